"""One data path for `msaflow train`, `evaluate` and `predict`: batches of the batch contract.

`open_source(path, lengths)` gives a `ShardSource` for a shard folder or a `PickleSource` for
an MMSA feature pickle; both answer the same three questions:

- `batches(split, batch_size, ...)`: this process's batches of a split, one epoch. Shards are
  streamed by the loader (`msaflow.pipeline.data.loader`): each rank reads its own share of the
  shards, exactly once per epoch, and nothing holds a whole split. A pickle is small and is
  read whole; under DDP each rank takes its block of rows of every global batch.
- `fit_normaliser()`: the z-scoring statistics of audio/vision features, fit on the train
  split's present steps in one streaming pass (float64 sums), stored in the run folder
  (`normaliser.json`) and reused by evaluation and prediction, which never open train.
- `modalities` / `feature_dims`: what the model is built for.

Length control (`msaflow.pipeline.data.lengths`) is applied to every sample before batching.
Weight-0 rows (the loader's top-up of a short last step, `weight` in the batch) are padding
for DDP and never count in a loss sum or a metric.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from msaflow.contract import SEQUENCE_MODALITIES, SPLITS
from msaflow.pipeline.data.lengths import LengthConfig, control_padded, control_sample
from msaflow.pipeline.data.loader import make_loader
from msaflow.pipeline.data.mmsa_pickle import (
    MMSAPickleError, Split, batch_indices, feature_dims, load_mmsa_pickle, zscore_stats,
)
from msaflow.pipeline.data.shard_index import ShardError, ShardLocation, SplitIndex, shard_location

NORMALISED = SEQUENCE_MODALITIES  # z-scored per feature; text is token ids
NORMALISER_FILE = "normaliser.json"
PICKLE_SUFFIXES = (".pkl", ".pickle")
EVAL_BATCH = 64


class DataError(ValueError):
    """--data is not a shard folder or an MMSA pickle, or lacks what the run needs."""


# ---------------------------------------------------------------- normalisation


@dataclass
class Normaliser:
    """Per-feature z-scoring of audio/vision over present steps: (x - mean) / (std + eps); absent steps 0."""

    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # modality -> (mean, std+eps)

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        for m, (mean, std) in self.stats.items():
            if m in batch:
                present = batch[f"{m}_present"]
                out[m] = torch.where(present[..., None], (batch[m] - mean) / std, torch.zeros(()))
        return out

    def to_json(self) -> dict:
        return {m: {"mean": mean.tolist(), "std": std.tolist()} for m, (mean, std) in self.stats.items()}

    @classmethod
    def from_json(cls, d: dict) -> "Normaliser":
        return cls({m: (torch.tensor(v["mean"]), torch.tensor(v["std"])) for m, v in d.items()})

    def save(self, run_dir: Path) -> None:
        from msaflow.tario import write_json_atomic

        write_json_atomic(run_dir / NORMALISER_FILE, self.to_json())

    @classmethod
    def load(cls, run_dir: Path) -> "Normaliser":
        path = Path(run_dir) / NORMALISER_FILE
        if not path.is_file():
            raise DataError(f"{run_dir}: no {NORMALISER_FILE} (the train-split statistics the run normalised "
                            f"with); run its `msaflow train` command again to add it (it resumes, nothing is retrained)")
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


def streaming_stats(batches, modalities=NORMALISED, eps: float = 1e-6) -> Normaliser:
    """Mean and population std per feature over the present steps of every batch (float64 sums)."""
    sums: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        keep = batch["weight"] > 0 if "weight" in batch else None
        for m in modalities:
            if m not in batch:
                continue
            present = batch[f"{m}_present"] if keep is None else batch[f"{m}_present"] & keep[:, None]
            x = batch[m][present].double()
            acc = sums.setdefault(m, [torch.zeros(()), torch.zeros(x.shape[-1]), torch.zeros(x.shape[-1])])
            acc[0] += len(x)
            acc[1] += x.sum(0)
            acc[2] += (x * x).sum(0)
    stats = {}
    for m, (n, s, ss) in sums.items():
        if n == 0:
            continue
        mean = s / n
        var = (ss / n - mean * mean).clamp(min=0)
        stats[m] = (mean.float(), (var.sqrt() + eps).float())
    return Normaliser(stats)


# ---------------------------------------------------------------- sources


def keep_real(batch: dict) -> dict:
    """The batch without its weight-0 rows (the loader's top-up for an even split over ranks)."""
    weight = batch.get("weight")
    if weight is None or bool((weight > 0).all()):
        return batch
    rows = torch.nonzero(weight > 0).flatten()
    n = len(weight)
    return {k: (v[rows] if isinstance(v, torch.Tensor) and len(v) == n else
                [v[i] for i in rows.tolist()] if isinstance(v, list) and len(v) == n else v)
            for k, v in batch.items()}


class ShardSource:
    """A shard folder, streamed split by split."""

    def __init__(self, shard_dir: str | Path, lengths: LengthConfig, *, limit: int = 0, workers: int = 0,
                 bucket: int = 8, shuffle_buffer: int | None = None, pin_memory: bool = False):
        self.path, self.lengths, self.limit, self.workers = shard_location(shard_dir), lengths, limit, workers
        self.bucket, self.shuffle_buffer = bucket, shuffle_buffer
        self.pin_memory = pin_memory  # page-locked batches: copies to a GPU run asynchronously
        self.index = {}
        for s in SPLITS:  # a local folder or a URL (s3://, http(s)://, pipe:)
            try:
                self.index[s] = SplitIndex.load(self.path / s).limited(limit)
            except ShardError as exc:
                raise DataError(f"{self.path}: no readable shards for split {s!r} ({exc})") from exc
        self.mode = self.index["train"].mode
        self.eval_batch_size = EVAL_BATCH if self.mode == "features" else 16  # raw samples weigh megabytes
        self._transform = partial(_control, mode=self.mode, cfg=lengths, rates=self.index["train"].rates)

    def __len__(self) -> int:
        return self.index["train"].n_samples

    def size(self, split: str) -> int:
        return self.index[split].n_samples

    @property
    def modalities(self) -> list[str]:
        """Modalities the fusion model reads directly (raw members need an end-to-end front-end)."""
        members = self.index["train"].members
        return [m for m, member in (("text", "text_ids.npy"), ("audio", "audio.npy"), ("vision", "vision.npy"))
                if member in members]

    def feature_dims(self) -> dict[str, int]:
        shapes = self.index["train"].shapes
        return {m: int(shapes[f"{m}.npy"][-1]) for m in NORMALISED if shapes.get(f"{m}.npy")}

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, epoch: int = 0, seed: int = 0,
                drop_last: bool = False, rank: int = 0, world_size: int = 1, generator=None) -> Iterator[dict]:
        """This rank's batches; `batch_size` is the global batch (split evenly over ranks)."""
        if drop_last and batch_size % world_size:  # training: every rank's share of a step alike
            raise DataError(f"batch size {batch_size} does not split over {world_size} processes: "
                            f"make --batch-size a multiple of the process count")
        if self.index[split].n_samples == 0:
            return iter(())
        loader = make_loader(self.path, split, -(-batch_size // world_size), shuffle=shuffle, seed=seed, epoch=epoch,
                             num_workers=self.workers, rank=rank, world_size=world_size, drop_last=drop_last,
                             transform=self._transform, bucket=self.bucket, limit=self.limit,
                             shuffle_buffer=self.shuffle_buffer, pin_memory=self.pin_memory)
        return iter(loader)

    def first_batch(self, split: str, n: int) -> dict | None:
        """The split's first `n` samples as one batch (None if it is empty), read without the
        bucketing window or workers: a look at what a split holds that reads only those samples."""
        if self.index[split].n_samples == 0:
            return None
        limit = min(n, self.limit) if self.limit else n
        return next(iter(make_loader(self.path, split, n, shuffle=False, rank=0, world_size=1, limit=limit)), None)

    def fit_normaliser(self) -> Normaliser:
        return streaming_stats(self.batches("train", EVAL_BATCH))


def _control(arrays, *, mode, cfg, rates):  # module level: DataLoader workers pickle the transform
    return control_sample(arrays, mode, cfg, rates)


class PickleSource:
    """An MMSA feature pickle, read whole (the format is small); batches cut from memory."""

    mode = "features"
    eval_batch_size = EVAL_BATCH

    def __init__(self, path: str | Path, lengths: LengthConfig, *, limit: int = 0):
        self.path, self.lengths = Path(path), lengths
        # caps work row by row, so capping whole splits and then taking the first `limit` rows
        # equals capping those rows; the statistics are fit on the whole capped train split
        try:
            splits = load_mmsa_pickle(self.path, zscore=False)
        except MMSAPickleError as exc:  # a user's file, not a bug: one line naming it
            raise DataError(str(exc)) from exc
        capped = {k: Split(s.name, s.ids, control_padded(s.tensors, lengths)) for k, s in splits.items()}
        train = capped["train"]
        self._normaliser = Normaliser({m: zscore_stats(train, m) for m in NORMALISED if m in train.tensors})
        keep = slice(limit) if limit > 0 else slice(None)
        self.splits = {k: Split(s.name, s.ids[keep], {t: v[keep] for t, v in s.tensors.items()})
                       for k, s in capped.items()}

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def __len__(self) -> int:
        return len(self.splits["train"])

    @property
    def modalities(self) -> list[str]:
        return self.splits["train"].modalities

    def feature_dims(self) -> dict[str, int]:
        return feature_dims(self.splits["train"])

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, epoch: int = 0, seed: int = 0,
                drop_last: bool = False, rank: int = 0, world_size: int = 1, generator=None) -> Iterator[dict]:
        """Global batches as `batch_indices` cuts them (`generator` shuffles); under DDP this
        rank's contiguous block of rows of each (for training the global batch must split evenly)."""
        data = self.splits[split]
        for index in batch_indices(data, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last):
            if world_size > 1:
                if drop_last and len(index) % world_size:
                    raise DataError(f"batch of {len(index)} samples does not split over {world_size} processes: "
                                    f"make --batch-size a multiple of the process count")
                index = index.tensor_split(world_size)[rank]
                if len(index) == 0:
                    continue
            yield {**data.batch(index), "weight": torch.ones(len(index))}

    def first_batch(self, split: str, n: int) -> dict | None:
        """The split's first `n` samples as one batch (None if it is empty)."""
        return next(self.batches(split, n), None)

    def fit_normaliser(self) -> Normaliser:
        """Statistics over the whole train split at once (before `limit`), as for pickles before."""
        return self._normaliser


def is_url(path: str | Path) -> bool:
    """A shard folder named by URL (s3://, http(s)://, pipe:...), read through the loader."""
    return isinstance(shard_location(path), ShardLocation)


def data_exists(path: str | Path) -> bool:
    """Whether --data names something: a local file or folder, or any URL (read to find out)."""
    return is_url(path) or Path(path).exists()


def read_index(path: str | Path, split: str) -> dict:
    """The raw `index.json` of one split of a local or remote shard folder (ShardError if unreadable)."""
    from msaflow.pipeline.data.shard_index import open_shard_file

    location = shard_location(path) / split / "index.json"
    try:
        with open_shard_file(location) as f:
            return json.loads(f.read().decode("utf-8"))
    except ShardError:
        raise
    except Exception as exc:  # missing, unreadable, bad JSON, a remote back-end's own error
        raise ShardError(f"{location}: unreadable index.json ({exc})") from exc


def is_shard_dir(path: str | Path) -> bool:
    """A local shard folder (a URL is taken to be one: reading its index says whether it is)."""
    if isinstance(shard_location(path), ShardLocation):
        return True
    path = Path(path)
    return path.is_dir() and any((path / s / "index.json").is_file() for s in SPLITS)


def open_source(path: str | Path, lengths: LengthConfig | None = None, *, limit: int = 0, workers: int = 0,
                bucket: int = 8, shuffle_buffer: int | None = None, pin_memory: bool = False):
    """The shard folder or MMSA pickle at `path` as a data source (see the module docstring)."""
    lengths = lengths or LengthConfig()
    if is_shard_dir(path):
        return ShardSource(path, lengths, limit=limit, workers=workers, bucket=bucket, shuffle_buffer=shuffle_buffer,
                           pin_memory=pin_memory)
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder without <split>/index.json: not a shard folder written by `msaflow shards`")
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise DataError(f"{path}: --data is a shard folder or an MMSA feature pickle named *.pkl / *.pickle "
                        f"(a pickle runs code when it is loaded, so msaflow opens only files named as one)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    warn_pickle_once(path)
    return PickleSource(path, lengths, limit=limit)


_WARNED: set[str] = set()


def warn_pickle_once(path: Path) -> None:
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        logging.getLogger("msaflow.data").warning(
            f"note: {path} is a pickle; loading it runs code stored in it: use pickles from trusted sources only")
