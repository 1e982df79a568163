"""Settings defined once: each command's flags come from (or are checked against) its settings dataclass, the token
limits have one name per role, one InputError handler, and `genpi run --config FILE` reads a YAML file with a section
per stage (the presets are such files)."""

import argparse
import ast
import dataclasses
import shutil

import pytest
import yaml
from conftest import REPO

from genpi import InputError, exits_2_on_input_error
from genpi.flags import add_settings, from_args, setting
from genpi.run import build_parser, main, run_config, stage_commands
from genpi.runconfig import PRESET_DIR, PRESETS, read_config
from genpi.synth.pipeline import SynthSettings
from genpi.synth.run import TURN_TOKEN_FIELDS, RunOptions
from genpi.synth.run import build_parser as synth_parser
from genpi.train.recipe import TrainSettings
from genpi.train.run import HAND_FLAGS, settings_from_args
from genpi.train.run import build_parser as train_parser

CATALOG = REPO / "tests" / "data" / "tiny.yaml"


def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


@pytest.mark.parametrize("cls", [SynthSettings, RunOptions, TrainSettings])
def test_every_setting_has_its_flag_with_the_fields_default_and_help(cls):
    parser = synth_parser() if cls is not TrainSettings else train_parser()
    by_dest = actions(parser)
    for f in dataclasses.fields(cls):
        if cls is TrainSettings and f.name in HAND_FLAGS:  # written by hand: the flag exists, its help is the field's
            for flag in HAND_FLAGS[f.name].split(", "):
                assert flag in parser._option_string_actions, (f.name, flag)
            continue
        action = by_dest.get(f.name)
        assert action is not None, f"{cls.__name__}.{f.name} has no flag"
        assert action.default == f.default, (f.name, action.default, f.default)
        assert action.help.startswith(f.metadata["help"]), f.name
    # the defaults, parsed, give the dataclass's defaults back: nothing is defaulted twice
    if cls is TrainSettings:
        settings, lambdas, overrides = settings_from_args(parser.parse_args(["DATA", "--catalog", "C", "--out", "O"]))
        assert settings == TrainSettings() and lambdas == [0.3, 0.5, 0.7] and overrides == frozenset()
    else:
        assert from_args(cls, parser.parse_args(["C", "--out", "O"])) == cls()


def test_a_field_without_help_text_cannot_become_a_flag():
    @dataclasses.dataclass
    class Drifted:
        documented: int = setting(3, "has its help")
        bare: int = 4

    parser = argparse.ArgumentParser()
    with pytest.raises(TypeError, match="Drifted.bare has no help text"):
        add_settings(parser, Drifted)
    add_settings(parser, Drifted, ["documented"])
    assert parser.parse_args([]).documented == 3 and parser.parse_args(["--documented", "5"]).documented == 5


def test_each_token_limit_has_its_own_flag_and_max_new_tokens_sets_them_all():
    def parse(*argv):
        return from_args(SynthSettings, synth_parser().parse_args(["C", "--out", "O", *argv]))

    assert {getattr(parse("--max-new-tokens", "64"), name) for name in TURN_TOKEN_FIELDS} == {64}
    roles = parse("--max-new-tokens", "64", "--max-reason-tokens", "9", "--max-student-tokens", "7")
    assert (
        roles.max_agent_tokens,
        roles.max_environment_tokens,
        roles.max_student_tokens,
        roles.max_reason_tokens,
    ) == (64, 64, 7, 9)
    # the defaults are the fields': the reason limit is what the command always gave it (--max-new-tokens' 384)
    assert {getattr(parse(), name) for name in TURN_TOKEN_FIELDS} == {384}


def test_one_input_error_handler_prints_one_line_and_exits_2(capsys, monkeypatch):
    import genpi.cli
    import genpi.study
    import genpi.synth.run
    import genpi.train.run

    for module in (genpi.cli, genpi.run, genpi.study, genpi.synth.run, genpi.train.run):
        assert module.main.__wrapped__, module  # each entry point is wrapped by the one handler

    def bad(*args, **kwargs):
        raise InputError("a file\n   that is bad")

    monkeypatch.setattr(genpi.synth.run, "synthesize", bad)
    assert genpi.synth.run.main([str(CATALOG), "--out", "x"]) == 2
    assert capsys.readouterr().err == "genpi: error: a file that is bad\n"
    assert exits_2_on_input_error(lambda: 0)() == 0


def test_run_does_not_import_study():
    """genpi study builds on genpi run, never the other way round (the circle run <-> study)."""
    tree = ast.parse((REPO / "genpi" / "run.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "genpi.study" not in imported and "genpi.runconfig" in imported


def test_the_presets_are_config_files_giving_the_same_stages(tmp_path):
    demo = PRESETS["demo"]
    assert (
        demo.samples,
        demo.heldout,
        demo.max_new_tokens,
        demo.methods,
        demo.lambdas,
        demo.steps,
        demo.cpus_per_trial,
    ) == (48, 0.25, 64, "topk-kl,genpi", "0.5", 72, 2)
    assert demo.synth_flags == ("--teacher-topk", "20", "--seed", "1") and demo.efficiency_flags == (
        "--turns",
        "2",
        "--repeats",
        "1",
    )
    assert (
        demo.expected_s["train genpi"] == 295
        and PRESETS["paper"].lr == 1e-4
        and PRESETS["paper"].lambdas == "0.3,0.5,0.7"
    )
    for name in PRESETS:
        copy = tmp_path / f"my-{name}.yaml"
        shutil.copy(PRESET_DIR / f"{name}.yaml", copy)  # what a user does: copy one, run it
        by_name = build_parser().parse_args([str(CATALOG), "--out", "R", "--preset", name])
        by_file = build_parser().parse_args([str(CATALOG), "--out", "R", "--config", str(copy)])
        assert run_config(by_file) == (PRESETS[name], str(copy)) and run_config(by_name) == (PRESETS[name], name)
        assert stage_commands(by_file, run_config(by_file)[0], ["calc"]) == stage_commands(
            by_name, PRESETS[name], ["calc"]
        )


def test_a_config_sections_flags_reach_their_stages_before_the_deprecated_strings(tmp_path, capsys):
    config = yaml.safe_load((PRESET_DIR / "demo.yaml").read_text())
    config["prompts"] = ["calc", "greet"]
    config["synth"].update(teacher_topk=5, dashboard=True, max_model_len=None)
    config["train"].update(gpus_per_trial=1, lr="1e-2", early_stop=False)
    config["eval"].update(limit=3, onpolicy_samples=2)
    config["tasks"] = {"rounds": 4}
    config["efficiency"] = {"turns": 3}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    args = build_parser().parse_args(
        [
            str(CATALOG),
            "--out",
            "R",
            "--config",
            str(path),
            "--train-args",
            "--seed 7",
            "--tasks",
            f"calc={REPO / 'examples' / 'os-tasks' / 'tasks.json'}",
        ]
    )
    preset, name = run_config(args)
    assert "--train-args is deprecated" in capsys.readouterr().err and name == str(path)
    stages = dict(stage_commands(args, preset, ["calc", "greet"]))
    synth = stages["synth"]
    assert synth[synth.index("--teacher-topk") + 1] == "5" and "--dashboard" in synth and "--max-model-len" not in synth
    assert synth[synth.index("--prompts") + 1] == "calc,greet"
    train = stages["train genpi"]
    assert train[train.index("--lr") + 1] == "0.01" and train[-4:] == [
        "--gpus-per-trial",
        "1",
        "--seed",
        "7",
    ]  # the string wins
    assert "--early-stop" not in train
    assert stages["eval fidelity"][-4:] == ["--limit", "3", "--onpolicy-samples", "2"]
    assert stages["eval os-tasks calc"][-2:] == ["--rounds", "4"] and stages["eval efficiency greet"][-2:] == [
        "--turns",
        "3",
    ]


@pytest.mark.parametrize(
    "text, words",
    [
        ("prompts: calc\nsynth: [1, 2]\n", "synth: expected a section of keys"),
        ("bogus: 1\n", "bogus: unknown key; expected some of prompts"),
        ("{not yaml: [", "cannot read it as YAML"),
        ("- a list\n", "expected a mapping of keys"),
        ("synth:\n  samples: many\n", "synth.samples: expected int, got 'many'"),
        ("synth:\n  samples: 4\n", "missing"),
        ("synth:\n  heldout: [0.1]\n", "synth.heldout: expected float"),
        ("train:\n  no_such_flag: 3\n", "train.no_such_flag: genpi train has no flag --no-such-flag"),
        ("efficiency:\n  turns: {a: 1}\n", "efficiency.turns: expected a number, text, true or false"),
        ("expected_s: {synth: soon}\n", "expected_s: expected a mapping of stage names to seconds"),
    ],
)
def test_a_bad_config_exits_2_naming_the_file_and_the_key(tmp_path, capsys, text, words):
    path = tmp_path / "bad.yaml"
    if "no_such_flag" in text:  # a whole file whose one bad key is a stage flag: refused before any work
        config = yaml.safe_load((PRESET_DIR / "demo.yaml").read_text())
        config["train"]["no_such_flag"] = 3
        text = yaml.safe_dump(config)
    path.write_text(text)
    out = tmp_path / "run"
    assert main([str(CATALOG), "--out", str(out), "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genpi: error: ") and str(path) in err and words in err, err
    assert err.count("\n") == 1 and not out.exists()  # one line, nothing written


def test_a_missing_config_file_and_missing_keys_are_named(tmp_path):
    with pytest.raises(InputError, match="none.yaml: cannot read it"):
        read_config(tmp_path / "none.yaml")
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump({"prompts": None, "synth": {"samples": 4}}))
    with pytest.raises(InputError, match=r"missing .*synth\.heldout.*train\.lr"):
        read_config(path)


def test_the_deprecated_flags_say_so_in_their_help():
    by_dest = actions(build_parser())
    for dest in ("preset", "synth_args", "train_args", "eval_args", "task_args", "mind2web_args", "efficiency_args"):
        assert by_dest[dest].help.startswith("deprecated"), dest
    assert "presets" in by_dest["config"].help
