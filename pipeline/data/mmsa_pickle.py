"""MMSA feature pickles (`unaligned_50.pkl` layout) → batches of the batch contract.

The file is a dict `{"train", "valid", "test"}`; each split holds `id`, `text_bert`
(N, 3, L: token ids, attention mask, segment ids), optionally `audio` (N, T_a, D_a) +
`audio_lengths` and `vision` (N, T_v, D_v) + `vision_lengths`, `regression_labels` and
optionally `regression_labels_T/A/V`. Absent modality keys are fine (that modality is
absent); `-inf`/NaN feature values become 0.

SECURITY: reading a pickle runs code stored in it. This is the format MMSA publishes, so
msaflow reads it with plain `pickle` for this input only: open only files you trust.
Everything msaflow writes itself is `.npy`/`.json`.

Audio and vision are z-scored per feature with train-split statistics over valid steps
(eps 1e-6) unless `zscore=False`: utterance-level COVAREP means span four orders of
magnitude, which an LSTM cannot read raw. (The released code does this for SIMS only.)
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from msaflow.contract import MODALITIES, SEQUENCE_MODALITIES, SPLITS

LABEL_KEYS = {"label": "regression_labels", "label_T": "regression_labels_T",
              "label_A": "regression_labels_A", "label_V": "regression_labels_V"}


class MMSAPickleError(ValueError):
    pass


@dataclass
class Split:
    """One split as padded tensors (full width); `batch(idx)` trims to the batch's longest item."""

    name: str
    ids: list[str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if (f"{m}_ids" if m == "text" else m) in self.tensors]

    def batch(self, index: torch.Tensor | list[int]) -> dict:
        index = torch.as_tensor(index, dtype=torch.long)
        out: dict = {"id": [self.ids[i] for i in index.tolist()], "index": index}
        for key, value in self.tensors.items():
            out[key] = value[index]
        if "text_ids" in out:
            width = max(int(out["text_lengths"].max()), 2)
            out["text_ids"] = out["text_ids"][:, :width]
            if "text" in out:  # precomputed per-token states share the token axis
                out["text"] = out["text"][:, :width]
        for m in SEQUENCE_MODALITIES:
            if m in out:
                t = max(int(out[f"{m}_lengths"].max()), 1)
                out[m] = out[m][:, :t]
                present = torch.arange(t)[None, :] < out[f"{m}_lengths"][:, None]
                if f"{m}_present" in out:  # shards also mark steps without data (no face, no audio)
                    present &= out[f"{m}_present"][:, :t]
                out[f"{m}_present"] = present
        return out


def _array(split: dict, key: str, path: Path, split_name: str, n: int | None) -> np.ndarray:
    value = np.asarray(split[key])
    if n is not None and len(value) != n:
        raise MMSAPickleError(f"{path}: split {split_name!r}: {key!r} has {len(value)} rows, expected {n}")
    return value


def _read_split(raw: dict, name: str, path: Path) -> Split:
    if "id" not in raw:
        raise MMSAPickleError(f"{path}: split {name!r} has no 'id' key")
    ids = [str(i) for i in np.asarray(raw["id"]).tolist()]
    n = len(ids)
    tensors: dict[str, torch.Tensor] = {}
    if "text_bert" in raw:
        tb = _array(raw, "text_bert", path, name, n)
        if tb.ndim != 3 or tb.shape[1] != 3:
            raise MMSAPickleError(f"{path}: split {name!r}: text_bert must be (N, 3, L), got {tb.shape}")
        tensors["text_ids"] = torch.from_numpy(tb[:, 0].astype(np.int64))
        tensors["text_lengths"] = torch.from_numpy(tb[:, 1].sum(axis=1).astype(np.int64))
    for m in SEQUENCE_MODALITIES:
        if m not in raw:
            continue
        x = _array(raw, m, path, name, n).astype(np.float32)
        if x.ndim != 3:
            raise MMSAPickleError(f"{path}: split {name!r}: {m} must be (N, T, D), got {x.shape}")
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        if f"{m}_lengths" in raw:
            lengths = _array(raw, f"{m}_lengths", path, name, n).astype(np.int64)
        else:
            lengths = np.full(n, x.shape[1], dtype=np.int64)
        bad = np.flatnonzero((lengths < 0) | (lengths > x.shape[1]))
        if len(bad):
            raise MMSAPickleError(f"{path}: split {name!r}: {m}_lengths out of range at row {bad[0]} (id {ids[bad[0]]})")
        tensors[m] = torch.from_numpy(x)
        tensors[f"{m}_lengths"] = torch.from_numpy(lengths)
    for key, raw_key in LABEL_KEYS.items():
        if raw_key in raw:
            labels = _array(raw, raw_key, path, name, n).astype(np.float32).reshape(n)
            bad = np.flatnonzero(~np.isfinite(labels))
            if len(bad):
                raise MMSAPickleError(f"{path}: split {name!r}: {raw_key} is not finite at row {bad[0]} (id {ids[bad[0]]})")
            tensors[key] = torch.from_numpy(labels)
    if "label" not in tensors:
        raise MMSAPickleError(f"{path}: split {name!r} has no 'regression_labels'")
    if not any(k in tensors for k in ("text_ids", "audio", "vision")):
        raise MMSAPickleError(f"{path}: split {name!r} has no modality (text_bert, audio or vision)")
    return Split(name, ids, tensors)


def zscore_stats(split: Split, modality: str, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    x, lengths = split.tensors[modality], split.tensors[f"{modality}_lengths"]
    valid = torch.arange(x.shape[1])[None, :] < lengths[:, None]
    frames = x[valid]
    return frames.mean(0), frames.std(0, unbiased=False) + eps


def load_mmsa_pickle(path: str | Path, zscore: bool = True) -> dict[str, Split]:
    """Read a trusted MMSA pickle into {"train", "valid", "test"} Splits (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MMSA pickle not found: {path}")
    with path.open("rb") as f:
        try:
            data = pickle.load(f)  # MMSA's own format; trusted input only (module docstring)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
            raise MMSAPickleError(f"{path}: not a readable MMSA feature pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise MMSAPickleError(f"{path}: expected a dict of splits, got {type(data).__name__}")
    missing = [s for s in SPLITS if s not in data]
    if missing:
        raise MMSAPickleError(f"{path}: missing split(s) {missing}; found {sorted(data)}")
    splits = {s: _read_split(data[s], s, path) for s in SPLITS}
    modalities = {s: splits[s].modalities for s in SPLITS}
    if len({tuple(v) for v in modalities.values()}) != 1:
        raise MMSAPickleError(f"{path}: splits disagree on modalities: {modalities}")
    if zscore:
        for m in SEQUENCE_MODALITIES:
            if m in splits["train"].tensors:
                mean, std = zscore_stats(splits["train"], m)
                for s in splits.values():
                    valid = torch.arange(s.tensors[m].shape[1])[None, :, None] < s.tensors[f"{m}_lengths"][:, None, None]
                    s.tensors[m] = torch.where(valid, (s.tensors[m] - mean) / std, torch.zeros(()))
    return splits


def feature_dims(split: Split) -> dict[str, int]:
    return {m: int(split.tensors[m].shape[-1]) for m in SEQUENCE_MODALITIES if m in split.tensors}


def sequence_lengths(split: Split) -> torch.Tensor:
    """Per sample, the longest of its modality sequences (what a batch is padded to)."""
    keys = [k for k in ("text_lengths", "audio_lengths", "vision_lengths") if k in split.tensors]
    return torch.stack([split.tensors[k] for k in keys]).amax(0)


def batch_indices(split: Split, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                  drop_last: bool = False, bucket: int = 8) -> list[torch.Tensor]:
    """Sample indices of each batch.

    Length bucketing (bucket > 1): samples are taken in windows of bucket × batch_size, sorted
    by length inside a window, cut into batches, and (when shuffling) the batches are shuffled:
    batches hold similar lengths, so far less compute goes to padding.
    """
    order = torch.randperm(len(split), generator=generator) if shuffle else torch.arange(len(split))
    if drop_last:
        order = order[: len(order) - len(order) % batch_size]
    if bucket > 1:
        lengths = sequence_lengths(split)
        window = bucket * batch_size
        order = torch.cat([w[torch.argsort(lengths[w], stable=True)] for w in order.split(window)]) if len(order) else order
    batches = list(order.split(batch_size))
    if shuffle and bucket > 1:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def iterate_batches(split: Split, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                    drop_last: bool = False, bucket: int = 8):
    for index in batch_indices(split, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                               bucket=bucket):
        yield split.batch(index)
