"""The OS-task sandbox: its shell, its limits, and containment of hostile agents.

The hostile commands (rm -rf /, a fork bomb, kill -9 -1, ...) run only behind harmless canaries: the
module fixture `contained` first shows, in a sandbox, that a marker file in the host user's home and
in the repository is invisible and a marker file visible through the overlay cannot be rewritten or
deleted on the host, and that a marker process on the host cannot be killed. Each destructive test
skips unless every canary held in this session.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from genpi.eval import os_tasks
from genpi.eval.os_tasks import LoopSettings, OSTask, play, replay_agent
from genpi.eval.sandbox import CommandTimeout, Limits, Sandbox, ansi_c_quote
from genpi.eval.serve import System

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not all(map(shutil.which, ("unshare", "nsenter", "prlimit"))), reason="needs util-linux")


def bash(command: str) -> str:
    return f"Think: run it.\n\nAct: bash\n\n```bash\n{command}\n```"


def pid_namespaces() -> set[str]:
    """The PID namespace of every process on the machine."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            found.add(os.readlink(f"/proc/{pid}/ns/pid"))
        except OSError:
            pass
    return found


def test_ansi_c_quote_round_trips_through_bash():
    text = "a'b\"c $HOME `x` \\ \n\t é ✓ {output}"
    assert subprocess.run(["bash", "-c", f"printf %s {ansi_c_quote(text)}"], capture_output=True, text=True).stdout == text


def test_shell_keeps_state_merges_stderr_and_survives_exit_and_timeout():
    with Sandbox() as box:
        assert box.execute("pwd; cd /tmp; export GENPI_X=42; echo err >&2") == "/\nerr\n"  # AgentBench's shell starts in /
        assert box.execute('echo "$PWD $GENPI_X"; printf no-newline') == "/tmp 42\nno-newline"
        assert box.execute("read line; echo read:$line") == "read:\n"  # stdin is /dev/null: nothing waits
        assert "unexpected EOF" in box.execute('echo "unclosed')  # a syntax error ends only that command
        assert box.execute("exit 3") == ""
        assert box.execute('echo "$PWD ${GENPI_X:-unset}"') == "/ unset\n"  # a fresh shell after exit
        with pytest.raises(CommandTimeout):
            box.execute("sleep 10", timeout=1)
        assert box.execute("echo next") == "next\n"
        assert box.run('echo "$1|$2"; exit 3', ["a b", "c"]) == (3, "a b|c\n")
        assert box.run("import sys; print(sys.argv[1:])", ["x"], language="python") == (0, "['x']\n")
        assert box.run("sleep 10", timeout=1)[0] == 124
        assert box.execute("id -u; hostname; ls /proc | grep -c '^[0-9]'").split()[:2] == ["0", "sandbox"]
        inside, outside, count = box.execute("cat /proc/self/uid_map").split()
        assert inside == "0" and outside != "0"  # never the host's root


def test_each_sandbox_starts_fresh_and_leaves_nothing():
    with Sandbox() as box:
        box.execute("echo one > /root/note; echo x > /etc/genpi-mark; touch /usr/genpi-mark")
        assert box.execute("cat /root/note /etc/genpi-mark") == "one\nx\n"
        ns = os.readlink(f"/proc/{box.pid1}/ns/pid")
    assert ns not in pid_namespaces()
    assert not Path("/usr/genpi-mark").exists() and not Path("/etc/genpi-mark").exists()
    with Sandbox() as box:
        assert box.execute("ls -A /root /tmp /home; ls /usr/genpi-mark /etc/genpi-mark 2>/dev/null | wc -l") == "/home:\n\n/root:\n\n/tmp:\n0\n"


def test_wall_time_limit_kills_the_sandbox():
    with Sandbox(Limits(wall_s=1)) as box:
        assert box.execute("sleep 5; echo not reached") == "" and box.expired


@pytest.fixture(scope="module")
def contained():
    """Harmless canaries; {check: held}. The destructive tests run only when every check held."""
    token, name = uuid.uuid4().hex, f".genpi-canary-{uuid.uuid4().hex}"
    home_marker, repo_marker = Path.home() / name, REPO / name
    visible = Path("/srv") / name  # a host file the sandbox sees through its overlay
    markers = [home_marker, repo_marker] + ([visible] if os.access("/srv", os.W_OK) else [])
    for marker in markers:
        marker.write_text(token)
    process = subprocess.Popen(["sleep", "600"])
    try:
        with Sandbox() as box:
            seen = box.execute(f"cat {home_marker} {repo_marker}; ls /proc | grep -c '^[0-9]'")
            for marker in markers:
                box.execute(f"echo rewritten > {marker}; rm -f {marker}; kill -9 {process.pid}")
            gone = box.execute(f"ls {visible} 2>/dev/null | wc -l") if visible in markers else "0\n"
        checks = {
            "host home and repository files are invisible": token not in seen and "No such file" in seen,
            "the sandbox sees only its own few processes": int(seen.split()[-1]) < 10,
            "marker files are unchanged on the host": all(m.read_text() == token for m in markers),
            "an overlay file the sandbox deleted is still on the host": visible not in markers or gone == "0\n",
            "a host process survives kill -9 of its PID": process.poll() is None,
        }
        yield checks
    finally:
        process.kill()
        process.wait()
        for marker in markers:
            marker.unlink(missing_ok=True)


def test_canaries_are_contained(contained):
    assert all(contained.values()), {k: v for k, v in contained.items() if not v}


@pytest.fixture
def sentinels(contained, tmp_path, monkeypatch):
    """Skips unless the canaries held; files that must be unchanged after a hostile task, whose
    sandboxes must have left no process behind."""
    if not all(contained.values()):
        pytest.skip(f"containment canaries failed, destructive cases not run: {contained}")
    namespaces = []

    class Recorded(Sandbox):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            namespaces.append(os.readlink(f"/proc/{self.pid1}/ns/pid"))

    monkeypatch.setattr(os_tasks, "Sandbox", Recorded)
    token = uuid.uuid4().hex
    files = [Path.home() / f".genpi-sentinel-{token}", REPO / f".genpi-sentinel-{token}", tmp_path / "sentinel"]
    for f in files:
        f.write_text(token)
    before = {f: f.stat().st_mtime_ns for f in files}
    yield files
    assert {f: f.stat().st_mtime_ns for f in files} == before and all(f.read_text() == token for f in files)
    assert namespaces and not set(namespaces) & pid_namespaces(), "a sandbox process outlived its task"
    for f in files:
        f.unlink()


def hostile(command: str, then: str = "Act: answer(done)", settings: LoopSettings = LoopSettings(command_timeout=10)) -> dict:
    """One task whose agent runs `command` and answers; the answer never matches."""
    task = OSTask(0, "hostile agent", match={"answer": "the task cannot be solved", "strip": True})
    with ThreadPoolExecutor(2) as pool:
        row = asyncio.run(play(task, System("replay"), [], replay_agent({0: [bash(command), then]}), settings, pool))
    assert row["success"] is False and row["error"] is None, row
    return row


def test_rm_rf_root(sentinels):
    # unlinking the ~150k files overlaid from /usr, /opt and /var takes 6 s here alone, over 10 s late in the full
    # suite (cold caches): the bound is for containment, not speed
    row = hostile("rm -rf --no-preserve-root / 2>&1 | tail -1; ls /", settings=LoopSettings(command_timeout=120))
    assert row["ended"] == "answered"
    assert (REPO / "genpi" / "eval" / "sandbox.py").exists() and Path("/usr/bin/bash").exists()


def test_writing_to_host_paths(sentinels, tmp_path):
    targets = [f for f in sentinels] + [REPO / "pwned", Path.home() / "pwned", tmp_path / "pwned", Path("/tmp") / f"pwned-{uuid.uuid4().hex}"]
    hostile("; ".join(f"echo pwned > {t}" for t in targets) + f"; echo pwned > /dev/shm/{targets[-1].name}")
    assert not any(t.exists() for t in targets[len(sentinels) :]) and not Path(f"/dev/shm/{targets[-1].name}").exists()


def test_reading_a_hidden_home_file(sentinels):
    secret = sentinels[0]
    task = OSTask(0, "read the secret", match={"answer": secret.read_text(), "strip": True})
    with ThreadPoolExecutor(1) as pool:
        row = asyncio.run(play(task, System("replay"), [], replay_agent({0: [bash(f"cat {secret}"), "Act: answer({output})"]}),
                               LoopSettings(command_timeout=10), pool))  # fmt: skip
    assert row["success"] is False and "No such file" in row["turns"][2]["content"]


def test_network_connections(sentinels):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    accepted = []

    def accept():
        try:
            accepted.append(server.accept())
        except OSError:  # timed out: nothing connected
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    row = hostile(f"echo hi > /dev/tcp/127.0.0.1/{port} && echo connected; "
                  "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 80), timeout=3)\" 2>&1 | tail -1")  # fmt: skip
    thread.join(6)
    server.close()
    out = row["turns"][2]["content"]
    assert not accepted and "connected\n" not in out and "Network is unreachable" in out


def test_fork_bomb(sentinels):
    row = hostile(":(){ :|:& };:", settings=LoopSettings(command_timeout=5, limits=Limits(processes=64)))
    assert row["ended"] in ("answered", "timeout")


def test_endless_loop(sentinels):
    assert hostile("while :; do :; done", settings=LoopSettings(command_timeout=2))["ended"] == "timeout"


def test_writing_2_gb(sentinels):
    free = shutil.disk_usage("/").free
    row = hostile("dd if=/dev/zero of=/root/big bs=1M count=2048 2>&1 | tail -1; ls -l /root/big")
    assert "268435456" in row["turns"][2]["content"]  # stopped at the 256 MiB file-size limit
    assert shutil.disk_usage("/").free > free - (1 << 30)


def test_kill_all(sentinels):
    victim = subprocess.Popen(["sleep", "600"])
    try:
        hostile("kill -9 -1; /bin/kill -9 -1")
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
