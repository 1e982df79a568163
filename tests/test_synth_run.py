"""The synthesis run's bookkeeping without Ray: the run lock, --out checks, the resume fingerprint, and
reruns that redo missing shards and retryable failures (Synthesis driven by an in-process fake engine)."""

import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, copy_into

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.data import runfolder, store
from genpi.data.manifest import LOCK, acquire_lock, new_manifest, read_manifest, reconcile_manifest, write_manifest
from genpi.data.runfolder import check_out, release_lock
from genpi.engines import ChatRequest, Completion, EngineConfig
from genpi.synth import pipeline
from genpi.synth.pipeline import END, SynthSettings
from genpi.synth.run import RunOptions, Synthesis, main

CATALOG = REPO / "tests" / "data" / "tiny.yaml"
ENTRIES = load_catalog(CATALOG)
SETTINGS = SynthSettings(samples=5, teacher_topk=0)
OPTIONS = RunOptions(shard_size=2, progress=False)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(out, pid, host=None, **fields):
    """A lock as a process of this host, boot and PID namespace writes it (`fields` change or drop, with None, what it
    records)."""
    out.mkdir(parents=True, exist_ok=True)
    holder = {
        **runfolder._me(),
        "host": host or socket.gethostname(),
        "pid": pid,
        "started": "2026-01-01T00:00:00",
        "start_ticks": None,
    }
    holder = {k: v for k, v in {**holder, **fields}.items() if v is not None or k not in fields}
    (out / LOCK).write_text(json.dumps(holder))


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(out, holder.pid)
        assert main([str(CATALOG), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "in use by another synthesis run" in err and f"pid {holder.pid}" in err and socket.gethostname() in err
        assert json.loads((out / LOCK).read_text())["pid"] == holder.pid  # the holder's lock is left alone
        write_lock(out, 1, host="some-other-host")  # another host's pid cannot be checked: held
        with pytest.raises(InputError, match="some-other-host"):
            acquire_lock(out)
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_from_a_killed_run_is_taken_over_and_released(tmp_path):
    out = tmp_path / "out"
    write_lock(out, dead_pid())
    lock = acquire_lock(out)
    held = json.loads(lock.read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
    with pytest.raises(InputError, match=f"pid {os.getpid()}"):  # held by a live process (this one)
        acquire_lock(out)
    release_lock(lock)
    assert not lock.exists()
    (out / LOCK).write_text("")  # an unreadable lock (written by a genpi that did not create it whole) ...
    with pytest.raises(InputError, match="is being written"):  # ... that may still be being written
        acquire_lock(out)
    old = time.time() - runfolder.FRESH_S - 1
    os.utime(out / LOCK, (old, old))
    release_lock(acquire_lock(out))  # ... left by a run killed before it wrote it
    assert not (out / LOCK).exists()


def test_a_holder_that_cannot_be_checked_from_here_keeps_its_lock(tmp_path):
    """Only a holder of this host, boot and PID namespace can be found gone: a pid from another namespace
    (a container on the same host name) means nothing here."""
    out, gone = tmp_path / "out", dead_pid()
    for fields in ({"pid_ns": "pid:[4026530000]"}, {"boot_id": "another-boot"}, {"boot_id": None, "pid_ns": None}):
        write_lock(out, gone, **fields)
        with pytest.raises(InputError, match=f"pid {gone}"):
            acquire_lock(out)
        assert json.loads((out / LOCK).read_text())["pid"] == gone
    write_lock(out, gone, pid_ns="pid:[4026530000]")
    with pytest.raises(InputError, match="another PID namespace"):
        acquire_lock(out)
    write_lock(out, gone)  # the same namespace: gone
    release_lock(acquire_lock(out))
    held = json.loads(runfolder.acquire_lock(out / LOCK, "synthesis run").read_text())
    assert held["pid_ns"] == os.readlink("/proc/self/ns/pid") and held["boot_id"] and held["start_ticks"] > 0
    release_lock(out / LOCK)


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
    out = tmp_path / "out"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = runfolder._start_ticks(other.pid)
        write_lock(out, other.pid, start_ticks=ticks)  # the holder itself
        with pytest.raises(InputError, match=f"pid {other.pid}"):
            acquire_lock(out)
        write_lock(out, other.pid, start_ticks=ticks - 1)  # the holder's pid, now another process's
        release_lock(acquire_lock(out))
    finally:
        other.kill()
        other.wait()


def test_a_lock_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", disk_full)
    monkeypatch.setattr(json, "dumps", disk_full)
    with pytest.raises(OSError, match="No space"):
        acquire_lock(out)
    assert list(out.iterdir()) == []  # no empty lock that a later run would have to judge


def test_a_stale_lock_taken_over_meanwhile_is_not_removed(tmp_path, monkeypatch):
    """Two runs that found the same stale lock: the one that comes second must not remove the first's new lock."""
    out = tmp_path / "out"
    write_lock(out, dead_pid())
    guard = runfolder._guard

    def first_takes_it_meanwhile(folder):
        (out / LOCK).unlink()
        write_lock(out, os.getppid())  # the other run's fresh lock (a live process)
        return guard(folder)

    monkeypatch.setattr(runfolder, "_guard", first_takes_it_meanwhile)
    with pytest.raises(InputError, match=f"pid {os.getppid()}"):
        acquire_lock(out)
    assert json.loads((out / LOCK).read_text())["pid"] == os.getppid()


@pytest.mark.parametrize("uri", ["s3://bucket/run", "gs://bucket/run", "hdfs://nn/run"])
def test_an_object_store_out_is_refused(tmp_path, capsys, monkeypatch, uri):
    monkeypatch.chdir(tmp_path)
    assert main([str(CATALOG), "--out", uri, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genpi: error: --out") and "shared filesystem" in err
    assert list(tmp_path.iterdir()) == []  # no local folder named after the scheme


def test_a_relative_out_in_a_submitted_ray_job_is_warned_about(tmp_path, capsys, monkeypatch):
    assert check_out("rel/out").as_posix() == "rel/out"
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray sets for a job's driver
    check_out("rel/out")
    assert "relative" in capsys.readouterr().err
    check_out(tmp_path / "abs")
    assert capsys.readouterr().err == ""


def manifest_for(settings=SETTINGS, engine=EngineConfig(), entries=ENTRIES, catalog=CATALOG):
    return new_manifest(catalog, entries, engine, engine, settings, OPTIONS.shard_size, pipeline.instruction_texts())


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda m: manifest_for(engine=EngineConfig(dtype="float16")), "generator"),
        (lambda m: manifest_for(engine=EngineConfig(max_model_len=2048)), "generator"),
        (lambda m: manifest_for(engine=EngineConfig(tensor_parallel_size=2)), "generator"),
        (lambda m: manifest_for(dataclasses.replace(SETTINGS, teacher_topk=5)), "settings"),
        (lambda m: (m.setattr(pipeline, "REASON_INSTRUCTION", "Explain."), manifest_for())[1], "instructions"),
        (lambda m: (m.setattr(pipeline, "END", "<<STOP>>"), manifest_for())[1], "instructions"),
    ],
)
def test_the_resume_fingerprint_refuses_a_changed_run(tmp_path, monkeypatch, change, key):
    old = manifest_for()
    assert reconcile_manifest(json.loads(json.dumps(old)), manifest_for(), tmp_path) == old
    with pytest.raises(InputError, match=f"different {key}"):
        reconcile_manifest(old, change(monkeypatch), tmp_path)


class Fake:
    """A deterministic engine for every persona; `broken` inputs fail as an engine error would. One turn each, or with
    `multi_turn` calc computes, sees a result and answers (three turns) while the others' environment replies after
    the answer, which leaves a trailing environment turn at the turn limit."""

    model_name = "fake"

    def __init__(self, broken=(), multi_turn=False):
        self.broken = set(broken)
        self.multi_turn = multi_turn
        self.generated_tokens = 0
        self.agent_inputs: list[str] = []

    async def complete(self, request: ChatRequest) -> Completion:
        system = request.messages[0]["content"] if request.messages[0]["role"] == "system" else ""
        last = request.messages[-1]["content"]
        if system.startswith(pipeline.INPUT_INSTRUCTION):
            return Completion(text=f"task {request.seed}", finish_reason="stop")
        if system.startswith(pipeline.ENVIRONMENT_INSTRUCTION):
            ends = not self.multi_turn or "answer(" in last
            return Completion(text=END if ends else "Result: 2", finish_reason="stop")
        if system.startswith(pipeline.REASON_INSTRUCTION):
            return Completion(text="because", finish_reason="stop")
        if not system:  # the student
            return Completion(text="hi", finish_reason="stop")
        self.agent_inputs.append(last)
        if last in self.broken:
            return Completion.failure("engine: RuntimeError: device lost")
        if "calc" not in system:
            return Completion(text="Answer: hello", finish_reason="stop")
        if not self.multi_turn:
            return Completion(text="Act: answer(1)", finish_reason="stop")
        return Completion(
            text="Act: answer(2)" if last.startswith("Result") else "Act: compute(1+1)", finish_reason="stop"
        )


def synth(out, engine, entries=ENTRIES, settings=SETTINGS, catalog=CATALOG):
    """What genpi.synth.run.synthesize does around its engines, with `engine` in place of the actors."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = manifest_for(settings, entries=entries, catalog=catalog)
    old = read_manifest(out)
    if old is not None:
        manifest = reconcile_manifest(old, manifest, out)
    run = Synthesis(out, entries, manifest, settings, OPTIONS)
    asyncio.run(run.run(engine, [engine]))
    return run.manifest


def rows_of(out, prompt_id):
    folder = store.shard_path(out, prompt_id, 0).parent
    return [r for path in sorted(folder.glob("*.parquet")) for r in store.read_rows(path)]


def test_a_shard_with_engine_failures_is_redone_on_rerun_every_sample_once(tmp_path):
    out = tmp_path / "out"
    synth(out, Fake())
    inputs = {r["sample_id"]: r["input"] for r in rows_of(out, "greet")}
    # a fresh folder with the same inputs, where two samples of shard 1 meet an engine failure
    out = tmp_path / "out2"
    manifest = synth(out, Fake(broken={inputs[2], inputs[3]}))
    shard = manifest["prompts"]["greet"]["shards"]["part-00001.parquet"]
    assert (shard["failed"], shard["retryable"]) == (2, 2)
    before = {p.name: p.stat().st_mtime_ns for p in store.shard_path(out, "greet", 0).parent.glob("*.parquet")}

    engine = Fake()
    manifest = synth(out, engine)
    assert sorted(engine.agent_inputs) == sorted([inputs[2], inputs[3]])  # only the failed samples redone
    rows = rows_of(out, "greet")
    assert [r["sample_id"] for r in rows] == list(range(5)) and all(r["error"] is None for r in rows)
    assert manifest["prompts"]["greet"]["shards"]["part-00001.parquet"]["retryable"] == 0
    after = {p.name: p.stat().st_mtime_ns for p in store.shard_path(out, "greet", 0).parent.glob("*.parquet")}
    assert after["part-00000.parquet"] == before["part-00000.parquet"]  # finished shards untouched
    assert after["part-00001.parquet"] != before["part-00001.parquet"]


def test_a_context_overflow_is_final_and_not_redone(tmp_path):
    class Overflow(Fake):
        async def complete(self, request):
            if request.messages[-1]["content"] == "task-overflow":
                return Completion.failure("context_length: 2000 prompt tokens + 384 max tokens > 2048")
            return await super().complete(request)

    out = tmp_path / "out"
    synth(out, Fake())
    inputs = store.read_rows(store.inputs_path(out, "greet"))
    inputs[0]["input"] = "task-overflow"
    manifest = read_manifest(out)  # an edit the manifest knows of (else the inputs are made again)
    manifest["prompts"]["greet"]["inputs_sha256"] = store.write_table(
        store.inputs_path(out, "greet"), inputs, store.INPUT_SCHEMA
    )
    write_manifest(out, manifest)
    for path in store.shard_path(out, "greet", 0).parent.glob("*.parquet"):
        path.unlink()
    manifest = synth(out, Overflow())
    shard = manifest["prompts"]["greet"]["shards"]["part-00000.parquet"]
    assert (shard["failed"], shard["retryable"]) == (1, 0)
    engine = Overflow()
    synth(out, engine)
    assert engine.agent_inputs == []  # nothing left to do


def test_a_listed_shard_whose_file_is_missing_is_redone(tmp_path):
    out = tmp_path / "out"
    synth(out, Fake())
    store.shard_path(out, "calc", 1).unlink()
    engine = Fake()
    manifest = synth(out, engine)
    assert len(engine.agent_inputs) == 2  # the two samples of the lost shard
    assert [r["sample_id"] for r in rows_of(out, "calc")] == list(range(5))
    assert "part-00001.parquet" in manifest["prompts"]["calc"]["shards"]


def test_only_a_synthesis_with_nothing_left_to_do_counts_as_finished(tmp_path):
    """A rerun of a finished synthesis starts no engine (genpi.synth.run._synthesize asks Synthesis.finished, and
    tests/test_synth_ray.py checks the rerun): anything left to do, or a file that no longer matches, is not."""
    done = tmp_path / "done"
    synth(done, Fake())
    entry = ENTRIES[0].id

    def damaged(name, damage) -> bool:
        out = copy_into(done, tmp_path, name)
        damage(out)
        return Synthesis(out, ENTRIES, read_manifest(out), SETTINGS, OPTIONS).finished()

    def edit_manifest(out, edit):
        manifest = read_manifest(out)
        edit(manifest["prompts"][entry])
        write_manifest(out, manifest)

    assert damaged("untouched", lambda out: None)
    assert not damaged("shard gone", lambda out: store.shard_path(out, entry, 1).unlink())
    assert not damaged("inputs changed", lambda out: store.inputs_path(out, entry).write_bytes(b"other"))
    assert not damaged(
        "retryable", lambda out: edit_manifest(out, lambda p: p["shards"]["part-00000.parquet"].update(retryable=1))
    )
    assert not damaged("write error", lambda out: edit_manifest(out, lambda p: p.update(write_errors={"x": "OSError"})))
    assert not damaged("no inputs yet", lambda out: edit_manifest(out, lambda p: p.update(inputs=None)))


def test_one_prompts_inputs_at_a_time_and_its_dialogues_start_before_the_next_prompts_inputs(tmp_path):
    events = []

    class Recording(Fake):
        async def complete(self, request):
            system = request.messages[0]["content"]
            kind = "input" if system.startswith(pipeline.INPUT_INSTRUCTION) else "other"
            prompt = "calc" if "calculator" in system else "greet"
            events.append(("start", kind, prompt))
            await asyncio.sleep(0.01 if kind == "input" else 0)  # a generator call takes a while
            events.append(("done", kind, prompt))
            return await super().complete(request)

    synth(tmp_path / "out", Recording())
    calc_inputs_done = max(i for i, e in enumerate(events) if e == ("done", "input", "calc"))
    greet_inputs_start = min(i for i, e in enumerate(events) if e == ("start", "input", "greet"))
    greet_inputs_done = max(i for i, e in enumerate(events) if e == ("done", "input", "greet"))
    assert calc_inputs_done < greet_inputs_start  # calc's inputs first, not behind or mixed with greet's
    calc_dialogues_start = min(i for i, e in enumerate(events) if e == ("start", "other", "calc"))
    assert calc_dialogues_start < greet_inputs_done  # calc's dialogues run while greet's inputs are written


@pytest.mark.parametrize("dashboard", [False, True])
def test_a_local_ray_starts_without_the_dashboard_unless_asked_and_forwards_actor_logs(
    tmp_path, monkeypatch, dashboard
):
    import ray

    from genpi.synth.run import synthesize

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(RuntimeError, match="stop here"):
        synthesize(CATALOG, tmp_path / "out", SETTINGS, options=dataclasses.replace(OPTIONS, dashboard=dashboard))
    assert calls[0]["include_dashboard"] is dashboard and calls[0]["log_to_driver"] is True
    assert not (tmp_path / "out" / LOCK).exists()  # released on the way out


PAGE_WORDS = 300  # a Mind2Web-style input: an HTML page (the fakes count a word as a token)


class WebFake(Fake):
    """Fake, plus what the input limit needs: the target counts tokens (a word each, 3 for the chat template),
    and for the "web" prompt the generator writes HTML pages of PAGE_WORDS tokens (cut by a smaller max_tokens,
    as an engine does), every second one the same page."""

    async def complete(self, request):
        system = request.messages[0]["content"] if request.messages[0]["role"] == "system" else ""
        if not system and request.sampling.max_tokens == 1:  # counting tokens
            return Completion(
                text="x", prompt_tokens=3 + len(request.messages[0]["content"].split()), finish_reason="length"
            )
        if system.startswith(pipeline.INPUT_INSTRUCTION) and "web agent" in system:
            n = min(PAGE_WORDS, request.sampling.max_tokens)
            self.pages = getattr(self, "pages", 0) + 1
            page = ["<html>", f"<p>{'copy' if self.pages % 2 == 0 else request.seed}</p>"] + ["<td>"] * (PAGE_WORDS - 2)
            return Completion(text=" ".join(page[:n]), finish_reason="length" if n < PAGE_WORDS else "stop")
        return await super().complete(request)


def web_entries(tmp_path):
    example = "Click the cart. <html> " + "<td> " * 200  # 204 tokens as WebFake counts
    catalog = tmp_path / "web.yaml"
    catalog.write_text(
        json.dumps(
            [
                {
                    "id": "web",
                    "system": "You are a web agent. Reply with the element to click.",
                    "shots": [[{"role": "user", "content": example}, {"role": "assistant", "content": "Answer: cart"}]],
                    "actions": {"final": "^Answer: "},
                    "max_turns": 1,
                }
            ]
        )
    )
    return [*ENTRIES, *load_catalog(catalog)]


def test_samples_are_reached_for_long_inputs_under_a_limit_derived_from_the_examples(tmp_path):
    out, settings = tmp_path / "out", dataclasses.replace(SETTINGS, samples=4)
    manifest = synth(out, WebFake(), web_entries(tmp_path), settings)
    web = manifest["prompts"]["web"]
    # 2 x the longest example input (204 tokens): the 300-token pages fit, where 256 tokens cut every one
    assert web["input_limit"] == {"tokens": 408, "source": "examples", "longest_example": 204, "note": None}
    assert web["inputs"] == 4 and web["shortfall"] is None and sum(s["rows"] for s in web["shards"].values()) == 4
    assert web["input_generation"]["cut"] == 0 and web["input_generation"]["duplicates"] >= 1
    assert len({r["input"] for r in rows_of(out, "web")}) == 4
    # prompts with short examples keep the floor
    assert manifest["prompts"]["calc"]["input_limit"]["tokens"] == pipeline.INPUT_LIMIT_FLOOR


def test_a_prompt_short_of_samples_is_named_in_the_closing_lines_and_the_manifest(tmp_path, monkeypatch, capsys):
    from genpi.synth import run as synth_run

    out = tmp_path / "out"
    settings = dataclasses.replace(SETTINGS, samples=4, max_input_tokens=256)  # the flag: pages are cut at 256
    monkeypatch.setattr(synth_run, "synthesize", lambda *a, **k: synth(out, WebFake(), web_entries(tmp_path), settings))
    assert main([str(CATALOG), "--out", str(out), "--no-progress", "--no-stats"]) == 0
    err = capsys.readouterr().err
    web = read_manifest(out)["prompts"]["web"]
    rounds = settings.input_rounds
    asked = 2 * 4 * rounds
    expected = (
        f"web: 0 of 4 dialogues ({asked} generated inputs over the 256-token input limit; {asked} inputs asked "
        f"in {rounds} generator rounds, at most {rounds}); --max-input-tokens sets a larger input limit"
    )
    assert web["shortfall"] == expected and web["inputs"] == 0
    assert web["input_generation"] == {
        "rounds": rounds,
        "asked": asked,
        "cut": asked,
        "duplicates": 0,
        "empty": 0,
        "errors": 0,
    }
    lines = err.strip().splitlines()
    assert lines[-2:] == ["8 dialogues in " + str(out) + " (0 failed)", f"genpi: {expected}"]


def test_a_failed_shard_write_fails_only_that_shard_and_a_rerun_completes_it(tmp_path, monkeypatch, capsys):
    import errno

    import pyarrow.parquet as pq

    from genpi.synth import run as synth_run

    real_write = pq.write_table

    def full_disk(table, where, *args, **kwargs):
        if "/calc/" in str(where) and ".part-00001.parquet" in str(where):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, *args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(store.pq, "write_table", full_disk)
    monkeypatch.setattr(synth_run, "synthesize", lambda *a, **k: synth(out, Fake()))
    assert main([str(CATALOG), "--out", str(out), "--no-progress", "--no-stats"]) == 1
    err = capsys.readouterr().err
    name = "dialogues/calc/part-00001.parquet"
    assert f"genpi: calc: {name} could not be written (OSError: [Errno 28] No space left on device); rerun" in err
    manifest = read_manifest(out)
    calc = manifest["prompts"]["calc"]
    assert sorted(calc["shards"]) == ["part-00000.parquet", "part-00002.parquet"] and list(calc["write_errors"]) == [
        name
    ]
    assert not store.shard_path(out, "calc", 1).exists() and not list(out.rglob("*.tmp"))
    assert [r["sample_id"] for r in rows_of(out, "greet")] == list(range(5))  # the other prompt is whole
    for prompt_id, prompt in manifest["prompts"].items():  # each finished shard's checksum is recorded
        for shard_name, shard in prompt["shards"].items():
            assert shard["sha256"] == store.file_sha256(store.shard_path(out, prompt_id, 0).with_name(shard_name))

    monkeypatch.setattr(store.pq, "write_table", real_write)
    engine = Fake()
    manifest = synth(out, engine)
    assert len(engine.agent_inputs) == 2  # only the failed shard's samples
    assert [r["sample_id"] for r in rows_of(out, "calc")] == list(range(5))
    assert (
        manifest["prompts"]["calc"]["write_errors"] == {}
        and "part-00001.parquet" in manifest["prompts"]["calc"]["shards"]
    )


@pytest.mark.parametrize("damage", ["flip a byte", "valid but changed"])
def test_a_finished_shard_that_no_longer_matches_its_checksum_is_redone_on_resume(tmp_path, capsys, damage):
    out = tmp_path / "out"
    synth(out, Fake())
    path = store.shard_path(out, "greet", 0)
    if damage == "flip a byte":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:  # a readable shard whose rows changed since it was written: not the run's work, not trusted
        rows = store.read_rows(path)
        rows[0]["reason"] = "edited"
        store.write_table(path, rows, store.DIALOGUE_SCHEMA)
    capsys.readouterr()
    engine = Fake()
    manifest = synth(out, engine)
    assert "greet: shard part-00000.parquet does not match the SHA-256" in capsys.readouterr().err
    assert len(engine.agent_inputs) == 2  # the two samples of that shard, nothing else
    rows = rows_of(out, "greet")
    assert [r["sample_id"] for r in rows] == list(range(5)) and all(r["reason"] == "because" for r in rows)
    assert manifest["prompts"]["greet"]["shards"]["part-00000.parquet"]["sha256"] == store.file_sha256(path)


def test_synthesis_starts_a_local_ray_beside_a_stale_session_file(tmp_path, capsys, monkeypatch):
    from test_train_run import stale_ray_session, stop_at_ray_init

    from genpi.synth.run import synthesize

    stale_ray_session(tmp_path, monkeypatch)
    used = stop_at_ray_init(monkeypatch)
    with pytest.raises(RuntimeError, match="stop at ray.init"):
        synthesize(CATALOG, tmp_path / "out", SETTINGS, options=OPTIONS)
    assert used == [None]  # a new local cluster, not the dead head's
    assert capsys.readouterr().err.count("genpi: Ray: using a local Ray cluster of its own") == 1


@pytest.mark.parametrize("text", ['{"version": 2, "prom', "[]", "\x00\x01binary", '{"prompts": [1]}'])
def test_a_corrupt_manifest_exits_2_naming_it(tmp_path, capsys, text):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_bytes(text.encode("latin-1"))
    assert main([str(CATALOG), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"genpi: error: {out / 'manifest.json'}: not a") and err.count("\n") == 1
    assert not (out / LOCK).exists()


def test_a_lock_is_readable_by_other_users_runs_and_one_they_cannot_read_is_held(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = acquire_lock(out)
    assert lock.stat().st_mode & 0o777 == 0o644
    release_lock(lock)
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    write_lock(out, dead_pid())
    (out / LOCK).chmod(0)
    with pytest.raises(InputError, match="not readable"):
        acquire_lock(out)
