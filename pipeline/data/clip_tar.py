"""One clip tar of the extraction step, read for `msaflow shards`: its members' headers (not
their arrays) checked against the contract (docs/data-contracts.md §2), their sizes in a
shard, and the per-member schema every sample of a split shares."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msaflow.extractors.audio import STEPS_PER_SECOND
from msaflow.tario import check_tar, npy_data_size


FBANK_RATE = float(STEPS_PER_SECOND)  # the 10 ms audio grid of fbank.npy / audio.npy / audio_mask.npy
TAR_BLOCK, TAR_RECORD = 512, 10240  # tar header/data block; the file is padded to whole records

# member -> its rate (steps per second) given the clip's json; None: no time axis (tokens)
_RATE: dict[str, Callable[[dict], float | None]] = {
    "face.npy": lambda meta: meta["fps"],
    "vision.npy": lambda meta: meta["fps"],
    "vision_mask.npy": lambda meta: meta["fps"],
    "wav.npy": lambda meta: meta["sample_rate"],
    "fbank.npy": lambda meta: FBANK_RATE,
    "audio.npy": lambda meta: FBANK_RATE,
    "audio_mask.npy": lambda meta: FBANK_RATE,
    "text.npy": lambda meta: None,
    "text_ids.npy": lambda meta: None,
}
REQUIRED_MEMBERS = {
    "raw": ("json", "face.npy", "vision_mask.npy", "wav.npy", "fbank.npy", "audio_mask.npy", "text_ids.npy"),
    "features": ("json", "vision.npy", "vision_mask.npy", "audio.npy", "audio_mask.npy", "text.npy",
                 "text_ids.npy"),
}
# members whose first axis must equal a json count / another member's first axis
_TIME_AXIS_OF_JSON = {"vision_mask.npy": "n_frames", "face.npy": "n_frames", "vision.npy": "n_frames"}
_SAME_TIME_AXIS = {"fbank.npy": "audio_mask.npy", "audio.npy": "audio_mask.npy", "text.npy": "text_ids.npy"}


class ClipError(ValueError):
    """One clip tar is unusable; the clip goes to failures.csv and the others go on."""


@dataclass(frozen=True)
class MemberInfo:
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Clip:
    """A validated clip tar: what to copy into the shard and what the index needs to know."""

    path: Path
    meta: dict
    sizes: dict[str, int]  # member suffix -> bytes
    arrays: dict[str, MemberInfo]

    @property
    def tar_bytes(self) -> int:
        return sum(TAR_BLOCK + _blocks(size) for size in self.sizes.values())


def _blocks(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_file_size(member_bytes: int) -> int:
    """Size on disk of a tar whose headers+data take `member_bytes` (end blocks, record padding)."""
    return -(-(member_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _npy_info(fileobj, name: str) -> MemberInfo:
    try:
        shape, dtype, _ = npy_data_size(fileobj)
    except ValueError as exc:
        raise ClipError(f"{name}: not a NumPy .npy array ({exc})") from exc
    if dtype.hasobject:
        raise ClipError(f"{name}: object dtype (would need pickle)")
    return MemberInfo(shape, np.dtype(dtype).name)


def read_clip(path: Path, key: str, clip_id: str) -> Clip:
    """Read the headers of one clip tar (not its arrays) and check it against the contract.

    The whole tar index is checked first (`tario.check_tar`): a tar cut short, or a `.npy`
    member shorter than its header says (an empty or cut face.npy), is not packed."""
    try:
        check_tar(path)
    except ValueError as exc:
        raise ClipError(f"damaged clip tar: {exc}") from exc
    sizes, arrays, meta = {}, {}, None
    try:
        with tarfile.open(path, "r") as tar:
            for info in tar:
                if not info.isfile():
                    raise ClipError(f"member {info.name!r} is not a regular file")
                member_key, _, suffix = info.name.partition(".")
                if member_key != key:
                    raise ClipError(f"member {info.name!r} does not belong to key {key!r}")
                if suffix != "json" and not suffix.endswith(".npy"):
                    raise ClipError(f"member {info.name!r}: only .json and .npy members are allowed")
                sizes[suffix] = info.size
                f = tar.extractfile(info)
                if suffix == "json":
                    meta = json.loads(f.read().decode("utf-8"))
                else:
                    arrays[suffix] = _npy_info(f, info.name)
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClipError(f"unreadable clip tar ({exc})") from exc
    if not sizes:
        raise ClipError("empty clip tar")
    if not isinstance(meta, dict):
        raise ClipError("no json member")
    if meta.get("id") != clip_id:
        raise ClipError(f"json id {meta.get('id')!r} differs from the manifest id {clip_id!r}")
    mode = meta.get("mode")
    if mode not in REQUIRED_MEMBERS:
        raise ClipError(f"json mode {mode!r} is not one of {sorted(REQUIRED_MEMBERS)}")
    missing = [m for m in REQUIRED_MEMBERS[mode] if m not in sizes]
    if missing:
        raise ClipError(f"{mode} mode clip lacks {', '.join(missing)}")
    for member, count_field in _TIME_AXIS_OF_JSON.items():
        if member in arrays and (not arrays[member].shape or arrays[member].shape[0] != meta.get(count_field)):
            raise ClipError(f"{member} has shape {arrays[member].shape} but json {count_field} is "
                            f"{meta.get(count_field)!r}")
    for member, other in _SAME_TIME_AXIS.items():
        if member in arrays and other in arrays and arrays[member].shape[:1] != arrays[other].shape[:1]:
            raise ClipError(f"{member} has {arrays[member].shape[:1]} steps but {other} has "
                            f"{arrays[other].shape[:1]}")
    return Clip(path, meta, sizes, arrays)


def _member_rate(member: str, meta: dict) -> float | None:
    rate = _RATE.get(member, lambda meta: None)(meta)
    return None if rate is None else float(rate)


def member_schema(clip: Clip) -> dict[str, dict]:
    """Per member: shape with a null time axis, dtype, rate: what every sample of a split shares."""
    return {
        name: {"shape": [None, *info.shape[1:]], "dtype": info.dtype, "rate": _member_rate(name, clip.meta)}
        for name, info in sorted(clip.arrays.items())
    }
