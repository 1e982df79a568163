"""`genpi run ... --dry-run`: what each stage of a run will cost, read from the stages' own commands.

The stages are genpi run's (name, argv) list, so the estimate sees exactly what the run would do: synthesis as
`genpi synth --dry-run` counts it (genpi.synth.estimate), the fidelity evaluation's episodes (each system plays
the held-out inputs against the environment as synthesis does; the teacher with P, the others without) and its
teacher-forced scoring (one forward over each held-out dialogue per system), and per training method the tokens
trained (trials x rows x epochs, or x --max-steps batches; no model calls). Not counted: the on-policy KL samples
and collateral-damage requests of the fidelity evaluation, os-tasks, mind2web and efficiency (a few calls per task
or turn), the report.
"""

from __future__ import annotations

import argparse
import statistics

from genpi.synth.estimate import (
    Cost,
    Episode,
    Load,
    counter,
    episode_load,
    format_costs,
    heldout_count,
    mean_load,
    shot_episodes,
    synth_costs,
    throughput,
)


def _episodes(entry, target, turns: int, agent_limit: int, env_limit: int) -> tuple[list[Episode], Episode]:
    """(dialogues like the shots, the longest dialogue) of a prompt at these limits."""
    x = statistics.mean(target.text(t) for t in entry.input_examples) if entry.input_examples else 0
    expected = shot_episodes(entry, target, turns, agent_limit, env_limit, x)
    most = Episode(x, (agent_limit,) * turns, (env_limit,) * turns)
    return expected or [most], most


def fidelity_costs(argv: list[str], entries, settings, target) -> list[Cost]:
    """genpi eval fidelity's episodes and teacher-forced scoring, from its argv."""
    from genpi.eval.run import build_parser

    args = build_parser().parse_args(argv)
    systems = 2 + len(args.adapters)  # the teacher (base with P), the base without P, each adapter
    episodes_cost, scoring_cost = [Load(), Load()], [Load(), Load()]
    for entry in entries:
        held = heldout_count(entry, settings)
        held = min(held, args.limit) if args.limit else held
        turns = min(entry.max_turns, args.max_turns or settings.max_turns or entry.max_turns)
        agent_limit = args.max_new_tokens or settings.max_agent_tokens
        env_limit = args.max_new_tokens or settings.max_environment_tokens
        expected, most = _episodes(entry, target, turns, agent_limit, env_limit)
        p_tokens = target.chat(entry.messages() + [{"role": "user", "content": ""}]) - target.chat(
            [{"role": "user", "content": ""}]
        )
        for i, episodes in enumerate((expected, [most])):
            with_p = mean_load([sum(episode_load(entry, target, e), Load()) for e in episodes])
            without = mean_load([sum(episode_load(entry, target, e, with_prompt=False), Load()) for e in episodes])
            episodes_cost[i] += (with_p + without * (systems - 1)) * held
            dialogue = statistics.mean(e.input + sum(e.agent) + sum(e.environment[:-1]) for e in episodes)
            scoring_cost[i] += Load(systems, systems * dialogue + p_tokens, 0) * held
    model = target.model
    return [
        Cost("eval fidelity episodes", "target", model, *episodes_cost),
        Cost("eval fidelity scoring", "target", model, *scoring_cost),
    ]


def train_line(name: str, argv: list[str], entries, settings, target) -> str:
    """One training stage's tokens trained (dialogues without P, forward and backward), from its argv."""
    from genpi.train.plan import NO_LAMBDA
    from genpi.train.recipe import TrainSettings
    from genpi.train.run import DEFAULT_LAMBDAS, build_parser

    args = build_parser().parse_args(argv)
    defaults = TrainSettings()
    steps = getattr(args, "max_steps", 0) or 0
    batch = args.batch_size or defaults.batch_size
    rows = tokens = 0.0
    trials = set()
    for entry in entries:  # a prompt's catalog train settings hold where the flag is not given, as in genpi train
        lam = entry.train.get("lam") if args.lambdas is None else None
        if args.method in NO_LAMBDA:
            lambdas = 1
        elif lam is not None:
            lambdas = len(lam) if isinstance(lam, (list, tuple)) else 1
        else:
            lambdas = len((args.lambdas or DEFAULT_LAMBDAS).split(","))
        trials.add(lambdas)
        epochs = args.epochs or entry.train.get("epochs") or defaults.epochs
        train_rows = settings.samples - heldout_count(entry, settings)
        rows_seen = steps * batch if steps else epochs * train_rows
        expected, _ = _episodes(
            entry, target, settings.turn_limit(entry), settings.max_agent_tokens, settings.max_environment_tokens
        )
        per_row = statistics.mean(e.input + sum(e.agent) + sum(e.environment[:-1]) for e in expected)
        rows += lambdas * rows_seen
        tokens += lambdas * rows_seen * per_row
    lambdas = " or ".join(map(str, sorted(trials)))
    return (
        f"{name}: {lambdas} trial{'s' * (lambdas != '1')} per prompt, {rows:.0f} rows trained, about "
        f"{tokens:,.0f} tokens forward and backward (no model calls; not timed)"
    )


def print_run_estimate(stages: list[tuple[str, list[str]]], args: argparse.Namespace) -> int:
    """genpi run --dry-run: the synthesis and fidelity table and the training lines; nothing run or written."""
    from genpi.catalog import load_catalog
    from genpi.flags import from_args
    from genpi.synth.pipeline import SynthSettings
    from genpi.synth.run import parse_args

    argv = dict(stages)
    synth = parse_args(argv["synth"])
    entries = load_catalog(synth.catalog, synth.prompts.split(",") if synth.prompts else None)
    settings = from_args(SynthSettings, synth)
    generator, target = counter(synth.generator), counter(synth.target)
    rate = throughput(args, {"generator": synth.generator, "target": synth.target}, entries[0])
    costs = synth_costs(entries, settings, generator, target)
    if "eval fidelity" in argv:
        costs += fidelity_costs(argv["eval fidelity"], entries, settings, target)
    lines = [train_line(name, a, entries, settings, target) for name, a in stages if name.startswith("train ")]
    others = [name for name, _ in stages if name not in ("synth", "stats", "eval fidelity", "report")]
    others = [name for name in others if not name.startswith("train ")]
    if others:
        lines.append(f"not estimated (a few calls per task or turn): {', '.join(others)}")
    prompts = f"{len(entries)} prompt{'s' * (len(entries) != 1)}"
    print(f"genpi run --dry-run: {len(stages)} stages, {prompts}, {settings.samples} dialogues each")
    print(format_costs(costs, rate, lines))
    return 0
