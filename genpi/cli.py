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
    genpi serve ADAPTERS --catalog C    an OpenAI-compatible server for the adapters (flags go to genpi.serve)
    genpi eval efficiency --catalog C --prompt ID [--adapters A]  FLOPs, latency and KV bytes with P and internalized
    genpi report RUN [--out report.md]  Markdown report with plots from a run's files
    genpi stats OUT [--json]            quality statistics per prompt
    genpi sql OUT QUERY [--json]        one read-only SELECT over the view `dialogues`

Bad input (InputError) prints `genpi: error: MESSAGE` on one line and exits with status 2 (genpi.exits_2_on_input_error,
the one handler of every entry point).
"""

from __future__ import annotations

import argparse
import json
import sys

from genpi import __version__, exits_2_on_input_error


def cmd_synth(args: argparse.Namespace) -> int:
    from genpi.synth.run import main as synth_main  # heavy imports (Ray, engines) only when needed

    return synth_main(args.rest)


def cmd_train(args: argparse.Namespace) -> int:
    from genpi.train.run import main as train_main

    return train_main(args.rest)


def cmd_eval(args: argparse.Namespace) -> int:
    from genpi.eval.run import main as eval_main

    return eval_main(args.rest)


def cmd_run(args: argparse.Namespace) -> int:
    from genpi.run import main as run_main

    return run_main(args.rest)


def cmd_study(args: argparse.Namespace) -> int:
    from genpi.study import main as study_main

    return study_main(args.rest)


def cmd_serve(args: argparse.Namespace) -> int:
    from genpi.serve import main as serve_main

    return serve_main(args.rest)


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
        print(f"genpi sql: the result was cut at {args.max_rows} rows (--max-rows); add a LIMIT, or raise --max-rows", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from genpi.synth.stats import MAX_ROWS, MAX_TEMP, MEMORY_LIMIT, THREADS, TIMEOUT_S

    parser = argparse.ArgumentParser(prog="genpi", description="Generative Prompt Internalization")
    parser.add_argument("--version", action="version", version=f"genpi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="catalog to evaluated adapters and a report, resumable (genpi run --help)", add_help=False)
    p.set_defaults(handler=cmd_run, passthrough=True)

    p = sub.add_parser("study", help="every internalization method on the same data and budget, one table (genpi study --help)", add_help=False)
    p.set_defaults(handler=cmd_study, passthrough=True)

    p = sub.add_parser(
        "synth",
        help="synthesize dialogues for a prompt catalog (genpi synth --help for its flags)",
        add_help=False,  # --help goes through to the synth parser
    )
    p.set_defaults(handler=cmd_synth, passthrough=True)

    p = sub.add_parser("train", help="train one adapter per prompt (genpi train --help for its flags)", add_help=False)
    p.set_defaults(handler=cmd_train, passthrough=True)

    p = sub.add_parser("eval", help="score adapters on held-out inputs (genpi eval --help for its flags)", add_help=False)
    p.set_defaults(handler=cmd_eval, passthrough=True)

    p = sub.add_parser("serve", help="an OpenAI-compatible server for adapters (genpi serve --help for its flags)", add_help=False)
    p.set_defaults(handler=cmd_serve, passthrough=True)

    p = sub.add_parser("report", help="a Markdown report with PNG plots from a run's synthesis, training and evaluation files")
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
    p.add_argument("query", metavar="QUERY", help="e.g. \"SELECT prompt_id, count(*) FROM dialogues GROUP BY ALL\"")
    p.add_argument("--json", action="store_true", help="print a JSON list of row objects instead of a table")
    p.add_argument("--memory-limit", default=MEMORY_LIMIT, help="DuckDB memory limit (default %(default)s)")
    p.add_argument("--threads", type=int, default=THREADS, help="DuckDB threads (default %(default)s)")
    p.add_argument("--max-temp", default=MAX_TEMP, help="what DuckDB may spill to disk, in a folder inside OUT (default %(default)s)")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S,
                   help="seconds before the query is stopped, converting and printing its rows included (default %(default)s)")
    p.add_argument("--max-rows", type=int, default=MAX_ROWS, help="rows printed at most; the rest are not fetched (default %(default)s)")
    p.set_defaults(handler=cmd_sql)
    return parser


@exits_2_on_input_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
