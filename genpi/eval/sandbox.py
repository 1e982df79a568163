"""A throwaway Linux system for an agent's shell commands, without Docker.

`Sandbox()` starts a holder (sandbox_enter.py) in new user, mount, PID, network, UTS and IPC namespaces; its
first process (PID 1 of the new PID namespace) builds a new root file system on a tmpfs and `pivot_root`s into
it, so nothing of the host is reachable except what it mounts:

    /usr /opt /srv /var/cache /var/lib   overlays: the host's directory read-only underneath, writes
                                         go to an upper layer on the tmpfs
    /etc /var (rest)                     copies on the tmpfs (files the sandbox's root cannot read are left out)
    /tmp /root /run /dev/shm             empty
    /home                                the homes of /etc/passwd's users under /home, from /etc/skel
    (a host directory the sandbox's root may not list: shown empty; PID 1 keeps Docker's capabilities)
    /dev                                 null zero full random urandom (bound from the host)
    /proc                                a new proc for the new PID namespace
    (everything else: /work, /mnt, the host's homes, /sys)  absent

Ids: ids 0-65535 of the sandbox map to 65536 host ids that own nothing on the host (root: its /etc/subuid
range or ids from 4,200,000,000; another user: its /etc/subuid range through newuidmap), so `chown` works and
the sandbox's root reads only world-readable host files. A user without subordinate ids gets one id, its own
(one warning says so): then the sandbox's root reads what that user and its groups can.

Every process enters through sandbox_enter.py (joins the namespaces, clears the groups, becomes the
sandbox's root with Docker's default capabilities, so no mount and no new namespaces, sets no_new_privs and
the rlimits: processes, file size, address space), in a process group of its own that a timeout kills whole.
The tmpfs's size caps all the files written; a delegated cgroup v2 (GENPI_SANDBOX_CGROUP) bounds memory,
processes and CPU of the whole sandbox; a timer kills the whole namespace after the wall-time limit; PID 1
exits when genpi dies or closes the sandbox (EOF on its stdin), and the holder dies with genpi
(PR_SET_PDEATHSIG), taking PID 1 with it. Killing PID 1 kills every process in its namespace, and the tmpfs
vanishes with the mount namespace. docs/sandbox.md says what this does and does not guarantee.

Over 400 lines on purpose: the namespaces, the cgroup, the limits and the shell protocol are one security
boundary, read and reviewed together (a split would spread what it guarantees over several files).
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from genpi.eval.sandbox_enter import KEEP

# Run by PID 1 as the sandbox's root ($1: the tmpfs size, $2: the capabilities PID 1 keeps once it is set up,
# $3...: the host's directories under the overlays that the sandbox's root could not read). Until pivot_root it
# sees the host, so it only writes inside the tmpfs it mounts first (over /tmp, in its own mount namespace;
# `set -e` stops it if that fails).
SETUP = r"""
set -eu
mount -t tmpfs -o size="$1",mode=0755 genpi-sandbox /tmp
mkdir /tmp/root /tmp/layer
mount --bind /tmp/root /tmp/root
caps=$2
shift 2
cd /tmp/root
# $2: how deep the lower layer's plain 0755 directories get upper-layer copies owned by the sandbox's root.
# The host's directories belong to ids the namespace does not map, so not even its root could create files in
# them (AgentBench's tasks install commands into /usr/local/bin); an upper directory makes the merged one its.
overlay() {
  mkdir -p "$1" "/tmp/layer/$1.up" "/tmp/layer/$1.work"
  (cd "/$1" && find . -xdev -mindepth 1 -maxdepth "$2" -type d -perm 0755 -print0) |
    (cd "/tmp/layer/$1.up" && xargs -0 -r mkdir -p)
  mount -t overlay overlay -o "lowerdir=/$1,upperdir=/tmp/layer/$1.up,workdir=/tmp/layer/$1.work" "$1"
}
[ -d /usr/local ] && mkdir -p /tmp/layer/usr.up &&
  (cd /usr && find local -xdev -type d -perm 0755 -print0) | (cd /tmp/layer/usr.up && xargs -0 -r mkdir -p)
for d in usr opt srv; do if [ -d "/$d" ] && [ ! -L "/$d" ]; then overlay "$d" 1; fi; done
for l in bin sbin lib lib32 lib64 libx32; do if [ -L "/$l" ]; then ln -s "$(readlink "/$l")" "$l"; fi; done
mkdir etc var
cp -R --preserve=mode,timestamps,links /etc/. etc/ 2>/dev/null || true
for v in /var/* /var/.[!.]*; do
  case "$v" in
    /var/cache|/var/lib) [ -d "$v" ] && overlay "${v#/}" 1 ;;
    *) [ -e "$v" ] && { cp -R --preserve=mode,timestamps,links "$v" var/ 2>/dev/null || true; } ;;
  esac
done
mkdir -m 1777 tmp
mkdir -m 0700 root
mkdir home proc dev run .old
# A directory the sandbox's root may not read (its host owner is not mapped) is shown empty and its own, as
# /etc's copy leaves such files out: in AgentBench's image root reads everything, so `find /` says nothing
# and apt can chmod its partial/ directories.
mask() {  # $1 shows $2, an empty directory
  mkdir -p "$2" && chmod "$(stat -c %a "$1")" "$2" && mount --bind "$2" "$1"
}
for d in "$@"; do if [ -d "./$d" ] && [ ! -L "./$d" ]; then mask "./$d" "/tmp/layer/empty/$d"; fi; done
# The users of this /etc/passwd with a home under /home have it, made from /etc/skel, as in an installed
# system (AgentBench's image, ubuntu, has its user's /home/ubuntu).
awk -F: '$6 ~ /^\/home\/[^\/]+$/ {print $3 ":" $4 ":" $6}' etc/passwd | while IFS=: read -r u g h; do
  [ -e ".$h" ] || {
    mkdir -m 0750 ".$h" && cp -R --preserve=mode /etc/skel/. ".$h/" 2>/dev/null
    chown -R "$u:$g" ".$h" 2>/dev/null
  } || true
done
mkdir dev/shm && mount -t tmpfs -o size=64m,mode=1777 shm dev/shm
for n in null zero full random urandom; do touch "dev/$n" && mount --bind "/dev/$n" "dev/$n"; done
ln -s /proc/self/fd dev/fd && ln -s fd/0 dev/stdin && ln -s fd/1 dev/stdout && ln -s fd/2 dev/stderr
pivot_root . .old
cd /
mount -t proc proc /proc
# the same for /proc (tty/driver belongs to the host's root), outside its processes' own directories
find /proc -mindepth 1 -maxdepth 4 \
  \( -path '/proc/[0-9]*' -o -path /proc/sys -o -path /proc/self -o -path /proc/thread-self \) -prune \
  -o -type d ! -perm -005 -print 2>/dev/null | while read -r d; do mask "$d" "/.old/tmp/layer/empty$d"; done
umount -l /.old
rmdir /.old
# A user namespace needs no capability, and in one of its own a process could mount (a tmpfs is memory): none
# may be made under this one. The agent cannot raise it again (no CAP_SYS_RESOURCE, see sandbox_enter.py).
echo 0 > /proc/sys/user/max_user_namespaces
ip link set lo up 2>/dev/null || true
hostname sandbox 2>/dev/null || true
echo ready
exec >/dev/null 2>&1
trap '' TERM INT HUP
# genpi holds the only writer of stdin: EOF means it closed the sandbox or died, and PID 1's exit kills every
# process of the namespace. It keeps Docker's capabilities only, as the sandbox's other processes: with more, the
# kernel would hide its /proc/1 entries (fdinfo, map_files) from them, unlike a container's PID 1.
exec setpriv --bounding-set "$caps" --inh-caps -all bash -c 'while read -r _; do :; done'
"""
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "SHELL": "/bin/bash",
    "TERM": "dumb",
    "LANG": "C.UTF-8",
}
NAMESPACES = ("user", "mnt", "pid", "net", "uts", "ipc")
HOME = "/root"  # where the shell and every script start: AgentBench's containers run as root in WorkingDir /root
NOFILE = 1 << 20  # open files per process, as Docker's (1048576); no more than the host's fs.nr_open
OVERLAID = ("usr", "opt", "srv", "var/cache", "var/lib")
ENTER = Path(__file__).with_name("sandbox_enter.py")
IDS = 65536  # ids mapped into the sandbox: 0-65535, as in a container
ROOT_BASE = 4_200_000_000  # host ids for them when genpi runs as root without an /etc/subuid range (no user has them)
CGROUP_ENV = "GENPI_SANDBOX_CGROUP"  # a delegated cgroup v2 directory with memory, pids and cpu in its subtree_control


@dataclass(frozen=True)
class Limits:
    disk_mb: int = 512  # the tmpfs holding every file written in the sandbox
    file_mb: int = 256  # largest file (RLIMIT_FSIZE)
    memory_mb: int = 2048  # address space per process (RLIMIT_AS)
    processes: int = 256  # processes in the sandbox (RLIMIT_NPROC; and pids.max with a cgroup)
    wall_s: float = 3600.0  # the sandbox is killed this long after it started (the agent's thinking included)
    output_kb: int = (
        1024  # output kept per command (its beginning, what the agent is shown); the rest is drained and dropped
    )
    total_memory_mb: int = 4096  # memory of the whole sandbox, tmpfs included (memory.max; with a cgroup only)
    cpus: float = 1.0  # CPU quota of the whole sandbox (cpu.max; with a cgroup only)


class SandboxError(RuntimeError):
    """The sandbox could not start (no user namespaces, no overlayfs, util-linux missing)."""


class CommandTimeout(Exception):
    def __init__(self, output: str):
        super().__init__("the command did not finish in time")
        self.output = output


def ansi_c_quote(text: str) -> str:
    """`text` as one bash $'...' word (every byte outside [A-Za-z0-9 ] as \\xHH), so no quote or newline
    in an agent's command can end the line that carries it."""
    return (
        "$'"
        + "".join(chr(b) if chr(b).isalnum() and b < 128 or b == 32 else f"\\x{b:02x}" for b in text.encode())
        + "'"
    )


def subordinate_ids(path: str, name: str, uid: int) -> tuple[int, int] | None:
    """The first range of `name`'s (or `uid`'s) subordinate ids in /etc/subuid or /etc/subgid: (start, count)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if (
            len(fields) == 3
            and fields[0] in (name, str(uid))
            and fields[1].isdigit()
            and fields[2].isdigit()
            and int(fields[2]) > 0
        ):
            return int(fields[1]), min(int(fields[2]), IDS)
    return None


def id_maps() -> tuple[str, tuple[int, int], tuple[int, int]] | None:
    """How the sandbox's ids map to the host's: ("root" | "subids", (uid start, count), (gid start, count)), or
    None where only genpi's own id can be mapped (no newuidmap or no subordinate ids)."""
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    users, groups = subordinate_ids("/etc/subuid", name, uid), subordinate_ids("/etc/subgid", name, uid)
    if uid == 0:
        return "root", users or (ROOT_BASE, IDS), groups or (ROOT_BASE, IDS)
    if users and groups and shutil.which("newuidmap") and shutil.which("newgidmap"):
        return "subids", users, groups
    return None


@cache
def unreadable_dirs() -> tuple[str, ...]:
    """The host's directories under the overlays (relative to /) that the sandbox's root cannot list or enter,
    looked up once: every host file belongs to an id the sandbox does not map, so only the permission bits
    for others count. The sandbox shows each as an empty directory of its own."""
    tops = [f"/{d}" for d in OVERLAID if os.path.isdir(f"/{d}") and not os.path.islink(f"/{d}")]
    found = subprocess.run(
        ["find", *tops, "-xdev", "-type", "d", "!", "-perm", "-005", "-prune", "-print0"], capture_output=True
    ).stdout
    return tuple(sorted(d.decode(errors="surrogateescape").lstrip("/") for d in found.split(b"\0") if d))


_warned: set[str] = set()


def warn_once(key: str, text: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(text, RuntimeWarning, stacklevel=3)


def sandbox_cgroup(limits: Limits, name: str) -> Path | None:
    """A fresh cgroup for one sandbox under GENPI_SANDBOX_CGROUP with its memory, process and CPU limits, or None
    (one warning: the sandbox then has its rlimits and tmpfs size only)."""
    parent = os.environ.get(CGROUP_ENV)
    if not parent:
        warn_once(
            "cgroup",
            f"no delegated cgroup v2 ({CGROUP_ENV} unset): each sandbox is bounded by rlimits and its "
            "tmpfs size only, not in total memory, processes across users or CPU",
        )
        return None
    parent = Path(parent)
    try:
        missing = {"memory", "pids", "cpu"} - set((parent / "cgroup.subtree_control").read_text().split())
    except OSError as e:
        raise SandboxError(f"{CGROUP_ENV}={parent}: not a cgroup v2 directory: {e}") from None
    if missing:
        raise SandboxError(
            f"{CGROUP_ENV}={parent}: controllers {', '.join(sorted(missing))} "
            "are not enabled in its cgroup.subtree_control"
        )
    group = parent / name
    group.mkdir()
    (group / "memory.max").write_text(str(limits.total_memory_mb << 20))
    (group / "memory.swap.max").exists() and (group / "memory.swap.max").write_text("0")
    (group / "pids.max").write_text(str(limits.processes))
    (group / "cpu.max").write_text(f"{max(1000, int(limits.cpus * 100_000))} 100000")
    return group


# Every sandbox's holder is started from this one thread: PR_SET_PDEATHSIG fires when the *thread* that
# started a process ends, and this one lives as long as genpi (a worker thread's end must not kill a sandbox).
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genpi-sandbox-spawner")


class Sandbox:
    def __init__(self, limits: Limits = Limits()):
        self.limits = limits
        self.expired = False  # killed by the wall-time limit
        self.discarded = 0  # bytes of the last command's output that were dropped (past limits.output_kb)
        self.stderr = ""  # the last run()'s stderr (its first limits.output_kb KiB)
        self._lock = threading.Lock()
        self._closed = False
        self._shell: subprocess.Popen | None = None
        self._processes: list[subprocess.Popen] = []  # every process started in the sandbox; killed at close
        self._timer = threading.Timer(limits.wall_s, self._expire)
        self._timer.daemon = True
        self._pidfd = None
        self._fds: dict[str, int] = {}
        maps = id_maps()
        self._groups = maps is not None  # setgroups is allowed in the namespace: the entered processes drop theirs
        if maps is None:
            warn_once(
                "ids",
                f"no subordinate ids for uid {os.geteuid()} (needs newuidmap, newgidmap and /etc/subuid, "
                "/etc/subgid): the sandbox's root is this user outside, so it reads every file this user "
                "and its groups can read under /usr, /opt, /srv, /etc and /var, and chown to other users fails",
            )
        self.cgroup = sandbox_cgroup(limits, f"sandbox-{os.getpid()}-{secrets.token_hex(4)}")
        spec = {"create": maps[0] if maps else "self"}
        caps = ",".join(["-all", *(f"+{name}" for name in KEEP)])
        argv = [
            sys.executable,
            "-I",
            "-S",
            str(ENTER),
            json.dumps(spec),
            "--",
            "bash",
            "-c",
            SETUP,
            "genpi-sandbox",
            f"{limits.disk_mb}m",
            caps,
            *unreadable_dirs(),
        ]
        life, self._life = os.pipe()  # PID 1 reads `life` until EOF; only genpi holds self._life
        try:
            self._holder = _spawner.submit(
                subprocess.Popen, argv, stdin=life, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env=ENV
            ).result()
        except OSError as e:
            os.close(self._life)
            raise SandboxError(f"the sandbox did not start: {e}") from None
        finally:
            os.close(life)
        try:
            self._start(maps)
        except BaseException:
            self.close()
            raise
        self._timer.start()

    def _start(self, maps) -> None:
        def failed(what: str) -> SandboxError:
            self._holder.kill()
            error = self._holder.stderr.read().decode(errors="replace").strip()
            return SandboxError(
                f"the sandbox did not start "
                f"({what}; needs unprivileged user namespaces, overlayfs and util-linux): {error}"
            )

        if self._holder.stdout.readline() != b"started\n":
            raise failed("no namespaces")
        if self.cgroup:  # PID 1 is forked after "go": it and everything it starts are counted there
            (self.cgroup / "cgroup.procs").write_text(str(self._holder.pid))
        if maps:
            kind, (uid, uids), (gid, gids) = maps
            try:
                if kind == "root":
                    Path(f"/proc/{self._holder.pid}/uid_map").write_text(f"0 {uid} {uids}\n")
                    Path(f"/proc/{self._holder.pid}/gid_map").write_text(f"0 {gid} {gids}\n")
                else:
                    subprocess.run(
                        ["newuidmap", str(self._holder.pid), "0", str(uid), str(uids)], check=True, capture_output=True
                    )
                    subprocess.run(
                        ["newgidmap", str(self._holder.pid), "0", str(gid), str(gids)], check=True, capture_output=True
                    )
            except (OSError, subprocess.CalledProcessError) as e:
                raise failed(
                    f"mapping ids failed: {getattr(e, 'stderr', b'').decode(errors='replace').strip() or e}"
                ) from None
        os.write(self._life, b"go\n")
        if self._holder.stdout.readline() != b"ready\n":
            raise failed("its setup failed")
        self._holder.stdout.close()
        self._holder.stderr.close()
        self.pid1 = int(open(f"/proc/{self._holder.pid}/task/{self._holder.pid}/children").read().split()[0])
        self._pidfd = os.pidfd_open(self.pid1)  # signals reach this process even if its number is reused later
        # Processes enter through these descriptors, never through the number pid1: were PID 1 gone and its
        # number reused by a host process, entering it would enter the host. Entering a PID namespace whose init
        # is gone fails instead.
        self._fds = {ns: os.open(f"/proc/{self.pid1}/ns/{ns}", os.O_RDONLY) for ns in NAMESPACES}
        if select.select([self._pidfd], [], [], 0)[0]:
            raise SandboxError("the sandbox's first process exited while it started")

    def _popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """`argv` inside the sandbox, as its root, under the limits, in a process group of its own."""
        if self._closed or self.expired:
            raise SandboxError("the sandbox is closed" if self._closed else "the sandbox ran out of time")
        mb = 1 << 20
        rlimits = {
            "RLIMIT_NPROC": self.limits.processes,
            "RLIMIT_FSIZE": self.limits.file_mb * mb,
            "RLIMIT_AS": self.limits.memory_mb * mb,
            "RLIMIT_CORE": 0,
        }
        spec = {
            "ns": self._fds,
            "rlimits": rlimits,
            "nofile": NOFILE,
            "cwd": HOME,
            "cgroup": str(self.cgroup) if self.cgroup else None,
            "groups": self._groups,
        }
        command = [sys.executable, "-I", "-S", str(ENTER), json.dumps(spec), "--", *argv]
        proc = subprocess.Popen(
            command, cwd="/", env=ENV, pass_fds=list(self._fds.values()), start_new_session=True, **kwargs
        )
        self._processes.append(proc)
        return proc

    def _kill_group(self, proc: subprocess.Popen) -> None:
        """The command and everything it started (that stayed in its process group) dies now."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def _read(
        self, proc: subprocess.Popen, deadline: float, end: bytes | None = None, until_exit: bool = False
    ) -> tuple[bytes, bytes, str]:
        """Read `proc`'s stdout (and its stderr, where that is a pipe too) until stdout ends with `end` ("end"),
        its EOF ("eof"), or with `until_exit` the process's exit ("exit": what is in the pipes then is read,
        but nothing waits for processes it left running that still hold them), or the deadline ("timeout"):
        the first limits.output_kb KiB of each, stdout without `end`, and how it stopped. The rest is read and
        dropped (a command's output never grows genpi's memory); self.discarded counts stdout's bytes dropped."""
        cap, out_fd = self.limits.output_kb << 10, proc.stdout.fileno()
        kept = {f.fileno(): [] for f in (proc.stdout, proc.stderr) if f is not None}
        size, total = dict.fromkeys(kept, 0), dict.fromkeys(kept, 0)
        open_fds, tail, ended = list(kept), b"", "timeout"
        exited = os.pidfd_open(proc.pid) if until_exit else None
        drain = 16  # reads after the exit: what was in the pipes then, not a background writer's endless stream
        try:
            while ended in ("timeout", "exit") and drain and (open_fds or ended == "timeout" and exited is not None):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if ended == "exit":
                    ready = select.select(open_fds, [], [], 0)[0]
                    if not ready:
                        break
                    drain -= 1
                else:
                    ready = select.select([*open_fds, *([exited] if exited is not None else [])], [], [], left)[0]
                    if exited in ready:
                        ended = "exit"
                        continue
                for fd in ready:
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        open_fds.remove(fd)
                        ended = "eof" if fd == out_fd and exited is None else ended
                        continue
                    total[fd] += len(chunk)
                    if size[fd] < cap:
                        kept[fd].append(chunk[: cap - size[fd]])
                        size[fd] += len(kept[fd][-1])
                    if fd == out_fd and end is not None:
                        tail = (tail + chunk)[-len(end) :]
                        if tail == end:
                            total[fd] -= len(end)
                            ended = "end"
        finally:
            if exited is not None:
                os.close(exited)
        head = b"".join(kept[out_fd])[: total[out_fd]]
        self.discarded = total[out_fd] - len(head)
        err = b"".join(b"".join(chunks) for fd, chunks in kept.items() if fd != out_fd)
        return head, err, ended

    def run(self, script: str, args: list[str] = (), language: str = "bash", timeout: float = 30) -> tuple[int, str]:
        """Run a script on its own (not in the shell), as AgentBench's `execute_independent`, in the same working
        directory (/root) and environment as the shell: (exit status, its stdout), as AgentBench's checks get
        it; its stderr goes to self.stderr. It has ended when the script's own process exits: processes it
        started in the background run on and may keep its output open (an init script's `sleep 60 &`).
        Status 124 when it ran out of time (its whole process group is killed then)."""
        argv = ["bash", "-c", script, "--", *args] if language == "bash" else ["python3", "-c", script, *args]
        proc = self._popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err, ended = self._read(proc, time.monotonic() + timeout, until_exit=True)
        self.stderr = err.decode(errors="replace")
        proc.stdout.close()
        proc.stderr.close()
        if ended == "timeout":
            self._kill_group(proc)
            return 124, ""
        return proc.wait(), out.decode(errors="replace")

    def start(self, script: str, language: str = "bash") -> None:
        """Start a script in the background (a task's `start`), its output discarded."""
        argv = ["bash", "-c", script] if language == "bash" else ["python3", "-c", script]
        self._popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def execute(self, command: str, timeout: float = 30) -> str:
        """Run a command in the sandbox's one `bash --login`, whose state (directory, variables) persists
        between commands: its stdout and stderr. Stdin is /dev/null, so nothing waits for input. The shell
        starts in /root, as AgentBench's (and its checks) do. Raises CommandTimeout, after killing the shell's
        whole process group. A shell that a command ended (`exit`) or that timed out is replaced by a fresh
        one at the next command."""
        if self._shell is None or self._shell.poll() is not None:
            self._shell = self._popen(
                ["bash", "--login"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        marker = secrets.token_hex(8)
        line = f"eval {ansi_c_quote(command)} </dev/null 2>&1; printf '\\n%s\\n' {marker}\n"
        shell = self._shell
        try:
            shell.stdin.write(line.encode())
            shell.stdin.flush()
        except BrokenPipeError:
            self._shell = None
            return ""
        out, _, ended = self._read(shell, time.monotonic() + timeout, end=f"\n{marker}\n".encode())
        if ended == "timeout":
            self._kill_group(shell)  # nothing of it may run on into the next command
            self._shell = None
            raise CommandTimeout(out.decode(errors="replace"))
        if (
            ended == "eof"
        ):  # the shell is gone (exit, kill, or the sandbox was killed): the next command gets a fresh one
            self._shell = None
        return out.decode(errors="replace")

    def _expire(self) -> None:
        """The wall-time limit: kill everything now; the owner's close() cleans up."""
        self.expired = True
        self._kill()

    def _kill(self) -> None:
        with self._lock:
            if self._pidfd is not None:
                try:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def close(self) -> None:
        """Kill every process in the sandbox (PID 1 first: the kernel then kills the rest of its PID
        namespace) and wait for them; the tmpfs goes with the last of them."""
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        os.close(self._life)  # EOF for PID 1, which then exits
        self._kill()
        if self._pidfd is not None:
            select.select(
                [self._pidfd], [], [], 30
            )  # readable once PID 1 is gone, and with it every process of its namespace
        with self._lock:
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        for fd in self._fds.values():
            os.close(fd)  # the last hold on the namespaces: the tmpfs is freed
        self._holder.kill()
        for proc in [self._holder, *self._processes]:
            if proc is not self._holder:
                self._kill_group(proc)
            proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()
        if self.cgroup:
            try:
                self.cgroup.rmdir()
            except OSError:
                pass

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
