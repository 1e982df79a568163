"""`python -m genpi.eval fidelity|leakage|os-tasks ...` (`genpi eval`): evaluate adapters against the teacher.

    genpi eval fidelity DATA --catalog C [--adapters DIR [DIR ...]] [--served NAME=SPEC ...] [--out EVAL]
    genpi eval leakage --catalog C [--adapters DIR [DIR ...]] [--served NAME=SPEC ...] --out EVAL
    genpi eval os-tasks TASKS.json --catalog C --prompt ID [--adapters DIR ...] [--served NAME=SPEC ...]
        [--agent replay:FILE] [--out EVAL]
    genpi eval os-tasks TASKS.json --replay-examples [--scripts DIR]   (each task's own solution, and a wrong answer)
    genpi eval DATA --catalog C --adapters DIR ...        (the same as `genpi eval fidelity`)
    genpi eval mind2web STEPS.jsonl --catalog C --prompt ID [--adapters DIR ...] [--limit N] [--out EVAL]
    genpi eval webshop --url URL --catalog C --prompt ID [--adapters DIR ...] [--goals N] [--out EVAL]
    genpi eval efficiency --catalog C --prompt ID [--data RUN] [--adapters DIR] [--turns 5] [--out EVAL] ...

An --adapters value is an adapters folder (genpi train --out: DIR/ID/ per prompt), named
after the folder, or NAME=DIR. A --served value (repeatable; fidelity, leakage and the task
commands) is a system on an OpenAI-compatible server, NAME=openai:BASE_URL/MODEL, MODEL with
{prompt_id} for each prompt's own (genpi serve names adapters by prompt id):
`--served genpi=openai:http://127.0.0.1:8000/v1/{prompt_id}`. Bad input, an unreachable server
or a model it does not list prints `genpi: error: ...` and exits 2, before the base model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable

from genpi import InputError, exits_2_on_input_error
from genpi.eval.settings import (
    EfficiencySettings,
    FidelitySettings,
    LeakageSettings,
    Mind2WebSettings,
    OSTaskSettings,
    SystemsSettings,
    WebShopSettings,
)
from genpi.flags import add_settings, from_args


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand's flags from its settings dataclasses (genpi.eval.settings); by hand only its positional
    argument and --json."""
    parser = argparse.ArgumentParser(prog="genpi eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("fidelity", help="first turn, whole episode and teacher-forced fidelity on held-out inputs")
    p.add_argument("data", help="synthesis run folder (its held-out dialogues are used)")
    add_settings(p, SystemsSettings, required=["catalog"])
    add_settings(p, FidelitySettings)
    p = sub.add_parser("leakage", help="how much of P each system gives away to extraction requests")
    add_settings(p, SystemsSettings, required=["catalog"])
    add_settings(p, LeakageSettings, required=["out"])
    p = sub.add_parser("os-tasks", help="task success on AgentBench-format OS tasks, each in a fresh rootless sandbox")
    p.add_argument("tasks", help="tasks file (AgentBench OS format, .json or .jsonl)")
    add_settings(p, SystemsSettings)  # --catalog: required unless --replay-examples
    add_settings(p, OSTaskSettings)
    p = sub.add_parser("mind2web", help="Mind2Web step success (multiple-choice element selection, as AgentBench asks)")
    p.add_argument("steps", help="prepared Mind2Web steps, JSON lines (see genpi.eval.mind2web)")
    add_settings(p, SystemsSettings, required=["catalog"])
    add_settings(p, Mind2WebSettings, required=["prompt"])
    p = sub.add_parser("webshop", help="WebShop reward of a client on a WebShop server you run")
    add_settings(p, SystemsSettings, required=["catalog"])
    add_settings(p, WebShopSettings, required=["prompt"])
    p = sub.add_parser(
        "efficiency",
        help="FLOPs, latency and KV-cache bytes per turn with P and internalized, in three serving regimes",
    )
    add_settings(p, EfficiencySettings, required=["catalog", "prompt"])
    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    return parser


def _fidelity(args, command: list[str]) -> tuple[dict, Callable[[dict], str]]:
    from genpi.eval.fidelity import evaluate_catalog, format_summary

    settings = from_args(FidelitySettings, args)
    return evaluate_catalog(args.data, from_args(SystemsSettings, args), settings, command), format_summary


def _leakage(args, command: list[str]) -> tuple[dict, Callable[[dict], str]]:
    from genpi.eval.leakage import format_summary, probe_catalog

    settings = from_args(LeakageSettings, args)
    return probe_catalog(from_args(SystemsSettings, args), settings, command), format_summary


def _os_tasks(args, command: list[str]) -> tuple[dict, Callable[[dict], str]]:
    from genpi.eval.os_tasks import evaluate_os_tasks, format_replay, format_summary, loop_settings, replay_examples

    systems, s = from_args(SystemsSettings, args), from_args(OSTaskSettings, args)
    if s.replay_examples:
        if s.agent or systems.adapters or systems.served or systems.compressed:
            raise InputError(
                "--replay-examples plays the tasks' own solutions: leave out --agent, --adapters, --served and "
                "--compressed"
            )
        return replay_examples(args.tasks, s.scripts, s.limit, s.parallel, loop_settings(s)), format_replay
    if not (systems.catalog and s.prompt):
        raise InputError("genpi eval os-tasks needs --catalog and --prompt (or --replay-examples)")
    return evaluate_os_tasks(args.tasks, systems, s, command), format_summary


def _mind2web(args, command: list[str]) -> tuple[dict, Callable[[dict], str]]:
    from genpi.eval.mind2web import evaluate, format_summary

    settings = from_args(Mind2WebSettings, args)
    return evaluate(args.steps, from_args(SystemsSettings, args), settings, command), format_summary


def _webshop(args, command: list[str]) -> tuple[dict, Callable[[dict], str]]:
    from genpi.eval.webshop import evaluate, format_summary

    settings = from_args(WebShopSettings, args)
    return evaluate(settings.url, from_args(SystemsSettings, args), settings, command), format_summary


def _efficiency(args, command: list[str]) -> tuple[dict, Callable[[dict], str]]:
    from genpi.eval.efficiency import evaluate, format_summary

    s = dataclasses.asdict(from_args(EfficiencySettings, args))
    summary = evaluate(s.pop("catalog"), s.pop("prompt"), **s, command=command)
    summary.pop("rows")
    return summary, format_summary


# `genpi eval WHAT`: each subcommand and the function that runs it (the evaluation modules load only when chosen)
COMMANDS = {
    "fidelity": _fidelity,
    "leakage": _leakage,
    "os-tasks": _os_tasks,
    "mind2web": _mind2web,
    "webshop": _webshop,
    "efficiency": _efficiency,
}


def _check(args) -> None:
    """What argparse cannot say: counts at least 1, and fidelity and leakage need a system to compare."""
    for flag in ("limit", "max_new_tokens", "max_turns", "max_batch", "goals", "parallel", "rounds", "task_timeout"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if getattr(args, "onpolicy_samples", 0) < 0:
        raise InputError(f"--onpolicy-samples must be at least 0, got {args.onpolicy_samples}")
    if args.what in ("fidelity", "leakage") and not args.adapters and not args.served and not args.compressed:
        raise InputError(
            f"genpi eval {args.what} compares adapters with the teacher: give --adapters DIR or --served NAME=SPEC "
            "(or --compressed NAME=llmlingua2:RATE)"
        )


@exits_2_on_input_error
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["fidelity", *argv]  # `genpi eval DATA ...`: the fidelity evaluation
    args = build_parser().parse_args(argv)
    _check(args)
    summary, format_summary = COMMANDS[args.what](args, ["genpi", "eval", *argv])
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
