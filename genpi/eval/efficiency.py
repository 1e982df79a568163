"""`genpi eval efficiency`: what internalizing P saves, per turn, in three serving regimes.

One conversation of N turns (the prompt's held-out dialogues, else its shots),
tokenized once per system, costs per turn:

    with-P               the base model with P (today's deployment)
    internalized-merged  the adapter merged into the base, no P (the base's cost without P)
    internalized-lora    the adapter served unmerged, no P (+ r·(in + out) MACs per adapted layer and token)
    compressed-P         the base with a shortened P (--compressed-prompt)
    NAME                 the base with P compressed by LLMLingua (--compressed NAME=llmlingua2:RATE; its prompt
                         tokens are the compressed P's: fewer than P's, not zero)
    icae-slots           the base with P's k ICAE memory slots in P's place (--adapters of a genpi train --method
                         icae folder; the slots are computed once per prompt, not counted)

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

This module is the command: the analytic cost model is genpi.eval.cost (no model needed), the tokenizing and
the measurements genpi.eval.cost_measure, the plot genpi.eval.plots.efficiency_plot.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow as pa

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.data.store import write_results
from genpi.eval.compressed import Compressions, compressed_note, write_compressed
from genpi.eval.cost import (
    COMPRESSED,
    FORMULA,
    ICAE,
    LINEAR_NAMES,
    LORA,
    MERGED,
    REGIMES,
    WITH_P,
    dims_of,
    read_config,
    summarize,
)
from genpi.eval.cost_measure import add_fresh_lora, conversation_pairs, counted_flops, timed, tokenize
from genpi.eval.evaluate import keep_per_prompt, row_schema
from genpi.eval.plots import efficiency_plot
from genpi.eval.systems import adapter_dirs, compressed_specs, load_engine, prompt_systems, served_as
from genpi.models import resolve_model

ROW_SCHEMA = row_schema(
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
)


def lora_shape(adapters: str | None, entry, base_path: str):
    """(rank, target modules, where from, the checked adapter System or None)."""
    if adapters:
        systems, missing = prompt_systems(entry, adapter_dirs([adapters]), base_path)
        if missing:
            raise InputError(f"--adapters {adapters}: {missing[0]}")
        if systems[-1].icae is not None:  # an ICAE folder has no LoRA of the base: a fresh one of the default shape
            return (*lora_shape(None, entry, base_path)[:3], systems[-1])
        if systems[-1].model:  # a full fine-tune: the base's architecture, no LoRA: its timed row is its own model
            return 0, [], f"{systems[-1].folder} (a fully fine-tuned model: no LoRA, the merged cost)", systems[-1]
        config = json.loads((systems[-1].folder / "adapter_config.json").read_text())
        targets = config["target_modules"]
        if isinstance(targets, str) and targets != "all-linear":
            raise InputError(
                f"{systems[-1].folder}/adapter_config.json: target_modules {targets!r} is a pattern; name the modules"
            )
        if config.get("rank_pattern"):
            raise InputError(
                f"{systems[-1].folder}/adapter_config.json: a rank_pattern (per-module ranks) is not counted"
            )
        return (
            config["r"],
            sorted(LINEAR_NAMES if targets == "all-linear" else targets),
            str(systems[-1].folder),
            systems[-1],
        )
    from genpi.train.qlora import LoraSettings

    settings = LoraSettings()
    targets = LINEAR_NAMES if settings.target_modules == "all-linear" else settings.target_modules
    return settings.r, sorted(targets), "genpi train's default LoRA settings (no --adapters)", None


def evaluate(
    catalog,
    prompt_id: str,
    *,
    data=None,
    adapters=None,
    turns: int = 5,
    compressed_prompt=None,
    concurrent: int = 1,
    model_config=None,
    prompt_tokens: int | None = None,
    base: str = "smollm2",
    repeats: int = 3,
    out=None,
    command: list[str] | None = None,
    compressed: list[str] = (),
) -> dict:
    from transformers import AutoTokenizer

    for flag, value in (
        ("turns", turns),
        ("concurrent", concurrent),
        ("repeats", repeats),
        ("prompt-tokens", prompt_tokens),
    ):
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
            raise InputError(
                f"--compressed-prompt {path}: {convs[-1].prefix} tokens, longer than P ({convs[0].prefix} tokens)"
            )
    specs = compressed_specs(list(compressed), [WITH_P, MERGED, LORA, COMPRESSED])
    shortened = Compressions(specs, base_path)(entry) if specs else []
    convs += [tokenize(tokenizer, c.name, c.messages(), pairs) for c in shortened]
    if adapter_system is not None and adapter_system.icae is not None:  # P's k memory slots in P's place
        k, merged = adapter_system.icae.shape[0], convs[1]  # any k ids cost what k slot embeddings cost
        convs.append(
            replace(
                merged,
                system=ICAE,
                ids=[tokenizer.eos_token_id] * k + merged.ids,
                prefix=merged.prefix + k,
                contexts=[c + k for c in merged.contexts],
            )
        )
    if prompt_tokens is not None:  # P adds prompt_tokens to every context (the conversation keeps its own tokens)
        shift = prompt_tokens - (convs[0].prefix - convs[1].prefix)
        convs[0].prefix += shift
        convs[0].contexts = [c + shift for c in convs[0].contexts]

    counted = timings = None
    form = None
    if not model_config:
        print(f"genpi eval efficiency: {entry.id}: counting FLOPs (meta-device copy, eager attention)", file=sys.stderr)
        counted = {c.system: counted_flops(config, c) for c in convs}
        engine = load_engine(base_path, [adapter_system] if adapter_system else [])
        if not lora.adapter:
            lora.adapter = add_fresh_lora(engine, lora.lora)
        form = served_as(engine, [adapter_system] if adapter_system else [])
        print(
            f"genpi eval efficiency: {entry.id}: timing {len(convs)} systems × {len(REGIMES)} regimes "
            f"× {repeats} repeats",
            file=sys.stderr,
        )
        timings = {c.system: timed(engine, c, repeats) for c in convs}

    result = summarize(entry.id, dims, convs, concurrent, counted, timings)
    result.update(
        {
            "command": command,
            "catalog": str(catalog),
            "model_config": config_source,
            "dims": asdict(dims),
            "tokenizer": tokenizer.name_or_path,
            "formula": FORMULA,
            "conversation": conversation_source,
            "prompt_tokens": f"P adds {prompt_tokens} tokens to every context (--prompt-tokens)"
            if prompt_tokens is not None
            else None,
            "lora": {"rank": rank, "targets": targets, "from": lora_source},
            "concurrent": concurrent,
            "kv_dtype": dims.dtype,
            "latency": {
                "served_as": form,
                "repeats": repeats,
                "note": "wall time on this machine's engine; prefill one forward, decode one forward per token",
            }
            if timings
            else None,
            "merged_latency": "the merged adapter has the base's shapes: its cost and latency are the base's without P",
            "compressed": {c.name: c.summary() for c in shortened},
        }
    )
    if out:
        write_outputs(Path(out), result)
        for c in shortened:  # the compressed P beside the results, to inspect its row
            write_compressed(Path(out), c)
    return result


def write_outputs(out: Path, result: dict) -> None:
    """Rows as EVAL/efficiency/ID/NAME/part-00000.parquet; EVAL/efficiency.json keeps one
    result per prompt (this run's replaces the prompt's earlier one); the plot as EVAL/efficiency-ID.png."""
    for system in result["systems"]:
        rows = [r for r in result["rows"] if r["system"] == system]
        write_results(out, "efficiency", result["prompt_id"], system, rows, ROW_SCHEMA)
    summary = {k: v for k, v in result.items() if k != "rows"}
    keep_per_prompt(out / "efficiency.json", summary)
    efficiency_plot(summary, out / f"efficiency-{result['prompt_id']}.png")


def format_summary(result: dict) -> str:
    lines = [
        f"{result['prompt_id']}: {result['conversation']}; model config {result['model_config']}; "
        f"tokens by {result['tokenizer']}",
        f"LoRA r={result['lora']['rank']} on {', '.join(result['lora']['targets'])} ({result['lora']['from']})",
        f"formula: {result['formula']}",
    ]
    if result.get("prompt_tokens"):
        lines.append(result["prompt_tokens"])
    lines += [compressed_note(name, c) for name, c in (result.get("compressed") or {}).items()]
    check = result["counter_check"]
    if check:
        worst = ", ".join(f"{r} {v:.2%}" for r, v in check["max_relative_difference"].items())
        lines.append(
            f"counter check ({check['compared']}): max difference {worst}: "
            f"{'agree' if check['agree'] else 'DISAGREE'} within {check['tolerance']:.0%}"
        )
    timed_ = result["latency"] is not None
    if timed_:
        lines.append(
            f"latency: {result['latency']['served_as']}, median of {result['latency']['repeats']} "
            f"({result['latency']['note']})"
        )
    for regime in REGIMES:
        lines += ["", f"{regime}, over {len(result['systems'][WITH_P]['contexts'])} turns (ratio: system / with-P)"]
        header = (
            f"{'system':<20} {'prefill tok':>11} {'GMACs pre':>10} {'GMACs dec':>10} {'GMACs':>9} {'ratio':>6} "
            f"{'KV MiB':>8} {'KV×C MiB':>9} {'ratio':>6}"
        )
        lines.append(header + (f" {'s pre':>7} {'s dec':>7} {'ratio':>6}" if timed_ else ""))
        for name, s in result["systems"].items():
            t = s["regimes"][regime]["total"]
            q = result["ratios"].get(name, {}).get(regime, {})
            line = (
                f"{name:<20} {t['prefill_tokens']:>11} {t['prefill_macs'] / 1e9:>10.2f} "
                f"{t['decode_macs'] / 1e9:>10.2f} {t['macs'] / 1e9:>9.2f} "
                f"{_r(q.get('macs', 1.0)):>6} {t['kv_bytes_peak'] / 2**20:>8.2f} "
                f"{t['kv_bytes_concurrent_peak'] / 2**20:>9.2f} {_r(q.get('kv_bytes_concurrent_peak', 1.0)):>6}"
            )
            if timed_:
                line += f" {t['prefill_s']:>7.3f} {t['decode_s']:>7.3f} {_r(q.get('latency_s', 1.0)):>6}"
            lines.append(line)
        for name, q in result["ratios"].items():
            per_turn = " ".join(_r(v) for v in q[regime]["macs_per_turn"])
            lines.append(
                f"  {name}: MACs ratio per turn {per_turn}"
                + (
                    f"; latency ratio per turn {' '.join(_r(v) for v in q[regime]['latency_per_turn'])}"
                    if timed_
                    else ""
                )
            )
    lines.append("")
    lines.append(
        "shared-prefix: the prefix's one-time prefill per server (GMACs): "
        + ", ".join(
            f"{n} {s['prefix_tokens']} tokens {s['shared_prefix_prefill_macs'] / 1e9:.2f}"
            for n, s in result["systems"].items()
        )
    )
    return "\n".join(lines)


def _r(value) -> str:
    return "–" if value is None else f"{value:.3f}"
