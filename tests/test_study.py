"""`genpi study`: every method on the same data and step budget, one table; resumable as genpi run; bad input exit 2."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, cli_in_process

pytestmark = pytest.mark.slow  # end to end (conftest)

CATALOG = REPO / "tests" / "data" / "tiny.yaml"


def study_argv(out, model, *extra) -> list[str]:
    return [
        "study",
        str(CATALOG),
        "--prompt",
        "calc",
        "--out",
        str(out),
        "--base",
        model,
        "--generator",
        model,
        "--samples",
        "5",
        "--heldout",
        "0.4",
        "--steps",
        "3",
        "--max-new-tokens",
        "8",
        "--cpus-per-trial",
        "1",
        "--train-args",
        "--onpolicy-max-tokens 4 --micro-batch 1",
        "--no-progress",
        *extra,
    ]


def study(out, model, *extra):
    return subprocess.run(
        [sys.executable, "-m", "genpi.cli", *study_argv(out, model, *extra)],
        cwd=REPO,
        env=dict(os.environ, RAY_ADDRESS="local"),
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_study_trains_every_method_on_the_same_budget_and_writes_its_table(tiny_finishing_model, tmp_path, capsys):
    out = tmp_path / "study"
    result = study(out, tiny_finishing_model, "--methods", "sft,onpolicy,topk-kl", "--seed", "7")
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((out / "study.json").read_text())
    rows = {r["system"]: r for r in table["rows"]}
    assert set(rows) == {"teacher", "base", "sft", "onpolicy", "topk-kl"}
    assert rows["teacher"]["kl_gap_closed"] == 1.0 and rows["base"]["kl_gap_closed"] == 0.0
    for method in ("sft", "onpolicy", "topk-kl"):
        row = rows[method]
        assert row["steps"] == 3 and row["settings"]["max_steps"] == 3 and row["settings"]["seed"] == 7, method
        assert row["train_seconds"] > 0 and row["kl_gap_closed_ci"] is not None and row["collateral_kl"] is not None, (
            method
        )
        command = row["train_command"]  # enough to rerun the row
        assert command[:2] == ["genpi", "train"] and command[command.index("--method") + 1] == method
        assert command[command.index("--max-steps") + 1] == "3" and command[command.index("--seed") + 1] == "7"
    assert "--teacher-topk" in table["synth_command"]  # topk-kl needs the teacher's top-k
    text = (out / "study.md").read_text()
    assert (
        "| sft | " in text
        and "KL gap closed [95% CI]" in text
        and "![gap closed against training time](study.png)" in text
    )
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resumed: nothing to do (in process: no stage runs, so nothing starts Ray; the command's exit status is above)
    code, err = cli_in_process(
        capsys, *study_argv(out, tiny_finishing_model, "--methods", "sft,onpolicy,topk-kl", "--seed", "7")
    )
    assert code == 0 and err.count("done before, skipped") == 7, err[-2000:]
    code, err = cli_in_process(
        capsys, *study_argv(out, tiny_finishing_model, "--methods", "sft,onpolicy,topk-kl", "--seed", "8")
    )
    assert code == 2 and "was started with other settings" in err


def test_study_refuses_bad_input_before_any_work(tmp_path, capsys):
    for extra, message in (
        (["--methods", "sft,nope"], "unknown method(s) nope"),
        (["--steps", "0"], "--steps must be >= 1"),
    ):  # in process; the command's exit status: below
        out = tmp_path / "bad"
        code, err = cli_in_process(capsys, *study_argv(out, "smollm2", *extra))
        assert code == 2 and message in err and not out.exists(), err
    result = subprocess.run(
        [sys.executable, "-m", "genpi.cli", "study", str(CATALOG), "--prompt", "nope", "--out", str(tmp_path / "x")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "nope" in result.stderr
