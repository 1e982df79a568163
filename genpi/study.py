"""`genpi study CATALOG --prompt ID --out DIR`: internalization methods side by side, on the same data and budget.

Synthesizes once, trains every method on the same rows with the same number of optimizer steps, learning rate
and seed, evaluates them all against the teacher, and writes a table. The stages are `genpi run`'s (the same
commands, recorded in DIR/run.json, resumed as `genpi run` resumes them):

    synth, stats, train METHOD (each), eval fidelity, study

The last writes DIR/study.md and DIR/study.json (per method: KL gap closed with its 95% interval, reverse KL on
its own samples, each check's pass rate and retention, collateral damage on unrelated requests, training time,
and the exact train command and settings that made the row) and DIR/study.png (gap closed against training
time). Every figure is measured on the held-out rows, which no method trains on; a λ sweep (more than one
--lambdas value) chooses on those rows, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from genpi import InputError, exits_2_on_input_error
from genpi.run import run_stage, run_stages, stage_commands
from genpi.runconfig import PRESETS, Preset

DEFAULT_METHODS = "genpi,sft,topk-kl,onpolicy,genpi+onpolicy"
_TOPK = ("topk-kl", "genpi+topk-kl")


def study_preset(args: argparse.Namespace) -> Preset:
    return Preset(
        prompts=args.prompt,
        samples=args.samples,
        heldout=args.heldout,
        max_new_tokens=args.max_new_tokens,
        max_turns=args.max_turns,
        engine="transformers",
        methods=args.methods,
        lambdas=args.lambdas,
        epochs=1,
        lr=args.lr,
        batch_size=args.batch_size,
        micro_batch=1,
        eval_limit=None,
        cpus_per_trial=args.cpus_per_trial,
        steps=args.steps,
    )


def study_stages(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """genpi run's stages for one prompt and these methods, every method on the same budget, then the table."""
    topk = ["--teacher-topk", "20"] if any(m in _TOPK for m in args.methods.split(",")) else []
    run_args = argparse.Namespace(
        out=args.out,
        base=args.base,
        generator=args.generator,
        catalog=args.catalog,
        tasks=[],
        mind2web=[],
        task_args="",
        mind2web_args="",
        efficiency_args="",
        **{
            name: None
            for name in (
                "prompts",
                "methods",
                "samples",
                "heldout",
                "max_new_tokens",
                "max_turns",
                "lambdas",
                "epochs",
                "lr",
                "batch_size",
                "micro_batch",
                "eval_limit",
                "cpus_per_trial",
                "engine",
                "steps",
            )
        },
        synth_args=" ".join([*topk, "--seed", str(args.seed), args.synth_args]),
        train_args=" ".join(["--seed", str(args.seed), args.train_args]),
        eval_args=args.eval_args,
    )
    stages = [
        (name, argv)
        for name, argv in stage_commands(run_args, study_preset(args), [args.prompt])
        if not name.startswith(("eval efficiency", "report"))
    ]
    return stages + [("study", [str(args.out), args.prompt])]


def study_rows(run: str | Path, prompt_id: str) -> dict:
    """The study's table as data: per system (teacher, base, each method) its figures, and how each method was made."""
    from genpi.data.adapters import read_adapter_manifest

    run = Path(run)
    fidelity = json.loads((run / "eval" / "fidelity.json").read_text())
    result = next((r for r in fidelity["results"] if r["prompt_id"] == prompt_id and "systems" in r), None)
    if result is None:
        raise InputError(f"{run}/eval/fidelity.json has no evaluation of prompt {prompt_id!r}")
    stages = json.loads((run / "run.json").read_text())["stages"]
    rows = []
    for name, m in result["systems"].items():
        kept = result["retention"].get(name, {})
        row = {
            "system": name,
            "kl": m.get("kl"),
            "kl_gap_closed": m.get("kl_gap_closed"),
            "kl_gap_closed_ci": m.get("kl_gap_closed_ci"),
            "reverse_kl": m.get("reverse_kl"),
            "reverse_kl_ci": m.get("reverse_kl_ci"),
            "collateral_kl": m.get("collateral_kl"),
            "checks": {
                check: {
                    "rate": c.get("first_turn"),
                    "ci": c.get("first_turn_ci"),
                    "retention": kept.get(f"checks.{check}"),
                }
                for check, c in (m.get("checks") or {}).items()
            },
        }
        folder = result.get("adapters", {}).get(name)
        if folder:
            manifest = read_adapter_manifest(Path(folder) / prompt_id) or read_adapter_manifest(folder)
            train = manifest.train_metrics if manifest else {}
            row.update(
                train_seconds=train.get("seconds"),
                steps=train.get("steps"),
                lam=manifest.lam if manifest else None,
                settings=manifest.settings if manifest else None,
                train_command=["genpi", "train", *stages.get(f"train {name}", {}).get("argv", [])],
                heldout_used_for_choice=result.get("heldout_used_for_lambda", {}).get(name, False),
            )
        rows.append(row)
    return {
        "prompt_id": prompt_id,
        "inputs": result["inputs"],
        "synth_command": ["genpi", "synth", *stages["synth"]["argv"]],
        "eval_command": ["genpi", "eval", *stages["eval fidelity"]["argv"]],
        "rows": rows,
    }


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _interval(ci) -> str:
    return "" if not ci or None in ci else f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def _kl(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def study_markdown(study: dict) -> str:
    checks = sorted({c for r in study["rows"] for c in r["checks"]})
    head = [
        "system",
        "KL gap closed [95% CI]",
        "reverse KL",
        *(f"{c} (retention)" for c in checks),
        "collateral KL",
        "train s",
        "steps",
    ]
    lines = [
        f"# Study: {study['prompt_id']}",
        "",
        f"{study['inputs']} held-out inputs; every method trained on the same rows for the same number of steps.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in study["rows"]:
        cells = [r["system"], _pct(r["kl_gap_closed"]) + _interval(r["kl_gap_closed_ci"]), _kl(r["reverse_kl"])]
        for c in checks:
            check = r["checks"].get(c, {})
            cells.append(f"{_pct(check.get('rate'))} ({_pct(check.get('retention'))})")
        seconds = r.get("train_seconds")
        cells += [_kl(r["collateral_kl"]), "–" if seconds is None else f"{seconds:.0f}", str(r.get("steps") or "–")]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("heldout_used_for_choice") for r in study["rows"]):
        lines += [
            "",
            "λ was chosen on these held-out rows for: "
            + ", ".join(r["system"] for r in study["rows"] if r.get("heldout_used_for_choice")),
        ]
    lines += [
        "",
        "KL gap closed = (KL_base − KL_system) / KL_base, KL(teacher with P ‖ system without P) on the teacher's "
        "held-out agent tokens; reverse KL(system ‖ teacher) on the system's own samples; "
        "collateral = KL(base ‖ system) on general requests unrelated to P. "
        "Each row's command and settings are in study.json.",
        "",
        "![gap closed against training time](study.png)",
    ]
    return "\n".join(lines) + "\n"


def study_plot(study: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in study["rows"]:
        if r.get("train_seconds") is None or r["kl_gap_closed"] is None:
            continue
        ci = r["kl_gap_closed_ci"] or [r["kl_gap_closed"]] * 2
        y = 100 * r["kl_gap_closed"]
        ax.errorbar(
            [r["train_seconds"]],
            [y],
            yerr=[[y - 100 * ci[0]], [100 * ci[1] - y]],
            fmt="o",
            capsize=4,
            label=r["system"],
        )
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("KL gap closed (%)")
    ax.set_title(f"{study['prompt_id']}: gap closed against training time")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_study(run: str | Path, prompt_id: str) -> Path:
    run = Path(run)
    study = study_rows(run, prompt_id)
    (run / "study.json").write_text(json.dumps(study, indent=2))
    study_plot(study, run / "study.png")
    (run / "study.md").write_text(study_markdown(study))
    return run / "study.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genpi study", description=__doc__.splitlines()[0])
    p.add_argument("catalog", help="prompt catalog (.yaml or .jsonl)")
    p.add_argument("--prompt", required=True, help="the prompt id to study")
    p.add_argument(
        "--out", required=True, help="study folder: data/, adapters/METHOD/, eval/, study.md, study.json, study.png"
    )
    p.add_argument(
        "--methods", default=DEFAULT_METHODS, help=f"comma-separated training methods (default {DEFAULT_METHODS})"
    )
    demo = PRESETS["demo"]  # the study's sizes are the demo's (genpi/presets/demo.yaml), its recipe's budget
    p.add_argument("--samples", type=int, default=demo.samples, help="dialogues synthesized (default %(default)s)")
    p.add_argument(
        "--heldout", type=float, default=demo.heldout, help="share held out for evaluation (default %(default)s)"
    )
    p.add_argument(
        "--steps", type=int, default=demo.steps, help="optimizer steps of every method (default %(default)s)"
    )
    p.add_argument("--lr", type=float, default=demo.lr, help="default %(default)s")
    p.add_argument("--batch-size", type=int, default=demo.batch_size, help="default %(default)s")
    p.add_argument(
        "--lambdas",
        default=demo.lambdas,
        help="λ of the joint methods (several: chosen by held-out teacher KL; default %(default)s)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=demo.max_new_tokens,
        help="per generated turn: synthesis (every role) and fidelity's episodes (default %(default)s)",
    )
    p.add_argument("--max-turns", type=int, default=demo.max_turns)
    p.add_argument("--seed", type=int, default=0, help="synthesis and training seed, recorded with every row")
    p.add_argument("--base", default="smollm2")
    p.add_argument("--generator", default="smollm2")
    p.add_argument("--cpus-per-trial", type=float, default=demo.cpus_per_trial)
    p.add_argument("--synth-args", default="", help="more flags for genpi synth")
    p.add_argument("--train-args", default="", help="more flags for every genpi train")
    p.add_argument("--eval-args", default="", help="more flags for genpi eval fidelity")
    p.add_argument("--no-progress", action="store_true")
    return p


def study_stage(name: str, argv: list[str], progress: bool) -> int:
    """genpi run's stages, and the study's last: its table."""
    if name == "study":
        print(f"genpi study: table: {write_study(*argv)}", file=sys.stderr)
        return 0
    return run_stage(name, argv, progress)


@exits_2_on_input_error
def main(argv: list[str] | None = None) -> int:
    from genpi.catalog import load_catalog
    from genpi.train.recipe import METHODS

    args = build_parser().parse_args(argv)
    load_catalog(args.catalog, [args.prompt])  # bad input fails before any work
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown or not args.methods:
        raise InputError(f"--methods: unknown method(s) {', '.join(unknown)}: expected some of {', '.join(METHODS)}")
    if args.steps < 1 or args.samples < 2 or not 0 < args.heldout < 1:
        raise InputError(
            f"--steps must be >= 1, --samples >= 2 and --heldout in (0, 1); "
            f"got {args.steps}, {args.samples}, {args.heldout}"
        )
    stages, preset = study_stages(args), study_preset(args)
    status = run_stages(Path(args.out), stages, preset, "study", not args.no_progress, study_stage)
    if status == 0:
        print(f"genpi study: table: {Path(args.out) / 'study.md'}", file=sys.stderr)
    return status
