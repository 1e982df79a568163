"""The analytic cost model of genpi eval efficiency: MACs, FLOPs and KV bytes per turn from a model config.

One conversation of N turns, per system (genpi.eval.efficiency names them), costs per turn in three regimes:

    no-cache             every turn re-reads the whole context (no KV cache across turns)
    conversation-cache   a KV cache carried across the turns of one conversation
    shared-prefix        the prompt's KV cache prefilled once per server and shared by every
                         conversation: a conversation pays only the attention over P's keys
                         (vLLM prefix caching, SGLang RadixAttention)

Within a turn every regime decodes with a KV cache. The shared prefix is the tokens every conversation of a
system starts with (P, or the chat template's default system turn without P); its one-time prefill is reported
apart. MACs follow FORMULA, the attention of a prefill counted causally (as FlashAttention or vLLM compute it);
`prefill_macs(eager=True)` counts what eager attention computes instead (the masked upper triangle included), the
number torch's FLOP counter is checked against (genpi.eval.cost_measure). KV bytes are those the cache holds,
at the config's dtype. Nothing here loads a model: a config (config.json) and token counts are all it needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from genpi import InputError
from genpi.eval.metrics import ratio

REGIMES = ("no-cache", "conversation-cache", "shared-prefix")
WITH_P, MERGED, LORA, COMPRESSED = "with-P", "internalized-merged", "internalized-lora", "compressed-P"
ICAE = "icae-slots"  # the base with P's k memory slots in P's place (genpi.train.icae)
CHECK_TOLERANCE = 0.05
FORMULA = (
    "MACs per token = L·(d·(d_q + 2·d_kv) + d_q·d + 3·d·d_ff) [+ L·Σ_adapted r·(in + out), unmerged LoRA]; "
    "+ d·V per generated token (LM head); + 2·L·d_q per attended key (causal: a prefill token attends to the "
    "cached keys and to itself and the tokens before it; GQA shrinks the KV cache, not these MACs); "
    "FLOPs = 2·MACs; KV bytes = 2·L·d_kv·(bytes per value) per token held. "
    "d_q = heads·head_dim (= d here), d_kv = kv_heads·head_dim."
)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}
CONFIGS = Path(__file__).resolve().parent / "model_configs"  # configs shipped in the package (package data)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
        return {
            "q_proj": (d, self.q_dim),
            "k_proj": (d, self.kv_dim),
            "v_proj": (d, self.kv_dim),
            "o_proj": (self.q_dim, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }

    def lora_macs(self, rank: int, targets: list[str]) -> int:
        """Per token: an unmerged LoRA's extra MACs, r·(in + out) per adapted layer."""
        shapes = self.shapes()
        unknown = sorted(set(targets) - set(shapes))
        if unknown:
            raise InputError(
                f"LoRA target modules {', '.join(unknown)}: not among {', '.join(shapes)} "
                "(a Llama-style model's linear layers)"
            )
        return self.layers * sum(rank * sum(shapes[t]) for t in targets)


def read_config(name_or_path: str | Path) -> tuple[dict, str]:
    """A model config (config.json as a dict) and where it came from: a .json file, a folder with
    config.json, or the name of a config shipped in genpi/eval/model_configs/ (e.g. llama-3-8b)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists() and (CONFIGS / f"{name_or_path}.json").exists():
        path = CONFIGS / f"{name_or_path}.json"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
        raise InputError(
            f"--model-config {name_or_path}: no such config file or folder with config.json (shipped: {shipped})"
        )
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
    return Dims(
        layers=config["num_hidden_layers"],
        hidden=config["hidden_size"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate=config["intermediate_size"],
        vocab=config["vocab_size"],
        dtype=str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"),
    )


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
    return steps * (dims.linear_macs + lora_macs + dims.head_macs) + dims.key_macs * (
        steps * context + steps * (steps + 1) // 2
    )


def kv_bytes(dims: Dims, conv: Conversation, turn: Turn, regime: str, concurrent: int) -> tuple[int, int]:
    """(per conversation, for `concurrent` conversations) at the turn's end; shared-prefix holds P's KV once per
    server."""
    shared = conv.prefix if regime == "shared-prefix" else 0
    own = (turn.held - shared) * dims.kv_token_bytes
    return own, concurrent * own + shared * dims.kv_token_bytes


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
                row = {
                    "prompt_id": prompt_id,
                    "system": conv.system,
                    "regime": regime,
                    "turn": k + 1,
                    "cached_tokens": turn.cached,
                    "prefill_tokens": turn.prefill,
                    "generated_tokens": turn.generated,
                    "prefill_macs": pm,
                    "decode_macs": dm,
                    "cumulative_macs": total,
                    "eager_flops": 2 * (prefill_macs(dims, turn, conv.lora_macs, eager=True) + dm),
                    "kv_bytes": own,
                    "kv_bytes_concurrent": together,
                }
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
        systems[conv.system] = {
            "prefix_tokens": conv.prefix,
            "contexts": conv.contexts,
            "generated": conv.generated,
            "lora_macs_per_token": conv.lora_macs,
            "shared_prefix_prefill_macs": prefill_macs(dims, shared, conv.lora_macs),
            "regimes": regimes,
        }
    ratios = {
        name: {r: _ratio(s["regimes"][r], systems[WITH_P]["regimes"][r]) for r in REGIMES}
        for name, s in systems.items()
        if name != WITH_P
    }
    check = None
    if counted:
        check = {
            "compared": "torch FLOP counter vs the analytic count of the same forwards "
            "as eager attention computes them",
            "max_relative_difference": worst,
            "tolerance": CHECK_TOLERANCE,
            "agree": all(v <= CHECK_TOLERANCE for v in worst.values()),
        }
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
    out = {k: ratio(v, with_p["total"][k]) for k, v in system["total"].items() if not k.endswith("_tokens")}
    out["macs_per_turn"] = [
        ratio(s["prefill_macs"] + s["decode_macs"], w["prefill_macs"] + w["decode_macs"])
        for s, w in zip(system["turns"], with_p["turns"])
    ]
    if "prefill_s" in with_p["turns"][0]:
        out["latency_per_turn"] = [
            ratio(s["prefill_s"] + s["decode_s"], w["prefill_s"] + w["decode_s"])
            for s, w in zip(system["turns"], with_p["turns"])
        ]
    return out
