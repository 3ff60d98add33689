"""One shard read front to back: the wanted samples decoded (`np.load(..., allow_pickle=False)`
only), and the whole file checked against `index.json` to its last byte (`read_shard`)."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msaflow.pipeline.data.shard_index import (_PRESENCE_ONLY, MEMBER_SPECS, MODE_LAYOUTS, ShardEntry, ShardError,
                                               SplitIndex, _file_size, open_shard_file)


@dataclass
class Sample:
    key: str
    meta: dict
    arrays: dict[str, np.ndarray]
    weight: float


def _decode_npy(shard: Path, key: str, member: str, data: bytes, shape: tuple) -> np.ndarray:
    spec = MEMBER_SPECS[member]
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ShardError(f"{shard}: sample {key!r}: {member} is not a readable .npy ({exc})") from exc
    if array.dtype != np.dtype(spec.dtype) or array.ndim != spec.ndim:
        raise ShardError(f"{shard}: sample {key!r}: {member} is {array.dtype}{list(array.shape)}, "
                         f"expected {spec.dtype} with {spec.ndim} axes")
    for axis, (want, got) in enumerate(zip(shape, array.shape)):
        if want is not None and want != got:
            raise ShardError(f"{shard}: sample {key!r}: {member} axis {axis} is {got}, index.json says {want}")
    return array


def decode_sample(shard: Path, key: str, blobs: dict[str, bytes], index: SplitIndex, weight: float) -> Sample:
    try:
        meta = json.loads(blobs["json"].decode("utf-8"))
    except (KeyError, ValueError) as exc:
        raise ShardError(f"{shard}: sample {key!r}: missing or unreadable json member ({exc})") from exc
    arrays = {m: _decode_npy(shard, key, m, blobs[m], index.shapes.get(m, ())) for m in index.members}
    for a, b in MODE_LAYOUTS[index.mode].aligned:
        if a in arrays and (a, b) not in _PRESENCE_ONLY and len(arrays[a]) != len(arrays[b]):
            raise ShardError(f"{shard}: sample {key!r}: {a} has {len(arrays[a])} steps, {b} has {len(arrays[b])}")
    return Sample(key, meta, arrays, weight)


def _check_end_of_archive(path: Path, fileobj, end: int, offset: int) -> None:
    """After the last member: the two zero blocks of a tar's end, then only zero padding to EOF."""
    fileobj.seek(end)
    if fileobj.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
        raise ShardError(f"{path}: no end-of-archive marker at byte {end}, after sample #{offset} "
                         "(truncated shard, or bytes there that are not a tar header)")
    position = end + 2 * tarfile.BLOCKSIZE
    while chunk := fileobj.read(1 << 20):
        if chunk.strip(b"\0"):
            first = position + len(chunk) - len(chunk.lstrip(b"\0"))
            raise ShardError(f"{path}: trailing data at byte {first}, after the end-of-archive marker")
        position += len(chunk)


def read_shard(entry: ShardEntry, index: SplitIndex, wanted: list[tuple[int, float]]) -> Iterator[Sample]:
    """Decode the samples at the `wanted` (offset, weight) of one shard, offsets non-decreasing.

    The whole shard is checked against index.json, to its last byte, before its last wanted
    sample is handed out (so a consumer that stops there still gets the check): the sample
    count, each sample's member set (exactly `json` + the index's members, each once, regular
    files only, a sample's members together), members running past the end of the file, the
    end-of-archive marker and nothing but zero padding after it. A problem raises ShardError
    naming the shard (and the sample where there is one).
    """
    path = entry.path
    picker = _WantedSamples(path, index, wanted)
    fileobj, size, tar = _open_shard_tar(path)
    with fileobj, tar:
        try:
            last_offset = yield from _shard_samples(path, tar, size, picker)
            # a tar ends with two zero blocks (then record padding); without them the file was cut short
            _check_end_of_archive(path, tar.fileobj, tar.offset, last_offset)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ShardError(f"{path}: truncated or corrupt shard ({exc})") from exc
    stored = entry.n_stored or entry.n_samples
    if last_offset + 1 != stored:
        raise ShardError(f"{path}: holds {last_offset + 1} samples, index.json says {stored} "
                         "(truncated or corrupt shard)")
    if picker.next != len(wanted):
        raise ShardError(f"{path}: sample #{wanted[picker.next][0]} not found")
    yield from picker.last


class _WantedSamples:
    """The samples of one shard to decode (offset, weight), and the check of every sample's members."""

    def __init__(self, path, index: SplitIndex, wanted: list[tuple[int, float]]):
        self.path, self.index, self.wanted = path, index, wanted
        self.needed = ("json", *index.members)
        self.expected = set(self.needed)
        self.offsets = {o for o, _ in wanted}
        self.next = 0  # position in `wanted` of the next sample to decode
        self.last: list[Sample] = []  # the last wanted sample, held back until the shard is checked whole

    def reads(self, offset: int, suffix: str) -> bool:
        """Whether the member's bytes are needed (a member of a wanted sample that index.json lists)."""
        return offset in self.offsets and suffix in self.needed

    def take(self, offset: int, key: str, suffixes: set[str], blobs: dict[str, bytes]) -> Iterator[Sample]:
        """Check sample #offset's member set; decode it once per time it is wanted."""
        path = self.path
        missing = [m for m in self.needed if m not in suffixes]
        if missing:
            raise ShardError(f"{path}: sample {key!r} (#{offset}) lacks members {missing} (truncated or corrupt shard?)")
        extra = sorted(suffixes - self.expected)
        if extra:
            raise ShardError(f"{path}: sample {key!r} (#{offset}) has members {extra} that index.json does not list "
                             f"(expected {sorted(self.expected)})")
        while self.next < len(self.wanted) and self.wanted[self.next][0] == offset:
            sample = decode_sample(path, key, blobs, self.index, self.wanted[self.next][1])
            self.next += 1
            if self.next == len(self.wanted):
                self.last.append(sample)
            else:
                yield sample


def _open_shard_tar(path):
    """(the shard's file object, its size, the tarfile reading it); ShardError when it cannot be opened."""
    try:
        fileobj = open_shard_file(path)
    except ShardError:
        raise
    except Exception as exc:  # OSError, or a remote back-end's own error
        raise ShardError(f"{path}: cannot open shard ({exc})") from exc
    try:
        size = _file_size(fileobj)
        tar = tarfile.open(fileobj=fileobj, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        fileobj.close()
        raise ShardError(f"{path}: cannot open shard ({exc})") from exc
    return fileobj, size, tar


def _shard_samples(path, tar: tarfile.TarFile, size: int, picker: _WantedSamples) -> Iterator[Sample]:
    """Walk the shard's members sample by sample (a sample's members are consecutive), yielding the
    wanted samples picker decodes; returns the offset of the last sample (-1: none)."""
    offset, key, suffixes, blobs = -1, None, set(), {}
    seen_keys: set[str] = set()
    for info in tar:
        if not info.isfile():
            raise ShardError(f"{path}: member {info.name!r} is not a regular file (after sample #{offset})")
        if info.offset_data + info.size > size:
            raise ShardError(f"{path}: member {info.name} runs past the end of the file (truncated shard)")
        name_key, _, suffix = info.name.partition(".")
        if name_key != key:
            if key is not None:
                yield from picker.take(offset, key, suffixes, blobs)
            if name_key in seen_keys:
                raise ShardError(f"{path}: sample {name_key!r} appears twice (its members are not together)")
            seen_keys.add(name_key)
            offset, key, suffixes, blobs = offset + 1, name_key, set(), {}
        if suffix in suffixes:
            raise ShardError(f"{path}: sample {key!r} (#{offset}) holds member {suffix!r} twice")
        suffixes.add(suffix)
        if picker.reads(offset, suffix):
            blobs[suffix] = tar.extractfile(info).read()
    if key is not None:
        yield from picker.take(offset, key, suffixes, blobs)
    return offset
