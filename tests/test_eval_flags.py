"""`genpi eval`'s flags come from its settings dataclasses (genpi.eval.settings): every field has its flag in each
subcommand that takes it, with the field's default and help, shown once in --help; the defaults parsed give the
dataclasses' defaults back; the users' flags (and genpi run's config keys) are what they were."""

import argparse
import dataclasses

import pytest
from conftest import REPO

from genpi.eval import settings as eval_settings
from genpi.eval.run import build_parser
from genpi.eval.settings import (
    EfficiencySettings,
    FidelitySettings,
    LeakageSettings,
    Mind2WebSettings,
    OSTaskSettings,
    SystemsSettings,
    WebShopSettings,
)
from genpi.flags import flag_name, from_args

CATALOG = str(REPO / "tests" / "data" / "tiny.yaml")
# each subcommand, the least argv it parses, and the dataclasses of its flags
COMMANDS = {
    "fidelity": (["DATA", "--catalog", CATALOG], [SystemsSettings, FidelitySettings]),
    "leakage": (["--catalog", CATALOG, "--out", "E"], [SystemsSettings, LeakageSettings]),
    "os-tasks": (["T.json"], [SystemsSettings, OSTaskSettings]),
    "mind2web": (["S.jsonl", "--catalog", CATALOG, "--prompt", "calc"], [SystemsSettings, Mind2WebSettings]),
    "webshop": (["--catalog", CATALOG, "--prompt", "calc"], [SystemsSettings, WebShopSettings]),
    "efficiency": (["--catalog", CATALOG, "--prompt", "calc"], [EfficiencySettings]),
}
REQUIRED = {  # what a user must give, as before the flags came from the dataclasses
    "fidelity": {"--catalog"},
    "leakage": {"--catalog", "--out"},
    "os-tasks": set(),
    "mind2web": {"--catalog", "--prompt"},
    "webshop": {"--catalog", "--prompt"},
    "efficiency": {"--catalog", "--prompt"},
}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_subcommand_is_covered():
    assert set(subparsers()) == set(COMMANDS)
    every = {c for _, c in vars(eval_settings).items() if dataclasses.is_dataclass(c) and isinstance(c, type)}
    covered = {c for _, classes in COMMANDS.values() for c in classes}
    assert all(any(issubclass(k, c) for k in covered) for c in every)  # no dataclass left without a command


@pytest.mark.parametrize("what", list(COMMANDS))
def test_every_field_has_its_flag_with_the_fields_default_and_help(what):
    parser = subparsers()[what]
    by_dest = {a.dest: a for a in parser._actions}
    argv, classes = COMMANDS[what]
    for cls in classes:
        for f in dataclasses.fields(cls):
            action = by_dest.get(f.name)
            assert action is not None, f"{cls.__name__}.{f.name} has no flag in genpi eval {what}"
            assert action.help.startswith(f.metadata["help"]), (what, f.name)
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            assert action.default == default, (what, f.name, action.default, f.default)
        # the defaults, parsed, give the dataclass's own defaults back (the required flags as given)
        args = parser.parse_args(argv)
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if flag_name(f) in REQUIRED[what]}
        assert from_args(cls, args) == dataclasses.replace(cls(), **given), (what, cls.__name__)
    assert {s for a in parser._actions if a.required for s in a.option_strings} == REQUIRED[what]


@pytest.mark.parametrize("what", list(COMMANDS))
def test_help_shows_each_default_once(what):
    text = " ".join(subparsers()[what].format_help().split())
    assert text.count("(default 32)") == (what != "efficiency")  # --max-batch, the one field defaulting to 32
    assert text.count("default smollm2") == 1 and text.count("--json") == 2  # usage line and its entry


def test_the_token_limit_is_each_evaluations_own():
    assert [cls().max_new_tokens for cls in (FidelitySettings, LeakageSettings)] == [None, None]
    assert [cls().max_new_tokens for cls in (OSTaskSettings, Mind2WebSettings, WebShopSettings)] == [512, 128, 256]
    parsers = subparsers()
    for what, default in (("fidelity", None), ("os-tasks", 512), ("mind2web", 128), ("webshop", 256)):
        assert parsers[what].parse_args(COMMANDS[what][0]).max_new_tokens == default


def test_the_users_flags_parse_as_before():
    parse = build_parser().parse_args
    args = parse(
        ["fidelity", "DATA", "--catalog", "C", "--adapters", "a=X", "Y", "--served", "s=openai:http://h/v1/m"]
        + ["--served", "t=openai:http://h/v1/n", "--no-record", "--no-progress", "--no-collateral", "--prompts", "x,y"]
    )
    systems, fidelity = from_args(SystemsSettings, args), from_args(FidelitySettings, args)
    assert systems.adapters == ("a=X", "Y") and len(systems.served) == 2 and systems.base == "smollm2"
    assert (fidelity.record, fidelity.progress, fidelity.collateral, fidelity.prompt_ids) == (
        False,
        False,
        False,
        ["x", "y"],
    )
    tasks = parse(["os-tasks", "T.json", "--replay-examples", "--task-timeout", "9", "--scripts", "D"])
    assert (tasks.replay_examples, tasks.task_timeout, tasks.scripts, tasks.catalog) == (True, 9, "D", None)
    web = parse(["mind2web", "S", "--catalog", "C", "--prompt", "p", "--adapters", "--layout", "examples"])
    assert web.adapters == [] and web.layout == "examples"
    with pytest.raises(SystemExit):
        parse(["mind2web", "S", "--catalog", "C", "--prompt", "p", "--layout", "other"])
    cost = parse(["efficiency", "--catalog", "C", "--prompt", "p", "--adapters", "A", "--compressed-prompt", "F"])
    assert (cost.adapters, cost.compressed_prompt, cost.turns, cost.repeats) == ("A", "F", 5, 3)


@pytest.mark.parametrize("argv", [["leakage", "--catalog", "C"], ["webshop", "--catalog", "C"], ["efficiency"]])
def test_a_missing_required_flag_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and "required" in capsys.readouterr().err
