"""`--compressed NAME=llmlingua2:RATE[:MODEL]`: the base model given a compressed P instead of P (issue 25 §1).

The text-based compression rows of the paper's Table 1 (LLMLingua-2 at ×0.9, ×0.7, ×0.3). P is compressed with the
maintained `llmlingua` package, one message at a time (the roles, the turn order and every shot stay; each turn's
text is shortened), and the evaluations play the system with the compressed messages where the teacher has P's.

Which compressor runs (recorded with the compressed prompt, `Compressed.compressor`):

    LLMLingua-2   the token classifier (`PromptCompressor(use_llmlingua2=True)`) when its model folder is on
                  this machine: MODEL as a folder or a Hugging Face id in the local cache, by default either of
                  LLMLINGUA2_MODELS in the local cache. Newlines and the prompt's action keywords are its
                  `force_tokens` (always kept). Its family (xlm-roberta or bert) is read from the config, so a
                  folder of any name works; the kept words are put back with P's spacing (`spaced_as_in`).
    LLMLingua     the package's causal-LM compressor (LLMLingua v1, `PromptCompressor`) with the bundled SmolLM2
                  (or MODEL, a causal LM folder) otherwise: the CPU default. The same parts are kept through the
                  package's structured compression (`context_segs` with `compress=False` on each kept part).

Nothing is downloaded: every load is `local_files_only`, and llmlingua's one network use, tiktoken's cl100k_base
(it counts tokens with it, and loads it in `PromptCompressor.__init__`), is replaced while the compressor is built
by the target model's own tokenizer (`TokenCounter`): the only `tiktoken` name llmlingua reads is the one in
`llmlingua.prompt_compressor`, and it is put back right after. So the compressor's token counts, and the achieved
rate reported next to the requested one, are the target model's tokens (compressed / original, over P's texts).

LLMLingua v1 runs each text as ONE window (`iterative_size` = the text's length): the package's iterative windows
pass the KV cache back as a list of tensors, which transformers 5 no longer takes, and its loop leaves the last
partial window uncompressed; one window scores every token by the compressing model's perplexity in one forward.

A rate of 1.0 gives P back unchanged without running a compressor (the degenerate row: it equals the teacher).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from genpi import InputError
from genpi.catalog import PromptEntry

METHOD = "llmlingua2"
SPEC = f"NAME={METHOD}:RATE[:MODEL]"
# The LLMLingua-2 classifiers the authors published, looked up in the local Hugging Face cache (never downloaded).
LLMLINGUA2_MODELS = (
    "microsoft/llmlingua-2-xlm-roberta-large-meetingbank",
    "microsoft/llmlingua-2-bert-base-multilingual-cased-meetingbank",
)
# A classifier's family (its config's model_type) -> the name llmlingua's word-piece rules look for in model_name
LLMLINGUA2_FAMILIES = {"xlm-roberta": "xlm-roberta-large", "bert": "bert-base-multilingual-cased"}
FALLBACK_MODEL = "smollm2"  # the causal LM of LLMLingua v1 when no LLMLingua-2 classifier is on this machine
LLMLINGUA2, LLMLINGUA = "llmlingua-2 token classifier", "llmlingua causal LM"
FORCED = ("\n", ":")  # kept in every text: the line structure and the `Keyword:` layout of the action formats


@dataclass(frozen=True)
class CompressSpec:
    name: str
    rate: float  # requested: compressed tokens / original tokens
    model: str | None = None  # a folder or a Hugging Face id in the local cache; None: LLMLINGUA2_MODELS, else SmolLM2


@dataclass(frozen=True)
class Compressed:
    """One prompt's compressed P: what a `compressed` system is given instead of P, and how it was made."""

    name: str
    prompt_id: str
    prompt_sha256: str  # of the original P
    rate: float  # requested
    achieved_rate: float  # compressed / original tokens of P's texts, by the target model's tokenizer
    original_tokens: int
    compressed_tokens: int
    compressor: str  # LLMLINGUA2, LLMLINGUA, or "none (rate 1: P unchanged)"
    model: str | None  # the compressing model's folder
    force_tokens: tuple[str, ...]
    entry: PromptEntry  # the catalog entry with the compressed texts: entry.messages() is the compressed P

    def messages(self) -> list[dict]:
        return self.entry.messages()

    def to_json(self) -> dict:
        messages = self.messages()
        return {
            "name": self.name,
            "prompt_id": self.prompt_id,
            "prompt_sha256": self.prompt_sha256,
            "method": METHOD,
            "rate": self.rate,
            "achieved_rate": self.achieved_rate,
            "original_tokens": self.original_tokens,
            "compressed_tokens": self.compressed_tokens,
            "compressor": self.compressor,
            "model": self.model,
            "force_tokens": list(self.force_tokens),
            "text": "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages),
            "messages": messages,
        }

    def summary(self) -> dict:
        """What a result's metrics say about the system (its rates and its compressor)."""
        return {k: v for k, v in self.to_json().items() if k not in ("text", "messages", "force_tokens")}


def compressed_note(name: str, summary: dict) -> str:
    """A compressed system's line under a table of systems: its requested and achieved rate, its compressor."""
    return (
        f"compressed: {name}: rate {summary['rate']:.2f} requested, {summary['achieved_rate']:.2f} achieved "
        f"({summary['compressed_tokens']} of {summary['original_tokens']} tokens; {summary['compressor']})"
    )


def parse_compressed(specs: list[str]) -> list[CompressSpec]:
    """`--compressed NAME=llmlingua2:RATE[:MODEL]` values (their names are checked with the other systems':
    genpi.eval.systems.compressed_specs)."""
    out: list[CompressSpec] = []
    for spec in specs:
        name, _, target = spec.partition("=")
        method, _, rest = target.partition(":")
        rate_text, _, model = rest.partition(":")
        try:
            rate = float(rate_text)
        except ValueError:
            rate = None
        if method != METHOD or rate is None or not 0 < rate <= 1:
            raise InputError(
                f"--compressed {spec}: expected {SPEC} with RATE in (0, 1], e.g. llm9={METHOD}:0.9 "
                "(MODEL: a LLMLingua-2 or causal LM folder, or a Hugging Face id in the local cache)"
            )
        out.append(CompressSpec(name, rate, model or None))
    return out


def action_keywords(entry: PromptEntry) -> list[str]:
    """The literal parts of the prompt's action patterns (`actions.valid`, `actions.final`): their words (Think, Act,
    bash, CLICK, ...) and punctuation ([, ], (, ), `, ...), escapes such as \\s dropped; longest first, so that a
    longer keyword wins over its prefix."""
    words = set()
    for pattern in (entry.valid_action, entry.final_action):
        plain = re.sub(r"\\[A-Za-z]", " ", pattern or "")  # \s, \n, \d: classes, not text
        words.update(re.findall(r"[A-Za-z][A-Za-z_]+", plain))
        literal = re.sub(r"\\(.)", " ", plain)  # escaped punctuation is text; the rest of the symbols are syntax
        words.update(re.findall(r"\\([^\w\s])", plain))
        words.update(c for c in literal if not c.isalnum() and not c.isspace() and c not in ".^$*+?{}[]()|\\")
    return sorted(words, key=lambda w: (-len(w), w))


def find_model(model: str | None) -> tuple[str, str]:
    """(the compressing model's folder, LLMLINGUA2 or LLMLINGUA by its architecture), found on this machine only."""
    from genpi.models import resolve_model

    if model is None:
        for repo in LLMLINGUA2_MODELS:
            if folder := _cached(repo):
                return folder, LLMLINGUA2
        folder = resolve_model(FALLBACK_MODEL)
    elif Path(model).expanduser().is_dir():
        folder = str(Path(model).expanduser())
    elif not (folder := _cached(model)):
        raise InputError(
            f"--compressed: MODEL {model!r} is neither a folder nor in the local Hugging Face cache "
            "(nothing is downloaded)"
        )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if not any("ForTokenClassification" in a for a in config.architectures or ()):
        return folder, LLMLINGUA
    if config.model_type not in LLMLINGUA2_FAMILIES:  # said before the model loads
        raise InputError(
            f"--compressed: {folder} is a {config.model_type} classifier; LLMLingua-2 is "
            + " or ".join(LLMLINGUA2_FAMILIES)
        )
    return folder, LLMLINGUA2


def _cached(repo: str) -> str | None:
    """The local Hugging Face cache's snapshot of `repo`, or None (never a download)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    return folder if (Path(folder) / "config.json").exists() else None


WORD_SEP = "\t\t|\t\t"  # between llmlingua's labelled words (its default)


def spaced_as_in(text: str, words: list[tuple[str, bool]]) -> str | None:
    """The kept words of LLMLingua-2's labelled words (`text`'s words in order, True: kept), with `text`'s own spacing
    between them: its gap where no word was dropped between two kept words; where some were, its newlines, else the
    gap before the kept word (a space if two words P spaces apart would touch). None if a word is not in `text` (a
    character its tokenizer normalized): the package's text then. The package's own text is its tokenizer's
    detokenization, which spaces BERT's words apart ("Act : answer ( )") and loses the space before a force token of
    several pieces ("Act:answer"): the action formats P teaches."""
    out, pos, last_kept = [], 0, 0  # pos: the end of the last word found; last_kept: of the last word kept
    for word, keep in words:
        if not word.strip():
            continue  # a forced newline (or XLM-RoBERTa's lone "▁"): the gaps carry P's newlines
        at = text.find(word, pos)
        if at < 0:
            return None
        if keep:
            gap, span = text[pos:at], text[last_kept:at]
            if pos != last_kept and "\n" in span:
                gap = "\n" * span.count("\n")
            elif pos != last_kept and not out:
                gap = ""
            elif pos != last_kept and not gap and re.search(r"\s", span) and (out[-1][-1] + word[0]).isalnum():
                gap = " "  # two words that P spaces apart, not glued together by a dropped quote between them
            out.extend((gap, word))
            last_kept = at + len(word)
        pos = at + len(word)
    tail = text[last_kept:]
    out.append(tail if pos == last_kept else "\n" * tail.count("\n"))
    return "".join(out)


class TokenCounter:
    """What llmlingua asks of tiktoken's encoding (`encode`, `decode`), answered by the target model's tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


@contextlib.contextmanager
def _counting_with(tokenizer):
    """llmlingua's `tiktoken.encoding_for_model` gives a TokenCounter while the compressor is built (its
    constructor fetches cl100k_base otherwise); llmlingua's own module name only, put back after."""
    import types

    import llmlingua.prompt_compressor as pc

    saved = pc.tiktoken
    pc.tiktoken = types.SimpleNamespace(encoding_for_model=lambda _name: TokenCounter(tokenizer))
    try:
        yield
    finally:
        pc.tiktoken = saved


class Compressor:
    """An llmlingua `PromptCompressor` on one model, counting with the target model's tokenizer."""

    def __init__(self, model: str | None, tokenizer_path: str):
        import torch
        from llmlingua import PromptCompressor
        from transformers import AutoTokenizer

        self.folder, self.kind = find_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        config = {"trust_remote_code": False, "local_files_only": True}
        with _counting_with(self.tokenizer):
            self.llmlingua = PromptCompressor(
                self.folder, device_map=device, model_config=config, use_llmlingua2=self.kind == LLMLINGUA2
            )
        if self.kind == LLMLINGUA2:
            # llmlingua picks its word-piece rules by a substring of the model's name (its folder here): the name of
            # the config's family instead, so that a folder of any name (a local copy, a fine-tuned classifier) works
            self.llmlingua.model_name = LLMLINGUA2_FAMILIES[self.llmlingua.model.config.model_type]

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def compress_text(self, text: str, rate: float, keep: list[str]) -> str:
        """One text at `rate`, the `keep` strings (and runs of newlines) left whole."""
        if not text.strip():
            return text
        if self.kind == LLMLINGUA2:
            result = self.llmlingua.compress_prompt(
                [text],
                rate=rate,
                force_tokens=keep,
                use_context_level_filter=False,
                drop_consecutive=False,
                return_word_label=True,
                word_sep=WORD_SEP,
            )
            words = [w.rpartition(" ") for w in result["fn_labeled_original_prompt"].split(WORD_SEP)]
            return spaced_as_in(text, [(w, label == "1") for w, _, label in words]) or result["compressed_prompt"]
        forced = re.compile(r"\n+|" + "|".join(re.escape(k) if not k.isalnum() else rf"\b{k}\b" for k in keep))
        segments, last = [], 0
        for match in forced.finditer(text):
            if match.start() > last:
                segments.append((text[last : match.start()], True))
            if match.group():
                segments.append((match.group(), False))
            last = match.end()
        if last < len(text):
            segments.append((text[last:], True))
        whole = {
            "rate": rate,
            "iterative_size": len(self.llmlingua.tokenizer(text, add_special_tokens=False).input_ids),
            "use_context_level_filter": False,
        }
        segmented = {
            "context_segs": [[s for s, _ in segments]],
            "context_segs_rate": [[rate if free else 1.0 for _, free in segments]],
            "context_segs_compress": [[free for _, free in segments]],
        }
        try:
            return self.llmlingua.compress_prompt([text], **whole, **segmented)["compressed_prompt"]
        except AssertionError:  # llmlingua asserts its tokenizer decodes the text back; a text it does not: whole
            return self.llmlingua.compress_prompt([text], **whole)["compressed_prompt"]


class Compressions:
    """The compressed P of each prompt for every `--compressed` spec, each compressor loaded once per run."""

    def __init__(self, specs: list[CompressSpec], tokenizer_path: str):
        self.specs, self.tokenizer_path = specs, tokenizer_path
        self.compressors: dict[str | None, Compressor] = {}
        for spec in specs:  # a missing MODEL is bad input: said before any model loads
            if spec.model is not None:
                find_model(spec.model)

    def __call__(self, entry: PromptEntry) -> list[Compressed]:
        return [self.compress(entry, spec) for spec in self.specs]

    def compress(self, entry: PromptEntry, spec: CompressSpec) -> Compressed:
        if spec.rate >= 1.0:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
            n = sum(len(tokenizer.encode(m["content"], add_special_tokens=False)) for m in entry.messages())
            return Compressed(
                spec.name, entry.id, entry.sha256, 1.0, 1.0, n, n, "none (rate 1: P unchanged)", None, (), entry
            )
        if spec.model not in self.compressors:
            self.compressors[spec.model] = Compressor(spec.model, self.tokenizer_path)
        compressor = self.compressors[spec.model]
        keep = list(FORCED) + action_keywords(entry)
        shorten = lambda text: compressor.compress_text(text, spec.rate, keep)  # noqa: E731
        shots = [[{**turn, "content": shorten(turn["content"])} for turn in dialogue] for dialogue in entry.shots]
        short = replace(entry, system=shorten(entry.system) if entry.system else entry.system, shots=shots)
        original = sum(compressor.count(m["content"]) for m in entry.messages())
        compressed = sum(compressor.count(m["content"]) for m in short.messages())
        return Compressed(
            spec.name,
            entry.id,
            entry.sha256,
            spec.rate,
            compressed / original if original else 1.0,
            original,
            compressed,
            compressor.kind,
            compressor.folder,
            tuple(keep),
            short,
        )


def write_compressed(out: Path, compressed: Compressed) -> Path:
    """EVAL/compressed/NAME/PROMPT_ID.json: the compressed P beside the results, to inspect the row."""
    path = Path(out) / "compressed" / compressed.name / f"{compressed.prompt_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(compressed.to_json(), indent=2, ensure_ascii=False))
    return path
