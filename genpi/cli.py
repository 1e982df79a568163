"""The `genpi` command: one small handler per subcommand.

    genpi run CATALOG --out RUN [--config FILE] ...  the whole pipeline, resumable (flags go to genpi.run)
    genpi study CATALOG --prompt ID --out DIR ...  every method on the same data and budget, one table (genpi.study)
    genpi synth CATALOG --out OUT ...   synthesize dialogues (all flags go to genpi.synth.run)
    genpi train DATA --catalog C --out A  train one adapter per prompt (flags go to genpi.train.run)
    genpi eval fidelity DATA --catalog C --adapters A [A ...]  fidelity without P against the teacher
    genpi eval leakage --catalog C --adapters A [A ...] --out E  how much of P the systems give away
    genpi eval os-tasks TASKS --catalog C --prompt ID [--adapters A ...]  OS task success in a sandbox
    genpi eval os-tasks TASKS --replay-examples [--scripts DIR]  each task's own solution and a wrong answer, replayed
    genpi eval mind2web STEPS --catalog C --prompt ID [--adapters A ...]  Mind2Web step success
    genpi eval webshop --url URL --catalog C --prompt ID [--adapters A ...]  WebShop reward
    genpi serve ADAPTERS --catalog C    an OpenAI-compatible server for the adapters (flags go to genpi.serve.cli)
    genpi eval efficiency --catalog C --prompt ID [--adapters A]  FLOPs, latency and KV bytes with P and internalized
    genpi report RUN [--out report.md]  Markdown report with plots from a run's files
    genpi stats OUT [--json]            quality statistics per prompt
    genpi sql OUT QUERY [--json]        one read-only SELECT over the view `dialogues`
    genpi export OUT --to DIR [--format messages|jsonl|parquet]  the dialogues as a chat dataset with a card
    genpi push ADAPTERS --repo ORG/NAME [--dataset]  adapters (or an exported dataset) to the Hugging Face hub

Bad input (InputError) prints `genpi: error: MESSAGE` on one line and exits with status 2 (genpi.exits_2_on_input_error,
the one handler of every entry point).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from genpi import InputError, __version__, exits_2_on_input_error

# The commands whose flags their own entry point reads (`genpi synth --help` goes through to it): the module whose
# main(argv) runs it, imported only when the command runs (heavy imports: Ray, engines), and the command's help line.
PASSTHROUGH = {
    "run": ("genpi.run", "catalog to evaluated adapters and a report, resumable (genpi run --help)"),
    "study": (
        "genpi.study",
        "every internalization method on the same data and budget, one table (genpi study --help)",
    ),
    "synth": ("genpi.synth.run", "synthesize dialogues for a prompt catalog (genpi synth --help for its flags)"),
    "train": ("genpi.train.run", "train one adapter per prompt (genpi train --help for its flags)"),
    "eval": ("genpi.eval.run", "score adapters on held-out inputs (genpi eval --help for its flags)"),
    "serve": ("genpi.serve.cli", "an OpenAI-compatible server for adapters (genpi serve --help for its flags)"),
}


# pyproject's extras: a module a command imports -> the extra that installs it (`pip install 'genpi[EXTRA]'`)
EXTRAS = {"starlette": "serve", "uvicorn": "serve", "matplotlib": "report", "gguf": "gguf"}


def cmd_passthrough(args: argparse.Namespace) -> int:
    return importlib.import_module(PASSTHROUGH[args.command][0]).main(args.rest)


def cmd_report(args: argparse.Namespace) -> int:
    from genpi.eval.report import write_report

    path = write_report(args.run, args.eval, args.out)
    print(path)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from genpi.synth.stats import format_stats, quality_stats

    stats = quality_stats(args.out)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from genpi.synth.stats import format_rows, rows_json, run_sql

    result = run_sql(args.out, args.query, args.memory_limit, args.threads, args.timeout, args.max_rows, args.max_temp)
    text = rows_json(result) if args.json else format_rows(result.columns, result.rows, result.check_time)
    print(text)
    if result.cut:  # on stderr: --json output stays one JSON document
        print(
            f"genpi sql: the result was cut at {args.max_rows} rows (--max-rows); add a LIMIT, or raise --max-rows",
            file=sys.stderr,
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from genpi.synth.export import export

    prompts = [p for p in args.prompts.split(",") if p] if args.prompts else None
    front = export(args.out, args.to, args.format, args.with_prompt, prompts, args.license)
    sizes = ", ".join(f"{n} {split}" for split, n in front["num_rows"].items())
    print(f"{args.to}: {sizes} dialogues ({args.format}), card in README.md")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from genpi.data.push import push

    pushed = push(args.path, args.repo, dataset=args.dataset, private=args.private)
    print(f"{pushed['url']}: {len(pushed['staged'])} files")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from genpi.data.dialogues import MAX_TEMP, MEMORY_LIMIT, THREADS
    from genpi.synth.stats import MAX_ROWS, TIMEOUT_S

    parser = argparse.ArgumentParser(prog="genpi", description="Generative Prompt Internalization")
    parser.add_argument("--version", action="version", version=f"genpi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, (_, help) in PASSTHROUGH.items():
        p = sub.add_parser(name, help=help, add_help=False)  # --help goes through to the command's own parser
        p.set_defaults(handler=cmd_passthrough, passthrough=True)

    p = sub.add_parser(
        "report", help="a Markdown report with PNG plots from a run's synthesis, training and evaluation files"
    )
    p.add_argument("run", metavar="RUN", help="synthesis run folder")
    p.add_argument("--eval", default=None, help="evaluation folder (default: RUN/eval)")
    p.add_argument("--out", default=None, help="Markdown file (default: RUN/report.md); plots go beside it")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("stats", help="quality statistics of a synthesis run, per prompt")
    p.add_argument("out", metavar="OUT", help="synthesis run folder")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(handler=cmd_stats)

    p = sub.add_parser("sql", help="run one read-only SELECT over the view `dialogues` of a run")
    p.add_argument("out", metavar="OUT", help="synthesis run folder")
    p.add_argument("query", metavar="QUERY", help='e.g. "SELECT prompt_id, count(*) FROM dialogues GROUP BY ALL"')
    p.add_argument("--json", action="store_true", help="print a JSON list of row objects instead of a table")
    p.add_argument("--memory-limit", default=MEMORY_LIMIT, help="DuckDB memory limit (default %(default)s)")
    p.add_argument("--threads", type=int, default=THREADS, help="DuckDB threads (default %(default)s)")
    p.add_argument(
        "--max-temp",
        default=MAX_TEMP,
        help="what DuckDB may spill to disk, in a folder inside OUT (default %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT_S,
        help="seconds before the query is stopped, converting and printing its rows included (default %(default)s)",
    )
    p.add_argument(
        "--max-rows",
        type=int,
        default=MAX_ROWS,
        help="rows printed at most; the rest are not fetched (default %(default)s)",
    )
    p.set_defaults(handler=cmd_sql)

    p = sub.add_parser("export", help="a run's teacher dialogues as a chat dataset (TRL messages) with a dataset card")
    p.add_argument("out", metavar="OUT", help="synthesis run folder (or a genpi run folder: its data/)")
    p.add_argument("--to", required=True, metavar="DIR", help="export folder (must not exist, or be empty)")
    p.add_argument(
        "--format",
        choices=["messages", "jsonl", "parquet"],
        default="messages",
        help="messages: Parquet with a chat `messages` column (default); jsonl: the same as JSON Lines; "
        "parquet: the dialogue rows as genpi writes them",
    )
    p.add_argument("--with-prompt", action="store_true", help="lead each dialogue with P (its system turn and shots)")
    p.add_argument("--prompts", default=None, help="comma-separated prompt ids to export (default: all)")
    p.add_argument("--license", default="other", help="the card's licence field (default %(default)s)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("push", help="adapters (ADAPTERS or ADAPTERS/ID) or an exported dataset to the Hugging Face hub")
    p.add_argument("path", metavar="PATH", help="adapters folder, one adapter's folder, or (--dataset) genpi export's")
    p.add_argument("--repo", required=True, help="the hub repository ORG/NAME (created if need be)")
    p.add_argument("--dataset", action="store_true", help="PATH is a dataset (genpi export --to DIR)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.set_defaults(handler=cmd_push)
    return parser


@exits_2_on_input_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return args.handler(args)
    except ModuleNotFoundError as e:  # an optional part that is not installed: name the extra that brings it
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        raise InputError(
            f"genpi {args.command} needs {e.name}, which is not installed: pip install 'genpi[{extra}]'"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
