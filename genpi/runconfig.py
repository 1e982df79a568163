"""`genpi run --config FILE`: every size a run chooses, in a YAML file with a section per stage.

The presets are such files, shipped in genpi/presets/ (demo.yaml, paper.yaml): copy one and edit it. Top-level keys
hold for several stages (prompts, methods, max_new_tokens, max_turns); a stage's section (synth, train, eval, tasks,
mind2web, efficiency) holds the sizes genpi run chooses for that stage (SECTIONS) and any other flag of the stage's own
command, by its name without the dashes (`teacher_topk: 20` under synth: `genpi synth --teacher-topk 20`; true: the
flag alone; null: left out). A file that cannot be read, a key that is not known, or a value of the wrong kind is
refused naming the file and the key (InputError: exit 2).

Two rows of one method (the paper's Table 1 prepends P to 100% and to 50% of the rows) are two names: a methods entry
NAME=METHOD trains METHOD into RUN/adapters/NAME, with the train flags of NAME's section under `variants:` after the
train: section's (`variants: {prepend-100: {prepend_ratio: 1.0}}`). `compressed:` lists evaluation-only systems, the
base given P compressed by LLMLingua (NAME=llmlingua2:RATE, genpi eval --compressed), in every evaluation stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import yaml

from genpi import InputError

PRESET_DIR = Path(__file__).with_name("presets")  # package data


@dataclasses.dataclass(frozen=True)
class Preset:
    """Every size `genpi run` chooses; a flag given on the command line wins."""

    prompts: str | None
    samples: int
    heldout: float
    max_new_tokens: int
    max_turns: int | None
    engine: str
    methods: str
    lambdas: str
    epochs: int
    lr: float
    batch_size: int
    micro_batch: int
    eval_limit: int | None
    cpus_per_trial: float | None  # None: genpi train's default
    steps: int = 0  # optimizer steps of every method (genpi train --max-steps); 0: the epochs decide
    full_finetune: str = ""  # the method names trained in full (genpi train --full-finetune, the paper's defaults)
    full_finetune_gpus: int | None = (
        None  # their --gpus-per-trial (FSDP over that many GPUs); None: the train section's
    )
    compressed: str = ""  # NAME=llmlingua2:RATE[:MODEL], comma-separated: evaluated beside the methods' adapters
    # a methods entry's own train flags by its name (after the train section's; they win), e.g. prepend-100's
    # --prepend-ratio 1.0: names not in the run's methods are left unused
    variant_flags: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # each stage's own flags from its section, before the deprecated --*-args strings, which win
    synth_flags: tuple[str, ...] = ()
    train_flags: tuple[str, ...] = ()
    eval_flags: tuple[str, ...] = ()
    task_flags: tuple[str, ...] = ()
    mind2web_flags: tuple[str, ...] = ()
    efficiency_flags: tuple[str, ...] = ()
    # seconds per stage (a per-prompt stage's per prompt, keyed without the id) measured on the idle 2-core CPU with
    # SmolLM2: the prior of the time estimate, which scales it by how fast the run has gone so far
    expected_s: dict[str, float] = dataclasses.field(default_factory=dict)


TOP_KEYS = {
    "prompts": "prompts",
    "methods": "methods",
    "max_new_tokens": "max_new_tokens",
    "max_turns": "max_turns",
    "full_finetune": "full_finetune",
    "full_finetune_gpus": "full_finetune_gpus",
    "compressed": "compressed",
}
# section: ({key: Preset field}, the Preset field of its other flags, the command whose flags those are)
SECTIONS = {
    "synth": ({"samples": "samples", "heldout": "heldout", "engine": "engine"}, "synth_flags", "synth"),
    "train": (
        {
            "lambdas": "lambdas",
            "epochs": "epochs",
            "lr": "lr",
            "batch_size": "batch_size",
            "micro_batch": "micro_batch",
            "max_steps": "steps",
            "cpus_per_trial": "cpus_per_trial",
        },
        "train_flags",
        "train",
    ),
    "eval": ({"limit": "eval_limit"}, "eval_flags", "eval fidelity"),
    "tasks": ({}, "task_flags", "eval os-tasks"),
    "mind2web": ({}, "mind2web_flags", "eval mind2web"),
    "efficiency": ({}, "efficiency_flags", "eval efficiency"),
}


def _value(where: str, value, hint):
    """A YAML value as the Preset field's type: numbers as YAML wrote them (2 stays "2" on the command line), a
    list as comma-separated text; InputError naming `where` otherwise."""
    kinds = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in kinds:
            return None
        raise InputError(f"{where}: a value is required")
    if str in kinds:
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return ",".join(map(str, value))
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif int in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif float in kinds and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return value
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as text
        except (TypeError, ValueError):
            pass
    expected = " or ".join(k.__name__ for k in kinds if k is not type(None))
    raise InputError(f"{where}: expected {expected}, got {value!r}")


def _flags(where: str, section: dict) -> tuple[str, ...]:
    flags: list[str] = []
    for key, value in section.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            flags += [flag, str(value)]
        elif value not in (None, False):
            raise InputError(f"{where}.{key}: expected a number, text, true or false for {flag}, got {value!r}")
    return tuple(flags)


def _variants(where: str, value) -> dict[str, tuple[str, ...]]:
    """`variants:` {NAME: {train flag: value}} as {NAME: train flags}; the method is the methods entry's NAME=METHOD."""
    if not isinstance(value or {}, dict):
        raise InputError(f"{where}: expected a section of method names, each with its train flags, got {value!r}")
    variants = {}
    for name, section in (value or {}).items():
        if not isinstance(section or {}, dict):
            raise InputError(f"{where}.{name}: expected a section of train flags (prepend_ratio: 1.0), got {section!r}")
        if "method" in (section or {}):
            raise InputError(f"{where}.{name}.method: name the method in methods, as {name}=METHOD")
        variants[str(name)] = _flags(f"{where}.{name}", dict(section or {}))
    return variants


def read_config(path: str | Path) -> Preset:
    """The run's sizes from a config file (InputError naming the file and the key for a bad one)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"--config {path}: cannot read it as YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise InputError(
            f"--config {path}: expected a mapping of keys (prompts, methods, synth, train, ...), "
            f"got {type(data).__name__}"
        )
    hints = typing.get_type_hints(Preset)
    fields: dict = {}
    for key, value in data.items():
        where = f"{path}: {key}"
        if key in TOP_KEYS:
            fields[TOP_KEYS[key]] = _value(where, value, hints[TOP_KEYS[key]])
        elif key in SECTIONS:
            known, flags_field, _ = SECTIONS[key]
            if not isinstance(value or {}, dict):
                raise InputError(f"{where}: expected a section of keys, got {value!r}")
            section = dict(value or {})
            for name, field in known.items():
                if name in section:
                    fields[field] = _value(f"{where}.{name}", section.pop(name), hints[field])
            fields[flags_field] = _flags(where, section)
        elif key == "expected_s":
            if not isinstance(value, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
            ):
                raise InputError(f"{where}: expected a mapping of stage names to seconds, got {value!r}")
            fields["expected_s"] = dict(value)
        elif key == "variants":
            fields["variant_flags"] = _variants(where, value)
        else:
            known = [*TOP_KEYS, *SECTIONS, "variants", "expected_s"]
            raise InputError(f"{where}: unknown key; expected some of {', '.join(known)}")
    required = {
        f.name
        for f in dataclasses.fields(Preset)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = [_key_of(name) for name in sorted(required - set(fields))]
    if missing:
        raise InputError(f"--config {path}: missing {', '.join(missing)}")
    return Preset(**fields)


def _key_of(field: str) -> str:
    """A Preset field as the config file's key (synth.samples)."""
    for section, (known, _, _) in SECTIONS.items():
        for key, name in known.items():
            if name == field:
                return f"{section}.{key}"
    return field


def preset_path(name: str) -> Path:
    return PRESET_DIR / f"{name}.yaml"


PRESETS = {path.stem: read_config(path) for path in sorted(PRESET_DIR.glob("*.yaml"))}  # genpi run --preset NAME


def check_stage_flags(preset: Preset, source: str) -> None:
    """Each section's other keys are flags of its stage's command: an unknown one is refused now (naming the file
    and the key), not after synthesis and training."""
    from genpi.eval.run import build_parser as eval_parser
    from genpi.synth.run import build_parser as synth_parser
    from genpi.train.run import build_parser as train_parser

    parsers = {"synth": synth_parser(), "train": train_parser()}
    (commands,) = [a for a in eval_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for section, (_, flags_field, command) in SECTIONS.items():
        parser = parsers.get(command) or commands.choices[command.split()[1]]
        known = {s for action in parser._actions for s in action.option_strings}
        for flag in getattr(preset, flags_field):
            if flag.startswith("--") and flag not in known:
                raise InputError(
                    f"{source}: {section}.{flag[2:].replace('-', '_')}: genpi {command} has no flag {flag}"
                )
    known = {s for action in parsers["train"]._actions for s in action.option_strings}
    for name, flags in preset.variant_flags.items():
        for flag in flags:
            if flag.startswith("--") and flag not in known:
                raise InputError(
                    f"{source}: variants.{name}.{flag[2:].replace('-', '_')}: genpi train has no flag {flag}"
                )
