"""The synthesis run on real Ray actors with a tiny model: shards, manifest, resume, and crashes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest
import ray
from conftest import REPO

from genpi import InputError
from genpi.data import store
from genpi.data.manifest import read_manifest
from genpi.engines import EngineConfig
from genpi.synth import actors
from genpi.synth.pipeline import SynthSettings
from genpi.synth.run import RunOptions, main, synthesize

pytestmark = pytest.mark.slow  # end to end (conftest)

CATALOG = REPO / "tests" / "data" / "tiny.yaml"
# teacher_topk=0: the top-k path is covered in test_pipeline with an engine that returns top-k. 24 input tokens:
# sampled inputs depend on how calls fall into batches (one seed per batch), and at 12 tokens a busy machine could
# leave too few uncut
SETTINGS = SynthSettings(
    samples=6,
    max_input_tokens=24,
    max_agent_tokens=12,
    max_environment_tokens=12,
    max_student_tokens=12,
    max_reason_tokens=12,
    teacher_topk=0,
)


def read_all(out):
    rows = []
    for path in store.dialogue_files(out):
        table = pq.read_table(path)
        assert table.schema.equals(store.DIALOGUE_SCHEMA), path
        rows += table.to_pylist()
    return rows


def assert_every_sample_once(out, samples_per_prompt):
    rows = read_all(out)
    manifest = json.loads((out / "manifest.json").read_text())
    for prompt_id in ("calc", "greet"):
        ids = sorted(r["sample_id"] for r in rows if r["prompt_id"] == prompt_id)
        assert ids == list(range(samples_per_prompt)), (prompt_id, ids)
        listed = manifest["prompts"][prompt_id]["shards"]
        assert sum(s["rows"] for s in listed.values()) == samples_per_prompt
        assert sorted(listed) == sorted(p.name for p in store.shard_path(out, prompt_id, 0).parent.glob("*.parquet"))
    return rows, manifest


def test_synthesis_writes_each_sample_once_and_resumes_without_redoing(
    local_ray, tiny_finishing_model, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    engine = EngineConfig(model=tiny_finishing_model, num_cpus=1)
    manifest = synthesize(CATALOG, out, SETTINGS, engine, engine, RunOptions(shard_size=4, progress=False))
    rows, on_disk = assert_every_sample_once(out, 6)
    assert manifest == on_disk
    assert all(r["error"] is None for r in rows)
    for r in rows:
        assert r["turns"][0]["role"] == "assistant" and r["n_turns"] >= 1
        assert r["student_output"] is not None and r["reason"] is not None
        assert r["target_model"] == r["generator_model"] == os.path.basename(tiny_finishing_model)
        assert r["agent_tokens"] > 0 and r["prompt_tokens"] > 0
        assert r["terminated_by"] in store.TERMINATED_BY and len(r["turn_cut"]) == len(r["turns"])
        assert r["student_output_cut"] is not None and r["reason_cut"] is not None
    assert {r["split"] for r in rows} == {"train", "heldout"}
    assert sum(r["split"] == "heldout" for r in rows) == 2  # 10% of 6, at least one per prompt
    assert manifest["prompts"]["calc"]["prompt_sha256"] == rows[0]["prompt_sha256"] or rows[0]["prompt_id"] != "calc"
    assert manifest["settings"]["samples"] == 6 and manifest["target"]["model"] == tiny_finishing_model

    before = {p: p.stat().st_mtime_ns for p in (out / "dialogues").rglob("*.parquet")}
    with monkeypatch.context() as patched:  # nothing left to do: no engine is started (its model not loaded)
        patched.setattr(actors, "start_engine", lambda *a, **k: pytest.fail("an engine was started"))
        assert synthesize(CATALOG, out, SETTINGS, engine, engine, RunOptions(shard_size=4, progress=False)) == on_disk
    after = {p: p.stat().st_mtime_ns for p in (out / "dialogues").rglob("*.parquet")}
    assert before == after  # nothing redone

    with pytest.raises(InputError, match="different settings"):
        synthesize(CATALOG, out, SynthSettings(samples=7), engine, engine, RunOptions(shard_size=4, progress=False))
    with pytest.raises(InputError, match="different target"):
        other = EngineConfig(model=str(tmp_path), num_cpus=1)
        synthesize(CATALOG, out, SETTINGS, engine, other, RunOptions(shard_size=4, progress=False))


def test_an_engine_actor_killed_mid_run_is_restarted_and_nothing_is_lost(local_ray, tiny_finishing_model, tmp_path):
    out = tmp_path / "out"
    engine = EngineConfig(model=tiny_finishing_model, num_cpus=1)
    settings = SynthSettings(**{**SETTINGS.__dict__, "samples": 8})
    result = {}

    def run():
        try:
            options = RunOptions(shard_size=2, shards_in_flight=1, progress=False)
            result["manifest"] = synthesize(CATALOG, out, settings, engine, engine, options)
        except BaseException as e:  # surface it in the test thread
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and thread.is_alive():
        manifest = read_manifest(out) or {"prompts": {}}
        if any(p["shards"] for p in manifest["prompts"].values()):
            break
        time.sleep(0.2)
    [name] = [n for n in ray.util.list_named_actors() if n.startswith("genpi-target-0-")]
    actor = ray.get_actor(name)  # generator and target share it: same model and settings
    pid = ray.get(actor.describe.remote())["pid"]
    finished_at_kill = sum(len(p["shards"]) for p in read_manifest(out)["prompts"].values())
    os.kill(pid, signal.SIGKILL)
    restarted_pid = ray.get(actor.describe.remote(), timeout=120)["pid"]  # Ray brings it back
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    assert finished_at_kill < 8  # the kill landed mid-run
    rows, _ = assert_every_sample_once(out, 8)
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    assert restarted_pid != pid


def synth_command(out, tiny_finishing_model):
    return [
        sys.executable,
        "-m",
        "genpi.synth",
        str(CATALOG),
        "--out",
        str(out),
        "--generator",
        tiny_finishing_model,
        "--target",
        tiny_finishing_model,
        "--samples",
        "8",
        "--shard-size",
        "2",
        "--shards-in-flight",
        "1",
        "--max-new-tokens",
        "12",
        "--teacher-topk",
        "0",
        "--no-stats",
        "--no-progress",
    ]


def wait_for(predicate, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("kill_when", ["inputs written", "first shard recorded"])
def test_sigkill_at_any_point_then_rerun_finishes_every_sample_exactly_once(
    local_ray, tiny_finishing_model, tmp_path, kill_when
):
    out = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS="local")  # a private Ray per run, whatever else runs here

    def progressed():
        manifest = read_manifest(out)
        if manifest is None:
            return False
        if kill_when == "inputs written":
            return any(p["inputs"] is not None for p in manifest["prompts"].values())
        return any(p["shards"] for p in manifest["prompts"].values())

    first = subprocess.Popen(
        synth_command(out, tiny_finishing_model),
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(progressed, first), (
            first.stderr.read().decode()[-3000:] if first.poll() is not None else "timed out"
        )
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started, with no chance to clean up
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    survivors = (
        {p: p.stat().st_mtime_ns for p in (out / "dialogues").rglob("*.parquet")}
        if (out / "dialogues").exists()
        else {}
    )
    finished_before = sum(len(p["shards"]) for p in read_manifest(out)["prompts"].values())
    assert finished_before < 8

    # The rerun: the same command in this process, on the module's Ray (a subprocess would start Python and a Ray of
    # its own again); the killed run above is the real process.
    assert main(synth_command(out, tiny_finishing_model)[3:]) == 0
    assert_every_sample_once(out, 8)
    for path, mtime in survivors.items():  # finished shards were kept, not redone
        assert path.stat().st_mtime_ns == mtime
    assert not list(out.rglob("*.tmp"))
