"""Turn dialogue rows into token ids and labels (label -100 = no loss).

Both builders render chat messages with the tokenizer's own chat template, as the
engines do (`apply_chat_template(..., tokenize=False)`, then tokenize with
`add_special_tokens=False`). Loss masks are computed from character offsets, not
from `{% generation %}` markers, so any template works: each assistant message is
located in the rendered text (the text of messages[:k] plus the generation prompt
is a prefix of the whole; otherwise the search goes on in order after the previous
turn), and a token carries loss when its character span overlaps a labelled span.

A labelled assistant turn ends with its end-of-turn marker: the template text that
follows the content (`<|im_end|>` in ChatML, `</s>` in Llama-2 style), with trailing
whitespace left out. The `\\n` after `<|im_end|>` is template glue that the model
never generates (generation stops at `<|im_end|>`), so it carries no loss.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from difflib import SequenceMatcher

import torch

from genpi.catalog import PromptEntry, render_prompt_text

IGNORE = -100

# variant: (fields on the input side besides x, y_s, y_t; fields generated, with loss)
_PG = {
    "full": ((), ("prompt", "reason")),
    "no_reason": ((), ("prompt",)),
    "no_prompt": ((), ("reason",)),
    "r_to_p": (("reason",), ("prompt",)),
    "p_to_r": (("prompt",), ("reason",)),
}
PG_VARIANTS = tuple(_PG)
_HEADERS = {
    "input": "### Input",
    "as_is": "### AS-IS output (without the prompt)",
    "to_be": "### TO-BE output (with the prompt)",
    "prompt": "### Prompt",
    "reason": "### Reason",
}
_TASKS = {
    "prompt": "the prompt P that makes a model give the TO-BE output instead of the AS-IS output",
    "reason": "the reason why the AS-IS output should become the TO-BE output",
}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # input_ids where the token carries loss, IGNORE elsewhere
    truncated_tokens: int = 0  # tokens cut: to fit max_length, and from turns longer than max_turn_tokens
    kind: str = "sft"  # "sft" | "pg"
    agent_tokens: list[list[int]] = field(
        default_factory=list
    )  # sft: per agent turn kept, its labelled content positions
    # topk-kl: the labelled tokens that have the teacher's top-k (ascending positions), and per token the
    # teacher's top-k ids and log-probabilities ([len(topk_positions), k]; padded with id 0, log-prob -inf)
    topk_positions: list[int] = field(default_factory=list)
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None

    @property
    def loss_token_count(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def build_sft(
    row: dict, tokenizer, max_length: int, prompt: list[dict] = (), max_turn_tokens: int | None = None
) -> Example:
    """The teacher's dialogue without the prompt P; loss on agent turns only.

    `prompt` (the messages of P) puts P first, carrying no loss: the teacher's view, for
    the `prepend` and `kld` methods. Each agent turn's content is first cut to
    `max_turn_tokens` tokens (the reference's per-turn cap; the cut counts as truncated).

    Messages: [user: input, assistant: turn1, user: obs1, assistant: turn2, ...]
    (environment turns after the last agent turn are dropped: they carry no loss).
    ChatML (SmolLM2) renders, with labelled text in brackets:

        <|im_start|>system\\nYou are a helpful AI ...<|im_end|>\\n   (template default)
        <|im_start|>user\\n{input}<|im_end|>\\n
        <|im_start|>assistant\\n[{turn1}<|im_end|>]\\n
        <|im_start|>user\\n{obs1}<|im_end|>\\n
        <|im_start|>assistant\\n[{turn2}<|im_end|>]\\n

    Too long: whole trailing turns are cut (an agent turn with the observation
    before it); if input + turn1 still does not fit, turn1 is cut from its end.
    ValueError when not one token of turn1 fits after the input.
    """
    turns = list(row["turns"])
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
    if not turns or turns[0]["role"] != "assistant":
        raise ValueError("SFT example: the row has no agent turn (turns must start with the agent)")
    messages, capped = [{"role": "user", "content": row["input"]}], 0
    for t in turns:
        content, cut = _cap(t["content"], tokenizer, max_turn_tokens) if t["role"] == "assistant" else (t["content"], 0)
        messages.append({"role": t["role"], "content": content})
        capped += cut
    agent = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    fixed = [(m["role"], [(m["content"], False)]) for m in prompt]
    full = None
    for last in reversed(agent):  # keep turns up to this agent turn
        ids, labels, owner = _encode(tokenizer, fixed + [_pieces(m) for m in messages[: last + 1]])
        full = full if full is not None else len(ids)
        if len(ids) <= max_length:
            break
    else:
        ids, labels, owner = ids[:max_length], labels[:max_length], owner[:max_length]
        if all(label == IGNORE for label in labels):
            raise ValueError(f"SFT example: the input alone does not fit in max_length={max_length}")
    turn_tokens = [[p for p, k in enumerate(owner) if k == len(fixed) + i] for i in agent if i <= last]
    return Example(ids, labels, full - len(ids) + capped, "sft", turn_tokens)


def build_pg(
    row: dict, entry: PromptEntry, tokenizer, max_length: int, variant: str = "full", max_turn_tokens: int | None = None
) -> Example:
    """Prompt generation: from x, y_s and y_t, generate P and/or the reason r.

    Two messages; only P, r and the assistant end-of-turn carry loss (not headers):

        user:      Given ..., write {task}.\\n\\n### Input\\n{x}\\n\\n
                   ### AS-IS output (without the prompt)\\n{y_s}\\n\\n
                   ### TO-BE output (with the prompt)\\n{y_t}
                   [\\n\\n### Reason\\n{r}]   (r_to_p)    [\\n\\n### Prompt\\n{P}]   (p_to_r)
        assistant: full:              ### Prompt\\n[{P}]\\n\\n### Reason\\n[{r}<|im_end|>]
                   no_reason, r_to_p: ### Prompt\\n[{P}<|im_end|>]
                   no_prompt, p_to_r: ### Reason\\n[{r}<|im_end|>]

    P is `render_prompt_text(entry)`, y_t the teacher's first agent turn; y_s and y_t are
    first cut to `max_turn_tokens` tokens each, as agent turns are in `build_sft`.
    Too long: the reason is shortened first (kept to at least one token where it
    is the only target), then y_s and y_t (the longer first), then x, each from
    its end. P is never shortened: ValueError when it cannot fit.
    """
    if variant not in _PG:
        raise ValueError(f"unknown PG variant {variant!r} (known: {', '.join(PG_VARIANTS)})")
    given, targets = _PG[variant]
    fields = {
        "input": row["input"],
        "as_is": row["student_output"],
        "to_be": row["turns"][0]["content"],
        "prompt": render_prompt_text(entry),
        "reason": row["reason"],
    }
    missing = [n for n in ("input", "as_is", "to_be") + given + targets if fields[n] is None]
    if missing:
        columns = {"input": "input", "as_is": "student_output", "to_be": "turns[0]", "reason": "reason"}
        raise ValueError(f"PG example: the row has no {' or '.join(columns[n] for n in missing)}")
    capped = 0
    for n in ("as_is", "to_be"):
        fields[n], cut = _cap(fields[n], tokenizer, max_turn_tokens)
        capped += cut

    def encode() -> tuple[list[int], list[int]]:
        task = " then ".join(_TASKS[t] for t in targets)
        intro = "Given a user input, the output of a model without the prompt (AS-IS) and with it (TO-BE)"
        intro += "".join(f" and the {t}" for t in given) + f", write {task}."
        user = [intro] + [f"{_HEADERS[n]}\n{fields[n]}" for n in ("input", "as_is", "to_be") + given]
        reply: list[tuple[str, bool]] = []
        for n in targets:
            reply += [(("\n\n" if reply else "") + _HEADERS[n] + "\n", False), (fields[n], True)]
        return _encode(tokenizer, [("user", [("\n\n".join(user), False)]), ("assistant", reply)])[:2]

    ids, labels = encode()
    full = len(ids)
    floors = {"reason": 1 if targets == ("reason",) else 0}
    present = ("input", "as_is", "to_be") + given + targets
    tokens = {n: tokenizer(fields[n], add_special_tokens=False)["input_ids"] for n in present if n != "prompt"}
    for tier in (("reason",), ("as_is", "to_be"), ("input",)):
        tier = tuple(n for n in tier if n in present)
        while tier and len(ids) > max_length:
            room = {n: max(0, len(tokens[n]) - floors.get(n, 0)) for n in tier}
            if not any(room.values()):
                break
            cut = dict.fromkeys(tier, 0)
            for _ in range(min(len(ids) - max_length, sum(room.values()))):  # longest first
                cut[max(tier, key=lambda n: (len(tokens[n]) - cut[n]) if room[n] > cut[n] else -1)] += 1
            for n in (n for n in tier if cut[n]):
                tokens[n] = tokens[n][: len(tokens[n]) - cut[n]]
                fields[n] = tokenizer.decode(tokens[n], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            ids, labels = encode()
    if len(ids) > max_length:
        what = "the prompt P" if "prompt" in given + targets else "the example"
        raise ValueError(
            f"PG example ({variant}): {what} does not fit in max_length={max_length} "
            f"even with the reason, outputs and input cut ({len(ids)} tokens left)"
        )
    return Example(ids, labels, full - len(ids) + capped, "pg")


def cut_to_labels(example: Example, n: int) -> Example:
    """The example up to and including its n-th labelled token (the rest counts as truncated)."""
    positions = [p for p, label in enumerate(example.labels) if label != IGNORE]
    if n >= len(positions):
        return example
    end = positions[n - 1] + 1 if n else 0
    turns = [[p for p in turn if p < end] for turn in example.agent_tokens]
    return Example(
        example.input_ids[:end],
        example.labels[:end],
        example.truncated_tokens + len(example.input_ids) - end,
        example.kind,
        [t for t in turns if t],
    )


def align_topk(example: Example, teacher_topk: list[dict], k: int) -> int:
    """Attach the teacher's top-k to the labelled tokens of each agent turn; returns how many turns did not align.

    `teacher_topk[i]` holds the token ids the engine generated for agent turn i and, per token, its
    top-k ids and log-probabilities. The stored text was stripped and re-tokenized here, so the two
    token sequences can differ at their edges: the longest common run is used when it covers the
    turn's labelled content tokens but for at most one token at each end (a prefix, for a turn
    cut by max_turn_tokens or max_length). Tokens left without a teacher top-k (end-of-turn
    markers, unaligned turns) keep their hard label.
    """
    unaligned = max(0, len(example.agent_tokens) - len(teacher_topk))  # turns without a stored top-k
    found, ids, logprobs = [], [], []
    for positions, teacher in zip(example.agent_tokens, teacher_topk):
        ours = [example.input_ids[p] for p in positions]
        theirs = list(teacher["token_ids"] or []) if teacher else []
        a, b, n = SequenceMatcher(None, ours, theirs, autojunk=False).find_longest_match(0, len(ours), 0, len(theirs))
        if not ours or n == 0 or a > 1 or len(ours) - (a + n) > 1:
            unaligned += 1
            continue
        found += positions[a : a + n]
        ids += [list(row[:k]) for row in teacher["topk_ids"][b : b + n]]
        logprobs += [list(row[:k]) for row in teacher["topk_logprobs"][b : b + n]]
    width = max(map(len, ids), default=0)
    example.topk_positions = found
    example.topk_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids], dtype=torch.int32).reshape(
        len(ids), width
    )
    example.topk_logprobs = torch.tensor([row + [-math.inf] * (width - len(row)) for row in logprobs]).reshape(
        len(ids), width
    )
    return unaligned


def loss_spans(example: Example, tokenizer) -> list[str]:
    """The text of each run of labelled tokens, in order."""
    spans, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    spans += [run] if run else []
    return [tokenizer.decode(s, skip_special_tokens=False, clean_up_tokenization_spaces=False) for s in spans]


def loss_tokens(example: Example, tokenizer) -> str:
    """Only the labelled tokens, decoded (for tests and debugging)."""
    return "".join(loss_spans(example, tokenizer))


def _pieces(message: dict) -> tuple[str, list[tuple[str, bool]]]:
    return message["role"], [(message["content"], message["role"] == "assistant")]


def _cap(text: str, tokenizer, max_tokens: int | None) -> tuple[str, int]:
    """`text` cut to its first `max_tokens` tokens, and how many tokens were cut."""
    if max_tokens is None:
        return text, 0
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text, 0
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=False, clean_up_tokenization_spaces=False), len(
        ids
    ) - max_tokens


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode(tokenizer, chat: list[tuple[str, list[tuple[str, bool]]]]) -> tuple[list[int], list[int], list[int]]:
    """Render (role, [(text, labelled), ...]) messages; label the marked pieces of
    assistant messages plus each labelled assistant turn's end-of-turn marker.
    Returns (ids, labels, owner): owner[t] is the index in `chat` of the message whose
    labelled content token t is, -1 for other tokens (end-of-turn markers included)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("example builders need a fast tokenizer (offset mapping)")
    messages = [{"role": role, "content": "".join(text for text, _ in pieces)} for role, pieces in chat]
    text = _render(tokenizer, messages)
    mask = bytearray(len(text))
    owner = [-1] * len(text)
    cursor = 0
    for k, (role, pieces) in enumerate(chat):
        if role != "assistant" or not any(labelled for _, labelled in pieces):
            continue
        content = messages[k]["content"]
        head = _render(tokenizer, messages[:k], generation_prompt=True) if k else ""
        if text.startswith(head):
            cursor = max(cursor, len(head))
        start, shift = text.find(content, cursor), 0
        if start < 0:  # templates that trim the content
            start, shift = text.find(content.strip(), cursor), len(content) - len(content.lstrip())
            content = content.strip()
        if start < 0:
            raise ValueError(f"cannot find assistant message {k} in the text rendered by the chat template")
        end = start + len(content)
        offset = start - shift
        for text_piece, labelled in pieces:
            if labelled:
                a, b = max(start, offset), min(end, offset + len(text_piece))
                mask[a:b] = b"\x01" * max(0, b - a)
                owner[a:b] = [k] * max(0, b - a)
            offset += len(text_piece)
        upto = _render(tokenizer, messages[: k + 1])
        tail = upto[upto.rfind(content) + len(content) :]
        eot = os.path.commonprefix([tail, text[end:]]).rstrip()
        mask[end : end + len(eot)] = b"\x01" * len(eot)
        cursor = end + len(eot)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    spans = [(s, max(e, s + 1)) for s, e in enc["offset_mapping"]]
    labels = [t if any(mask[s:e]) else IGNORE for t, (s, e) in zip(ids, spans)]
    return ids, labels, [max(owner[s:e], default=-1) for s, e in spans]
