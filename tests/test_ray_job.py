"""`ray job submit` of `python -m genpi.synth` to a real head node started with `ray start --head`.

This is the cluster path of docs/design.md ("Running") end to end on one machine: the
repository travels as the job's working_dir, the driver's `ray.init()` connects to
the job's cluster, and the engine actors run on its node.

Isolation from any other Ray on the machine (another test's `ray.init()`, another
session's cluster):
- every port is chosen free up front (Ray's defaults, 6379, 8265, 10001, 52365,
  would collide) and the dashboard listens on 127.0.0.1 only; the head's temp dir
  (sockets, logs, unpacked packages) is a private folder under /tmp;
- the cluster gets its own random auth token through RAY_AUTH_MODE/RAY_AUTH_TOKEN
  (Ray >= 2.60 turns token auth on by default); ~/.ray/auth_token is neither read
  nor written;
- teardown never calls `ray stop`: that kills *every* Ray process of the machine
  (it matches process names: raylet, gcs_server, ...). The head runs as
  `ray start --block`, whose SIGTERM handler stops the processes it started; then
  whatever still carries this head's marker variable in its environment (every
  process of the head inherits it: workers, actors, the job driver) is killed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import REPO

from genpi.catalog import load_catalog
from genpi.data import store

pytestmark = pytest.mark.slow  # end to end (conftest)

CATALOG = REPO / "tests" / "data" / "tiny.yaml"
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
MARKER = "GENPI_TEST_RAY_HEAD"
JOB_TIMEOUT = 420


@dataclass
class Head:
    url: str
    env: dict  # for `ray job ...` clients: the cluster's token, no RAY_ADDRESS
    token: str
    temp: Path
    log: Path

    def api(self, path: str, token: str | None = "own") -> tuple[int, str]:
        headers = {} if token is None else {"Authorization": f"Bearer {self.token if token == 'own' else token}"}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (urllib.error.URLError, OSError) as e:  # not listening (yet)
            return 0, str(e)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def diagnostics(self) -> str:
        parts = [f"--- ray start --head ({self.log}) ---\n" + tail(self.log)]
        logs = self.temp / "session_latest" / "logs"
        for name in ("raylet.out", "gcs_server.out", "dashboard.log", "runtime_env_setup-*.log", "job-driver-*.log"):
            for path in sorted(logs.glob(name)):
                parts.append(f"--- {path.name} ---\n" + tail(path, 2500))
        return "\n".join(parts)


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"({e})"


def free_ports(n: int) -> list[int]:
    with ExitStack() as stack:  # all held open together, so the n ports differ
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def processes_of(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER) == marker:
                found.append(p)
        except psutil.Error:  # gone, a zombie, or not ours to read
            pass
    return found


def stop_head(start: subprocess.Popen, marker: str) -> list[str]:
    """Stop exactly this head's processes; returns those that needed a SIGKILL."""
    if start.poll() is None:
        start.send_signal(signal.SIGTERM)  # `ray start --block` then stops its own processes
        try:
            start.wait(timeout=30)
        except subprocess.TimeoutExpired:
            start.kill()
            start.wait()
    left = processes_of(marker)
    for p in left:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=5)
    names = []
    for p in alive:
        try:
            names.append(f"{p.pid} {p.name()}")
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return names


@pytest.fixture
def ray_head():
    temp = Path(tempfile.mkdtemp(prefix="genpi-rayjob-", dir="/tmp"))  # short: Ray's unix sockets live below it
    token, marker = secrets.token_hex(32), secrets.token_hex(8)
    gcs, dashboard, agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager, client = free_ports(9)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS or foreign token
    base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    head_env = dict(base, **{MARKER: marker}, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    log = temp / "ray-start.log"
    command = [
        RAY,
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--temp-dir",
        str(temp),
        "--port",
        str(gcs),  # no --node-ip-address 127.0.0.1: Ray swaps loopback for the machine's IP anyway
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--dashboard-agent-listen-port",
        str(agent_http),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(runtime_env),
        "--metrics-export-port",
        str(metrics),
        "--node-manager-port",
        str(node_manager),
        "--object-manager-port",
        str(object_manager),
        "--ray-client-server-port",
        str(client),
        "--num-cpus",
        "2",
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(200 * 1024**2),
    ]
    with open(log, "w") as out:
        start = subprocess.Popen(
            command, env=head_env, stdout=out, stderr=subprocess.STDOUT, cwd=temp, start_new_session=True
        )
    head = Head(f"http://127.0.0.1:{dashboard}", base, token, temp, log)
    failed = True
    try:
        deadline = time.monotonic() + 120
        while head.api("/api/jobs/")[0] != 200:
            assert start.poll() is None, f"ray start --head exited with {start.returncode}\n{head.diagnostics()}"
            assert time.monotonic() < deadline, f"head not ready in 120 s\n{head.diagnostics()}"
            time.sleep(0.5)
        yield head
        failed = False
    finally:
        killed = stop_head(start, marker)
        if failed:
            print(head.diagnostics())
        shutil.rmtree(temp, ignore_errors=True)
    assert not killed, f"processes of the head outlived `ray start` and needed SIGKILL: {killed}"


def test_ray_job_submit_runs_the_synthesis_on_the_cluster(ray_head, tiny_finishing_model):
    head = ray_head
    # Token auth is really on: without the token, or with another one, the job API refuses.
    assert head.api("/api/jobs/", token=None)[0] == 401
    assert head.api("/api/jobs/", token=secrets.token_hex(32))[0] == 403

    out = Path(tempfile.mkdtemp(prefix="genpi-rayjob-out-", dir="/tmp")) / "out"
    submission = f"genpi-synth-{secrets.token_hex(4)}"
    submit = [
        "job",
        "submit",
        "--address",
        head.url,
        "--working-dir",
        str(REPO),
        "--submission-id",
        submission,
        "--",
        "python",
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
        "3",
        "--shard-size",
        "2",
        "--max-new-tokens",
        "24",
        "--no-stats",
    ]
    started = time.monotonic()
    try:
        try:
            result = head.ray(*submit, timeout=JOB_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            head.ray("job", "stop", "--address", head.url, "--no-wait", submission)
            logs = head.ray("job", "logs", "--address", head.url, submission)
            pytest.fail(
                f"job not done in {JOB_TIMEOUT} s\n{(e.stdout or b'')[-3000:]!r}\n"
                f"--- job logs ---\n{logs.stdout[-6000:]}\n{head.diagnostics()}"
            )
        elapsed = time.monotonic() - started
        status = json.loads(head.api(f"/api/jobs/{submission}")[1])
        logs = head.ray("job", "logs", "--address", head.url, submission)
        report = (
            f"submit rc={result.returncode} status={status.get('status')} message={status.get('message')}\n"
            f"--- submit stdout ---\n{result.stdout[-4000:]}\n--- submit stderr ---\n{result.stderr[-4000:]}\n"
            f"--- ray job logs ---\n{logs.stdout[-6000:]}{logs.stderr[-2000:]}\n{head.diagnostics()}"
        )
        print(report)  # pytest shows captured output when the test fails
        assert result.returncode == 0 and status["status"] == "SUCCEEDED", (
            f"rc={result.returncode}: {status.get('message')}"
        )
        print(f"job {submission} succeeded in {elapsed:.1f} s")

        # The working dir went up without the virtualenvs (.gitignore: .venv/, .venv-*/).
        uri = status["runtime_env"]["working_dir"]  # gcs://_ray_pkg_<hash>.zip, unpacked on the node
        assert uri.startswith("gcs://_ray_pkg_") and uri in result.stdout + result.stderr, status
        package = (
            head.temp
            / "session_latest"
            / "runtime_resources"
            / "working_dir_files"
            / uri.removeprefix("gcs://").removesuffix(".zip")
        )
        assert (package / "genpi" / "synth" / "run.py").is_file() and (
            package / "tests" / "data" / "tiny.yaml"
        ).is_file()
        assert not (package / ".venv").exists() and not list(package.glob(".venv-*")), sorted(
            p.name for p in package.iterdir()
        )

        # The driver ran there (the job's cluster, its working dir) and finished the synthesis.
        assert logs.returncode == 0, status
        assert f"Running entrypoint for job {submission}: python -m genpi.synth" in logs.stdout, status
        assert f"6 dialogues in {out} (0 failed)" in logs.stdout, status
        code, body = head.api("/api/v0/actors?detail=1&limit=1000")
        assert code == 200, body
        actors = [a for a in json.loads(body)["data"]["result"]["result"] if a["class_name"] == "EngineActor"]
        assert [a["job_id"] for a in actors] == [status["job_id"]], actors  # one shared engine, in this job

        # Every prompt of the catalog: shards covering sample ids 0..2 exactly once, all in the manifest.
        manifest = json.loads((out / "manifest.json").read_text())
        for entry in load_catalog(CATALOG):
            shards = sorted(store.shard_path(out, entry.id, 0).parent.glob("part-*.parquet"))
            assert [p.name for p in shards] == ["part-00000.parquet", "part-00001.parquet"], shards
            rows = [r for p in shards for r in store.read_rows(p)]
            assert sorted(r["sample_id"] for r in rows) == [0, 1, 2], (entry.id, rows)
            assert {r["prompt_id"] for r in rows} == {entry.id} and {r["prompt_sha256"] for r in rows} == {entry.sha256}
            assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
            listed = manifest["prompts"][entry.id]["shards"]
            assert sorted(listed) == [p.name for p in shards]
            assert sum(s["rows"] for s in listed.values()) == 3
        assert not list(out.rglob("*.tmp"))
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
