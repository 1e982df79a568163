"""`genpi eval efficiency`: what internalizing P saves, per turn, in three serving regimes.

One conversation of N turns (the prompt's held-out dialogues, else its shots),
tokenized once per system, costs per turn:

    with-P               the base model with P (today's deployment)
    internalized-merged  the adapter merged into the base, no P (the base's cost without P)
    internalized-lora    the adapter served unmerged, no P (+ r·(in + out) MACs per adapted layer and token)
    compressed-P         the base with a shortened P (--compressed-prompt)

in three regimes:

    no-cache             every turn re-reads the whole context (no KV cache across turns)
    conversation-cache   a KV cache carried across the turns of one conversation
    shared-prefix        the prompt's KV cache prefilled once per server and shared by every
                         conversation: a conversation pays only the attention over P's keys
                         (vLLM prefix caching, SGLang RadixAttention)

Within a turn every regime decodes with a KV cache. The shared prefix is the
tokens every conversation of a system starts with (P, or the chat template's
default system turn without P); its one-time prefill is reported apart.

MACs are counted analytically from the model config (FORMULA; the attention of a
prefill counted causally, as FlashAttention or vLLM compute it) and, to check that
count, by torch's FLOP counter running the same forwards on a weightless (meta
device) copy of the model with eager attention. Eager attention computes each
prefill block's full score matrix, masked upper triangle included, so the counter
is compared with the analytic count of that computation (`eager` below); the two
agree within CHECK_TOLERANCE or the run says so. Latency is the wall time of the
same forwards on the engine's model (the teacher's reply tokens fed back, so every
system decodes the same tokens), median of --repeats. A turn's decode forwards are
the same in every regime (the cache holds the whole context when decoding), so
they are counted and timed once per turn and shared by the regimes. KV bytes are those the
cache holds, at the config's dtype (what a server in that dtype holds).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from genpi import InputError

REGIMES = ("no-cache", "conversation-cache", "shared-prefix")
WITH_P, MERGED, LORA, COMPRESSED = "with-P", "internalized-merged", "internalized-lora", "compressed-P"
CHECK_TOLERANCE = 0.05
FORMULA = ("MACs per token = L·(d·(d_q + 2·d_kv) + d_q·d + 3·d·d_ff) [+ L·Σ_adapted r·(in + out), unmerged LoRA]; "
           "+ d·V per generated token (LM head); + 2·L·d_q per attended key (causal: a prefill token attends to the "
           "cached keys and to itself and the tokens before it; GQA shrinks the KV cache, not these MACs); "
           "FLOPs = 2·MACs; KV bytes = 2·L·d_kv·(bytes per value) per token held. "
           "d_q = heads·head_dim (= d here), d_kv = kv_heads·head_dim.")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}
CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "model-configs"  # configs shipped with the repo
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ROW_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("system", pa.string()),
        ("regime", pa.string()),
        ("turn", pa.int32()),
        ("cached_tokens", pa.int64()),  # KV tokens held when the turn's prefill starts
        ("prefill_tokens", pa.int64()),
        ("generated_tokens", pa.int64()),  # decode forwards: generated - 1
        ("prefill_macs", pa.int64()),
        ("decode_macs", pa.int64()),
        ("cumulative_macs", pa.int64()),
        ("counted_prefill_flops", pa.int64()),  # torch's FLOP counter (eager attention); null with --model-config
        ("counted_decode_flops", pa.int64()),
        ("eager_flops", pa.int64()),  # the analytic count of what eager attention computes
        ("kv_bytes", pa.int64()),  # per conversation at the turn's end (shared-prefix: P's KV not counted)
        ("kv_bytes_concurrent", pa.int64()),  # --concurrent conversations (shared-prefix: P's KV once)
        ("kv_bytes_measured", pa.int64()),  # the engine's cache tensors at the turn's end (engine dtype); null if not timed
        ("prefill_s", pa.float64()),  # median over repeats; null if not timed
        ("decode_s", pa.float64()),
    ]
)


@dataclass(frozen=True)
class Dims:
    """The sizes of a Llama-style decoder (gated MLP) that its MACs depend on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype: str

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_macs(self) -> int:
        """Per token through the decoder layers (attention projections and MLP)."""
        d = self.hidden
        return self.layers * (d * (self.q_dim + 2 * self.kv_dim) + self.q_dim * d + 3 * d * self.intermediate)

    @property
    def head_macs(self) -> int:
        return self.hidden * self.vocab

    @property
    def key_macs(self) -> int:
        """Per query token and attended key: the score q·k and the weighted value, in every layer."""
        return 2 * self.layers * self.q_dim

    @property
    def kv_token_bytes(self) -> int:
        return 2 * self.layers * self.kv_dim * DTYPE_BYTES.get(self.dtype, 2)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of a decoder layer, by its module name."""
        d, f = self.hidden, self.intermediate
        return {"q_proj": (d, self.q_dim), "k_proj": (d, self.kv_dim), "v_proj": (d, self.kv_dim), "o_proj": (self.q_dim, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}  # fmt: skip

    def lora_macs(self, rank: int, targets: list[str]) -> int:
        """Per token: an unmerged LoRA's extra MACs, r·(in + out) per adapted layer."""
        shapes = self.shapes()
        unknown = sorted(set(targets) - set(shapes))
        if unknown:
            raise InputError(f"LoRA target modules {', '.join(unknown)}: not among {', '.join(shapes)} (a Llama-style model's linear layers)")
        return self.layers * sum(rank * sum(shapes[t]) for t in targets)


def read_config(name_or_path: str | Path) -> tuple[dict, str]:
    """A model config (config.json as a dict) and where it came from: a .json file, a folder with
    config.json, or the name of a config shipped in examples/model-configs/ (e.g. llama-3-8b)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists() and (CONFIGS / f"{name_or_path}.json").exists():
        path = CONFIGS / f"{name_or_path}.json"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
        raise InputError(f"--model-config {name_or_path}: no such config file or folder with config.json (shipped: {shipped})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--model-config {path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise InputError(f"--model-config {path}: expected a JSON object")
    return config, str(path)


def dims_of(config: dict, source: str) -> Dims:
    config = config.get("text_config", config)
    need = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if not isinstance(config.get(k), int) or config[k] < 1]
    if missing:
        raise InputError(f"{source}: the model config lacks {', '.join(missing)} (a positive integer each)")
    heads = config["num_attention_heads"]
    return Dims(layers=config["num_hidden_layers"], hidden=config["hidden_size"], heads=heads,
                kv_heads=config.get("num_key_value_heads") or heads, head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                intermediate=config["intermediate_size"], vocab=config["vocab_size"],
                dtype=str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"))  # fmt: skip


@dataclass(frozen=True)
class Turn:
    """What the model processes in one turn: a prefill after `cached` KV tokens, then generation."""

    cached: int
    prefill: int
    generated: int  # tokens generated; the last one is fed back only in the next turn's prefill

    @property
    def held(self) -> int:
        """KV tokens held at the turn's end."""
        return self.cached + self.prefill + self.generated - 1


@dataclass
class Conversation:
    """One system's view of the conversation, in tokens."""

    system: str
    ids: list[int]  # the whole conversation's token ids
    prefix: int  # leading tokens every conversation of this system shares (P, or the template's default system turn)
    contexts: list[int]  # tokens before each reply
    generated: list[int]  # tokens each reply generates, its end-of-turn token included
    lora_macs: int = 0  # per token, an unmerged adapter's extra MACs
    lora: tuple[int, list[str]] | None = None  # (rank, target modules) of that adapter
    adapter: str | None = None  # its name on the engine (None: a fresh LoRA of that shape is timed)

    def turns(self, regime: str) -> list[Turn]:
        out, held = [], 0 if regime != "shared-prefix" else self.prefix
        for context, generated in zip(self.contexts, self.generated):
            cached = 0 if regime == "no-cache" else held
            out.append(Turn(cached, context - cached, generated))
            held = out[-1].held
        return out


def prefill_macs(dims: Dims, turn: Turn, lora_macs: int = 0, eager: bool = False) -> int:
    """A prefill's MACs; its last position's logits give the first generated token. `eager`: every prefill
    token against every key of the block, as eager attention computes it (the masked scores included)."""
    n, c = turn.prefill, turn.cached
    pairs = n * (c + n) if eager else n * c + n * (n + 1) // 2
    return n * (dims.linear_macs + lora_macs) + dims.head_macs + dims.key_macs * pairs


def decode_macs(dims: Dims, turn: Turn, lora_macs: int = 0) -> int:
    """generated - 1 single-token forwards; forward j attends the context and j generated keys."""
    steps, context = turn.generated - 1, turn.cached + turn.prefill
    return steps * (dims.linear_macs + lora_macs + dims.head_macs) + dims.key_macs * (steps * context + steps * (steps + 1) // 2)


def kv_bytes(dims: Dims, conv: Conversation, turn: Turn, regime: str, concurrent: int) -> tuple[int, int]:
    """(per conversation, for `concurrent` conversations) at the turn's end; shared-prefix holds P's KV once per server."""
    shared = conv.prefix if regime == "shared-prefix" else 0
    own = (turn.held - shared) * dims.kv_token_bytes
    return own, concurrent * own + shared * dims.kv_token_bytes


# ---- the conversation


def conversation_pairs(entry, data: str | None, n_turns: int) -> tuple[list[tuple[str, str]], str]:
    """N (user, agent) turns taken in order from the held-out dialogues of a run, else from the shots."""
    if data:
        from genpi.eval.fidelity import heldout_rows

        rows = heldout_rows(data, entry)
        dialogues = [[{"role": "user", "content": r["input"]}, *r["turns"]] for r in rows]
        source = f"held-out dialogues of {data}"
    else:
        dialogues, source = entry.shots, "the prompt's shots"
    pairs, used = [], 0
    for dialogue in dialogues:
        if len(pairs) == n_turns:
            break
        used += 1
        for user, agent in zip(dialogue[::2], dialogue[1::2]):
            if user["role"] != "user" or agent["role"] != "assistant":
                break
            pairs.append((user["content"], agent["content"]))
            if len(pairs) == n_turns:
                break
    if len(pairs) < n_turns:
        raise InputError(f"--turns {n_turns}: {source} hold only {len(pairs)} agent turns of {entry.id!r}; "
                         "ask for fewer turns or pass --data RUN with held-out dialogues")  # fmt: skip
    return pairs, f"{source}: {n_turns} agent turns from {used} dialogue(s), in order"


def tokenize(tokenizer, system: str, prefix_messages: list[dict], pairs: list[tuple[str, str]]) -> Conversation:
    def encode(messages, generation_prompt):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    messages = list(prefix_messages)
    for user, agent in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": agent}]
    ids = encode(messages, False)
    # the tokens every conversation of this system starts with: those two different first user turns share
    a, b = (encode(prefix_messages + [{"role": "user", "content": text}], False) for text in ("a", "b"))
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    contexts, generated = [], []
    for k in range(len(pairs)):
        context = encode(messages[: len(prefix_messages) + 2 * k + 1], True)
        if ids[: len(context)] != context:
            raise InputError(f"{tokenizer.name_or_path}: the chat template does not render turn {k + 1} as a prefix of "
                             "the later turns, so a KV cache cannot be carried across them")  # fmt: skip
        reply = ids[len(context) :]
        end = next((i for i, t in enumerate(reply) if t == tokenizer.eos_token_id), len(reply) - 1)
        contexts.append(len(context))
        generated.append(end + 1)
    return Conversation(system, ids, prefix, contexts, generated)


# ---- measurements


class _Timer:
    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.value = time.perf_counter() - self.start


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    class Counter(FlopCounterMode):
        def __exit__(self, *exc):
            super().__exit__(*exc)
            self.value = self.get_total_flops()

    return Counter(display=False)


def replay(model, ids, turns: list[Turn], measure, decode: bool = True) -> list[tuple]:
    """Run one regime's forwards over the conversation: per turn (prefill measure, decode measure, cache bytes
    at the turn's end). `measure()` gives a context manager with `.value` after it exits. decode=False feeds
    the generated tokens in one unmeasured forward instead (decode measure None): the decode forwards are the
    same in every regime, as the cache holds the whole context when decoding, so they are measured once."""
    import torch
    from transformers import DynamicCache

    def forward(cache, start, stop):
        model(input_ids=ids[:, start:stop], cache=cache, use_cache=True, logits_to_keep=1)

    shared, cache, out = None, None, []
    with torch.no_grad():
        if turns[0].cached:  # shared-prefix: the server prefilled P once, before any conversation
            shared = DynamicCache()
            forward(shared, 0, turns[0].cached)
        for turn in turns:
            if turn.cached == 0:
                cache = DynamicCache()
            elif cache is None:
                cache = copy.deepcopy(shared)
            assert cache.get_seq_length() == turn.cached, (cache.get_seq_length(), turn)
            start = turn.cached + turn.prefill
            with measure() as prefill:
                forward(cache, turn.cached, start)
            decoded = None
            if decode:
                with measure() as decoded:
                    for j in range(turn.generated - 1):
                        forward(cache, start + j, start + j + 1)
            elif turn.generated > 1:
                forward(cache, start, start + turn.generated - 1)
            held = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
            out.append((prefill.value, decoded and decoded.value, held))
    return out


def replay_regimes(model, ids, conv: Conversation, measure) -> dict[str, list[tuple]]:
    """`replay` in every regime, the decode forwards measured in the first (no-cache) and shared by the others."""
    out = {REGIMES[0]: replay(model, ids, conv.turns(REGIMES[0]), measure)}
    for regime in REGIMES[1:]:
        runs = replay(model, ids, conv.turns(regime), measure, decode=False)
        out[regime] = [(p, first[1], held) for (p, _, held), first in zip(runs, out[REGIMES[0]])]
    return out


def meta_model(config: dict, lora: tuple[int, list[str]] | None):
    """A weightless copy of the model (meta device, eager attention), with an unmerged LoRA if given."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora[0], target_modules=list(lora[1])))
    return model.eval()


def counted_flops(config: dict, conv: Conversation) -> dict[str, list[tuple[int, int]]]:
    """Per regime, per turn: torch's FLOP counter over the prefill's forward and the decode's forwards."""
    import torch

    ids = torch.zeros(1, len(conv.ids), dtype=torch.long, device="meta")
    return {r: [(int(p), int(d)) for p, d, _ in runs] for r, runs in replay_regimes(meta_model(config, conv.lora), ids, conv, _flop_counter).items()}


def timed(engine, conv: Conversation, repeats: int) -> dict[str, list[tuple[float, float, int]]]:
    """Per regime, per turn: median prefill and decode seconds on the engine's model (decode timed once per turn,
    see `replay`), and the cache's bytes."""
    import torch

    ids = torch.tensor([conv.ids], device=engine.device)
    with engine.serving(conv.adapter):
        runs = [replay_regimes(engine.model, ids, conv, lambda: _Timer(engine.device)) for _ in range(repeats)]
    return {regime: [(statistics.median(r[regime][k][0] for r in runs), statistics.median(r[regime][k][1] for r in runs), runs[0][regime][k][2])
                     for k in range(len(conv.contexts))] for regime in REGIMES}  # fmt: skip


def add_fresh_lora(engine, lora: tuple[int, list[str]]) -> str:
    """Time an unmerged LoRA of the adapter's shape without a trained one (the weights do not change the cost)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=lora[0], target_modules=list(lora[1]))
    if isinstance(engine.model, PeftModel):
        engine.model.add_adapter("fresh_lora", config)
    else:
        engine.model = get_peft_model(engine.model, config, adapter_name="fresh_lora").eval()
    return "fresh_lora"


# ---- the whole evaluation


def lora_shape(adapters: str | None, entry, base_path: str):
    """(rank, target modules, where from, the checked adapter System or None)."""
    if adapters:
        from genpi.eval.serve import adapter_dirs, prompt_systems

        systems, missing = prompt_systems(entry, adapter_dirs([adapters]), base_path)
        if missing:
            raise InputError(f"--adapters {adapters}: {missing[0]}")
        config = json.loads((systems[-1].folder / "adapter_config.json").read_text())
        targets = config["target_modules"]
        if isinstance(targets, str) and targets != "all-linear":
            raise InputError(f"{systems[-1].folder}/adapter_config.json: target_modules {targets!r} is a pattern; name the modules")
        if config.get("rank_pattern"):
            raise InputError(f"{systems[-1].folder}/adapter_config.json: a rank_pattern (per-module ranks) is not counted")
        return config["r"], sorted(LINEAR_NAMES if targets == "all-linear" else targets), str(systems[-1].folder), systems[-1]
    from genpi.train.qlora import LoraSettings

    settings = LoraSettings()
    targets = LINEAR_NAMES if settings.target_modules == "all-linear" else settings.target_modules
    return settings.r, sorted(targets), "genpi train's default LoRA settings (no --adapters)", None


def evaluate(catalog, prompt_id: str, data=None, adapters=None, turns: int = 5, compressed_prompt=None, concurrent: int = 1,
             model_config=None, prompt_tokens: int | None = None, base: str = "smollm2", repeats: int = 3,
             out=None, command: list[str] | None = None) -> dict:  # fmt: skip
    from transformers import AutoTokenizer

    from genpi.catalog import load_catalog
    from genpi.models import resolve_model

    for flag, value in (("turns", turns), ("concurrent", concurrent), ("repeats", repeats), ("prompt-tokens", prompt_tokens)):
        if value is not None and value < 1:
            raise InputError(f"--{flag} must be at least 1, got {value}")
    if prompt_tokens is not None and not model_config:
        raise InputError("--prompt-tokens counts P as N tokens for the analytic part alone; it needs --model-config")
    entries = {e.id: e for e in load_catalog(catalog)}
    if prompt_id not in entries:
        raise InputError(f"--prompt {prompt_id}: not in {catalog} (it has {', '.join(entries)})")
    entry = entries[prompt_id]
    base_path = resolve_model(base)
    config, config_source = read_config(model_config or base_path)
    dims = dims_of(config, config_source)
    rank, targets, lora_source, adapter_system = lora_shape(adapters, entry, base_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    pairs, conversation_source = conversation_pairs(entry, data, turns)

    convs = [tokenize(tokenizer, WITH_P, entry.messages(), pairs), tokenize(tokenizer, MERGED, [], pairs)]
    lora = tokenize(tokenizer, LORA, [], pairs)
    lora.lora_macs, lora.lora = dims.lora_macs(rank, targets), (rank, targets)
    lora.adapter = adapter_system.adapter if adapter_system else None
    convs.append(lora)
    if compressed_prompt:
        path = Path(compressed_prompt)
        text = path.read_text(encoding="utf-8").strip() if path.is_file() else None
        if not text:
            raise InputError(f"--compressed-prompt {path}: {'empty' if text == '' else 'no such file'}")
        convs.append(tokenize(tokenizer, COMPRESSED, [{"role": "system", "content": text}], pairs))
        if convs[-1].prefix > convs[0].prefix:
            raise InputError(f"--compressed-prompt {path}: {convs[-1].prefix} tokens, longer than P ({convs[0].prefix} tokens)")
    if prompt_tokens is not None:  # P adds prompt_tokens to every context (the conversation keeps its own tokens)
        shift = prompt_tokens - (convs[0].prefix - convs[1].prefix)
        convs[0].prefix += shift
        convs[0].contexts = [c + shift for c in convs[0].contexts]

    counted = timings = None
    form = None
    if not model_config:
        print(f"genpi eval efficiency: {entry.id}: counting FLOPs (meta-device copy, eager attention)", file=sys.stderr)
        counted = {c.system: counted_flops(config, c) for c in convs}
        from genpi.eval.serve import load_engine, served_as

        engine = load_engine(base_path, [adapter_system] if adapter_system else [])
        if not adapter_system:
            lora.adapter = add_fresh_lora(engine, lora.lora)
        form = served_as(engine, [adapter_system] if adapter_system else [])
        print(f"genpi eval efficiency: {entry.id}: timing {len(convs)} systems × {len(REGIMES)} regimes × {repeats} repeats", file=sys.stderr)
        timings = {c.system: timed(engine, c, repeats) for c in convs}

    result = summarize(entry.id, dims, convs, concurrent, counted, timings)
    result.update({
        "command": command, "catalog": str(catalog), "model_config": config_source, "dims": asdict(dims),
        "tokenizer": tokenizer.name_or_path, "formula": FORMULA, "conversation": conversation_source,
        "prompt_tokens": f"P adds {prompt_tokens} tokens to every context (--prompt-tokens)" if prompt_tokens is not None else None,
        "lora": {"rank": rank, "targets": targets, "from": lora_source},
        "concurrent": concurrent, "kv_dtype": dims.dtype,
        "latency": {"served_as": form, "repeats": repeats, "note": "wall time on this machine's engine; prefill one forward, decode one forward per token"} if timings else None,
        "merged_latency": "the merged adapter has the base's shapes: its cost and latency are the base's without P",
    })  # fmt: skip
    if out:
        write_outputs(Path(out), result)
    return result


def summarize(prompt_id, dims: Dims, convs: list[Conversation], concurrent: int, counted=None, timings=None) -> dict:
    systems, rows, worst = {}, [], {r: 0.0 for r in REGIMES}
    for conv in convs:
        regimes = {}
        for regime in REGIMES:
            turns, total = [], 0
            for k, turn in enumerate(conv.turns(regime)):
                pm, dm = prefill_macs(dims, turn, conv.lora_macs), decode_macs(dims, turn, conv.lora_macs)
                total += pm + dm
                own, together = kv_bytes(dims, conv, turn, regime, concurrent)
                row = {"prompt_id": prompt_id, "system": conv.system, "regime": regime, "turn": k + 1, "cached_tokens": turn.cached,
                       "prefill_tokens": turn.prefill, "generated_tokens": turn.generated, "prefill_macs": pm, "decode_macs": dm,
                       "cumulative_macs": total, "eager_flops": 2 * (prefill_macs(dims, turn, conv.lora_macs, eager=True) + dm),
                       "kv_bytes": own, "kv_bytes_concurrent": together}  # fmt: skip
                if counted:
                    row["counted_prefill_flops"], row["counted_decode_flops"] = counted[conv.system][regime][k]
                    diff = abs(sum(counted[conv.system][regime][k]) - row["eager_flops"]) / row["eager_flops"]
                    worst[regime] = max(worst[regime], diff)
                if timings:
                    row["prefill_s"], row["decode_s"], row["kv_bytes_measured"] = timings[conv.system][regime][k]
                turns.append(row)
            rows += turns
            regimes[regime] = {"turns": turns, "total": _total(turns)}
        shared = Turn(0, conv.prefix, 1)
        systems[conv.system] = {"prefix_tokens": conv.prefix, "contexts": conv.contexts, "generated": conv.generated,
                                "lora_macs_per_token": conv.lora_macs, "shared_prefix_prefill_macs": prefill_macs(dims, shared, conv.lora_macs),
                                "regimes": regimes}  # fmt: skip
    ratios = {name: {r: _ratio(s["regimes"][r], systems[WITH_P]["regimes"][r]) for r in REGIMES} for name, s in systems.items() if name != WITH_P}
    check = None
    if counted:
        check = {"compared": "torch FLOP counter vs the analytic count of the same forwards as eager attention computes them",
                 "max_relative_difference": worst, "tolerance": CHECK_TOLERANCE,
                 "agree": all(v <= CHECK_TOLERANCE for v in worst.values())}  # fmt: skip
    return {"prompt_id": prompt_id, "systems": systems, "ratios": ratios, "counter_check": check, "rows": rows}


def _total(turns: list[dict]) -> dict:
    total = {k: sum(t[k] for t in turns) for k in ("prefill_tokens", "generated_tokens", "prefill_macs", "decode_macs")}
    total["macs"] = total["prefill_macs"] + total["decode_macs"]
    total["flops"] = 2 * total["macs"]
    total["kv_bytes_peak"] = max(t["kv_bytes"] for t in turns)
    total["kv_bytes_concurrent_peak"] = max(t["kv_bytes_concurrent"] for t in turns)
    if "prefill_s" in turns[0]:
        total["prefill_s"] = sum(t["prefill_s"] for t in turns)
        total["decode_s"] = sum(t["decode_s"] for t in turns)
        total["latency_s"] = total["prefill_s"] + total["decode_s"]
    return total


def _ratio(system: dict, with_p: dict) -> dict:
    from genpi.eval.metrics import ratio

    out = {k: ratio(v, with_p["total"][k]) for k, v in system["total"].items() if not k.endswith("_tokens")}
    out["macs_per_turn"] = [ratio(s["prefill_macs"] + s["decode_macs"], w["prefill_macs"] + w["decode_macs"])
                            for s, w in zip(system["turns"], with_p["turns"])]  # fmt: skip
    if "prefill_s" in with_p["turns"][0]:
        out["latency_per_turn"] = [ratio(s["prefill_s"] + s["decode_s"], w["prefill_s"] + w["decode_s"])
                                   for s, w in zip(system["turns"], with_p["turns"])]  # fmt: skip
    return out


def write_outputs(out: Path, result: dict) -> None:
    """Rows as EVAL/efficiency/prompt_id=ID/system=NAME/part-00000.parquet; EVAL/efficiency.json keeps one
    result per prompt (this run's replaces the prompt's earlier one); the plot as EVAL/efficiency-ID.png."""
    from genpi.data.store import results_path, write_table

    for system in result["systems"]:
        rows = [r for r in result["rows"] if r["system"] == system]
        write_table(results_path(out, "efficiency", result["prompt_id"], system), rows, ROW_SCHEMA)
    from genpi.eval.report import keep_per_prompt

    summary = {k: v for k, v in result.items() if k != "rows"}
    keep_per_prompt(out / "efficiency.json", summary)
    plot(summary, out / f"efficiency-{result['prompt_id']}.png")


def plot(result: dict, path: Path) -> str:
    """Cumulative MACs over turns, per-turn latency and KV bytes, per system and regime (the paper's figures' style)."""
    from genpi.eval.report import _figure, _lines

    def series(key, cumulative=False):
        out = {}
        for name, s in result["systems"].items():
            for regime, r in s["regimes"].items():
                values = [t.get(key) if isinstance(key, str) else key(t) for t in r["turns"]]
                if None in values:
                    return {}
                out[f"{name} / {regime}"] = [sum(values[: k + 1]) for k in range(len(values))] if cumulative else values
        return out

    panels = [(f"cumulative GMACs: {result['prompt_id']}", _lines({k: [v / 1e9 for v in vs] for k, vs in series('cumulative_macs').items()}, "turn", "GMACs")),
              (f"KV cache per conversation ({result['kv_dtype']})", _lines({k: [v / 2**20 for v in vs] for k, vs in series('kv_bytes').items()}, "turn", "MiB"))]  # fmt: skip
    latency = series(lambda t: None if t.get("prefill_s") is None else t["prefill_s"] + t["decode_s"])
    if latency:
        panels.insert(1, ("latency per turn (prefill + decode)", _lines(latency, "turn", "seconds")))
    return _figure(path, panels)


def format_summary(result: dict) -> str:
    lines = [f"{result['prompt_id']}: {result['conversation']}; model config {result['model_config']}; tokens by {result['tokenizer']}",
             f"LoRA r={result['lora']['rank']} on {', '.join(result['lora']['targets'])} ({result['lora']['from']})",
             f"formula: {result['formula']}"]  # fmt: skip
    if result.get("prompt_tokens"):
        lines.append(result["prompt_tokens"])
    check = result["counter_check"]
    if check:
        worst = ", ".join(f"{r} {v:.2%}" for r, v in check["max_relative_difference"].items())
        lines.append(f"counter check ({check['compared']}): max difference {worst}: {'agree' if check['agree'] else 'DISAGREE'} within {check['tolerance']:.0%}")
    timed_ = result["latency"] is not None
    if timed_:
        lines.append(f"latency: {result['latency']['served_as']}, median of {result['latency']['repeats']} ({result['latency']['note']})")
    for regime in REGIMES:
        lines += ["", f"{regime}, over {len(result['systems'][WITH_P]['contexts'])} turns (ratio: system / with-P)"]
        header = f"{'system':<20} {'prefill tok':>11} {'GMACs pre':>10} {'GMACs dec':>10} {'GMACs':>9} {'ratio':>6} {'KV MiB':>8} {'KV×C MiB':>9} {'ratio':>6}"
        lines.append(header + (f" {'s pre':>7} {'s dec':>7} {'ratio':>6}" if timed_ else ""))
        for name, s in result["systems"].items():
            t = s["regimes"][regime]["total"]
            q = result["ratios"].get(name, {}).get(regime, {})
            line = (f"{name:<20} {t['prefill_tokens']:>11} {t['prefill_macs'] / 1e9:>10.2f} {t['decode_macs'] / 1e9:>10.2f} {t['macs'] / 1e9:>9.2f} "
                    f"{_r(q.get('macs', 1.0)):>6} {t['kv_bytes_peak'] / 2**20:>8.2f} {t['kv_bytes_concurrent_peak'] / 2**20:>9.2f} {_r(q.get('kv_bytes_concurrent_peak', 1.0)):>6}")  # fmt: skip
            if timed_:
                line += f" {t['prefill_s']:>7.3f} {t['decode_s']:>7.3f} {_r(q.get('latency_s', 1.0)):>6}"
            lines.append(line)
        for name, q in result["ratios"].items():
            per_turn = " ".join(_r(v) for v in q[regime]["macs_per_turn"])
            lines.append(f"  {name}: MACs ratio per turn {per_turn}" + (f"; latency ratio per turn {' '.join(_r(v) for v in q[regime]['latency_per_turn'])}" if timed_ else ""))
    lines.append("")
    lines.append("shared-prefix: the prefix's one-time prefill per server (GMACs): "
                 + ", ".join(f"{n} {s['prefix_tokens']} tokens {s['shared_prefix_prefill_macs'] / 1e9:.2f}" for n, s in result["systems"].items()))  # fmt: skip
    return "\n".join(lines)


def _r(value) -> str:
    return "–" if value is None else f"{value:.3f}"


__all__ = ["Conversation", "Dims", "FORMULA", "REGIMES", "Turn", "decode_macs", "dims_of", "evaluate", "format_summary", "prefill_macs"]
