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
import json
import sys
from collections.abc import Callable

from genpi import InputError, exits_2_on_input_error

SERVED_HELP = "a served system, NAME=openai:BASE_URL/MODEL (MODEL may hold {prompt_id}); repeatable"
COMPRESSED_HELP = "the base given P compressed by LLMLingua, NAME=llmlingua2:RATE[:MODEL] (RATE in (0, 1]); repeatable"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", required=True)
    p.add_argument(
        "--adapters", nargs="+", default=[], metavar="DIR", help="adapters folders (genpi train --out), or NAME=DIR"
    )
    p.add_argument("--served", action="append", default=[], metavar="NAME=SPEC", help=SERVED_HELP)
    p.add_argument("--compressed", action="append", default=[], metavar="NAME=llmlingua2:RATE", help=COMPRESSED_HELP)
    p.add_argument(
        "--base", default="smollm2", help="base model: local folder or 'smollm2' (must be the adapters' base)"
    )
    p.add_argument(
        "--prompts",
        default=None,
        help="comma-separated prompt ids (default: all with an adapter, or all with --served)",
    )
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--no-record", action="store_true", help="leave the adapters' genpi.json unchanged")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genpi eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("fidelity", help="first turn, whole episode and teacher-forced fidelity on held-out inputs")
    p.add_argument("data", help="synthesis run folder (its held-out dialogues are used)")
    _common(p)
    p.add_argument("--out", default=None, help="evaluation folder (default: DATA/eval)")
    p.add_argument("--limit", type=int, default=None, help="at most this many held-out inputs per prompt")
    p.add_argument(
        "--max-turns", type=int, default=None, help="cap the episodes' turn limit (default: the synthesis run's)"
    )
    p.add_argument(
        "--onpolicy-samples",
        type=int,
        default=1,
        metavar="N",
        help="first-turn replies sampled per input (temperature 1) for the reverse KL(system || teacher); 0: skip it",
    )
    p.add_argument(
        "--no-collateral", action="store_true", help="skip the collateral damage KL(base || system) on general requests"
    )
    p = sub.add_parser("leakage", help="how much of P each system gives away to extraction requests")
    _common(p)
    p.add_argument("--out", required=True, help="evaluation folder")
    p = sub.add_parser("os-tasks", help="task success on AgentBench-format OS tasks, each in a fresh rootless sandbox")
    p.add_argument("tasks", help="tasks file (AgentBench OS format, .json or .jsonl)")
    p.add_argument(
        "--scripts",
        default=None,
        metavar="DIR",
        help="folder that script 'file's resolve in (AgentBench's script_dir, e.g. its "
        "data/os_interaction/scripts/dev); default: the tasks file's",
    )
    p.add_argument("--catalog", default=None, help="prompt catalog (required unless --replay-examples)")
    p.add_argument(
        "--prompt",
        default=None,
        help="the catalog prompt whose P the teacher gets "
        "(and the adapters internalize; required unless --replay-examples)",
    )
    p.add_argument(
        "--replay-examples",
        action="store_true",
        help="no model: play each task's own example solution (a match task's answer) and a wrong answer, "
        "print how many pass and why the rest fail",
    )
    p.add_argument(
        "--adapters", nargs="+", default=[], metavar="DIR", help="adapters folders (genpi train --out), or NAME=DIR"
    )
    p.add_argument("--served", action="append", default=[], metavar="NAME=SPEC", help=SERVED_HELP)
    p.add_argument("--compressed", action="append", default=[], metavar="NAME=llmlingua2:RATE", help=COMPRESSED_HELP)
    p.add_argument(
        "--agent",
        default=None,
        help="replay:FILE plays known replies (task index -> list of replies) instead of the model",
    )
    p.add_argument(
        "--base", default="smollm2", help="base model: local folder or 'smollm2' (must be the adapters' base)"
    )
    p.add_argument("--limit", type=int, default=None, help="the first N tasks only")
    p.add_argument("--parallel", type=int, default=4, help="tasks played at once (each in its own sandbox)")
    p.add_argument("--rounds", type=int, default=8, help="agent replies per task at most")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument(
        "--input-template", default=None, help="the task's user turn, with {description} (default: AgentBench's)"
    )
    p.add_argument(
        "--task-timeout",
        type=int,
        default=3600,
        help="seconds a task's sandbox lives, model time included (default 3600)",
    )
    p.add_argument("--out", default="eval", help="evaluation folder (default: ./eval)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    _task_parsers(sub)
    p = sub.add_parser(
        "efficiency",
        help="FLOPs, latency and KV-cache bytes per turn with P and internalized, in three serving regimes",
    )
    p.add_argument("--catalog", required=True)
    p.add_argument("--prompt", required=True, metavar="ID")
    p.add_argument(
        "--data",
        default=None,
        metavar="RUN",
        help="synthesis run: the conversation is its held-out dialogues (default: the shots)",
    )
    p.add_argument(
        "--adapters",
        default=None,
        metavar="DIR",
        help="adapters folder (DIR/ID): the LoRA served unmerged "
        "(default: a fresh LoRA of genpi train's default shape)",
    )
    p.add_argument("--turns", type=int, default=5)
    p.add_argument(
        "--compressed-prompt",
        default=None,
        metavar="FILE",
        help="a shortened P (text, used as the system turn) to compare with",
    )
    p.add_argument("--compressed", action="append", default=[], metavar="NAME=llmlingua2:RATE", help=COMPRESSED_HELP)
    p.add_argument(
        "--concurrent", type=int, default=1, metavar="C", help="KV bytes also for C concurrent conversations"
    )
    p.add_argument(
        "--model-config",
        default=None,
        metavar="NAME_OR_PATH",
        help="analytic counts alone for this config (config.json, a folder, or a shipped name: llama-3-8b)",
    )
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        metavar="N",
        help="with --model-config: P adds N tokens to every context (over the system without P)",
    )
    p.add_argument(
        "--base", default="smollm2", help="base model: local folder or 'smollm2' (its tokenizer counts the tokens)"
    )
    p.add_argument("--repeats", type=int, default=3, help="latency: median of this many runs")
    p.add_argument("--out", default=None, help="evaluation folder (rows, efficiency.json, plot)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    return parser


def _task_parsers(sub) -> None:
    """mind2web and webshop: one catalog prompt, task success of the teacher, the base and any adapters."""
    p = sub.add_parser("mind2web", help="Mind2Web step success (multiple-choice element selection, as AgentBench asks)")
    p.add_argument("steps", help="prepared Mind2Web steps, JSON lines (see genpi.eval.mind2web)")
    p.add_argument("--limit", type=int, default=None, help="the first N steps")
    p.add_argument("--max-new-tokens", type=int, default=128)
    q = sub.add_parser("webshop", help="WebShop reward of a client on a WebShop server you run")
    q.add_argument("--url", default=None, help="the WebShop web app's address, e.g. http://localhost:3000")
    q.add_argument("--goals", type=int, default=10, help="goals 0..N-1 of the server (default 10)")
    q.add_argument("--max-new-tokens", type=int, default=256)
    for p in (p, q):
        p.add_argument("--catalog", required=True)
        p.add_argument("--prompt", required=True, help="the catalog prompt's id")
        p.add_argument(
            "--adapters", nargs="*", default=[], metavar="DIR", help="adapters folders (genpi train --out), or NAME=DIR"
        )
        p.add_argument("--served", action="append", default=[], metavar="NAME=SPEC", help=SERVED_HELP)
        p.add_argument(
            "--compressed", action="append", default=[], metavar="NAME=llmlingua2:RATE", help=COMPRESSED_HELP
        )
        p.add_argument(
            "--base", default="smollm2", help="base model: local folder or 'smollm2' (must be the adapters' base)"
        )
        p.add_argument(
            "--layout",
            choices=("agentbench", "examples"),
            default="agentbench",
            help="the user turns: AgentBench's text, or the layout examples/agents.yaml's prompts show",
        )
        p.add_argument("--out", default="eval", help="evaluation folder (default: ./eval)")
        p.add_argument("--max-batch", type=int, default=32)
        p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def _fidelity(args, command: list[str]) -> tuple[dict, Callable[[dict], str]]:
    from genpi.eval.fidelity import evaluate_catalog, format_summary

    summary = evaluate_catalog(
        args.data,
        args.catalog,
        args.adapters,
        args.base,
        _prompts(args),
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        max_turns=args.max_turns,
        out=args.out,
        record=not args.no_record,
        max_batch=args.max_batch,
        command=command,
        progress=not args.no_progress,
        served=args.served,
        onpolicy_samples=args.onpolicy_samples,
        collateral=not args.no_collateral,
        compressed=args.compressed,
    )
    return summary, format_summary


def _leakage(args, command: list[str]) -> tuple[dict, Callable[[dict], str]]:
    from genpi.eval.leakage import format_summary, probe_catalog

    summary = probe_catalog(
        args.catalog,
        args.adapters,
        args.out,
        args.base,
        _prompts(args),
        max_new_tokens=args.max_new_tokens,
        record=not args.no_record,
        max_batch=args.max_batch,
        command=command,
        progress=not args.no_progress,
        served=args.served,
        compressed=args.compressed,
    )
    return summary, format_summary


def _os_tasks(args, command: list[str]) -> tuple[dict, Callable[[dict], str]]:
    from genpi.eval.os_tasks import (
        INPUT_TEMPLATE,
        LoopSettings,
        evaluate_os_tasks,
        format_replay,
        format_summary,
        replay_examples,
    )
    from genpi.eval.sandbox import Limits

    settings = LoopSettings(
        args.rounds,
        max_new_tokens=args.max_new_tokens,
        input_template=args.input_template or INPUT_TEMPLATE,
        limits=Limits(wall_s=args.task_timeout),
    )
    if args.replay_examples:
        if args.agent or args.adapters or args.served:
            raise InputError(
                "--replay-examples plays the tasks' own solutions: leave out --agent, --adapters and --served"
            )
        return replay_examples(args.tasks, args.scripts, args.limit, args.parallel, settings), format_replay
    if not (args.catalog and args.prompt):
        raise InputError("genpi eval os-tasks needs --catalog and --prompt (or --replay-examples)")
    summary = evaluate_os_tasks(
        args.tasks,
        args.catalog,
        args.prompt,
        args.adapters,
        args.base,
        agent=args.agent,
        limit=args.limit,
        parallel=args.parallel,
        out=args.out,
        settings=settings,
        max_batch=args.max_batch,
        command=command,
        served=args.served,
        scripts=args.scripts,
        compressed=args.compressed,
    )
    return summary, format_summary


def _web(args, command: list[str]) -> tuple[dict, Callable[[dict], str]]:
    """Mind2Web (a steps file, --limit) and WebShop (a server, --goals): the same call otherwise."""
    if args.what == "mind2web":
        from genpi.eval.mind2web import evaluate, format_summary

        source, count = args.steps, {"limit": args.limit}
    else:
        from genpi.eval.webshop import evaluate, format_summary

        source, count = args.url, {"goals": args.goals}
    summary = evaluate(
        source,
        args.catalog,
        args.prompt,
        args.adapters,
        args.base,
        **count,
        out=args.out,
        layout=args.layout,
        max_new_tokens=args.max_new_tokens,
        max_batch=args.max_batch,
        command=command,
        served=args.served,
        compressed=args.compressed,
    )
    return summary, format_summary


def _efficiency(args, command: list[str]) -> tuple[dict, Callable[[dict], str]]:
    from genpi.eval.efficiency import evaluate, format_summary

    summary = evaluate(
        args.catalog,
        args.prompt,
        data=args.data,
        adapters=args.adapters,
        turns=args.turns,
        compressed_prompt=args.compressed_prompt,
        compressed=args.compressed,
        concurrent=args.concurrent,
        model_config=args.model_config,
        prompt_tokens=args.prompt_tokens,
        base=args.base,
        repeats=args.repeats,
        out=args.out,
        command=command,
    )
    summary.pop("rows")
    return summary, format_summary


# `genpi eval WHAT`: each subcommand and the function that runs it (the evaluation modules load only when chosen)
COMMANDS = {
    "fidelity": _fidelity,
    "leakage": _leakage,
    "os-tasks": _os_tasks,
    "mind2web": _web,
    "webshop": _web,
    "efficiency": _efficiency,
}


def _prompts(args) -> list[str] | None:
    return args.prompts.split(",") if args.prompts else None


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
