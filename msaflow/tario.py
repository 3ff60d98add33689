"""Deterministic, atomic tar files of `.json` / `.npy` members (WebDataset samples).

Everything the pipeline writes to disk goes through here, so that a resumed run yields
byte-identical files: members are sorted, mtime/uid/gid are zero, and a file only
appears under its final name once it is complete.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

Member = dict | np.ndarray | bytes
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the process's umask, restored at once


def encode_member(name: str, value: Member) -> bytes:
    """Bytes of one member: `.json` as sorted UTF-8 JSON, `.npy` in NumPy's format (no pickle)."""
    if isinstance(value, bytes):
        return value
    if name.endswith(".json") or name == "json":
        return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")
    if name.endswith(".npy"):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
        return buf.getvalue()
    raise ValueError(f"member {name!r}: only .json and .npy members are allowed")


def decode_member(name: str, data: bytes) -> Member:
    if name.endswith(".json") or name == "json":
        return json.loads(data.decode("utf-8"))
    if name.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    raise ValueError(f"member {name!r}: only .json and .npy members are allowed")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# temp files are named `.<final name>.<pid>@<host>.<random>.tmp`, so that a later run can tell
# the leftovers of a dead process (killed during a write) from a running process's files
_TEMP_RE = re.compile(r"^\.(?P<name>.*)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[A-Za-z0-9_]+\.tmp$")


def temp_owner(name: str) -> tuple[int, str] | None:
    """(pid, host) of the process that made a temp file of `atomic_path`; None for other names."""
    m = _TEMP_RE.match(name)
    return (int(m["pid"]), m["host"]) if m else None


def remove_stale_temp(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files in `folder` left by processes of this host that no longer run."""
    from msaflow.lock import host_name, pid_alive

    removed, me = [], host_name()
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        owner = temp_owner(entry.name)
        if owner is not None and owner[1] == me and not pid_alive(owner[0]) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


def fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush a file (or a folder's entries) to the disk; a file system that cannot is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EROFS):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file is flushed to the disk before the rename and the folder after it, so that after
    a power loss `path` is either absent or complete. An OSError without a file name (a write
    into an open file: no space, I/O error) is raised again naming `path`.
    """
    from msaflow.lock import host_name

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:120]}.{os.getpid()}@{host_name()}.", suffix=".tmp",
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files owner-only; give the usual mode
        os.replace(tmp, path)
        fsync_path(path.parent, directory=True)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None or exc.filename == tmp:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


class TarWriter:
    """Appends samples to one tar; members of a sample are written in sorted order.

    Used directly for shards (`with atomic_path(p) as tmp: with TarWriter(tmp) as w: ...`)
    and through `write_sample_tar` for the one-clip tars of the extraction step.
    """

    def __init__(self, path: str | os.PathLike):
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def add_bytes(self, name: str, data: bytes) -> None:
        self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))

    def add_file(self, name: str, src: str | os.PathLike) -> None:
        """Stream a member from a file on disk (large arrays never sit in memory)."""
        with open(src, "rb") as f:
            self._tar.addfile(_tarinfo(name, os.fstat(f.fileno()).st_size), f)

    def add_sample(self, key: str, members: dict[str, Member | Path]) -> None:
        for suffix in sorted(members):
            value = members[suffix]
            name = f"{key}.{suffix}"
            if isinstance(value, Path):
                self.add_file(name, value)
            else:
                self.add_bytes(name, encode_member(suffix, value))

    def close(self) -> None:
        self._tar.close()

    def discard(self) -> None:
        """Close the file without writing the end of the archive (it is being thrown away, and a
        write may fail the same way the last one did)."""
        if not self._tar.closed:
            self._tar.closed = True
            try:
                self._tar.fileobj.close()
            except OSError:
                pass

    def __enter__(self) -> "TarWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def write_sample_tar(path: str | os.PathLike, key: str, members: dict[str, Member | Path]) -> None:
    """Write one sample as its own tar, atomically. Path values are streamed from disk."""
    with atomic_path(path) as tmp, TarWriter(tmp) as writer:
        writer.add_sample(key, members)


def iter_tar_members(path: str | os.PathLike) -> Iterable[tuple[str, bytes]]:
    """(member name, raw bytes) in file order; a truncated or corrupt tar raises naming the file."""
    try:
        with tarfile.open(path, "r") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                f = tar.extractfile(info)
                yield info.name, f.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"{path}: unreadable tar ({exc})") from exc


def read_sample_tar(path: str | os.PathLike) -> tuple[str, dict[str, Member]]:
    """The (key, decoded members) of a one-sample tar written by `write_sample_tar`."""
    key, members = None, {}
    for name, data in iter_tar_members(path):
        k, _, suffix = name.partition(".")
        if key is not None and k != key:
            raise ValueError(f"{path}: holds more than one sample ({key!r}, {k!r})")
        key = k
        members[suffix] = decode_member(suffix, data)
    if key is None:
        raise ValueError(f"{path}: empty tar")
    return key, members


def npy_data_size(fileobj) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes the whole .npy must have) from the header at `fileobj`'s position."""
    start = fileobj.tell()
    version = np.lib.format.read_magic(fileobj)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, _, dtype = read_header(fileobj)
    n_items = 1
    for n in shape:
        n_items *= int(n)
    return tuple(int(n) for n in shape), dtype, fileobj.tell() - start + n_items * dtype.itemsize


def check_tar(path: str | os.PathLike) -> None:
    """Check a tar written here without reading its data: every header, every member's data
    within the file, each `.npy` member as long as its header says, a `.json` member parses,
    and the end-of-archive blocks present. Raises ValueError saying what is wrong (a file cut
    short by a power loss or a full disk, a damaged header); an error reading the disk stays
    an OSError.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r") as tar:
            n = 0
            for info in tar:
                n += 1
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:
                    raise ValueError(f"member {info.name} is cut short ({size - info.offset_data} of "
                                     f"{info.size} bytes)")
                f = tar.extractfile(info)
                if info.name.endswith(".npy"):
                    try:
                        shape, dtype, expected = npy_data_size(f)
                    except (ValueError, EOFError) as exc:
                        raise ValueError(f"member {info.name}: not a NumPy .npy array ({exc})") from None
                    if expected != info.size:
                        raise ValueError(f"member {info.name}: its header says {shape} {dtype} "
                                         f"({expected} bytes) but it holds {info.size} bytes")
                elif info.name.endswith(".json"):
                    json.loads(f.read().decode("utf-8"))
            end = tar.offset
        if n == 0:
            raise ValueError("no members")
        with open(path, "rb") as f:
            f.seek(end)
            rest = f.read(1 << 16)
        if len(rest) < 2 * tarfile.BLOCKSIZE or rest.count(0) != len(rest) or len(rest) == 1 << 16:
            raise ValueError(f"no end-of-archive marker after {n} member(s) (cut short, or data after "
                             f"byte {end})")
    except (tarfile.TarError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable tar ({exc})") from exc
