"""`genpi run CATALOG --out RUN`: catalog to evaluated adapters in one resumable command.

    RUN/data              synthesis (genpi synth), its quality table in RUN/data/stats.txt
    RUN/adapters/NAME     one adapters folder per method (genpi train; NAME: the method, or a
                          methods entry NAME=METHOD's name)
    RUN/eval              fidelity of every method against the teacher (genpi eval fidelity); with
                          --tasks ID=FILE, OS task success of every method on that prompt (genpi eval
                          os-tasks); with --mind2web ID=FILE, Mind2Web step success (genpi eval
                          mind2web); per prompt, efficiency with the first method's adapter (genpi eval
                          efficiency)
    RUN/report            report.md with its plots (genpi report)
    RUN/run.json          each stage's command, state and time
    RUN/run.lock          while a run goes on: a second run of the same folder is refused

Stages, in order: synth, stats, train NAME (each method), eval fidelity, eval os-tasks ID (each --tasks),
eval mind2web ID (each --mind2web), eval efficiency ID (each prompt), report. Each stage is the stage's
own command, called with the arguments recorded in run.json. A rerun skips the stages recorded as done
with the same arguments (the report is rewritten when another stage ran), and the stages that were cut
off resume as they do alone (synthesis by shards, training from the trials' checkpoints). A rerun whose
arguments differ for a stage already started is refused: choose another --out.

The sizes come from `--config FILE` (genpi.runconfig: a YAML file with a section per stage; the packaged presets
genpi/presets/demo.yaml and paper.yaml are such files), else from the demo preset; a flag given here wins.
`--preset NAME` and the quoted `--synth-args "..."` flags (each stage's) still work for this release, deprecated.

Every row of the paper's Table 1 is a method or a system here (docs/table1.md): a methods entry NAME=METHOD is a
variant of METHOD with its own train flags (the config's `variants:` section) and its own folder, RUN/adapters/NAME
(prepend at 100% and 50%: prepend-100=prepend, prepend-50=prepend); `--compressed NAME=llmlingua2:RATE` (or the
config's `compressed:`) adds a system that is the base given a compressed P to every evaluation stage.

Over 400 lines on purpose: one pipeline driver, whose stage commands, run.json record and rules for skipping,
resuming and refusing stages depend on each other and are read together.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from genpi import InputError, exits_2_on_input_error
from genpi.data.runfolder import check_out, holding_lock, write_json
from genpi.runconfig import PRESET_DIR, PRESETS, Preset, check_stage_flags, preset_path, read_config

RUN_FILE = "run.json"
LOCK = "run.lock"  # held while the run goes on (genpi.data.runfolder)


TASK_FLAGS = {"--tasks": "its AgentBench-format OS tasks file", "--mind2web": "its Mind2Web steps file (JSON lines)"}


def task_files(specs: list[str], flag: str = "--tasks") -> dict[str, str]:
    """`--tasks` (or `--mind2web`) values (each ID=FILE, or several, comma-separated) as {prompt id: file}."""
    files: dict[str, str] = {}
    for spec in (part for value in specs for part in value.split(",") if part):
        prompt_id, _, path = spec.partition("=")
        if not prompt_id or not path:
            raise InputError(f"{flag} {spec}: expected ID=FILE (a catalog prompt and {TASK_FLAGS[flag]})")
        if prompt_id in files:
            raise InputError(f"{flag} {spec}: prompt {prompt_id} has a file already ({files[prompt_id]})")
        files[prompt_id] = path
    return files


def method_names(text: str) -> dict[str, str]:
    """A methods list (`genpi,prepend-100=prepend,...`) as {name: method}: an entry NAME=METHOD trains METHOD into
    RUN/adapters/NAME with NAME's variant flags; a bare METHOD is its own name. InputError for an unknown method or a
    name that is repeated or cannot be a system name."""
    from genpi.eval.systems import BASE, SYSTEM_NAME, TEACHER  # a name is an evaluated system's too
    from genpi.train.recipe import METHODS

    entries = [e.strip() for e in text.split(",") if e.strip()]
    pairs = [entry.partition("=")[::2] if "=" in entry else (entry, entry) for entry in entries]
    unknown = [method for _, method in pairs if method not in METHODS]
    if unknown or not pairs:
        raise InputError(f"--methods: unknown method(s) {', '.join(unknown)}: expected some of {', '.join(METHODS)}")
    names: dict[str, str] = {}
    for entry, (name, method) in zip(entries, pairs):
        if not SYSTEM_NAME.fullmatch(name) or name in (TEACHER, BASE) or name in names:
            raise InputError(
                f"--methods {entry}: name {name!r} is repeated, reserved (teacher, base) or not [A-Za-z0-9._+-]: "
                "two rows of one method need two names, NAME=METHOD"
            )
        names[name] = method
    return names


def compressed_values(args: argparse.Namespace, preset: Preset) -> list[str]:
    """The run's compressed systems, NAME=llmlingua2:RATE each: the --compressed flags, else the config's."""
    given = [part for value in getattr(args, "compressed", None) or [] for part in value.split(",") if part]
    return given or [part for part in preset.compressed.split(",") if part]


def stage_commands(
    args: argparse.Namespace, preset: Preset, catalog_ids: list[str], catalog_train: set[str] = frozenset()
) -> list[tuple[str, list[str]]]:
    """[(stage name, the argv of its command)], in order; every size from the flag, else the preset. `catalog_ids`:
    the catalog's prompt ids (the run's prompts when neither --prompts nor the preset names them); `catalog_train`:
    the training settings (lam, epochs, lr) that the run's prompts set in the catalog, where the preset's yield."""
    run = Path(args.out)
    data, eval_dir = str(run / "data"), str(run / "eval")
    pick = lambda name: getattr(preset, name) if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    prompts, named = pick("prompts"), method_names(pick("methods"))
    methods = list(named)  # the names: each one's folder, stage and system
    compressed = [flag for spec in compressed_values(args, preset) for flag in ("--compressed", spec)]
    max_turns, max_new = pick("max_turns"), pick("max_new_tokens")
    turns = ["--max-turns", str(max_turns)] if max_turns else []
    synth = [
        args.catalog,
        "--out",
        data,
        "--samples",
        str(pick("samples")),
        "--heldout",
        str(pick("heldout")),
        "--max-new-tokens",
        str(max_new),
        "--engine",
        pick("engine"),
        "--generator",
        args.generator,
        "--target",
        args.base,
        "--no-stats",
        *turns,
        *preset.synth_flags,
    ]
    only = ["--prompts", prompts] if prompts else []
    stages = [("synth", synth + only + shlex.split(args.synth_args)), ("stats", [data])]
    # the methods trained in full: genpi train's full-fine-tune sizes unless a flag is given, on their own GPUs
    full = set((getattr(args, "full_finetune", None) or preset.full_finetune).split(","))
    full_gpus = ["--gpus-per-trial", str(preset.full_finetune_gpus)] if preset.full_finetune_gpus else []
    for name, method in named.items():
        variant = preset.variant_flags.get(name, ())
        in_full = name in full or "--full-finetune" in variant
        train = [
            data,
            "--catalog",
            args.catalog,
            "--out",
            str(run / "adapters" / name),
            "--base",
            args.base,
            "--method",
            method,
            *(["--full-finetune"] if in_full else []),
            *([] if in_full and args.batch_size is None else ["--batch-size", str(pick("batch_size"))]),
            "--micro-batch",
            str(pick("micro_batch")),
        ]
        for flag, key, size in (
            ("--lambdas", "lam", "lambdas"),
            ("--epochs", "epochs", "epochs"),
            ("--lr", "lr", "lr"),
        ):
            if getattr(args, size) is None and in_full and size != "lambdas":  # genpi train's full-fine-tune defaults
                continue
            if (
                getattr(args, size) is not None or key not in catalog_train
            ):  # a preset's value yields to the catalog's train settings
                train += [flag, str(pick(size))]
        if pick("steps"):
            train += ["--max-steps", str(pick("steps"))]
        if pick("cpus_per_trial") is not None:
            train += ["--cpus-per-trial", str(pick("cpus_per_trial"))]
        extra = [*preset.train_flags, *(full_gpus if in_full else []), *variant, *shlex.split(args.train_args)]
        stages.append((f"train {name}", train + extra))
    limit = pick("eval_limit")
    adapters = [f"{m}={run / 'adapters' / m}" for m in methods]
    fidelity = [
        "fidelity",
        data,
        "--catalog",
        args.catalog,
        "--base",
        args.base,
        "--out",
        eval_dir,
        "--adapters",
        *adapters,
        "--max-new-tokens",
        str(max_new),
        *turns,
        *only,
        *(["--limit", str(limit)] if limit else []),
        *compressed,
    ]
    stages.append(("eval fidelity", fidelity + [*preset.eval_flags, *shlex.split(args.eval_args)]))
    run_ids = prompts.split(",") if prompts else catalog_ids
    tasks_extra = [*preset.task_flags, *shlex.split(args.task_args)]
    mind2web_extra = [*preset.mind2web_flags, *shlex.split(args.mind2web_args)]
    for flag, kind, extra in (("--tasks", "os-tasks", tasks_extra), ("--mind2web", "mind2web", mind2web_extra)):
        for prompt_id, path in task_files(getattr(args, flag[2:]), flag).items():
            if prompt_id not in run_ids:
                raise InputError(
                    f"{flag} {prompt_id}={path}: {prompt_id} is not a prompt of this run ({', '.join(run_ids)})"
                )
            tasks = [
                kind,
                path,
                "--catalog",
                args.catalog,
                "--prompt",
                prompt_id,
                "--base",
                args.base,
                "--adapters",
                *adapters,
                "--out",
                eval_dir,
                *(["--max-new-tokens", str(max_new)] if kind == "os-tasks" else []),
                *compressed,
            ]
            stages.append((f"eval {kind} {prompt_id}", tasks + extra))
    for prompt_id in run_ids:  # the first method's adapter: its LoRA shape is what the unmerged cost counts
        efficiency = [
            "efficiency",
            "--catalog",
            args.catalog,
            "--prompt",
            prompt_id,
            "--data",
            data,
            "--base",
            args.base,
            "--adapters",
            str(run / "adapters" / methods[0]),
            "--out",
            eval_dir,
            *compressed,
            *preset.efficiency_flags,
        ]
        stages.append((f"eval efficiency {prompt_id}", efficiency + shlex.split(args.efficiency_args)))
    stages.append(("report", [data, "--eval", eval_dir, "--out", str(run / "report" / "report.md")]))
    return stages


def run_stage(name: str, argv: list[str], progress: bool) -> int:
    """One stage through its own entry point; its exit status (0: done). genpi study runs one more stage of its
    own, through its own function (run_stages' `run_stage`): this module imports nothing of the study's."""
    quiet = [] if progress else ["--no-progress"]
    if name == "synth":
        from genpi.synth.run import main

        return main(argv + quiet)
    if name == "stats":
        from genpi.synth.stats import format_stats, quality_stats

        text = format_stats(quality_stats(argv[0]))
        Path(argv[0], "stats.txt").write_text(text + "\n")
        print(text, file=sys.stderr)
        return 0
    if name.startswith("train "):
        from genpi.train.run import main

        return main(argv + quiet)
    if name.startswith("eval "):
        from genpi.eval.run import main

        return on_a_gpu_if_any(
            main, argv + (quiet if name == "eval fidelity" else [])
        )  # the others draw no progress bars
    if name == "report":
        from genpi.eval.report import write_report

        data, _, eval_dir, _, out = argv
        print(f"genpi run: report: {write_report(data, eval_dir, out)}", file=sys.stderr)
        return 0
    raise AssertionError(f"unknown stage {name!r}")


def on_a_gpu_if_any(stage_main, argv: list[str]) -> int:
    """`stage_main(argv)` in a Ray task holding one GPU when the Ray cluster has GPUs (on a cluster the driver
    usually sits on a CPU-only head node, and evaluation loads the base model); else in this process."""
    import ray

    from genpi.cluster import init_ray

    init_ray()
    if not ray.cluster_resources().get("GPU"):
        return stage_main(argv)
    return ray.get(ray.remote(num_gpus=1, max_retries=0)(stage_main).remote(argv))


def read_record(run: Path) -> dict:
    path = run / RUN_FILE
    if not path.exists():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise InputError(
            f"{path}: not valid JSON ({e}); it records what this run did, so remove the run or repair it"
        ) from None


def write_record(run: Path, record: dict) -> None:
    write_json(run / RUN_FILE, record)  # atomic: a kill never leaves half a record


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def expected_s(preset: Preset, name: str) -> float | None:
    """The preset's time for a stage; a per-prompt stage's ("eval efficiency ID") is keyed without the id."""
    return preset.expected_s.get(name, preset.expected_s.get(name.rpartition(" ")[0]))


def estimate_left(preset: Preset, names: list[str], index: int, elapsed: float, spent_expected: float) -> str:
    """Time left for stages index.. from the preset's measured times, scaled by how this run compares so far."""
    left = [expected_s(preset, n) for n in names[index:]]
    if not preset.expected_s or None in left:
        return "no estimate for these sizes"
    scale = elapsed / spent_expected if spent_expected and elapsed > 30 else 1.0
    return f"about {_minutes(sum(left) * scale)} left"


def refuse_changed_stages(run: Path, stages: list[tuple[str, list[str]]]) -> None:
    """A stage already started with other arguments cannot resume: refused before any work (exit 2)."""
    record = read_record(run)
    for name, argv in stages:
        before = record["stages"].get(name)
        if before and before["argv"] != argv:
            raise InputError(
                f"{run}: stage {name!r} was started with other settings ({' '.join(before['argv'])}); "
                "rerun with the same flags to resume it, or choose another --out"
            )


def run_stages(
    run: Path, stages: list[tuple[str, list[str]]], preset: Preset, preset_name: str, progress: bool, stage_runner=None
) -> int:
    """Each stage in order through `stage_runner` (default run_stage), recorded in RUN/run.json: a stage done before
    is skipped (the last, which reads what the others wrote, is redone when another stage ran); returns the first
    failing stage's exit status, else 0."""
    with holding_lock(run / LOCK, "genpi run"):  # two runs of one folder would run the same stages at once
        return _run_stages(run, stages, preset, preset_name, progress, stage_runner or run_stage)


def _run_stages(
    run: Path, stages: list[tuple[str, list[str]]], preset: Preset, preset_name: str, progress: bool, run_stage
) -> int:
    refuse_changed_stages(run, stages)
    record = read_record(run)
    record["preset"] = preset_name
    names = [name for name, _ in stages]
    started, spent_expected, ran = time.monotonic(), 0.0, False
    for i, (name, argv) in enumerate(stages):
        state = record["stages"].get(name, {})
        if state.get("status") == "done" and not (i == len(stages) - 1 and ran):
            print(f"genpi run: [{i + 1}/{len(stages)}] {name}: done before, skipped", file=sys.stderr)
            continue
        elapsed = time.monotonic() - started
        print(
            f"genpi run: [{i + 1}/{len(stages)}] {name} (elapsed {_minutes(elapsed)}, "
            f"{estimate_left(preset, names, i, elapsed, spent_expected)})",
            file=sys.stderr,
        )
        record["stages"][name] = {"argv": argv, "status": "running", "seconds": state.get("seconds", 0.0)}
        write_record(run, record)
        t0, ran = time.monotonic(), True
        status = run_stage(name, argv, progress)
        record["stages"][name]["seconds"] += time.monotonic() - t0
        record["stages"][name]["status"] = "done" if status == 0 else f"failed (exit {status})"
        write_record(run, record)
        spent_expected += expected_s(preset, name) or 0.0
        if status != 0:
            print(
                f"genpi run: {name} failed (exit {status}); fix the cause and rerun the same command to resume",
                file=sys.stderr,
            )
            return status
    print(f"genpi run: {len(stages)} stages done in {_minutes(time.monotonic() - started)}", file=sys.stderr)
    return 0


# the deprecated quoted-flag strings (--synth-args "..."): the --config section that replaces each, the command whose
# flags it holds, an example
DEPRECATED_ARGS = {
    "synth_args": ("synth", "genpi synth", "--generator-tp 4 --target-replicas 4"),
    "train_args": ("train", "every genpi train", "--gpus-per-trial 1"),
    "eval_args": ("eval", "genpi eval fidelity", None),
    "task_args": ("tasks", "genpi eval os-tasks", "--limit 5 --rounds 4"),
    "mind2web_args": ("mind2web", "genpi eval mind2web", "--limit 5 --layout examples"),
    "efficiency_args": ("efficiency", "genpi eval efficiency", "--turns 5 --repeats 3"),
}


def run_config(args: argparse.Namespace) -> tuple[Preset, str]:
    """The run's sizes and the name run.json records for them: --config FILE, else the packaged preset --preset NAME
    (deprecated). A section's flag that its stage does not have is refused now, naming the file and the key."""
    if args.config:
        preset, name = read_config(args.config), str(args.config)
    else:
        preset, name = PRESETS[args.preset], args.preset
    check_stage_flags(preset, name if args.config else str(preset_path(name)))
    for dest, (section, _, _) in DEPRECATED_ARGS.items():
        if getattr(args, dest):
            flag = "--" + dest.replace("_", "-")
            print(
                f"genpi run: {flag} is deprecated and goes in the next release: put its flags in the {section}: "
                "section of a --config file",
                file=sys.stderr,
            )
    return preset, name


def run_pipeline(args: argparse.Namespace) -> int:
    from genpi.catalog import load_catalog
    from genpi.train.recipe import METHODS

    preset, preset_name = run_config(args)
    check_out(args.out)  # an object-store URI is refused before anything is written
    entries = load_catalog(
        args.catalog, args.prompts.split(",") if args.prompts else None
    )  # bad input fails before any work
    if args.prompts is None and preset.prompts and not set(preset.prompts.split(",")) <= {e.id for e in entries}:
        args.prompts = entries[0].id  # the demo's example prompt is not in this catalog: its first prompt instead
        print(f"genpi run: the {preset_name} preset runs prompt {args.prompts!r}", file=sys.stderr)
    methods = list(method_names(args.methods or preset.methods))
    full = [m for m in (args.full_finetune or preset.full_finetune).split(",") if m and m not in (*METHODS, *methods)]
    if full:
        raise InputError(
            f"--full-finetune: unknown method(s) {', '.join(full)}: expected some of {', '.join(METHODS)} "
            f"or a name of this run's methods"
        )
    if compressed_values(args, preset):  # a bad spec or a name taken by a method fails before any work
        from genpi.eval.systems import compressed_specs

        compressed_specs(compressed_values(args, preset), methods)
    run_prompts = args.prompts or preset.prompts
    in_run = [e for e in entries if not run_prompts or e.id in run_prompts.split(",")]
    stages = stage_commands(args, preset, [e.id for e in entries], {key for e in in_run for key in e.train})
    if args.dry_run:  # what these stages would cost (genpi.estimate); nothing run or written
        from genpi.estimate import print_run_estimate

        return print_run_estimate(stages, args)
    tasks = task_files(args.tasks)
    if tasks:  # a tasks file or a sandbox that cannot work fails now, not after synthesis and training
        from genpi.eval.os_task_file import load_tasks
        from genpi.eval.os_tasks import check_sandbox

        scripts = argparse.ArgumentParser(add_help=False)
        scripts.add_argument("--scripts", default=None)
        tasks_extra = [*preset.task_flags, *shlex.split(args.task_args)]
        scripts = scripts.parse_known_args(tasks_extra)[0].scripts  # where the tasks' script files are
        for path in tasks.values():
            load_tasks(path, scripts)
    if args.mind2web:
        from genpi.eval.mind2web import read_steps

        for path in task_files(args.mind2web, "--mind2web").values():
            read_steps(path)
    if tasks:
        check_sandbox()
    status = run_stages(Path(args.out), stages, preset, preset_name, not args.no_progress)
    if status != 0:
        return status
    run = Path(args.out)
    print(f"genpi run: done; report: {run / 'report' / 'report.md'}", file=sys.stderr)
    print(
        f"genpi run: serve the adapters with: genpi serve {run / 'adapters' / methods[0]} --catalog {args.catalog}",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genpi run", description=__doc__.splitlines()[0])
    p.add_argument("catalog", help="prompt catalog (.yaml or .jsonl)")
    p.add_argument("--out", required=True, help="run folder: data/, adapters/METHOD/, eval/, report/")
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help=f"the run's sizes, a YAML file with a section per stage; copy one of {PRESET_DIR}/*.yaml and edit it",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="demo",
        help="deprecated (goes in the next release): --config instead; demo (the default without "
        "--config): one prompt, sized for 20 minutes on 2 CPU cores; paper: the paper's sizes, for a GPU "
        "cluster",
    )
    p.add_argument(
        "--base", default="smollm2", help="the model that is internalized (agent, environment, adapters' base)"
    )
    p.add_argument("--generator", default="smollm2", help="the model that writes the pseudo inputs")
    p.add_argument("--engine", choices=["transformers", "vllm"], default=None)
    p.add_argument("--prompts", default=None, help="comma-separated prompt ids")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated training methods, each evaluated beside the others; NAME=METHOD: a variant of METHOD "
        "with the config's variants.NAME train flags, in RUN/adapters/NAME",
    )
    p.add_argument(
        "--full-finetune",
        default=None,
        metavar="METHODS",
        help="comma-separated methods (or method names) trained in full, not as LoRA (genpi train --full-finetune; the "
        "paper preset: kld,seqkd,seqkd+kld)",
    )
    p.add_argument(
        "--compressed",
        action="append",
        default=[],
        metavar="NAME=llmlingua2:RATE",
        help="also evaluate the base given P compressed by LLMLingua at RATE, as system NAME, in every evaluation "
        "stage (genpi eval --compressed); repeatable or comma-separated; replaces the config's compressed:",
    )
    p.add_argument("--samples", type=int, default=None, help="dialogues per prompt")
    p.add_argument("--heldout", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--max-turns", type=int, default=None)
    p.add_argument("--lambdas", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every method (0: the epochs decide)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument(
        "--eval-limit", type=int, default=None, help="at most this many held-out inputs per prompt in evaluation"
    )
    p.add_argument("--cpus-per-trial", type=float, default=None)
    p.add_argument(
        "--tasks",
        action="append",
        default=[],
        metavar="ID=FILE",
        help="OS tasks (AgentBench format) for prompt ID: genpi eval os-tasks of every method; "
        "repeatable or comma-separated",
    )
    p.add_argument(
        "--mind2web",
        action="append",
        default=[],
        metavar="ID=FILE",
        help="Mind2Web steps (JSON lines) for prompt ID: genpi eval mind2web of every method; "
        "repeatable or comma-separated",
    )
    for dest, (section, command, example) in DEPRECATED_ARGS.items():
        p.add_argument(
            "--" + dest.replace("_", "-"),
            default="",
            help=f"deprecated: a --config file's {section}: section instead; more flags for {command}"
            + (f', e.g. "{example}"' if example else ""),
        )
    p.add_argument("--no-progress", action="store_true")
    from genpi.synth.estimate import add_flags as add_dry_run_flags

    add_dry_run_flags(p)  # --dry-run, --throughput, --prompt-throughput
    return p


@exits_2_on_input_error
def main(argv: list[str] | None = None) -> int:
    return run_pipeline(build_parser().parse_args(argv))
