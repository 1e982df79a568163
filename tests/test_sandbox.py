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
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from genpi.eval import os_tasks
from genpi.eval import sandbox as sandbox_module
from genpi.eval.os_task_file import OSTask, Script
from genpi.eval.os_tasks import LoopSettings, play, replay_agent
from genpi.eval.sandbox import CommandTimeout, Limits, Sandbox, ansi_c_quote
from genpi.eval.systems import System

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not all(map(shutil.which, ("unshare", "nsenter", "prlimit"))), reason="needs util-linux"
)


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
    assert (
        subprocess.run(["bash", "-c", f"printf %s {ansi_c_quote(text)}"], capture_output=True, text=True).stdout == text
    )


def test_shell_keeps_state_merges_stderr_and_survives_exit_and_timeout():
    with Sandbox() as box:
        assert box.execute("pwd; cd /tmp; export GENPI_X=42; echo err >&2") == "/root\nerr\n"  # AgentBench's WorkingDir
        assert box.execute('echo "$PWD $GENPI_X"; printf no-newline') == "/tmp 42\nno-newline"
        assert box.execute("read line; echo read:$line") == "read:\n"  # stdin is /dev/null: nothing waits
        assert "unexpected EOF" in box.execute('echo "unclosed')  # a syntax error ends only that command
        assert box.execute("exit 3") == ""
        assert box.execute('echo "$PWD ${GENPI_X:-unset}"') == "/root unset\n"  # a fresh shell after exit
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
        assert (
            box.execute("ls -A /root /tmp; ls /usr/genpi-mark /etc/genpi-mark 2>/dev/null | wc -l")
            == "/root:\n\n/tmp:\n0\n"
        )


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


def hostile(
    command: str, then: str = "Act: answer(done)", settings: LoopSettings = LoopSettings(command_timeout=10)
) -> dict:
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
    targets = [f for f in sentinels] + [
        REPO / "pwned",
        Path.home() / "pwned",
        tmp_path / "pwned",
        Path("/tmp") / f"pwned-{uuid.uuid4().hex}",
    ]
    hostile("; ".join(f"echo pwned > {t}" for t in targets) + f"; echo pwned > /dev/shm/{targets[-1].name}")
    assert not any(t.exists() for t in targets[len(sentinels) :]) and not Path(f"/dev/shm/{targets[-1].name}").exists()


def test_reading_a_hidden_home_file(sentinels):
    secret = sentinels[0]
    task = OSTask(0, "read the secret", match={"answer": secret.read_text(), "strip": True})
    with ThreadPoolExecutor(1) as pool:
        row = asyncio.run(
            play(
                task,
                System("replay"),
                [],
                replay_agent({0: [bash(f"cat {secret}"), "Act: answer({output})"]}),
                LoopSettings(command_timeout=10),
                pool,
            )
        )
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
    row = hostile(
        f"echo hi > /dev/tcp/127.0.0.1/{port} && echo connected; "
        "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 80), timeout=3)\" 2>&1 | tail -1"
    )
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


def processes_named(text: str) -> list[int]:
    """Host PIDs of the processes whose command line contains `text`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_agent_commands_cannot_mount_or_make_namespaces():
    """A tmpfs is unreclaimable memory outside every limit: neither the shell nor a script may mount one, directly
    or in a user namespace of its own, nor raise the namespace limit that forbids the latter."""
    attempts = (
        "mkdir -p /tmp/m; mount -t tmpfs -o size=1g none /tmp/m && echo MOUNTED; "
        "unshare --user --map-root-user --mount sh -c 'mount -t tmpfs none /tmp && echo NESTED'; "
        "unshare --mount true && echo UNSHARED; echo 9 > /proc/sys/user/max_user_namespaces && echo RAISED; "
        "nsenter --target 1 --mount true && echo ENTERED; echo done"
    )
    with Sandbox() as box:
        assert box.execute(attempts).endswith("done\n")
        for out in (box.execute(attempts), box.run(attempts)[1]):
            assert not any(word in out for word in ("MOUNTED", "NESTED", "UNSHARED", "RAISED", "ENTERED")), out
        assert "NoNewPrivs:\t1" in box.execute("grep NoNewPrivs /proc/self/status")


def test_root_installs_into_usr_local_bin_and_chowns_to_other_users():
    """AgentBench's root can do this in its container; an init script and example solutions rely on it."""
    with Sandbox() as box:
        status, out = box.run(
            "printf '#!/bin/sh\\necho hello\\n' > /usr/local/bin/genpi-hello && chmod +x /usr/local/bin/genpi-hello"
            " && touch /home/f && chown 1000:1001 /home/f && mkdir -p /home/u && chown 65534 /home/u && echo ok"
        )
        assert (status, out) == (0, "ok\n")
        assert box.execute("genpi-hello; stat -c '%u:%g' /home/f /home/u") == "hello\n1000:1001\n65534:0\n"
        assert box.execute("cat /proc/self/uid_map").split()[2] == "65536"  # a range, as in a container
    assert not Path("/usr/local/bin/genpi-hello").exists()


def test_judge_scripts_run_where_and_as_the_agents_shell_does():
    """AgentBench runs the shell and the checks alike in one container: same working directory, same variables."""
    probe = 'echo "$PWD|$HOME|$PATH|$USER|$LANG"; id; find . -maxdepth 1 -name "*.helloworld" | wc -l'
    with Sandbox() as box:
        box.run("touch a.helloworld")
        assert box.execute(probe) == box.run(probe)[1]
        assert box.run("pwd") == (0, "/root\n") and box.execute("pwd") == "/root\n"  # AgentBench's WorkingDir /root
        assert box.execute(probe).endswith("\n1\n")


def test_scripts_pass_stdout_alone_and_end_when_the_script_exits():
    """AgentBench's checks get a script's stdout only (its stderr apart), and an init script that leaves a
    process running in the background (holding the output pipe) has ended when the script itself exits."""
    with Sandbox() as box:
        assert box.run("echo out; echo err >&2") == (0, "out\n") and box.stderr == "err\n"
        started = time.monotonic()
        assert box.run("sleep 60 & echo started; exit 2", timeout=20) == (2, "started\n")
        assert time.monotonic() - started < 10
        assert (
            box.execute("pgrep -x sleep >/dev/null && echo still-running") == "still-running\n"
        )  # left running, as in Docker
        task = OSTask(
            0,
            "Say 7.",
            check=(None, Script("bash", '[ "$1" = "$(echo "$2" | tr -d "[:space:]")" ]')),
            example=Script("bash", "echo 7; echo progress >&2"),
        )
        assert os_tasks.judge(task, box, "7", 10) == (True, None)


def test_open_files_go_as_far_as_dockers():
    """Docker's containers allow 1048576 open files and AgentBench's tasks use descriptors like 123321: sandbox
    processes get that many where the host allows it, never fewer than genpi's own hard limit (here with
    genpi's soft limit lowered to 256)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raise_hard = "import resource as r; r.setrlimit(r.RLIMIT_NOFILE, (1 << 20, 1 << 20))"
    can_raise = subprocess.run([sys.executable, "-c", raise_hard], capture_output=True).returncode == 0
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    expected = min(1 << 20, nr_open) if can_raise or hard == resource.RLIM_INFINITY else min(1 << 20, nr_open, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        with Sandbox() as box:
            assert box.execute("ulimit -n") == f"{expected}\n"
            descriptor = min(expected - 1, 123321)
            assert box.run(f"echo 1 {descriptor}>/tmp/x && cat /tmp/x") == (0, "1\n")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_find_over_the_whole_system_finds_nothing_it_may_not_read(tmp_path):
    """In AgentBench's container root reads everything, so `find / -name X` prints no error (a solution's
    output is its answer): the sandbox's PID 1 has the capabilities of its other processes (else the kernel
    hides /proc/1's fdinfo and map_files), and a host directory its root cannot read (an owner-only one,
    /proc/tty/driver) is shown empty and its own."""
    secret = None
    if os.access("/srv", os.W_OK):
        secret = Path("/srv") / f".genpi-private-{uuid.uuid4().hex}"
        secret.mkdir(mode=0o700)
        (secret / "inside").write_text("hidden-text")
        sandbox_module.unreadable_dirs.cache_clear()
    try:
        with Sandbox() as box:
            assert box.execute("find / -name genpi-nothing-here; echo done") == "done\n"
            assert box.execute("ls /proc/1/fdinfo /proc/1/map_files >/dev/null && echo listed") == "listed\n"
            if secret is not None:
                assert (
                    box.execute(f"ls -A {secret}; stat -c '%a %u' {secret}; touch {secret}/mine && echo ok")
                    == "700 0\nok\n"
                )
        if secret is not None:
            assert not (secret / "mine").exists()
    finally:
        if secret is not None:
            shutil.rmtree(secret)
            sandbox_module.unreadable_dirs.cache_clear()


def test_users_with_a_home_under_home_have_it():
    """As in an installed system (AgentBench's ubuntu image has /home/ubuntu): each user of the sandbox's
    /etc/passwd whose home is /home/NAME has it, from /etc/skel, owned by that user (ids below 65536)."""
    users = {}
    for line in Path("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) == 7 and re.fullmatch(r"/home/[^/]+", fields[5]) and int(fields[2]) < 65536:
            users[fields[5]] = fields[2]
    with Sandbox() as box:
        listed = box.execute('for h in /home/*; do [ -d "$h" ] && stat -c \'%n %u\' "$h"; done')
        assert dict(line.split() for line in listed.splitlines()) == users
        if Path("/etc/skel/.profile").exists() and users:
            assert box.run(f"cmp /etc/skel/.profile {next(iter(users))}/.profile && echo same") == (0, "same\n")


def test_output_is_capped_drained_and_counted():
    """A command printing 40 MB keeps its first KiBs only and never holds the rest in genpi's memory."""
    import tracemalloc

    with Sandbox(Limits(output_kb=64)) as box:
        tracemalloc.start()
        try:
            out = box.execute("yes | head -c 40000000; echo")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert out == "y\n" * 32768 and box.discarded == 40_000_001 - 65536
        assert peak < 8 << 20, f"{peak} bytes held while reading"
        assert box.execute("echo after") == "after\n" and box.discarded == 0  # the shell is in step
        status, out = box.run("yes | head -c 10000000")
        assert status == 0 and len(out) == 65536 and box.discarded == 10_000_000 - 65536


def test_a_timed_out_command_leaves_nothing_running():
    """Its whole process group dies at the timeout, so a timed-out check never overlaps the next command."""
    canary = f"genpi-canary-{uuid.uuid4().hex}"
    with Sandbox() as box:
        with pytest.raises(CommandTimeout):
            box.execute(f"bash -c 'exec -a {canary}-shell sleep 600' & sleep 600", timeout=1)
        assert box.run(f"bash -c 'exec -a {canary}-run sleep 600' & sleep 600", timeout=1)[0] == 124
        deadline = time.monotonic() + 5  # SIGKILLed at the timeout; exiting takes the kernel a moment
        while processes_named(canary) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_named(canary) == []  # while the sandbox is still open
        assert box.execute("echo next") == "next\n"


def test_a_sandbox_started_in_a_thread_outlives_the_thread():
    """PR_SET_PDEATHSIG fires when the starting *thread* ends: sandboxes are started from one long-lived thread."""
    boxes = []
    thread = threading.Thread(target=lambda: boxes.append(Sandbox()))
    thread.start()
    thread.join()
    with boxes[0] as box:
        assert box.execute("echo alive") == "alive\n"


KILLED_PARENT = """
import os, sys, time
from genpi.eval.sandbox import Sandbox
box = Sandbox()
box.start("exec -a {canary}-start sleep 600")
box.execute("bash -c 'exec -a {canary}-shell sleep 600' &")
print(os.readlink(f"/proc/{{box.pid1}}/ns/pid"), box._holder.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_genpi_leaves_no_sandbox_process():
    canary = f"genpi-canary-{uuid.uuid4().hex}"
    parent = subprocess.Popen(
        [sys.executable, "-c", KILLED_PARENT.format(canary=canary)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        namespace, holder = parent.stdout.readline().split()
        assert len(set(processes_named(canary)) - {parent.pid}) >= 2 and namespace in pid_namespaces()
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while (processes_named(canary) or namespace in pid_namespaces()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_named(canary) == [] and namespace not in pid_namespaces()
    assert not Path(f"/proc/{holder}").exists() or b"sandbox_enter" not in Path(f"/proc/{holder}/cmdline").read_bytes()


def test_only_world_readable_host_files_are_visible(tmp_path):
    """The sandbox's root owns nothing on the host and has no supplementary groups: a host file readable by its
    owner or group only is unreadable (/srv is overlaid into the sandbox)."""
    if not os.access("/srv", os.W_OK):
        pytest.skip("/srv is not writable here")
    secret = Path("/srv") / f".genpi-secret-{uuid.uuid4().hex}"
    secret.write_text("hidden-text")
    try:
        for mode in (0o600, 0o640, 0o660):
            secret.chmod(mode)
            with Sandbox() as box:
                assert (
                    "Permission denied" in box.execute(f"cat {secret}")
                    and "hidden-text" not in box.run(f"cat {secret}")[1]
                )
                assert box.execute("id -G") == "0\n"
    finally:
        secret.unlink()


NOT_ROOT = """
import os, warnings
from genpi.eval.sandbox import Sandbox
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with Sandbox() as box:
        print(box.execute("id -u; cat /proc/self/uid_map"), end="")
    with Sandbox() as box:
        pass
print(sum("subordinate ids" in str(w.message) for w in caught))
"""


def test_as_an_unprivileged_user_without_subordinate_ids():
    """Not root and no /etc/subuid range: the sandbox maps that user's own id only, and says so once."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to switch to an unprivileged user (setpriv)")
    if shutil.which("newuidmap"):
        pytest.skip("newuidmap is installed: the unprivileged path would use subordinate ids")
    python = (
        shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    )  # one user 65534 may run (not a root-only venv)
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", NOT_ROOT]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd="/", env={**os.environ, "PYTHONPATH": str(REPO), "HOME": "/"}
    )
    if "Permission denied" in result.stderr or "No module named" in result.stderr:
        pytest.skip(f"user 65534 cannot read the repository or the interpreter: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0", "65534", "1", "1"]  # root inside is 65534 outside; one warning


def test_sandbox_cgroup_limits_and_single_warning(tmp_path, monkeypatch):
    from genpi.eval import sandbox

    monkeypatch.setattr(sandbox, "_warned", set())
    monkeypatch.delenv(sandbox.CGROUP_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="no delegated cgroup v2") as caught:
        assert sandbox.sandbox_cgroup(Limits(), "a") is None and sandbox.sandbox_cgroup(Limits(), "b") is None
    assert len(caught) == 1
    (tmp_path / "cgroup.subtree_control").write_text("cpu memory\n")
    monkeypatch.setenv(sandbox.CGROUP_ENV, str(tmp_path))
    with pytest.raises(sandbox.SandboxError, match="controllers pids"):
        sandbox.sandbox_cgroup(Limits(), "c")
    (tmp_path / "cgroup.subtree_control").write_text("cpu memory pids\n")
    group = sandbox.sandbox_cgroup(Limits(processes=64, total_memory_mb=1024, cpus=0.5), "d")
    assert [(group / f).read_text() for f in ("memory.max", "pids.max", "cpu.max")] == [
        str(1 << 30),
        "64",
        "50000 100000",
    ]
