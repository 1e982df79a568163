"""The steps every evaluation (fidelity, leakage, os-tasks, mind2web, webshop) shares, run by `evaluate`:

    systems    genpi.eval.systems: per prompt the teacher, the base, each adapter and each served system,
               every check done before a model loads (`catalog_prompts`, `task_prompt` there)
    engine     one TransformersEngine on the base with every adapter loaded (none for a replay agent)
    play       the evaluation's own: rows per system (episodes, replies, steps, goals, tasks)
    Parquet    EVAL/NAME/ID/S/part-00000.parquet per system, in the evaluation's schema (store.write_results)
    score      the evaluation's `summarize` of each system's rows; served systems marked (`mark_served`)
    retention  system / teacher, by the evaluation's rule
    result     per prompt: the evaluation's leading keys, then missing, systems, retention, its own keys, adapters
    record     each adapter's genpi.json, `eval_metrics.NAME` (fidelity, leakage), its numbers also logged to the
               trackers of --tracking (genpi.tracking) under ADAPTERS/.tracking/, run NAME/ID

An evaluation is an `Evaluation`: what it does its own way, as plain functions. The summary file is one of
two shapes: `{header..., "results": [...]}` written whole (fidelity, leakage: every prompt of a catalog in one
run), or `keep_per_prompt` (the task evaluations: one prompt per run, the file keeps the others' results).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from genpi.catalog import PromptEntry
from genpi.data.adapters import record_eval
from genpi.data.model_card import hub_ready
from genpi.data.store import write_results
from genpi.eval.compressed import write_compressed
from genpi.eval.metrics import ratio
from genpi.eval.systems import (
    TEACHER,
    Batcher,
    Prompt,
    System,
    load_engine,
    mark_served,
    prompt_of,
    served_as,
    served_notes,
)
from genpi.tracking import open_tracker, parse_tracking


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation does its own way; `evaluate` runs every other step."""

    name: str  # EVAL/NAME/... rows, eval_metrics.NAME
    schema: pa.Schema  # each system's Parquet rows
    play: Callable[[Prompt, Any], dict[str, list[dict]]]  # (prompt, engine) -> rows per system, in its systems' order
    summarize: Callable[[list[dict]], dict]  # one system's rows -> its metrics
    describe: Callable[[Prompt, str | None], dict]  # (prompt, served_as) -> the result's leading keys
    retention: Callable[[dict, dict], Any] | None = None  # (a system's metrics, the teacher's) -> its retention
    teacher_retention: bool = False  # the teacher's own retention (1.0 each) is kept too
    not_scored: tuple[str, ...] = ()  # metrics a served system cannot give (null, named in its `not_scored`)
    finish: Callable[[Prompt, dict, dict], dict] | None = (
        None  # (prompt, rows, metrics) -> result keys after retention;
    )
    # it may add to the metrics what needs every system's rows (fidelity: the KL gap)
    record: Callable[[System, dict, str | None], dict] | None = (
        None  # (adapter, result, served_as) -> eval_metrics.NAME
    )


@dataclass(frozen=True)
class RunSettings:
    """Where an evaluation runs and writes: the same for every evaluation."""

    base_path: str | None  # None: no model (a replay agent)
    out: Path
    max_batch: int = 32
    record: bool = True  # write each adapter's eval_metrics into its genpi.json
    tracking: str | None = None  # and log them (genpi.tracking: e.g. "tensorboard") under ADAPTERS/.tracking/
    model: bool = True  # False: no system needs the base model (a replay agent): no engine loads


def evaluate(evaluation: Evaluation, prompts: list[Prompt], run: RunSettings) -> tuple[str | None, list[dict]]:
    """Every shared step over `prompts`: (how the adapters were served, in words; one result per prompt)."""
    trackers = parse_tracking(run.tracking) if run.record and evaluation.record else ()  # refused before any work
    every = [s for p in prompts for s in p.systems]
    engine = load_engine(run.base_path, every, run.max_batch) if run.model else None
    form = served_as(engine, every) if engine is not None else None
    results = []
    for prompt in prompts:
        rows = evaluation.play(prompt, engine)
        for s in prompt.systems:
            if s.compressed:  # the compressed P beside the results, to inspect its row
                write_compressed(run.out, s.compressed)
        for name, records in rows.items():
            write_results(run.out, evaluation.name, prompt.entry.id, name, records, evaluation.schema)
        metrics = mark_served(
            {name: evaluation.summarize(rs) for name, rs in rows.items()}, prompt.systems, evaluation.not_scored
        )
        extra = evaluation.finish(prompt, rows, metrics) if evaluation.finish else {}
        result = {**evaluation.describe(prompt, form), "missing": prompt.missing, "systems": metrics}
        if evaluation.retention:
            result["retention"] = retained(metrics, evaluation.retention, evaluation.teacher_retention)
        result.update(extra, adapters={s.name: str(s.folder) for s in prompt.systems if s.folder})
        results.append(result)
        if run.record and evaluation.record:
            for s in prompt.systems:
                if s.folder:  # an adapter's or an ICAE system's folder
                    record = evaluation.record(s, result, form)
                    hub_ready(s.folder, record_eval(s.folder, {evaluation.name: record}), configs=False)  # new figures
                    folder = Path(s.folder)
                    with open_tracker(trackers, folder.parent, "eval", f"{evaluation.name}/{folder.name}") as tracker:
                        tracker.log(record)
    return form, results


def row_schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    """An evaluation's per-row Parquet schema: prompt_id and system (its folders' names), then its own fields."""
    return pa.schema([("prompt_id", pa.string()), ("system", pa.string()), *fields])


def evaluate_task(evaluation: Evaluation, prompt: Prompt, run: RunSettings) -> dict:
    """A task evaluation of one prompt (os-tasks, mind2web, webshop): `evaluate`, its result kept in EVAL/NAME.json
    beside the other prompts' results."""
    _, [result] = evaluate(evaluation, [prompt], run)
    keep_per_prompt(run.out / f"{evaluation.name}.json", result)
    return result


def retained(metrics: dict[str, dict], rule: Callable[[dict, dict], Any], with_teacher: bool = False) -> dict:
    """Each system's retention by `rule` (a system's metrics, the teacher's); {} without a teacher (a replay agent)."""
    teacher = metrics.get(TEACHER)
    return {n: rule(m, teacher) for n, m in metrics.items() if n != TEACHER or with_teacher} if teacher else {}


def per_metric(keys: tuple[str, ...]) -> Callable[[dict, dict], dict]:
    """The retention rule of the task evaluations: system / teacher for each metric in `keys`."""
    return lambda m, teacher: {k: ratio(m[k], teacher[k]) for k in keys}


def play_every(
    items: list, agents: dict[str, tuple[System, Any]], entry: PromptEntry, one, run_async=asyncio.run
) -> dict[str, list[dict]]:
    """{system: rows}: the coroutine `one(item, agent, prefix)` for every system's AsyncEngine and every item, all at
    once (prefix: P's messages for a system with P, else none); each row gets its prompt_id and system first.
    `agents` maps a system's name to (system, its AsyncEngine); `run_async` runs the whole (a Batcher's `run`
    closes its served systems' sessions after it)."""

    async def run() -> list[dict]:
        return await asyncio.gather(
            *(one(item, agent, prompt_of(entry, system)) for system, agent in agents.values() for item in items)
        )

    rows, n = run_async(run()), len(items)
    return {
        name: [{"prompt_id": entry.id, "system": name, **r} for r in rows[i * n : (i + 1) * n]]
        for i, name in enumerate(agents)
    }


def ask_every(name: str, items: list, what: str, one) -> Callable[[Prompt, Any], dict[str, list[dict]]]:
    """The `play` of an evaluation that gives every item (mind2web's steps, webshop's goals) to every system's agent,
    all at once on the one engine: `play_every` with an AsyncEngine per system (genpi.eval.systems.Batcher)."""

    def play(prompt: Prompt, engine) -> dict[str, list[dict]]:
        batcher = Batcher(engine)
        print(
            f"genpi eval {name}: {prompt.entry.id}: {len(items)} {what}, {len(prompt.systems)} systems", file=sys.stderr
        )
        agents = {s.name: (s, batcher.view(s)) for s in prompt.systems}
        return play_every(items, agents, prompt.entry, one, batcher.run)

    return play


def notes(result: dict) -> list[str]:
    """The lines under a result's table: where each served system was served, and why adapters are missing."""
    return served_notes(result["systems"]) + [f"missing: {m}" for m in result["missing"]]


def describe_web(command: list[str] | None, source: dict, catalog, base_path: str, settings, counts: dict):
    """The `describe` of Mind2Web and WebShop: the command, where the items came from (`source`), the prompt, how
    its systems ran, `settings`' layout, how many items (`counts`) and the token limit."""
    return lambda p, form: {
        "command": command,
        **source,
        "catalog": str(catalog),
        "prompt_id": p.entry.id,
        "base": base_path,
        "served_as": form,
        "layout": settings.layout,
        **counts,
        "greedy": True,
        "max_new_tokens": settings.max_new_tokens,
    }


def pct(value) -> str:
    """A share in a text table."""
    return "-" if value is None else f"{100 * value:.1f}%"


def task_text(summary: dict, title: str, header: str, rows: list[str], width: int) -> str:
    """A task evaluation's summary (mind2web, webshop) as text: how the adapters were served, the title, the table
    of systems, a retention row per system (each metric's system / teacher, `width` wide), the notes."""
    kept = [
        f"{'  retention':<14}" + "".join(f"{pct(v):>{width}}" for v in m.values()) + f"   ({n})"
        for n, m in summary["retention"].items()
    ]
    return "\n".join([f"served as: {summary['served_as']}", title, header, *rows, *kept, *notes(summary)])


def catalog_text(summary: dict, table: Callable[[dict], list[str]]) -> str:
    """A whole-catalog summary (fidelity, leakage) as text: how the adapters were served, then per prompt its
    `table(result)` or why it was skipped."""
    lines = [f"served as: {summary['served_as']}"]
    for r in summary["results"]:
        lines += [f"{r['prompt_id']}: skipped: {r['skipped']}"] if "skipped" in r else table(r)
    return "\n".join(lines)


def write_summary(path: Path, summary: dict) -> None:
    """A summary file written whole (fidelity.json, leakage.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))


def keep_per_prompt(path: Path, result: dict) -> None:
    """Write `result` into the evaluation file `path` that holds one result per prompt ({"results": [...]}, as
    genpi report reads it): it replaces its prompt's earlier one, the other prompts' stay."""
    previous = json.loads(path.read_text()) if path.exists() else None
    kept = [r for r in (previous or {}).get("results", []) if r["prompt_id"] != result["prompt_id"]]
    write_summary(path, {"results": kept + [result]})
