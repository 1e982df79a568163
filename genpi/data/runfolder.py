"""Run folders: the lock that keeps two runs out of one folder, the refusal of object-store paths, records
written whole.

    check_out(OUT)                  OUT as a local path; InputError for s3://, gs://, ... (before anything is written)
    acquire_lock(PATH, WHAT)        take the lock file PATH for a run of kind WHAT, or InputError naming its holder
    release_lock(PATH)              drop it (only this process's own lock)
    holding_lock(PATH, WHAT)        both, as a context manager (making the folder, and removing it if left empty)
    write_json(PATH, DATA)          through a unique temporary file in the same folder and os.replace

A lock file holds its holder's host name, pid, start time, boot id, PID namespace and process start time
(clock ticks since boot). It appears whole: written under a private name and hard-linked into place, which
fails when a lock exists. A lock is taken over only when this process can tell that its holder is gone:
the same host, boot and PID namespace, and the pid not running (or running a process that started at
another time: a reused pid). A holder on another host, in another boot or PID namespace (a container on
the same machine), or written by a genpi that recorded none of these counts as live: its lock stays until
it ends or someone removes the file. A lock file that cannot be read counts as live for FRESH_S seconds
after its last change (a writer that does not link may be writing it), then as left by a killed run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

from genpi import InputError

URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")  # s3://, gs://, ... (also as pathlib collapses them: s3:/)
FRESH_S = 10.0  # an unreadable lock file younger than this may still be being written


def check_out(out: str | Path, flag: str = "--out") -> Path:
    """OUT as a local path; refuses object-store URIs, warns about a relative OUT in a submitted Ray job."""
    if URI.match(str(out)):
        raise InputError(
            f"{flag} {out}: object-store URIs are not supported; give a path on a filesystem the driver can write "
            "(on a cluster, a shared filesystem mounted at the same path on the head node)"
        )
    out = Path(out)
    # Ray sets this variable for the driver of a `ray job submit` job, whose working dir is deleted after the job.
    if not out.is_absolute() and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        print(
            f"genpi: warning: {flag} {out} is relative and this runs as a Ray job: it lands in the job's working "
            "directory, which Ray deletes when the job ends; give an absolute path on a shared filesystem",
            file=sys.stderr,
        )
    return out


def write_json(path: str | Path, data) -> None:
    """PATH replaced whole: a kill never leaves half a file, and two writers never share a temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # as a plain open would leave it (mkstemp makes it private)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None if unknown."""
    stat = _read(f"/proc/{pid}/stat")
    try:
        return int(stat.rpartition(")")[2].split()[19])  # after the command name, which may hold spaces and ')'
    except (AttributeError, IndexError, ValueError):
        return None


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "boot_id": _read("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
        "start_ticks": _start_ticks(os.getpid()),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def holder_gone(holder: dict, me: dict) -> bool:
    """Whether the lock's holder has certainly exited; whatever this process cannot verify counts as alive."""
    same = all(key in holder and holder[key] == me[key] for key in ("host", "boot_id", "pid_ns"))
    pid = holder.get("pid")
    if not same or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if not _pid_alive(pid):
        return True
    ticks = holder.get("start_ticks")
    now = _start_ticks(pid)
    return ticks is not None and now is not None and ticks != now  # the pid now names another process


def _create(path: Path, me: dict) -> bool:
    """Create the lock whole (a private file hard-linked into place); False if a lock exists."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # readable by other users' runs, which must see who holds it
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: create exclusively, then write
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _holder(path: Path) -> tuple[str, dict | None] | None:
    """(the lock's text, its holder or None if unreadable), or None when there is no lock."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except PermissionError:  # another user's lock that this user may not read: held, as far as anyone here can tell
        return "", {"host": "unknown (the lock file is not readable)"}
    except (OSError, UnicodeDecodeError):
        return "", None
    try:
        holder = json.loads(text)
    except ValueError:
        return text, None
    return text, holder if isinstance(holder, dict) else None


@contextlib.contextmanager
def _guard(folder: Path):
    """An exclusive flock on the folder while a stale lock is replaced, so that two runs taking it over at
    once cannot remove each other's fresh lock (best effort where the filesystem has no flock)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def acquire_lock(path: str | Path, what: str) -> Path:
    """Take the lock file PATH (its folder must exist) for a run of kind `what` ("synthesis run"); a lock
    whose holder is certainly gone is taken over. InputError naming the holder while it is held."""
    path = Path(path)
    me = _me()
    for _ in range(5):
        if _create(path, me):
            return path
        found = _holder(path)
        if found is None:  # released meanwhile
            continue
        text, holder = found
        if holder is None:
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age < FRESH_S:
                raise InputError(
                    f"{path.parent} is being locked by another {what} (its lock file {path} is being "
                    "written); wait for it, or remove the file if no run is starting"
                )
        elif not holder_gone(holder, me):
            where = (
                ""
                if holder.get("host") != me["host"] or holder.get("pid_ns") == me["pid_ns"]
                else ", in another PID namespace"
            )
            raise InputError(
                f"{path.parent} is in use by another {what} "
                f"(host {holder.get('host')}, pid {holder.get('pid')}{where}, "
                f"started {holder.get('started')}); wait for it to finish, or remove {path} if that run is gone"
            )
        with _guard(path.parent):
            again = _holder(path)
            if again is not None and again[0] == text:  # still the stale lock judged above, not a fresh one
                path.unlink(missing_ok=True)
    raise InputError(f"{path}: could not take the run lock")


def release_lock(path: str | Path) -> None:
    path = Path(path)
    found = _holder(path)
    if found and found[1] and found[1].get("pid") == os.getpid() and found[1].get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def holding_lock(path: str | Path, what: str):
    """The lock file PATH held for the block, its folder made if need be; a folder made here that is empty
    at the end (a run refused before it wrote anything) is removed again."""
    folder = Path(path).parent
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        lock = acquire_lock(path, what)
        try:
            yield lock
        finally:
            release_lock(lock)
    finally:
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
