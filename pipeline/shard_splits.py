"""WebDataset shards → the in-memory `Split`s that `msaflow train` / `evaluate` iterate.

The streaming loader (`msaflow.pipeline.loader`) reads and checks every shard; the batches
it yields are concatenated here into one padded tensor per member and split, so the
training loop, the fixed per-sample missing masks (keyed by sample index) and the
evaluation code run unchanged on shards and on MMSA pickles. Features-mode shards of a
corpus the size of CMU-MOSEI fit in memory easily; raw-mode shards keep uint8 crops.

Features-mode audio/vision are z-scored per feature with train-split statistics over the
steps that hold data (eps 1e-6), as for pickles; the `*_present` masks from the shards (no
face in a frame, no audio in the clip) are kept, so a missing step is never mistaken for data.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from msaflow.pipeline.loader import make_loader
from msaflow.pipeline.mmsa_pickle import SPLITS, Split

# batch keys whose first axis after the batch one is time, with the lengths that bound it
TIME_KEYS = {"text_ids": "text_lengths", "text": "text_lengths", "audio": "audio_lengths",
             "audio_present": "audio_lengths", "vision": "vision_lengths", "vision_present": "vision_lengths",
             "face": "vision_lengths", "fbank": "audio_lengths", "wav": "wav_lengths"}
OPTIONAL_LABELS = ("label_T", "label_A", "label_V")


def is_shard_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / s / "index.json").is_file() for s in SPLITS)


def shard_mode(path: str | Path) -> str:
    for s in SPLITS:
        index = Path(path) / s / "index.json"
        if index.is_file():
            return json.loads(index.read_text(encoding="utf-8"))["mode"]
    raise FileNotFoundError(f"{path}: no <split>/index.json (not a shard folder)")


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    longest = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = torch.zeros((t.shape[0], longest - t.shape[1], *t.shape[2:]), dtype=t.dtype)
        padded.append(torch.cat([t, pad], dim=1))
    return torch.cat(padded)


def read_split(shard_dir: str | Path, split: str, batch_size: int = 64) -> Split:
    ids, batches = [], []
    for batch in make_loader(shard_dir, split, batch_size, shuffle=False, rank=0, world_size=1):
        ids += batch["id"]
        batches.append(batch)
    parts: dict[str, list[torch.Tensor]] = {}
    keys = {k for b in batches for k, v in b.items() if isinstance(v, torch.Tensor) and k != "weight"}
    for batch in batches:
        for key in sorted(keys):
            if key in batch:
                parts.setdefault(key, []).append(batch[key])
            elif key in OPTIONAL_LABELS:  # a batch whose clips have no per-modality label: NaN rows
                parts.setdefault(key, []).append(torch.full((len(batch["id"]),), float("nan")))
            else:
                raise ValueError(f"{shard_dir}/{split}: member {key!r} missing from some samples")
    tensors = {k: (_pad_cat(v) if k in TIME_KEYS else torch.cat(v)) for k, v in parts.items()}
    labels = tensors.get("label")
    if labels is not None and torch.isnan(labels).any():
        missing = [ids[i] for i in torch.nonzero(torch.isnan(labels)).flatten().tolist()[:5]]
        raise ValueError(f"{shard_dir}/{split}: unlabeled samples cannot train or be scored (e.g. {missing})")
    return Split(split, ids, tensors)


def zscore_features(splits: dict[str, Split], eps: float = 1e-6) -> None:
    """In place: audio/vision features standardised with train statistics over present steps."""
    for m in ("audio", "vision"):
        train = splits["train"].tensors
        if m not in train or len(splits["train"]) == 0:
            continue
        frames = train[m][train[f"{m}_present"]]
        if len(frames) == 0:
            continue
        mean, std = frames.mean(0), frames.std(0, unbiased=False) + eps
        for s in splits.values():
            x, present = s.tensors[m], s.tensors[f"{m}_present"]
            s.tensors[m] = torch.where(present[..., None], (x - mean) / std, torch.zeros(()))


def load_shard_splits(shard_dir: str | Path, zscore: bool = True) -> dict[str, Split]:
    """{"train", "valid", "test"} Splits from `shard_dir/<split>/` (every split must exist)."""
    missing = [s for s in SPLITS if not (Path(shard_dir) / s / "index.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{shard_dir}: no shards for split(s) {missing}")
    splits = {s: read_split(shard_dir, s) for s in SPLITS}
    if zscore and shard_mode(shard_dir) == "features":
        zscore_features(splits)
    return splits


def load_splits(path: str | Path, zscore: bool = True) -> dict[str, Split]:
    """The train/valid/test splits of a shard folder or of an MMSA feature pickle."""
    if is_shard_dir(path):
        return load_shard_splits(path, zscore=zscore)
    from msaflow.pipeline.mmsa_pickle import load_mmsa_pickle

    return load_mmsa_pickle(path, zscore=zscore)
