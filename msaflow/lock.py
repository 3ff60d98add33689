"""One writer per output folder: a lock file naming its holder.

`output_lock(folder, command)` holds `folder/.msaflow.lock` (or `.msaflow-<name>.lock`) for
the duration of a block. The file records the holder (pid, host, start time, command) and
is locked with `flock` while the holder runs, so the kernel releases it when the holder
dies, however it dies. A second process refuses at once with a `LockError` naming the
holder. A lock file left behind by a process of this host that is no longer running
(killed, power loss) is stale: it is taken over with a note on stderr. A lock file of
another host cannot be checked from here: the message says how to clear it by hand.

On a file system without working `flock` (some network mounts) the pid check alone decides.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the pid check alone
    fcntl = None


class LockError(RuntimeError):
    """The output folder is in use by another process (a one-line message naming it)."""


class Stopped(BaseException):
    """A run stopped by a signal (SIGTERM, SIGINT) after cleaning up; `signum` says which.

    A BaseException, so that no `except Exception` on the way records it as a clip's fault.
    `msaflow` exits with 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def host_name() -> str:
    """This host's short name, as lock files and temp names record it."""
    name = socket.gethostname().split(".")[0]
    return "".join(c for c in name if c.isalnum() or c == "-")[:32] or "localhost"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True
    return True


def lock_path(folder: Path, name: str | None = None) -> Path:
    return Path(folder) / (f".msaflow-{name}.lock" if name else ".msaflow.lock")


def read_holder(path: Path) -> dict | None:
    """The holder recorded in a lock file; None when there is none (or it cannot be parsed)."""
    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "a process that left no record"
    return (f"`{holder.get('command', '?')}` (pid {holder['pid']} on host {holder.get('host', '?')}, "
            f"since {holder.get('started', '?')})")


def _flock(fd: int, shared: bool = False) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            return None
        raise


def held_by(path: Path) -> dict | None:
    """The holder of a lock file when a running process holds it, else None (free or stale)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        locked = _flock(fd, shared=True)
        holder = read_holder(path)
        if locked is False:
            return holder or {"pid": -1}
        if holder is None:
            return None
        if holder.get("host") != host_name():
            return holder  # cannot be checked from here
        if locked is None and pid_alive(holder["pid"]) and holder["pid"] != os.getpid():
            return holder
        return None
    finally:
        os.close(fd)  # releases the probe's shared lock


def _clear_hint(path: Path, holder: dict | None) -> str:
    if holder and holder.get("host") not in (None, host_name()):
        return (f"wait for it to finish; if no such process runs on host {holder.get('host')}, "
                f"delete {path}")
    return f"wait for it to finish (if that process is gone, delete {path})"


@contextmanager
def output_lock(folder: str | os.PathLike, command: str, name: str | None = None) -> Iterator[Path]:
    """Hold the lock of `folder` (created if needed) for the block; yield the lock file's path.

    `command` says who holds it (shown to a process that finds the folder in use); `name`
    gives a lock of its own (e.g. one per extraction chunk), default: one for the folder.
    Raises LockError when a running process holds it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = lock_path(folder, name)
    me = {"pid": os.getpid(), "host": host_name(), "command": command,
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    fd = _acquire(path, me)
    try:
        yield path
    finally:
        try:
            if read_holder(path) == me:
                path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(fd)


def _acquire(path: Path, me: dict) -> int:
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _flock(fd)
            if locked is False:
                holder = _wait_for_record(path)
                raise LockError(f"{path.parent} is in use by {describe_holder(holder)}: "
                                f"{_clear_hint(path, holder)}")
            try:  # the file we locked may have been removed by its previous holder meanwhile
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = read_holder(path)
            if previous is not None and previous != me:
                if previous.get("host") != me["host"]:
                    raise LockError(f"{path.parent} is in use by {describe_holder(previous)} "
                                    f"(cannot be checked from host {me['host']}): {_clear_hint(path, previous)}")
                if locked is None and pid_alive(previous["pid"]):
                    raise LockError(f"{path.parent} is in use by {describe_holder(previous)}: "
                                    f"{_clear_hint(path, previous)}")
                logging.getLogger("msaflow.lock").warning(
                    f"msaflow: note: took over the stale lock {path} of {describe_holder(previous)}: "
                    f"that process is no longer running")
            data = (json.dumps(me, sort_keys=True) + "\n").encode("utf-8")
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            return fd
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
    raise LockError(f"{path}: could not take the lock (the file keeps being replaced)")


def _wait_for_record(path: Path) -> dict | None:
    """The holder's record; a holder that has just taken the lock may not have written it yet."""
    for _ in range(10):
        if (holder := read_holder(path)) is not None:
            return holder
        time.sleep(0.05)
    return None
