"""`genpi run`: every stage through its own entry point, killed mid-run and resumed, reruns skip, changes refused."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, cli_in_process

from genpi import InputError
from genpi.data.adapters import read_adapter_manifest
from genpi.eval.run import build_parser as eval_parser
from genpi.run import build_parser, main, stage_commands
from genpi.runconfig import PRESET_DIR, PRESETS

CATALOG = REPO / "tests" / "data" / "tiny.yaml"
TASKS = REPO / "examples" / "os-tasks" / "tasks.json"
STEPS = REPO / "examples" / "mind2web" / "steps.jsonl"


def command(out, model, *extra):
    return [
        sys.executable,
        "-m",
        "genpi.cli",
        "run",
        str(CATALOG),
        "--out",
        str(out),
        "--base",
        model,
        "--generator",
        model,
        "--prompts",
        "calc",
        "--samples",
        "5",
        "--heldout",
        "0.4",
        "--max-new-tokens",
        "8",
        "--methods",
        "sft,genpi",
        "--lr",
        "1e-3",
        "--steps",  # the demo's 72 steps per method: what is checked here is each stage done once, not what it learnt
        "2",
        "--cpus-per-trial",
        "1",
        "--mind2web",
        f"calc={STEPS}",
        "--mind2web-args",
        "--limit 2 --max-new-tokens 6",
        "--synth-args",  # pseudo inputs cut at 24 tokens, not the 256 floor: a third of synthesis's CPU here
        "--max-input-tokens 24",
        "--no-progress",
        *extra,
    ]


def run(argv: list[str]):
    return subprocess.run(
        argv,
        cwd=REPO,
        env=dict(os.environ, RAY_ADDRESS="local"),
        capture_output=True,
        text=True,
        timeout=900,
    )


def stages(out) -> dict:
    return json.loads((out / "run.json").read_text())["stages"]


def resumed_command(out, model) -> list[str]:
    """`command` with a prompt-prepending variant `p100` of ratio 1.0 (in a config beside `out`: the demo's with its
    `variants`) as a third method, and the compressed system `short` in every evaluation stage: the run
    tests/test_table1.py reads for Table 1."""
    config = yaml.safe_load((PRESET_DIR / "demo.yaml").read_text())
    config["variants"] = {"p100": {"prepend_ratio": 1.0}}
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "config.yaml").write_text(yaml.safe_dump(config))
    methods = ["--methods", "sft,genpi,p100=prepend", "--compressed", f"short=llmlingua2:0.3:{model}"]
    return command(out, model, "--config", str(out.parent / "config.yaml"), *methods)


def killed_then_resumed(model, out) -> tuple[list[str], dict, int, subprocess.CompletedProcess]:
    """`resumed_command`'s run, killed (the whole process group: driver, Ray, Tune trials) once its second training
    stage has started, then run again: (its command, the stages at the kill, the sft adapter's mtime then, the second
    run). conftest's `tiny_run_resumed` makes it once for test_run and test_table1."""
    argv = resumed_command(out, model)
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=dict(os.environ, RAY_ADDRESS="local"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "run.json").exists() and stages(out).get("train genpi", {}).get("status") == "running":
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before, sft_written = stages(out), sft_weights(out).stat().st_mtime_ns
    return argv, before, sft_written, run(argv)


def sft_weights(out):
    return out / "adapters" / "sft" / "calc" / "adapter_model.safetensors"  # genpi.json gets the eval's metrics


@pytest.mark.slow
def test_killed_run_resumes_and_finishes_each_stage_once(tiny_run_resumed, capsys):
    out, (argv, before, sft_written, result) = tiny_run_resumed
    assert before["synth"]["status"] == "done" and before["train sft"]["status"] == "done"
    assert before["train genpi"]["status"] == "running" and "eval fidelity" not in before
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "[1/9] synth: done before, skipped" in result.stderr
        and "[3/9] train sft: done before, skipped" in result.stderr
    )
    assert all(s["status"] == "done" for s in stages(out).values()) and len(stages(out)) == 9
    rows = [r for p in sorted((out / "data" / "dialogues").rglob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["sample_id"] for r in rows) == list(range(5))  # every dialogue exactly once
    assert sft_weights(out).stat().st_mtime_ns == sft_written  # the finished adapter was not trained again
    assert read_adapter_manifest(out / "adapters" / "genpi" / "calc").method == "genpi"
    fidelity = json.loads((out / "eval" / "fidelity.json").read_text())
    assert set(fidelity["results"][0]["systems"]) == {"teacher", "base", "sft", "genpi", "p100", "short"}
    [steps] = json.loads((out / "eval" / "mind2web.json").read_text())["results"]
    assert (
        steps["prompt_id"] == "calc"
        and steps["steps"] == 2
        and set(steps["systems"]) == {"teacher", "base", "sft", "genpi", "p100", "short"}
    )
    [efficiency] = json.loads((out / "eval" / "efficiency.json").read_text())["results"]
    assert efficiency["prompt_id"] == "calc" and efficiency["lora"]["from"] == str(out / "adapters" / "sft" / "calc")
    report = (out / "report" / "report.md").read_text()
    assert (
        "genpi" in report
        and "sft" in report
        and "## Efficiency\n\n### calc" in report
        and "### Mind2Web steps: calc" in report
    )
    assert f"report: {out / 'report' / 'report.md'}" in result.stderr
    assert f"genpi serve {out / 'adapters' / 'sft'} --catalog {CATALOG}" in result.stderr  # the first method's

    # the reruns run no stage: in this process (a subprocess each cost seconds of imports; the run above is the CLI's)
    code, err = cli_in_process(capsys, *argv[3:])
    assert code == 0 and err.count("done before, skipped") == 9, err[-2000:]

    code, err = cli_in_process(capsys, *argv[3:], "--samples", "6")
    assert code == 2
    assert "stage 'synth' was started with other settings" in err and "choose another --out" in err


def test_bad_input_exits_2_before_any_work(tmp_path, capsys):
    cases = [
        (["--prompts", "calc", "--methods", "sft,bogus"], "unknown method(s) bogus"),
        (["--prompts", "nope"], "nope not in"),
        (["--prompts", "calc", "--tasks", f"calc={REPO / 'none.json'}"], "none.json: no such tasks file"),
        (["--prompts", "calc", "--tasks", f"greet={TASKS}"], "--tasks greet="),
        (["--prompts", "calc", "--tasks", "calc"], "--tasks calc: expected ID=FILE"),
        (["--prompts", "calc", "--mind2web", f"calc={TASKS}"], "line 1"),  # an OS tasks file is no Mind2Web steps file
        (["--prompts", "calc", "--mind2web", f"greet={STEPS}"], "--mind2web greet="),
        (
            ["--prompts", "calc", "--mind2web", "calc"],
            "--mind2web calc: expected ID=FILE (a catalog prompt and its Mind2Web steps",
        ),
    ]
    for extra, message in cases:  # in process: one subprocess each cost ~4 s of imports (the CLI's status: below)
        out = tmp_path / "run"
        code, err = cli_in_process(capsys, "run", CATALOG, "--out", out, *extra)
        assert code == 2 and message in err, (extra, err)
        assert not out.exists()  # nothing written


@pytest.mark.slow
def test_bad_input_exits_2_from_the_command_line(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "genpi.cli", "run", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert not (tmp_path / "r").exists()


def stage_list(out, *extra) -> list[tuple[str, list[str]]]:
    args = build_parser().parse_args([str(CATALOG), "--out", str(out), "--methods", "sft,genpi", *extra])
    return stage_commands(args, PRESETS[args.preset], ["calc", "greet"])


def test_stages_evaluate_tasks_and_efficiency_into_the_eval_folder(tmp_path):
    out = tmp_path / "run"
    plain = dict(stage_list(out, "--prompts", "calc,greet"))
    assert list(plain) == [
        "synth",
        "stats",
        "train sft",
        "train genpi",
        "eval fidelity",
        "eval efficiency calc",
        "eval efficiency greet",
        "report",
    ]
    eval_dir = plain["report"][plain["report"].index("--eval") + 1]
    assert eval_dir == str(out / "eval")
    for prompt_id in ("calc", "greet"):
        cost = eval_parser().parse_args(plain[f"eval efficiency {prompt_id}"])
        assert (cost.what, cost.prompt, cost.data, cost.out) == ("efficiency", prompt_id, str(out / "data"), eval_dir)
        assert cost.adapters == str(out / "adapters" / "sft") and (cost.turns, cost.repeats) == (
            2,
            1,
        )  # the first method; demo sizes
    assert (
        eval_parser()
        .parse_args(
            dict(stage_list(out, "--prompts", "calc", "--efficiency-args", "--turns 3"))["eval efficiency calc"]
        )
        .turns
        == 3
    )

    other = tmp_path / "other.json"
    tasks = stage_list(
        out, "--prompts", "calc,greet", "--tasks", f"calc={TASKS},greet={other}", "--task-args", "--limit 2 --rounds 4"
    )
    assert [n for n, _ in tasks] == [
        "synth",
        "stats",
        "train sft",
        "train genpi",
        "eval fidelity",
        "eval os-tasks calc",
        "eval os-tasks greet",
        "eval efficiency calc",
        "eval efficiency greet",
        "report",
    ]
    calc = eval_parser().parse_args(dict(tasks)["eval os-tasks calc"])
    assert (calc.what, calc.tasks, calc.prompt, calc.out, calc.limit, calc.rounds) == (
        "os-tasks",
        str(TASKS),
        "calc",
        eval_dir,
        2,
        4,
    )
    assert (
        calc.adapters == [f"sft={out / 'adapters' / 'sft'}", f"genpi={out / 'adapters' / 'genpi'}"]
        and calc.max_new_tokens == 64
    )  # the demo preset's
    assert eval_parser().parse_args(dict(tasks)["eval os-tasks greet"]).tasks == str(other)
    assert tasks == stage_list(
        out,
        "--prompts",
        "calc,greet",
        "--tasks",
        f"calc={TASKS}",
        "--tasks",
        f"greet={other}",
        "--task-args",
        "--limit 2 --rounds 4",
    )  # repeated or comma-separated: the same stages
    both = dict(
        stage_list(
            out,
            "--prompts",
            "calc,greet",
            "--tasks",
            f"calc={TASKS}",
            "--mind2web",
            f"greet={STEPS},calc={other}",
            "--mind2web-args",
            "--limit 3 --layout examples",
        )
    )
    assert [n for n in both if n.startswith("eval ")] == [
        "eval fidelity",
        "eval os-tasks calc",
        "eval mind2web greet",
        "eval mind2web calc",
        "eval efficiency calc",
        "eval efficiency greet",
    ]
    steps = eval_parser().parse_args(both["eval mind2web greet"])
    assert (steps.what, steps.steps, steps.prompt, steps.out, steps.limit, steps.layout) == (
        "mind2web",
        str(STEPS),
        "greet",
        eval_dir,
        3,
        "examples",
    )
    assert (
        steps.adapters == calc.adapters and steps.base == calc.base and steps.max_new_tokens == 128
    )  # mind2web's own default
    assert eval_parser().parse_args(both["eval mind2web calc"]).steps == str(other)
    for bad, message in (
        (["--prompts", "calc", "--tasks", f"calc={TASKS}", "--tasks", f"calc={other}"], "calc has a file already"),
        (["--prompts", "calc", "--mind2web", f"calc={STEPS}", "--mind2web", f"calc={other}"], "--mind2web calc="),
        (["--prompts", "greet", "--mind2web", f"calc={STEPS}"], "calc is not a prompt of this run (greet)"),
        (["--prompts", "greet", "--tasks", f"calc={TASKS}"], "calc is not a prompt of this run (greet)"),
    ):
        with pytest.raises(InputError, match=re.escape(message)):
            stage_list(out, *bad)


def test_a_changed_task_or_efficiency_setting_is_refused(tmp_path, capsys):
    out, other = tmp_path / "run", tmp_path / "tasks.json"
    other.write_text(json.dumps([{"description": "Say yes.", "evaluation": {"match": "yes"}}]))
    flags = ["--prompts", "calc", "--tasks", f"calc={TASKS}"]
    out.mkdir()
    (out / "run.json").write_text(
        json.dumps(
            {
                "stages": {
                    name: {"argv": argv, "status": "done", "seconds": 1.0} for name, argv in stage_list(out, *flags)
                }
            }
        )
    )
    for extra, stage in (
        (["--efficiency-args", "--turns 3"], "eval efficiency calc"),
        (["--tasks", f"calc={other}"], "eval os-tasks calc"),
        (["--task-args", "--limit 1"], "eval os-tasks calc"),
    ):
        argv = [
            str(CATALOG),
            "--out",
            str(out),
            "--methods",
            "sft,genpi",
            *(flags[:2] + extra if extra[0] == "--tasks" else flags + extra),
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"stage {stage!r} was started with other settings" in err and "choose another --out" in err, err
    assert json.loads((out / "run.json").read_text())["stages"]["report"]["status"] == "done"  # nothing ran


def test_a_second_run_of_one_folder_is_refused_naming_the_holder(tmp_path, capsys, monkeypatch):
    from test_train_run import live_lock

    import genpi.run

    ran = []

    def stage(name, argv, progress):
        assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()  # held while the stages run
        ran.append(name)
        return 0

    monkeypatch.setattr(genpi.run, "run_stage", stage)
    out = tmp_path / "run"
    argv = [str(CATALOG), "--out", str(out), "--prompts", "calc", "--methods", "sft"]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_lock(out / "run.lock", holder.pid)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "in use by another genpi run" in err and f"pid {holder.pid}" in err and err.count("\n") == 1
        assert not ran and not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0 and ran[0] == "synth"  # the holder is gone: its lock is taken over
    assert not (out / "run.lock").exists()  # and released


def test_an_object_store_out_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(CATALOG), "--out", "s3://bucket/run", "--prompts", "calc"]) == 2
    assert "object-store URIs are not supported" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no local folder s3:/bucket/run


def test_run_json_is_replaced_through_a_unique_temporary_file(tmp_path, monkeypatch):
    from genpi.run import read_record, write_record

    replaced, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(str(src)), real(src, dst))[1])
    write_record(tmp_path, {"stages": {}})
    write_record(tmp_path, {"stages": {"synth": {"status": "done"}}})
    assert len(set(replaced)) == 2 and all(
        os.path.dirname(src) == str(tmp_path) for src in replaced
    )  # two writers never share one
    assert read_record(tmp_path) == {"stages": {"synth": {"status": "done"}}} and os.listdir(tmp_path) == ["run.json"]


def test_evaluation_on_a_gpu_if_any_starts_a_local_ray_beside_a_stale_session_file(tmp_path, capsys, monkeypatch):
    from test_train_run import stale_ray_session, stop_at_ray_init

    from genpi.run import on_a_gpu_if_any

    stale_ray_session(tmp_path, monkeypatch)
    used = stop_at_ray_init(monkeypatch)
    with pytest.raises(RuntimeError, match="stop at ray.init"):
        on_a_gpu_if_any(lambda argv: 0, [])
    assert used == [None] and "genpi: Ray: using a local Ray cluster of its own" in capsys.readouterr().err
