"""`genpi report RUN [--eval EVAL] [--out report.md]`: one Markdown file, PNG plots beside it.

Built only from what the run's files hold, never recomputed from models:

    RUN/manifest.json, RUN/dialogues/     synthesis settings and the quality table (genpi stats)
    EVAL/fidelity.json, EVAL/fidelity/    genpi eval fidelity (EVAL defaults to RUN/eval)
    EVAL/leakage.json                     genpi eval leakage
    EVAL/mind2web.json, EVAL/webshop.json genpi eval mind2web, genpi eval webshop (task success, one result per prompt)
    EVAL/os_tasks.json                    genpi eval os-tasks (one result per prompt)
    EVAL/efficiency.json                  genpi eval efficiency (one result per prompt)
    ADAPTERS/ID/genpi.json                training settings and curves of the adapters those name

Every number in a table is a value of those files, printed by `genpi.eval.markdown.cell`,
except the per-turn action-space rates, which are shares of the fidelity Parquet
rows. A part whose files are missing is listed under "Missing", not invented. A run that evaluated rows of the
paper's Table 1 (docs/table1.md) gets that table first (genpi.eval.report_table1).
"""

from __future__ import annotations

import json
from pathlib import Path

from genpi import InputError
from genpi.eval import plots
from genpi.eval.markdown import cell, drop_empty_sections, rate, scored_results, served, table
from genpi.eval.report_fidelity import fidelity_section, verdict
from genpi.eval.report_table1 import table1_section

TABLE4 = (
    ("gold turns", "gold_turns"),
    ("avg turns", "avg_turns"),
    ("% max turns", "pct_hit_max_turns"),
    ("% no termination", "pct_no_termination"),
    ("% invalid final action", "pct_invalid_final_action"),
    ("rows", "rows"),
    ("failed", "failed"),
    ("heldout", "heldout"),
)
LEAKAGE = (("span of P", "span"), ("ROUGE-L recall", "rouge_l_recall"), ("verbatim 50 chars", "verbatim_rate"))
TASKS = (
    (
        "mind2web",
        "Mind2Web steps",
        (
            ("element accuracy", "element_accuracy"),
            ("action F1", "action_f1"),
            ("step success", "step_success"),
            ("errors", "errors"),
        ),
    ),
    (
        "webshop",
        "WebShop",
        (
            ("mean reward", "mean_reward"),
            ("success", "success_rate"),
            ("bought", "purchase_rate"),
            ("invalid action", "invalid_action_rate"),
            ("mean rounds", "mean_rounds"),
            ("errors", "errors"),
        ),
    ),
)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def build_report(
    run: str | Path, eval_dir: str | Path | None = None, out: str | Path | None = None
) -> tuple[str, list[Path]]:
    """(the Markdown text, the PNG files written beside `out`)."""
    from genpi.data.adapters import read_adapter_manifest
    from genpi.data.manifest import read_manifest
    from genpi.synth.stats import quality_stats

    run = Path(run)
    if not run.is_dir():
        raise InputError(f"{run}: no such run folder")
    eval_dir = Path(eval_dir) if eval_dir else run / "eval"
    out = Path(out) if out else run / "report.md"
    figure = lambda name: out.parent / f"{out.stem}-{name}.png"  # noqa: E731
    figures: list[Path] = []
    missing: list[str] = []
    md = [f"# genpi report: `{run}`", ""]

    manifest = read_manifest(run)
    md += ["## Synthesis", ""]
    if manifest:
        s = manifest["settings"]
        md += [
            f"Target `{manifest['target'].get('model')}`, generator `{manifest['generator'].get('model')}`, catalog "
            f"`{manifest['catalog']['path']}`; settings: samples {s['samples']}, heldout {s['heldout']}, "
            f"seed {s['seed']}, max turns cap {s.get('max_turns')}, agent tokens {s['max_agent_tokens']}, "
            f"teacher top-k {s.get('teacher_topk')}.",
            "",
        ]
    else:
        missing.append(f"synthesis settings: {run / 'manifest.json'} not found")
    try:
        stats = quality_stats(run)
    except InputError as e:
        stats = []
        missing.append(f"synthesis quality table: {e}")
    if stats:
        md += ["Quality (the paper's Table 4 columns; percentages over good rows), from `genpi stats`:", ""]
        md += table(
            ["prompt"] + [h for h, _ in TABLE4],
            [
                [s["prompt_id"]]
                + [rate(s[k] / 100) if h.startswith("%") and s[k] is not None else s[k] for h, k in TABLE4]
                for s in stats
            ],
        ) + [""]

    fidelity = _read_json(eval_dir / "fidelity.json")
    adapters: dict[str, dict[str, str]] = {}  # prompt -> system -> folder
    if fidelity is None:
        missing.append(f"fidelity: {eval_dir / 'fidelity.json'} not found (run genpi eval fidelity)")
    else:
        md[2:2] = verdict(fidelity) + table1_section(fidelity, eval_dir, manifest)  # Table 1 when its rows ran
        md += fidelity_section(fidelity, eval_dir, figure, adapters, missing, figures)

    leakage = _read_json(eval_dir / "leakage.json")
    if leakage is None:
        missing.append(f"leakage: {eval_dir / 'leakage.json'} not found (run genpi eval leakage)")
    else:
        md += ["## Prompt leakage", ""]
        md += [
            f"Command: `{' '.join(leakage['command'] or [])}`; {len(leakage['requests'])} extraction requests; "
            f"served as: {leakage['served_as']}.",
            "",
        ]
        done = scored_results(leakage, "leakage", missing, adapters)
        for r in done:
            md += [f"### {r['prompt_id']} (P: {r['prompt_words']} words)", ""]
            md += table(
                ["system"] + [h for h, _ in LEAKAGE],
                [[name] + [m[k] for _, k in LEAKAGE] for name, m in r["systems"].items()],
            ) + [""]
            md += served(r["systems"])
        if done:
            panels = [
                (
                    f"leakage: {r['prompt_id']}",
                    plots.bars(
                        [h for h, _ in LEAKAGE],
                        {n: [m[k] for _, k in LEAKAGE] for n, m in r["systems"].items()},
                        "share",
                    ),
                )
                for r in done
            ]
            figures.append(out.parent / plots.figure(figure("leakage"), panels))
            md += [f"![leakage]({figure('leakage').name})", ""]

    md += ["## Task success", ""]
    for name, title, columns in TASKS:
        results = _read_json(eval_dir / f"{name}.json")
        if results is None:
            missing.append(f"{name}: {eval_dir / f'{name}.json'} not found (run genpi eval {name})")
        for result in results.get("results", [results]) if results else []:  # one summary alone: an older genpi's
            adapters.setdefault(result["prompt_id"], {}).update(result["adapters"])
            md += [
                f"### {title}: {result['prompt_id']}",
                "",
                f"Command: `{' '.join(result['command'] or [])}`; served as: {result['served_as']}; "
                f"{result['layout']} layout; greedy.",
                "",
            ]
            md += table(
                ["system"] + [h for h, _ in columns],
                [[n] + [m[k] for _, k in columns] for n, m in result["systems"].items()],
            ) + [""]
            md += served(result["systems"])
            if result["retention"]:
                keys = list(next(iter(result["retention"].values())))
                md += (
                    ["Retention (system / teacher):", ""]
                    + table(
                        ["system"] + keys, [[n] + [kept[k] for k in keys] for n, kept in result["retention"].items()]
                    )
                    + [""]
                )
            missing += [f"{name} of {result['prompt_id']}: {m}" for m in result["missing"]]
    os_tasks = _read_json(eval_dir / "os_tasks.json")
    md += ["## OS task success", ""]
    if os_tasks is None:
        missing.append(f"OS task success: {eval_dir / 'os_tasks.json'} not found (run genpi eval os-tasks)")
    for tasks in (
        os_tasks.get("results", [os_tasks]) if os_tasks else []
    ):  # one summary alone: written by an older genpi
        adapters.setdefault(tasks["prompt_id"], {}).update(tasks["adapters"])
        md += [
            f"### {tasks['prompt_id']}",
            "",
            f"Command: `{' '.join(tasks['command'] or [])}`; {tasks['tasks']} tasks from "
            f"`{tasks['tasks_file']}`, prompt {tasks['prompt_id']}, agent {tasks['agent']}, "
            f"{tasks['settings']['rounds']} rounds.",
            "",
        ]
        md += table(
            ["system", "tasks", "successes", "success rate", "retention", "mean rounds", "seconds per task", "ended"],
            [
                [
                    name,
                    m["tasks"],
                    m["successes"],
                    rate(m["success_rate"]),
                    rate(tasks["retention"].get(name)),
                    m["mean_rounds"],
                    m["mean_seconds"],
                    ", ".join(f"{k} {v}" for k, v in m["ended"].items()),
                ]
                for name, m in tasks["systems"].items()
            ],
        ) + [""]
        md += served(tasks["systems"])
        missing += [f"OS task success of {tasks['prompt_id']}: {m}" for m in tasks["missing"]]
    efficiency = _read_json(eval_dir / "efficiency.json")
    md += ["## Efficiency", ""]
    if efficiency is None:
        missing.append(f"efficiency: {eval_dir / 'efficiency.json'} not found (run genpi eval efficiency)")
    for r in efficiency["results"] if efficiency else []:
        check, latency = r["counter_check"], r["latency"]
        md += [
            f"### {r['prompt_id']}",
            "",
            f"Command: `{' '.join(r['command'] or [])}`",
            "",
            f"Conversation: {r['conversation']}; model config `{r['model_config']}`; "
            f"LoRA r={r['lora']['rank']} ({r['lora']['from']}); "
            f"KV bytes in {r['kv_dtype']}, {r['concurrent']} concurrent conversation(s). Formula: {r['formula']}",
            "",
            "Counter check: "
            + (
                f"{check['compared']}; largest difference per regime: "
                + ", ".join(f"{k} {cell(v)}" for k, v in check["max_relative_difference"].items())
                if check
                else "not run (--model-config: analytic only)"
            )
            + ".",
            "",
            f"Latency: {latency['served_as']}, median of {latency['repeats']} ({latency['note']})."
            if latency
            else "Latency: not measured (analytic only).",
            "",
        ]
        for regime in next(iter(r["systems"].values()))["regimes"]:
            rows = []
            for name, s in r["systems"].items():
                t, q = s["regimes"][regime]["total"], r["ratios"].get(name, {}).get(regime, {})
                rows.append(
                    [
                        name,
                        t["prefill_tokens"],
                        t["prefill_macs"],
                        t["decode_macs"],
                        t["macs"],
                        q.get("macs"),
                        t["kv_bytes_concurrent_peak"],
                        q.get("kv_bytes_concurrent_peak"),
                        t.get("latency_s"),
                        q.get("latency_s"),
                    ]
                )
            md += [f"{regime}, whole conversation (ratios: system / with-P):", ""]
            md += table(
                [
                    "system",
                    "prefill tokens",
                    "prefill MACs",
                    "decode MACs",
                    "MACs",
                    "MACs ratio",
                    "KV bytes",
                    "KV ratio",
                    "latency s",
                    "latency ratio",
                ],
                rows,
            ) + [""]
        name = figure(f"efficiency-{r['prompt_id']}")
        figures.append(out.parent / plots.efficiency_plot(r, name))
        md += [f"![efficiency {r['prompt_id']}]({name.name})", ""]

    md += ["## Training", ""]
    curves, lambdas = {}, {}
    rows = []
    for prompt_id, systems in sorted(adapters.items()):
        for name, folder in sorted(systems.items()):
            manifest = read_adapter_manifest(folder)
            if manifest is None:
                missing.append(f"training of {name}/{prompt_id}: {folder} has no genpi.json")
                continue
            t, settings = manifest.train_metrics, manifest.settings
            rows.append(
                [
                    prompt_id,
                    name,
                    manifest.method,
                    manifest.lam,
                    settings.get("epochs"),
                    settings.get("lr"),
                    t.get("steps"),
                    t.get("train_loss_first"),
                    t.get("train_loss_last"),
                    manifest.eval_metrics.get("heldout_loss"),
                    manifest.eval_metrics.get("heldout_kl"),
                ]
            )
            if t.get("train_losses"):
                curves[f"{name}/{prompt_id}"] = t["train_losses"]
            else:
                missing.append(
                    f"loss per step of {name}/{prompt_id}: not recorded in {folder}/genpi.json "
                    "(trained before genpi recorded it)"
                )
            trials = {
                k: v
                for k, v in manifest.eval_metrics.get("trials_heldout_kl", {}).items()
                if isinstance(v, (int, float))
            }
            if len(trials) > 1:
                lambdas[f"{name}/{prompt_id}"] = (trials, manifest.eval_metrics.get("trials", {}))
    if rows:
        md += ["Adapters evaluated above (`genpi.json`):", ""]
        md += table(
            [
                "prompt",
                "system",
                "method",
                "λ",
                "epochs",
                "lr",
                "steps",
                "loss first",
                "loss last",
                "held-out loss",
                "held-out KL",
            ],
            rows,
        ) + [""]
    else:
        missing.append("training: no evaluated adapters to read")
    for key, (kls, losses) in lambdas.items():
        md += [f"Held-out teacher KL (which chose λ) and loss per λ, {key}:", ""]
        md += table(
            ["λ", "held-out KL", "held-out loss"], [[float(k), v, losses.get(k)] for k, v in sorted(kls.items())]
        ) + [""]
    panels = []
    if curves:
        panels.append(("training loss per step", plots.lines(curves, "optimizer step", "loss", marker="")))
    if lambdas:
        panels.append(
            (
                "held-out teacher KL per λ",
                plots.lines(
                    {k: [v[x] for x in sorted(v)] for k, (v, _) in lambdas.items()},
                    "λ",
                    "held-out KL",
                    {k: [float(x) for x in sorted(v)] for k, (v, _) in lambdas.items()},
                ),
            )
        )
    if panels:
        figures.append(out.parent / plots.figure(figure("training"), panels))
        md += [f"![training]({figure('training').name})", ""]

    md += ["## Missing", ""] + ([f"- {m}" for m in missing] or ["Nothing: every part was found."]) + [""]
    return "\n".join(drop_empty_sections(md)), figures


def write_report(run: str | Path, eval_dir: str | Path | None = None, out: str | Path | None = None) -> Path:
    if not Path(run).is_dir():
        raise InputError(f"{run}: no such run folder")
    out = Path(out) if out else Path(run) / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    text, _ = build_report(run, eval_dir, out)
    out.write_text(text)
    return out
