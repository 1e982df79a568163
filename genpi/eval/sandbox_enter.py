"""Make a sandbox's namespaces, or enter them, and run a command there: `python -I -S sandbox_enter.py SPEC -- ARGV...`.

SPEC {"create": ..., ...}: this process becomes the sandbox's holder (what `unshare --fork --kill-child` would
be, but the ids are mapped before anything is exec'd: a program exec'd by an unmapped id loses every capability,
and `unshare` maps a range only through newuidmap). It makes the namespaces, says "started", waits for "go" on
stdin (genpi has written the id maps meanwhile, or it maps its own id itself where SPEC says "self"), becomes the
sandbox's root and forks PID 1, which execs ARGV (the setup script). Both die with genpi (PR_SET_PDEATHSIG).

Otherwise:

Run by `genpi.eval.sandbox` for every process it starts inside a sandbox (the agent's shell, init, start and
check scripts), instead of `nsenter`: joining the namespaces gives a process every capability in the sandbox's
user namespace, and nsenter would exec the next program with them, a program the sandbox itself could have
replaced (its /etc/ld.so.preload, its /lib64, its PATH). Here everything happens in this one already-loaded
process, and only then is the command exec'd: the namespaces are joined, groups cleared, the ids set to the
sandbox's root, the capabilities cut to Docker's default set (no CAP_SYS_ADMIN: no mount, no new namespaces
but user namespaces, which the sandbox's PID 1 limited to 0), no_new_privs set, the rlimits applied.

Only the standard library, and every import before the first setns (afterwards the file system is the
sandbox's). SPEC is JSON: {"ns": {name: fd}, "rlimits": {name: n}, "cgroup": path or null, "groups": bool}.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import warnings  # noqa: F401 (os.execvp imports it; by then this process may no longer reach the standard library)

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 1, 38, 24, 47, 4
CLONE = {"mnt": 0x20000, "uts": 0x4000000, "ipc": 0x8000000, "user": 0x10000000, "pid": 0x20000000, "net": 0x40000000}
# Docker's default capabilities (what AgentBench's containers give their root); numbers from linux/capability.h
KEEP = {
    "chown": 0,
    "dac_override": 1,
    "fowner": 3,
    "fsetid": 4,
    "kill": 5,
    "setgid": 6,
    "setuid": 7,
    "setpcap": 8,
    "net_bind_service": 10,
    "net_raw": 13,
    "sys_chroot": 18,
    "mknod": 27,
    "audit_write": 29,
    "setfcap": 31,
}
# The user namespace first: it gives the capabilities the others need.
ORDER = ("user", "mnt", "pid", "net", "uts", "ipc")


def main() -> None:
    # Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec: `yes | head` would
    # print "Broken pipe" and a file past RLIMIT_FSIZE would not kill its writer, unlike in any shell
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    spec = json.loads(sys.argv[1])
    argv = sys.argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())

    def check(result: int, what: str) -> None:
        if result != 0:
            raise OSError(ctypes.get_errno(), f"sandbox entry: {what}: {os.strerror(ctypes.get_errno())}")

    if "create" in spec:
        create(spec, argv, libc, check)
    nofile(spec["nofile"])
    if spec["cgroup"]:  # before anything else, so that every process of the command is counted in it
        with open(os.path.join(spec["cgroup"], "cgroup.procs"), "w") as f:
            f.write("0")
    for name in ORDER:
        check(libc.setns(spec["ns"][name], 0), f"setns {name}")
        os.close(spec["ns"][name])
    pid = os.fork()  # joining a PID namespace takes effect for children only
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    os.chdir(spec["cwd"])
    if spec["groups"]:  # no supplementary groups (refused where the namespace's setgroups is "deny")
        os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    for cap in range(last_cap + 1):
        if cap not in KEEP.values():
            check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    for name, n in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (n, n))
    try:
        os.execvp(argv[0], argv)  # uid 0 again: the new program's capabilities are the bounding set's
    except OSError as e:
        print(f"{argv[0]}: {e.strerror}", file=sys.stderr)
        os._exit(127)


def nofile(n: int) -> None:
    """Open files up to `n` (Docker's containers get 1048576; AgentBench's tasks use descriptors like 123321). Only
    here, outside the sandbox's user namespace, can a root genpi raise the hard limit too (that needs
    CAP_SYS_RESOURCE in the host's); otherwise the soft limit goes as far as the hard one allows."""
    n = min(n, int(open("/proc/sys/fs/nr_open").read()))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard) if hard != resource.RLIM_INFINITY else hard))
    except (ValueError, OSError):
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (n if hard == resource.RLIM_INFINITY else max(soft, min(n, hard)), hard)
        )


def create(spec: dict, argv: list[str], libc, check) -> None:
    check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "PR_SET_PDEATHSIG")  # SIGKILL when genpi (its spawner thread) ends
    uid, gid = os.geteuid(), os.getegid()
    check(libc.unshare(sum(CLONE.values())), "unshare")
    if spec["create"] == "self":  # only this user's own id: setgroups must be denied first
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    print("started", flush=True)
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            os._exit(1)
        line += chunk
    if line != b"go\n":
        os._exit(1)
    if spec["create"] != "self":
        os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    pid = os.fork()
    if pid == 0:  # PID 1
        check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "PR_SET_PDEATHSIG")  # SIGKILL when the holder ends
        os.execvp(argv[0], argv)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
