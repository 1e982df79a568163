"""`python -m genpi.eval DATA --catalog CATALOG --adapters ADAPTERS`: prompt-free fidelity.

Does the model served *without* the prompt P act as P asks? Each prompt's
held-out inputs (split `heldout` of a synthesis run: never trained on) are
answered three ways, greedily, first agent turn only:

    base      the base model, no P        what serving without the prompt gives
    adapter   base + the adapter, no P    what genpi gives
    base+P    the base model with P       the teacher

The score of a condition is its action-format rate: the share of replies that
match the prompt's `actions.valid` regex (`re.search` on the stripped reply, as
in synthesis). The adapter is merged into the unquantized base, as a LoRA
serving engine applies it. Scores go into the adapter's genpi.json
(`eval_metrics.format_rate`); `--report FILE` also keeps every reply.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from genpi import InputError
from genpi.catalog import PromptEntry, load_catalog
from genpi.engines import ChatRequest, Completion, Sampling

CONDITIONS = ("base", "adapter", "base+P")


def heldout_inputs(data: str | Path, entry: PromptEntry, limit: int | None = None) -> list[str]:
    """The prompt's held-out inputs, by sample id; refuses dialogues of another version of the prompt."""
    from genpi.synth.stats import open_dialogues

    con = open_dialogues(data)
    rows = con.execute(
        "SELECT input, prompt_sha256 FROM dialogues WHERE prompt_id = ? AND split = 'heldout' "
        "AND coalesce(input, '') <> '' ORDER BY sample_id",
        [entry.id],
    ).fetchall()
    if any(sha != entry.sha256 for _, sha in rows):
        raise InputError(f"{data}: dialogues of {entry.id!r} were synthesized from another version of the prompt; resynthesize")
    return [text for text, _ in rows][:limit]


def first_replies(engine, entry: PromptEntry, inputs: list[str], with_prompt: bool, max_tokens: int) -> list[Completion]:
    prompt = entry.messages() if with_prompt else []
    return engine.generate(
        [
            ChatRequest(prompt + [{"role": "user", "content": text}], Sampling(max_tokens=max_tokens), prefix_messages=len(prompt))
            for text in inputs
        ]
    )


def score(entry: PromptEntry, replies: list[Completion]) -> dict:
    hits = [r.error is None and entry.in_action_space(r.text) for r in replies]
    return {
        "format_rate": sum(hits) / len(hits),
        "errors": sum(r.error is not None for r in replies),
        "prompt_tokens": sum(r.prompt_tokens for r in replies) / len(replies),
        "completion_tokens": sum(r.completion_tokens for r in replies) / len(replies),
        "hits": hits,
    }


def evaluate_prompt(entry: PromptEntry, adapter: str | Path, inputs: list[str], base_path: str, max_tokens: int, max_batch: int = 32) -> dict:
    """Score the three conditions on `inputs`; returns per-condition metrics and every reply."""
    from genpi.engines.hf import TransformersEngine

    engine = TransformersEngine(base_path, max_batch=max_batch)
    replies = {
        "base": first_replies(engine, entry, inputs, False, max_tokens),
        "base+P": first_replies(engine, entry, inputs, True, max_tokens),
    }
    del engine
    engine = TransformersEngine(base_path, max_batch=max_batch, adapter=str(adapter))
    replies["adapter"] = first_replies(engine, entry, inputs, False, max_tokens)
    scores = {c: score(entry, replies[c]) for c in CONDITIONS}
    return {
        "prompt_id": entry.id,
        "inputs": len(inputs),
        "max_new_tokens": max_tokens,
        "conditions": {c: {k: v for k, v in scores[c].items() if k != "hits"} for c in CONDITIONS},
        "replies": [
            {"input": text, **{c: {"text": replies[c][i].text, "valid": scores[c]["hits"][i], "error": replies[c][i].error} for c in CONDITIONS}}
            for i, text in enumerate(inputs)
        ],
    }


def evaluate_catalog(data, catalog, adapters, base: str = "smollm2", prompts: list[str] | None = None, limit: int | None = None,
                     max_tokens: int | None = None, max_batch: int = 32, record: bool = True) -> list[dict]:  # fmt: skip
    """Evaluate every prompt that can be (or those named); the others are listed with the reason they were skipped."""
    from tqdm import tqdm

    from genpi.models import resolve_model
    from genpi.synth.store import read_manifest
    from genpi.train.adapters import check_adapter, record_eval

    entries = load_catalog(catalog, prompts)
    if max_tokens is None:  # as long as the teacher's turns were allowed to be
        manifest = read_manifest(data) or {}
        max_tokens = manifest.get("settings", {}).get("max_agent_tokens", 256)
    plans, results = [], []
    for entry in entries:  # every check before any model loads
        folder = Path(adapters) / entry.id
        if not entry.valid_action:
            results.append({"prompt_id": entry.id, "skipped": "no actions.valid regex to score against"})
        elif not folder.is_dir():
            results.append({"prompt_id": entry.id, "skipped": f"no adapter at {folder}"})
        else:
            check_adapter(folder, entry)
            inputs = heldout_inputs(data, entry, limit)
            if inputs:
                plans.append((entry, folder, inputs))
            else:
                results.append({"prompt_id": entry.id, "skipped": "no held-out inputs"})
    if not plans:
        raise InputError("nothing to evaluate: " + "; ".join(f"{r['prompt_id']}: {r['skipped']}" for r in results))
    base_path = resolve_model(base)
    for entry, folder, inputs in tqdm(plans, unit="prompt", desc="eval", file=sys.stderr, disable=len(plans) < 2):
        result = evaluate_prompt(entry, folder, inputs, base_path, max_tokens, max_batch)
        if record:
            record_eval(folder, {"format_rate": {c: result["conditions"][c]["format_rate"] for c in CONDITIONS},
                                 "format_inputs": result["inputs"]})  # fmt: skip
        results.append(result)
    return results


def format_results(results: list[dict]) -> str:
    lines = [f"{'prompt':<16} {'inputs':>6} " + " ".join(f"{c:>8}" for c in CONDITIONS) + "   (share of replies in the action format)"]
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['prompt_id']:<16} skipped: {r['skipped']}")
        else:
            rates = " ".join(f"{100 * r['conditions'][c]['format_rate']:>7.1f}%" for c in CONDITIONS)
            lines.append(f"{r['prompt_id']:<16} {r['inputs']:>6} {rates}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m genpi.eval", description=__doc__.splitlines()[0])
    p.add_argument("data", help="synthesis run folder (its held-out inputs are used)")
    p.add_argument("--catalog", required=True)
    p.add_argument("--adapters", required=True, help="adapters folder (genpi train --out)")
    p.add_argument("--base", default="smollm2", help="base model: local folder or 'smollm2'")
    p.add_argument("--prompts", default=None, help="comma-separated prompt ids (default: all with an adapter)")
    p.add_argument("--limit", type=int, default=None, help="at most this many held-out inputs per prompt")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the synthesis run's agent-turn limit")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--report", default=None, help="write every reply and score to this JSON file")
    p.add_argument("--no-record", action="store_true", help="leave the adapters' genpi.json unchanged")
    p.add_argument("--json", action="store_true", help="print the scores as JSON instead of a table")
    args = p.parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise InputError(f"--limit must be at least 1, got {args.limit}")
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        results = evaluate_catalog(args.data, args.catalog, args.adapters, args.base, args.prompts and args.prompts.split(","),
                                   args.limit, args.max_new_tokens, args.max_batch, not args.no_record)  # fmt: skip
    except InputError as e:
        print(f"genpi: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.report:
        Path(args.report).write_text(json.dumps(results, indent=2))
    scores = [{k: v for k, v in r.items() if k != "replies"} for r in results]
    print(json.dumps(scores, indent=2) if args.json else format_results(results))
    return 0
