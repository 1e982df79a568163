"""A throwaway Linux system for an agent's shell commands, without root and without Docker.

`Sandbox()` starts `unshare --user --map-root-user --mount --pid --net --uts --ipc --fork`; its first
process (PID 1 of the new PID namespace) builds a new root file system on a tmpfs and `pivot_root`s into
it, so nothing of the host is reachable except what it mounts:

    /usr /opt /srv /var/cache /var/lib   overlays: the host's directory read-only underneath, writes
                                         go to an upper layer on the tmpfs
    /etc /var (rest)                     copies on the tmpfs (files the host user cannot read are left out)
    /tmp /home /root /run /dev/shm       empty
    /dev                                 null zero full random urandom (bound from the host)
    /proc                                a new proc for the new PID namespace
    (everything else: /work, /mnt, the host's homes, /sys)  absent

Commands run as root *inside* the user namespace, which is an unprivileged user outside: the invoking
user, or `nobody` (65534) when genpi itself runs as root, so that the sandbox's root is never the host's
(a host-root-mapped namespace root could still write host-root-owned inodes it can reach, like /dev/null,
and is exempt from the process limit). Processes enter through `nsenter` with a process limit
(RLIMIT_NPROC, counted per user namespace), a file-size limit (RLIMIT_FSIZE) and a per-process memory
limit (RLIMIT_AS); the tmpfs's size caps all the files written; a timer kills the whole namespace after
the wall-time limit. Killing PID 1 kills every process in its namespace, and the tmpfs (the writable
layer) vanishes with the mount namespace. README.md lists what this does and does not isolate.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

# Run by PID 1 of the sandbox ($1: the tmpfs size). Until pivot_root it sees the host, so it only writes
# inside the tmpfs it mounts first (over /tmp, in its own mount namespace; `set -e` stops it if that fails).
SETUP = r"""
set -eu
mount -t tmpfs -o size="$1",mode=0755 genpi-sandbox /tmp
mkdir /tmp/root /tmp/layer
mount --bind /tmp/root /tmp/root
cd /tmp/root
overlay() {
  mkdir -p "$1" "/tmp/layer/$1.up" "/tmp/layer/$1.work"
  mount -t overlay overlay -o "lowerdir=/$1,upperdir=/tmp/layer/$1.up,workdir=/tmp/layer/$1.work" "$1"
}
for d in usr opt srv; do if [ -d "/$d" ] && [ ! -L "/$d" ]; then overlay "$d"; fi; done
for l in bin sbin lib lib32 lib64 libx32; do if [ -L "/$l" ]; then ln -s "$(readlink "/$l")" "$l"; fi; done
mkdir etc var
cp -R --preserve=mode,timestamps,links /etc/. etc/ 2>/dev/null || true
for v in /var/* /var/.[!.]*; do
  case "$v" in /var/cache|/var/lib) [ -d "$v" ] && overlay "${v#/}" ;; *) [ -e "$v" ] && { cp -R --preserve=mode,timestamps,links "$v" var/ 2>/dev/null || true; } ;; esac
done
mkdir -m 1777 tmp
mkdir -m 0700 root
mkdir home proc dev run .old
mkdir dev/shm && mount -t tmpfs -o size=64m,mode=1777 shm dev/shm
for n in null zero full random urandom; do touch "dev/$n" && mount --bind "/dev/$n" "dev/$n"; done
ln -s /proc/self/fd dev/fd && ln -s fd/0 dev/stdin && ln -s fd/1 dev/stdout && ln -s fd/2 dev/stderr
pivot_root . .old
cd /
mount -t proc proc /proc
umount -l /.old
rmdir /.old
ip link set lo up 2>/dev/null || true
hostname sandbox 2>/dev/null || true
echo ready
exec >/dev/null 2>&1 </dev/null
trap '' TERM INT HUP
while :; do sleep 3600 & wait; done
"""
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/bash", "TERM": "dumb", "LANG": "C.UTF-8",
}  # fmt: skip
NOBODY = 65534
NAMESPACES = {"user": "--user", "mnt": "--mount", "pid": "--pid", "net": "--net", "uts": "--uts", "ipc": "--ipc"}


@dataclass(frozen=True)
class Limits:
    disk_mb: int = 512  # the tmpfs holding every file written in the sandbox
    file_mb: int = 256  # largest file (RLIMIT_FSIZE)
    memory_mb: int = 2048  # address space per process (RLIMIT_AS)
    processes: int = 256  # processes in the sandbox (RLIMIT_NPROC)
    wall_s: float = 3600.0  # the sandbox is killed this long after it started (the agent's thinking included)


class SandboxError(RuntimeError):
    """The sandbox could not start (no user namespaces, no overlayfs, util-linux missing)."""


class CommandTimeout(Exception):
    def __init__(self, output: str):
        super().__init__("the command did not finish in time")
        self.output = output


def ansi_c_quote(text: str) -> str:
    """`text` as one bash $'...' word (every byte outside [A-Za-z0-9 ] as \\xHH), so no quote or newline
    in an agent's command can end the line that carries it."""
    return "$'" + "".join(chr(b) if chr(b).isalnum() and b < 128 or b == 32 else f"\\x{b:02x}" for b in text.encode()) + "'"


class Sandbox:
    def __init__(self, limits: Limits = Limits()):
        self.limits = limits
        self.expired = False  # killed by the wall-time limit
        self._creds = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}
        self._lock = threading.Lock()
        self._closed = False
        self._shell: subprocess.Popen | None = None
        self._background: list[subprocess.Popen] = []
        self._timer = threading.Timer(limits.wall_s, self._expire)
        self._timer.daemon = True
        try:
            self._holder = subprocess.Popen(
                ["unshare", *NAMESPACES.values(), "--map-root-user", "--fork", "--kill-child", "bash", "-c", SETUP, "genpi-sandbox", f"{limits.disk_mb}m"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env=ENV, **self._creds,
            )  # fmt: skip
        except OSError as e:
            raise SandboxError(f"the sandbox did not start (needs util-linux's unshare, nsenter and prlimit): {e}") from None
        if self._holder.stdout.readline() != b"ready\n":
            self._holder.kill()
            error = self._holder.stderr.read().decode(errors="replace").strip()
            self._holder.wait()
            raise SandboxError(f"the sandbox did not start (needs unprivileged user namespaces, overlayfs and util-linux): {error}")
        self._holder.stdout.close()
        self._holder.stderr.close()
        children = open(f"/proc/{self._holder.pid}/task/{self._holder.pid}/children").read().split()
        self.pid1 = int(children[0])
        self._pidfd = os.pidfd_open(self.pid1)  # signals reach this process even if its number is reused later
        # Processes enter through these descriptors, never through the number pid1: were PID 1 gone and its
        # number reused by a host process, `nsenter --target` would enter the host. Entering a PID namespace
        # whose init is gone fails instead.
        self._fds = {ns: os.open(f"/proc/{self.pid1}/ns/{ns}", os.O_RDONLY) for ns in NAMESPACES}
        self._fds["root"] = os.open(f"/proc/{self.pid1}/root", os.O_RDONLY | os.O_DIRECTORY)
        if select.select([self._pidfd], [], [], 0)[0]:
            self.close()
            raise SandboxError("the sandbox's first process exited while it started")
        self._timer.start()

    def _enter(self, argv: list[str]) -> list[str]:
        """A command line that runs `argv` inside the sandbox, as its root, under the limits."""
        mb = 1 << 20
        limits = [f"--nproc={self.limits.processes}", f"--fsize={self.limits.file_mb * mb}", f"--as={self.limits.memory_mb * mb}", "--core=0"]
        fd = {name: f"/proc/self/fd/{n}" for name, n in self._fds.items()}
        enter = [f"{flag}={fd[ns]}" for ns, flag in NAMESPACES.items()] + [f"--root={fd['root']}", f"--wd={fd['root']}"]
        return ["prlimit", *limits, "nsenter", *enter, "--preserve-credentials", *argv]

    def _popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        if self._closed or self.expired:
            raise SandboxError("the sandbox is closed" if self._closed else "the sandbox ran out of time")
        return subprocess.Popen(self._enter(argv), cwd="/", env=ENV, pass_fds=list(self._fds.values()), **self._creds, **kwargs)

    def run(self, script: str, args: list[str] = (), language: str = "bash", timeout: float = 30) -> tuple[int, str]:
        """Run a script on its own (not in the shell), as AgentBench's `execute_independent`:
        (exit status, stdout and stderr); status 124 when it ran out of time."""
        argv = ["bash", "-c", script, "--", *args] if language == "bash" else ["python3", "-c", script, *args]
        proc = self._popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=timeout)
            return proc.returncode, out.decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()  # nsenter; the script itself dies with the sandbox (its output with it)
            proc.wait()
            proc.stdout.close()
            return 124, ""

    def start(self, script: str, language: str = "bash") -> None:
        """Start a script in the background (a task's `start`), its output discarded."""
        argv = ["bash", "-c", script] if language == "bash" else ["python3", "-c", script]
        self._background.append(self._popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def execute(self, command: str, timeout: float = 30) -> str:
        """Run a command in the sandbox's one `bash --login`, whose state (directory, variables) persists
        between commands: its stdout and stderr. Stdin is /dev/null, so nothing waits for input. Raises
        CommandTimeout. A shell that a command ended (`exit`) or that timed out is replaced by a fresh one
        at the next command."""
        if self._shell is None or self._shell.poll() is not None:
            self._shell = self._popen(["bash", "--login"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self._send("cd ~", timeout)
            if self._shell is None:
                raise SandboxError("the sandbox's shell did not start")
        return self._send(command, timeout)

    def _send(self, command: str, timeout: float) -> str:
        marker = secrets.token_hex(8).encode()
        line = f"eval {ansi_c_quote(command)} </dev/null 2>&1; printf '\\n%s\\n' {marker.decode()}\n"
        try:
            self._shell.stdin.write(line.encode())
            self._shell.stdin.flush()
        except BrokenPipeError:
            self._background.append(self._shell)
            self._shell = None
            return ""
        out, fd, deadline = b"", self._shell.stdout.fileno(), time.monotonic() + timeout
        while not out.endswith(b"\n" + marker + b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:  # the shell is still busy: the next command gets a fresh one
                self._shell.kill()
                self._background.append(self._shell)  # closed with the sandbox
                self._shell = None
                raise CommandTimeout(out.decode(errors="replace"))
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # the shell is gone (exit, kill, or the sandbox was killed): the next command gets a fresh one
                self._background.append(self._shell)
                self._shell = None
                return out.decode(errors="replace")
            out += chunk
        return out[: -len(marker) - 2].decode(errors="replace")

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
        self._kill()
        select.select([self._pidfd], [], [], 30)  # readable once PID 1 is gone, and with it every process of its namespace
        with self._lock:
            os.close(self._pidfd)
            self._pidfd = None
        for fd in self._fds.values():
            os.close(fd)  # the last hold on the namespaces: the tmpfs is freed
        for proc in [self._holder, *([self._shell] if self._shell else []), *self._background]:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
