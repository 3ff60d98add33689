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

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from msaflow.pipeline.data.shard_index import MEMBER_SPECS, SplitIndex, shard_location
from msaflow.pipeline.data.shard_reader import Sample, read_shard


LABEL_KEYS = ("label_T", "label_A", "label_V")
# Samples a shuffle buffer holds per worker: a raw sample (face crops) weighs megabytes.
DEFAULT_SHUFFLE_BUFFER = {"features": 1000, "raw": 128}


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
        if self.transform is not None:  # length control first: the shuffle buffer holds capped samples
            samples = (replace(s, arrays=self.transform(s.arrays)) for s in samples)
        if self.shuffle and self.buffer_size > 1:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
            samples = shuffle_buffer(samples, self.buffer_size, rng)
        samples = iter(samples)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
        window = max(self.bucket, 1)
        for start in range(0, len(sizes), window):
            group = sizes[start: start + window]
            taken = [next(samples) for _ in range(sum(group))]
            batches = bucketed(taken, group) if window > 1 else cut(taken, group)
            order = rng.permutation(len(batches)) if (self.shuffle and window > 1) else range(len(batches))
            for i in order:
                yield collate(batches[i], self.index.members)


def cut(samples: list, sizes: list[int]) -> list[list]:
    """`samples` cut in order into consecutive batches of `sizes`."""
    cuts = np.cumsum([0, *sizes])
    return [samples[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def bucketed(samples: list[Sample], sizes: list[int]) -> list[list[Sample]]:
    """Length bucketing: batches of `sizes` (in that order) filled from the samples sorted by length.

    Similar lengths share a batch, so padding stays small. A short batch (a split's last)
    takes the shortest samples, so the longest ones fill a whole batch: the widest batch
    shape, which sets peak memory, is then the same for a small split as for a large one."""
    ranked = sorted(samples, key=sample_length)
    by_size = sorted(range(len(sizes)), key=lambda i: sizes[i])  # stable: equal sizes keep their order
    batches: list[list[Sample]] = [[] for _ in sizes]
    for i, batch in zip(by_size, cut(ranked, [sizes[i] for i in by_size])):
        batches[i] = batch
    return batches


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
