"""`genpi run`: every stage through its own entry point, killed mid-run and resumed, reruns skip, changes refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq

from conftest import REPO
from genpi.train.adapters import read_adapter_manifest

CATALOG = REPO / "tests" / "data" / "tiny.yaml"


def command(out, model, *extra):
    return [sys.executable, "-m", "genpi.cli", "run", str(CATALOG), "--out", str(out), "--base", model, "--generator", model,
            "--prompts", "calc", "--samples", "5", "--heldout", "0.4", "--max-new-tokens", "8", "--methods", "sft,genpi",
            "--lr", "1e-3", "--cpus-per-trial", "1", "--no-progress", *extra]  # fmt: skip


def run(out, model, *extra):
    return subprocess.run(command(out, model, *extra), cwd=REPO, env=dict(os.environ, RAY_ADDRESS="local"),
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def stages(out) -> dict:
    return json.loads((out / "run.json").read_text())["stages"]


def test_killed_run_resumes_and_finishes_each_stage_once(tiny_finishing_model, tmp_path):
    out = tmp_path / "run"
    # kill the whole process group (driver, Ray, Tune trials) once the second training stage has started
    proc = subprocess.Popen(command(out, tiny_finishing_model), cwd=REPO, env=dict(os.environ, RAY_ADDRESS="local"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "run.json").exists() and stages(out).get("train genpi", {}).get("status") == "running":
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = stages(out)
    assert before["synth"]["status"] == "done" and before["train sft"]["status"] == "done"
    assert before["train genpi"]["status"] == "running" and "eval fidelity" not in before
    sft_adapter = out / "adapters" / "sft" / "calc" / "adapter_model.safetensors"  # genpi.json gets the eval's metrics
    sft_written = sft_adapter.stat().st_mtime_ns

    result = run(out, tiny_finishing_model)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[1/6] synth: done before, skipped" in result.stderr and "[3/6] train sft: done before, skipped" in result.stderr
    assert all(s["status"] == "done" for s in stages(out).values()) and len(stages(out)) == 6
    rows = [r for p in sorted((out / "data" / "dialogues").rglob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["sample_id"] for r in rows) == list(range(5))  # every dialogue exactly once
    assert sft_adapter.stat().st_mtime_ns == sft_written  # the finished adapter was not trained again
    assert read_adapter_manifest(out / "adapters" / "genpi" / "calc").method == "genpi"
    fidelity = json.loads((out / "eval" / "fidelity.json").read_text())
    assert set(fidelity["results"][0]["systems"]) == {"teacher", "base", "sft", "genpi"}
    report = (out / "report" / "report.md").read_text()
    assert "genpi" in report and "sft" in report
    assert f"report: {out / 'report' / 'report.md'}" in result.stderr

    again = run(out, tiny_finishing_model)
    assert again.returncode == 0 and again.stderr.count("done before, skipped") == 6, again.stderr[-2000:]

    changed = run(out, tiny_finishing_model, "--samples", "6")
    assert changed.returncode == 2
    assert "stage 'synth' was started with other settings" in changed.stderr and "choose another --out" in changed.stderr


def test_bad_input_exits_2_before_any_work(tmp_path):
    cases = [
        (["--prompts", "calc", "--methods", "sft,bogus"], "unknown method(s) bogus"),
        (["--prompts", "nope"], "nope not in"),
    ]
    for extra, message in cases:
        out = tmp_path / "run"
        result = subprocess.run([sys.executable, "-m", "genpi.cli", "run", str(CATALOG), "--out", str(out), *extra],
                                cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, (extra, result.stderr)
        assert not out.exists()  # nothing written
    missing = subprocess.run([sys.executable, "-m", "genpi.cli", "run", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")],
                             cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "no such file" in missing.stderr
