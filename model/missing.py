"""Missing-feature simulation and additive-noise corruption of a batch (batch contract).

Missing features (the EMT-DLFR protocol): every *valid* position of every modality is
dropped independently with probability r. Valid = before the sequence's length; for text
also not [CLS] (first) nor [SEP] (last). A dropped token becomes [UNK], a dropped audio or
vision step becomes zeros; lengths and padding masks stay as they are. The drop masks go
into the batch as `<modality>_missing` (B, T) bool so the reconstruction loss can find them.

The rate is one number for the whole batch (the EMT-DLFR protocols), or per sample and per
modality: a (B,) tensor, or a dict modality -> number or (B,) tensor (the `lnln` protocol:
every sample and modality its own rate, pipeline/training/protocols.py).

Two ways to draw the masks:
- `generator`: a fresh draw per call (training default: a new mask every batch);
- `seed`: fixed per sample — the uniforms come from a generator seeded by (seed, modality,
  sample id), so every model, batch size and batch order sees the same corrupted split.
  Masks are nested across rates (a token dropped at r=0.3 is dropped at r=0.5 too).

Noise (DynMM's robustness setting): audio/vision get `level * N(0, 1)` added at their
valid positions, on the model's input scale (z-scored features by default); text is untouched.
"""

from __future__ import annotations

import zlib
from typing import Callable

import numpy as np
import torch

from msaflow.contract import MODALITIES, SEQUENCE_MODALITIES, UNK_ID

# per-modality seed offsets of the released code (text/audio/vision)
MODALITY_SEEDS = {"text": 111, "audio": 1111, "vision": 11111}


def valid_positions(batch: dict, modality: str) -> torch.Tensor:
    """(B, T) bool on the batch's device: positions a corruption may touch."""
    if modality == "text":
        ids = batch["text_ids"]
        lengths = batch["text_lengths"]
        pos = torch.arange(ids.shape[1], device=lengths.device)[None, :]
        return (pos >= 1) & (pos < lengths[:, None] - 1)
    lengths = batch[f"{modality}_lengths"]
    pos = torch.arange(batch[modality].shape[1], device=lengths.device)[None, :]
    return pos < lengths[:, None]


def _width(batch: dict, modality: str) -> int:
    return batch["text_ids"].shape[1] if modality == "text" else batch[modality].shape[1]


def present_modalities(batch: dict) -> list[str]:
    return [m for m in MODALITIES if (f"{m}_ids" if m == "text" else m) in batch]


def sample_uniforms(ids: list[str], width: int, seed: int, modality: str) -> torch.Tensor:
    """(B, width) uniforms, a pure function of (seed, modality, id); prefixes agree across widths."""
    rows = []
    for sample_id in ids:
        key = zlib.crc32(f"{seed}/{MODALITY_SEEDS[modality]}/{sample_id}".encode())
        rows.append(np.random.default_rng(key).random(width))
    return torch.from_numpy(np.stack(rows)).float() if rows else torch.zeros(0, width)


def _uniforms(batch: dict, modality: str, generator: torch.Generator | None, seed: int | None) -> torch.Tensor:
    width = _width(batch, modality)
    if seed is not None:
        return sample_uniforms(list(batch["id"]), width, seed, modality)
    return torch.rand(len(batch["id"]), width, generator=generator)


Rate = float | torch.Tensor | dict  # one rate, (B,) per-sample rates, or modality -> either


def modality_rate(rate: Rate, modality: str, n: int):
    """The rate of `modality` as a float or an (n,) float32 tensor; checked to lie in [0, 1]."""
    r = rate.get(modality, 0.0) if isinstance(rate, dict) else rate
    if isinstance(r, torch.Tensor):
        r = r.detach().float().cpu().reshape(-1)
        if r.numel() != n:
            raise ValueError(f"{modality}: {r.numel()} per-sample missing rates for a batch of {n}")
        if r.numel() and not (0.0 <= float(r.min()) and float(r.max()) <= 1.0):
            raise ValueError(f"{modality}: missing rates must lie in [0, 1], got {float(r.min())} ... {float(r.max())}")
        return r
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"missing rate must lie in [0, 1], got {r}")
    return r


def drop_masks(batch: dict, rate: Rate, *, generator: torch.Generator | None = None,
               seed: int | None = None, modalities: list[str] | None = None) -> dict[str, torch.Tensor]:
    """modality -> (B, T) bool, True where the position is dropped (always a valid position).
    `rate`: one rate, (B,) per-sample rates, or a dict modality -> either (absent modality: 0)."""
    n = len(batch["id"])
    chosen = modalities or present_modalities(batch)
    rates = {m: modality_rate(rate, m, n) for m in chosen}  # checked before any draw
    masks = {}
    for m in chosen:
        valid = valid_positions(batch, m)
        r = rates[m]
        # drawn on the CPU whatever the batch's device, so a seed gives the same masks everywhere
        u = _uniforms(batch, m, generator, seed)
        masks[m] = (u < (r[:, None] if isinstance(r, torch.Tensor) else r)).to(valid.device) & valid
    return masks


def apply_drop(batch: dict, masks: dict[str, torch.Tensor], unk_id: int) -> dict:
    """A new batch with the masked positions dropped; the input batch is not modified."""
    out = dict(batch)
    for m, mask in masks.items():
        if m == "text":
            out["text_ids"] = batch["text_ids"].masked_fill(mask, unk_id)
            if "text" in batch:  # precomputed states (features mode): a dropped token's state is zeros
                out["text"] = batch["text"].masked_fill(mask[..., None], 0.0)
        else:
            out[m] = batch[m].masked_fill(mask[..., None], 0.0)
        out[f"{m}_missing"] = mask
    return out


def simulate_missing(batch: dict, rate: Rate, *, unk_id: int = UNK_ID, generator: torch.Generator | None = None,
                     seed: int | None = None) -> dict:
    return apply_drop(batch, drop_masks(batch, rate, generator=generator, seed=seed), unk_id)


def add_noise(batch: dict, level: float, *, unk_id: int = UNK_ID, generator: torch.Generator | None = None,
              seed: int | None = None) -> dict:
    if level < 0:
        raise ValueError(f"noise level must be >= 0, got {level}")
    out = dict(batch)
    for m in SEQUENCE_MODALITIES:
        if m not in batch:
            continue
        x = batch[m]
        if seed is not None:
            noise = _per_sample_normals(list(batch["id"]), x.shape[1:], seed, m)
        else:
            noise = torch.randn(x.shape, generator=generator)
        out[m] = x + level * noise.to(x.device) * valid_positions(batch, m)[..., None]
    return out


def _per_sample_normals(ids: list[str], shape: tuple[int, ...], seed: int, modality: str) -> torch.Tensor:
    rows = []
    for sample_id in ids:
        key = zlib.crc32(f"noise/{seed}/{MODALITY_SEEDS[modality]}/{sample_id}".encode())
        rows.append(np.random.default_rng(key).standard_normal(tuple(shape)))
    return torch.from_numpy(np.stack(rows)).float()


# corruption name -> function(batch, level, *, unk_id, generator, seed) -> corrupted batch
CORRUPTIONS: dict[str, Callable[..., dict]] = {"missing": simulate_missing, "noise": add_noise}


def corrupt(batch: dict, kind: str, level: float, **kw) -> dict:
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; known: {sorted(CORRUPTIONS)}")
    return CORRUPTIONS[kind](batch, level, **kw)
