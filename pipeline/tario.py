"""Deterministic, atomic tar files of `.json` / `.npy` members (WebDataset samples).

Everything the pipeline writes to disk goes through here, so that a resumed run yields
byte-identical files: members are sorted, mtime/uid/gid are zero, and a file only
appears under its final name once it is complete.
"""

from __future__ import annotations

import io
import json
import os
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


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files owner-only; give the usual mode
        os.replace(tmp, path)
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

    def __enter__(self) -> "TarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
