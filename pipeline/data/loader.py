"""Streaming loader over the WebDataset shards of one split (docs/data-contracts.md §3).

`make_loader(SHARD_DIR, split, batch_size, ...)` yields padded batches in the batch contract
(docs/loader.md). How an epoch is cut up, so that every sample is seen exactly once across
all ranks x workers:

1. The epoch's sample sequence: the shards of `index.json` in order (with `shuffle`: in a
   seeded per-epoch order, the whole sequence rotated by a seeded offset).
2. Global step k takes `batch_size * world_size` consecutive positions; rank r takes the
   r-th block of `batch_size` of them. The last global step, when shorter, is split evenly
   over the ranks and topped up with weight-0 repeats of the last sample, so every rank runs
   the same number of steps (DDP needs that) and no sample is dropped (`drop_last=True`
   instead drops the short last step: for training only, never for evaluation).
3. Rank-local batch j goes to DataLoader worker j mod num_workers. DataLoader collects
   worker batches round-robin, so without shuffling the batches come out in the same order
   for any number of workers, and one process with batch B sees exactly the union of what
   W ranks see with batch B/W at each step.
4. With `shuffle`, each worker passes its samples through a seeded shuffle buffer
   (seed, epoch, rank, worker) before cutting batches.

5. Optional per-sample `transform` (length control, `msaflow.pipeline.data.lengths`) right after
   decoding, and length bucketing: `bucket` consecutive batches of a worker are filled from
   their samples sorted by length (and, when shuffling, run in a seeded order), so padding
   stays small while the buffer stays bounded.

Samples are split, not shards, so fewer shards than ranks x workers is fine. Each worker
reads its shards front to back, seeking over the samples it does not own. Every shard a
worker opens is checked whole (sample count against `index.json`, member sets, member
bounds): a truncated or corrupt shard raises `ShardError` naming the file, never a silently
short epoch. Arrays are decoded with `np.load(..., allow_pickle=False)` only.

A shard folder is a local path or a URL: any fsspec URL (`s3://bucket/shards`, `gs://...`,
`http(s)://host/shards`; the `remote` extra installs the S3 and HTTP back-ends, an S3-compatible
store is reached with `AWS_ENDPOINT_URL`), or a WebDataset-style `pipe:` command template whose
`{path}` is replaced by the file's path inside the folder (`pipe:aws s3 cp s3://b/shards/{path} -`),
its standard output read to a temporary file. Only opening files differs (`ShardLocation`).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class ShardError(ValueError):
    """A shard or its index.json is missing, truncated, corrupt or off-contract."""


@dataclass(frozen=True)
class MemberSpec:
    """How one `.npy` member of a sample becomes batch tensors."""

    batch_key: str
    dtype: str  # dtype on disk, as the data contract states it
    ndim: int
    length_key: str | None = None  # batch key of the per-sample lengths of this member's first axis
    scale: float | None = None  # multiply after conversion to float32


MEMBER_SPECS: dict[str, MemberSpec] = {
    "text_ids.npy": MemberSpec("text_ids", "int64", 1, length_key="text_lengths"),
    "text.npy": MemberSpec("text", "float32", 2),
    "audio.npy": MemberSpec("audio", "float32", 2, length_key="audio_lengths"),
    "audio_mask.npy": MemberSpec("audio_present", "bool", 1),
    "vision.npy": MemberSpec("vision", "float32", 2, length_key="vision_lengths"),
    "vision_mask.npy": MemberSpec("vision_present", "bool", 1),
    "face.npy": MemberSpec("face", "uint8", 4, length_key="vision_lengths"),
    "fbank.npy": MemberSpec("fbank", "float32", 2, length_key="audio_lengths"),
    # int16 PCM on disk; float32 in [-1, 1) in the batch
    "wav.npy": MemberSpec("wav", "int16", 1, length_key="wav_lengths", scale=1.0 / 32768.0),
}


@dataclass(frozen=True)
class ModeLayout:
    """The members a shard mode may hold and how they depend on each other."""

    members: tuple[str, ...]
    # (a, b): a sample holding member a must hold b, with the same first-axis length
    aligned: tuple[tuple[str, str], ...]


MODE_LAYOUTS: dict[str, ModeLayout] = {
    "raw": ModeLayout(
        members=("face.npy", "vision_mask.npy", "wav.npy", "fbank.npy", "audio_mask.npy", "text_ids.npy"),
        aligned=(("face.npy", "vision_mask.npy"), ("vision_mask.npy", "face.npy"),
                 ("fbank.npy", "audio_mask.npy"), ("audio_mask.npy", "fbank.npy"),
                 ("wav.npy", "fbank.npy")),
    ),
    "features": ModeLayout(
        members=("vision.npy", "vision_mask.npy", "audio.npy", "audio_mask.npy", "text.npy", "text_ids.npy"),
        aligned=(("vision.npy", "vision_mask.npy"), ("vision_mask.npy", "vision.npy"),
                 ("audio.npy", "audio_mask.npy"), ("audio_mask.npy", "audio.npy"),
                 ("text.npy", "text_ids.npy")),
    ),
}
# wav has its own (sample-rate) time axis: it requires fbank but is not length-aligned with it
_PRESENCE_ONLY = {("wav.npy", "fbank.npy")}
LABEL_KEYS = ("label_T", "label_A", "label_V")
# Samples a shuffle buffer holds per worker: a raw sample (face crops) weighs megabytes.
DEFAULT_SHUFFLE_BUFFER = {"features": 1000, "raw": 128}


# ---------------------------------------------------------------------------- index.json


# ---------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class ShardLocation:
    """A file or folder of a shard set named by URL: fsspec (`s3://`, `http(s)://`, ...) or `pipe:CMD`.

    `/` joins names as for a Path; `str()` is the URL (for `pipe:`, the command with `{path}` filled in).
    """

    url: str
    rel: str = ""

    def __truediv__(self, name: str) -> "ShardLocation":
        return ShardLocation(self.url, f"{self.rel}/{name}" if self.rel else str(name))

    @property
    def name(self) -> str:
        return (self.rel or self.url.rstrip("/")).rsplit("/", 1)[-1]

    def __str__(self) -> str:
        if self.url.startswith("pipe:"):
            return self.url.replace("{path}", self.rel)
        return f"{self.url.rstrip('/')}/{self.rel}" if self.rel else self.url


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def shard_location(location: str | os.PathLike) -> Path | ShardLocation:
    """A local Path, or a ShardLocation for a URL (`scheme://...`) or a `pipe:` command template."""
    if isinstance(location, ShardLocation):
        return location
    text = os.fspath(location)
    if text.startswith("pipe:"):
        if "{path}" not in text:
            raise ShardError(f"{text}: a pipe: shard folder needs {{path}} where a file's path inside it goes")
        return ShardLocation(text)
    if _URL.match(text) and not text.startswith("file://"):
        return ShardLocation(text)
    return Path(text.removeprefix("file://"))


def open_shard_file(location: Path | ShardLocation):
    """A readable, seekable binary file object for a local path, an fsspec URL or a pipe: command."""
    if isinstance(location, Path):
        return open(location, "rb")
    if location.url.startswith("pipe:"):
        spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # larger shards spill to a temporary file
        with tempfile.TemporaryFile() as errors:
            proc = subprocess.Popen(str(location)[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=errors)
            with proc.stdout:
                shutil.copyfileobj(proc.stdout, spool, 1 << 20)
            if proc.wait() != 0:
                spool.close()
                errors.seek(0)
                message = errors.read().decode("utf-8", "replace").strip()[-500:]
                raise FileNotFoundError(f"command exited with status {proc.returncode}: {message}")
        spool.seek(0)
        return spool
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec comes with torch
        raise ShardError(f"{location}: reading shards by URL needs fsspec: pip install 'msaflow[remote]'") from exc
    try:
        return fsspec.open(str(location), "rb").open()
    except (ImportError, ValueError) as exc:  # no back-end for the scheme
        raise ShardError(f"{location}: no fsspec back-end for this URL ({exc}): pip install 'msaflow[remote]'") from exc


def _file_size(fileobj) -> int:
    position = fileobj.tell()
    size = fileobj.seek(0, io.SEEK_END)
    fileobj.seek(position)
    return size


@dataclass(frozen=True)
class ShardEntry:
    path: Path | ShardLocation
    n_samples: int  # samples used from this shard
    n_stored: int | None = None  # samples the file holds, when more than are used (`SplitIndex.limited`)


@dataclass(frozen=True)
class SplitIndex:
    """What the loader needs from `SHARD_DIR/<split>/index.json`."""

    split: str
    mode: str
    n_samples: int
    shards: tuple[ShardEntry, ...]
    members: tuple[str, ...]  # the .npy members every sample holds, in MEMBER_SPECS order
    shapes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)
    rates: dict[str, float | None] = field(default_factory=dict)  # steps per second of each member

    @property
    def modalities(self) -> tuple[str, ...]:
        """The batch-contract modalities present: text / audio / vision."""
        has = {"text": "text_ids.npy", "audio": "audio_mask.npy", "vision": "vision_mask.npy"}
        return tuple(m for m, member in has.items() if member in self.members)

    @classmethod
    def load(cls, split_dir: str | os.PathLike, mode_hint: str | None = None) -> "SplitIndex":
        split_dir = shard_location(split_dir)
        path = split_dir / "index.json"
        try:
            with open_shard_file(path) as f:
                raw = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError as exc:
            raise ShardError(f"{path}: no index.json (is {split_dir} a split folder written by `msaflow shards`?)") from exc
        except ShardError:
            raise
        except Exception as exc:  # OSError, bad JSON, or a remote back-end's own error
            raise ShardError(f"{path}: unreadable index.json ({exc})") from exc
        try:
            mode = raw["mode"]
            shards = tuple(ShardEntry(split_dir / s["name"], int(s["n_samples"])) for s in raw["shards"])
            n_samples = int(raw["n_samples"])
            modalities = raw["modalities"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{path}: missing or malformed field {exc}") from exc
        if mode is None and n_samples == 0:  # an empty split of a run: nothing to read, any mode fits
            mode = mode_hint or "features"
        if mode not in MODE_LAYOUTS:
            raise ShardError(f"{path}: mode {mode!r} is not one of {sorted(MODE_LAYOUTS)}")
        if mode_hint is not None and mode_hint != mode:
            raise ShardError(f"{path}: shards are in {mode!r} mode, the caller expects {mode_hint!r}")
        if sum(s.n_samples for s in shards) != n_samples:
            raise ShardError(f"{path}: n_samples {n_samples} != sum over shards {sum(s.n_samples for s in shards)}")
        layout = MODE_LAYOUTS[mode]
        names = {m if m.endswith(".npy") else f"{m}.npy": v for m, v in modalities.items()}
        unknown = sorted(set(names) - set(layout.members))
        if unknown:
            raise ShardError(f"{path}: members {unknown} do not belong to {mode!r} shards (allowed: {list(layout.members)})")
        members = tuple(m for m in MEMBER_SPECS if m in names)
        for a, b in layout.aligned:
            if a in names and b not in names:
                raise ShardError(f"{path}: member {a} requires {b}, which the index does not list")
        if n_samples and not any(m in members for m in ("text_ids.npy", "audio_mask.npy", "vision_mask.npy")):
            raise ShardError(f"{path}: lists no modality (members {sorted(names)})")
        shapes = {m: tuple(names[m].get("shape") or ()) for m in members}
        for m, shape in shapes.items():
            if shape and len(shape) != MEMBER_SPECS[m].ndim:
                raise ShardError(f"{path}: {m} shape {list(shape)} should have {MEMBER_SPECS[m].ndim} axes")
        rates = {m: names[m].get("rate") for m in members}
        return cls(raw.get("split", split_dir.name), mode, n_samples, shards, members, shapes, rates)

    def limited(self, n: int) -> "SplitIndex":
        """The first n samples only (smoke tests); n <= 0 keeps everything."""
        if n <= 0 or n >= self.n_samples:
            return self
        shards, left = [], n
        for s in self.shards:
            if left <= 0:
                break
            shards.append(ShardEntry(s.path, min(s.n_samples, left), s.n_samples))
            left -= s.n_samples
        return replace(self, n_samples=n, shards=tuple(shards))


# ---------------------------------------------------------------------------- epoch plan


@dataclass(frozen=True)
class Slot:
    """One place in a batch: a position in the epoch's sample sequence and its loss weight."""

    position: int
    weight: float = 1.0


def rank_batches(n_samples: int, batch_size: int, rank: int, world_size: int,
                 drop_last: bool = False) -> list[list[Slot]]:
    """The batches rank `rank` runs in one epoch, as slots of the epoch's sample sequence.

    Every rank gets the same number of batches. Without `drop_last` the positions of all
    ranks together cover 0..n_samples-1 exactly once with weight 1; the short last global
    step is split evenly and topped up with weight-0 repeats of the last sample.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
    step = batch_size * world_size
    n_full, rest = divmod(n_samples, step)
    batches = [[Slot(k * step + rank * batch_size + i) for i in range(batch_size)] for k in range(n_full)]
    if rest and not drop_last:
        per_rank = math.ceil(rest / world_size)
        start = n_full * step + rank * per_rank
        batches.append([Slot(p) if p < n_samples else Slot(n_samples - 1, 0.0)
                        for p in range(start, start + per_rank)])
    return batches


def epoch_sequence(shard_sizes: list[int], shuffle: bool, seed: int, epoch: int) -> list[tuple[int, int]]:
    """(shard number, sample offset in the shard) for every position of the epoch's sequence.

    Shuffled: shard order permuted and the sequence rotated, both seeded by (seed, epoch), so
    every rank and worker computes the same sequence and the rank/worker a sample lands on
    changes from epoch to epoch.
    """
    order = list(range(len(shard_sizes)))
    rng = np.random.default_rng([seed, epoch])
    if shuffle:
        order = [int(i) for i in rng.permutation(len(shard_sizes))]
    sequence = [(s, o) for s in order for o in range(shard_sizes[s])]
    if shuffle and sequence:
        shift = int(rng.integers(len(sequence)))
        sequence = sequence[shift:] + sequence[:shift]
    return sequence


def shard_runs(stream: list[tuple[tuple[int, int], float]]) -> Iterator[tuple[int, list[tuple[int, float]]]]:
    """Cut a worker's stream of ((shard, offset), weight) into runs readable front to back."""
    run: list[tuple[int, float]] = []
    shard = None
    for (s, offset), weight in stream:
        if run and (s != shard or offset < run[-1][0]):
            yield shard, run
            run = []
        shard = s
        run.append((offset, weight))
    if run:
        yield shard, run


# ---------------------------------------------------------------------------- reading


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


def shuffle_buffer(samples: Iterable, size: int, rng: np.random.Generator, initial: int | None = None) -> Iterator:
    """Yield every sample once, in an order mixed within a window of up to `size` samples.

    Yielding starts once `initial` samples (default size // 10) are buffered, and the buffer
    keeps growing to `size` (two in, one out), so the first batch does not wait for a full
    buffer to be decoded.
    """
    initial = max(1, size // 10 if initial is None else min(initial, size))
    buffer: list = []
    source = iter(samples)
    for sample in source:
        buffer.append(sample)
        if len(buffer) < size:
            buffer.extend(next_items(source, 1))
        if len(buffer) >= initial:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def next_items(source: Iterator, n: int) -> list:
    """Up to n more items of an iterator (fewer at its end)."""
    out = []
    for item in source:
        out.append(item)
        if len(out) == n:
            break
    return out


# ---------------------------------------------------------------------------- collation


def pad_stack(arrays: list[np.ndarray], pad_value=0) -> tuple[np.ndarray, np.ndarray]:
    """Stack arrays of different first-axis lengths, padding at the end; (stacked, lengths).

    The padded axis is at least 1 long, so a batch of empty arrays (clips without audio)
    still gives a valid tensor.
    """
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    longest = max(1, int(lengths.max(initial=0)))
    out = np.full((len(arrays), longest, *arrays[0].shape[1:]), pad_value, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out, lengths


def _optional_float(value) -> float:
    return float("nan") if value is None or value == "" else float(value)


def collate(samples: list[Sample], members: tuple[str, ...]) -> dict:
    """Padded batch-contract tensors from decoded samples (see docs/loader.md)."""
    batch: dict = {
        "id": [s.meta.get("id", s.key) for s in samples],
        "key": [s.key for s in samples],
        "label": torch.tensor([_optional_float(s.meta.get("label")) for s in samples], dtype=torch.float32),
        "weight": torch.tensor([s.weight for s in samples], dtype=torch.float32),
    }
    for name in LABEL_KEYS:  # per-modality labels only where the data has them
        values = [_optional_float(s.meta.get(name)) for s in samples]
        if not all(math.isnan(v) for v in values):
            batch[name] = torch.tensor(values, dtype=torch.float32)
    for member in members:
        spec = MEMBER_SPECS[member]
        stacked, lengths = pad_stack([s.arrays[member] for s in samples])
        tensor = torch.from_numpy(stacked)
        if spec.scale is not None:
            tensor = tensor.float() * spec.scale
        batch[spec.batch_key] = tensor
        if spec.length_key:
            batch[spec.length_key] = torch.from_numpy(lengths)
    return batch


# ---------------------------------------------------------------------------- dataset


class ShardDataset(IterableDataset):
    """One rank's share of a split, as collated batches; `set_epoch` before each epoch."""

    def __init__(self, split_dir: str | os.PathLike, batch_size: int, *, shuffle: bool, seed: int = 0,
                 epoch: int = 0, rank: int = 0, world_size: int = 1, mode_hint: str | None = None,
                 drop_last: bool = False, shuffle_buffer: int | None = None,
                 transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
                 bucket: int = 0, limit: int = 0):
        self.index = SplitIndex.load(split_dir, mode_hint).limited(limit)
        self.transform, self.bucket = transform, bucket
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.buffer_size = DEFAULT_SHUFFLE_BUFFER[self.index.mode] if shuffle_buffer is None else shuffle_buffer

    @property
    def mode(self) -> str:
        return self.index.mode

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[Slot]]:
        return rank_batches(self.index.n_samples, self.batch_size, self.rank, self.world_size, self.drop_last)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return len(self.batches())

    def worker_stream(self, worker: int, n_workers: int) -> tuple[list[tuple[tuple[int, int], float]], list[int]]:
        """((shard, offset), weight) of every sample a worker reads, and its batch sizes."""
        sequence = epoch_sequence([s.n_samples for s in self.index.shards], self.shuffle, self.seed, self.epoch)
        mine = self.batches()[worker::n_workers]
        stream = [(sequence[slot.position], slot.weight) for batch in mine for slot in batch]
        return stream, [len(b) for b in mine]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        stream, sizes = self.worker_stream(worker, n_workers)
        samples: Iterable[Sample] = (
            sample
            for shard, run in shard_runs(stream)
            for sample in read_shard(self.index.shards[shard], self.index, run)
        )
        if self.shuffle and self.buffer_size > 1:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
            samples = shuffle_buffer(samples, self.buffer_size, rng)
        if self.transform is not None:  # length control, before the shuffle buffer holds the samples
            samples = (replace(s, arrays=self.transform(s.arrays)) for s in samples)
        samples = iter(samples)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
        window = max(self.bucket, 1)
        for start in range(0, len(sizes), window):
            group = sizes[start: start + window]
            taken = [next(samples) for _ in range(sum(group))]
            if window > 1:  # length bucketing: similar lengths share a batch, little padding
                taken.sort(key=sample_length)
            cuts = np.cumsum([0, *group])
            batches = [taken[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
            order = rng.permutation(len(batches)) if (self.shuffle and window > 1) else range(len(batches))
            for i in order:
                yield collate(batches[i], self.index.members)


def sample_length(sample: Sample) -> int:
    """The longest time axis of a sample (what its batch is padded to)."""
    return max((len(a) for m, a in sample.arrays.items() if MEMBER_SPECS[m].length_key and m != "wav.npy"), default=0)


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def make_loader(shard_dir: str | os.PathLike, split: str, batch_size: int, *, shuffle: bool, seed: int = 0,
                epoch: int = 0, num_workers: int = 0, rank: int | None = None, world_size: int | None = None,
                mode_hint: str | None = None, drop_last: bool = False, shuffle_buffer: int | None = None,
                pin_memory: bool = False, transform=None, bucket: int = 0, limit: int = 0) -> DataLoader:
    """A DataLoader over `shard_dir/<split>/` yielding this rank's padded batches.

    `batch_size` is per rank (the global batch is batch_size x world_size). rank and
    world_size default to the initialized process group, else 0 and 1. Call
    `loader.dataset.set_epoch(e)` (or make a new loader) for each epoch.
    """
    default_rank, default_world = _default_rank_world()
    dataset = ShardDataset(shard_location(shard_dir) / split, batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                           rank=default_rank if rank is None else rank,
                           world_size=default_world if world_size is None else world_size,
                           mode_hint=mode_hint, drop_last=drop_last, shuffle_buffer=shuffle_buffer,
                           transform=transform, bucket=bucket, limit=limit)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=2 if num_workers else None)
