"""Length and rate control: how many time steps of each modality reach the model.

A 60-s clip is 6,000 audio steps at 100 Hz and 1,500 frames at 25 fps, and EMT's attention
is quadratic in length, so every sample is capped per modality before it is batched (in the
loader's workers for shards, at load time for MMSA pickles). Per modality:

- `pool_hz` (features mode only, optional): average consecutive steps down to about that
  rate (a window of round(rate / pool_hz) steps; a step counts as present where any step of
  its window is). Pooling keeps every step's information, at a coarser grain.
- `max_steps` (0 = no cap): longer sequences are cut to `max_steps` steps, by `how`:
  - `subsample` (default for audio and vision): `max_steps` steps spread evenly over the
    whole sequence. The label describes the whole utterance, so the model should see all of
    it; neighbouring frames at 25 fps or 100 Hz are nearly identical anyway.
  - `truncate`: the first `max_steps` steps. Text is always truncated (skipping words makes
    a different sentence), keeping its final [SEP]; raw-mode audio is always truncated,
    since the fbank and the waveform must stay contiguous for the audio CNN.

The defaults (text 128 tokens, audio 1,000 steps, vision 500 frames) leave MMSA feature
files (50 / 375-500 / 500) and clips up to 10 s of audio and 20 s of video untouched.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from msaflow.contract import MODALITIES

WAV_HOP = 160  # waveform samples per 10-ms fbank step at 16 kHz

# member groups that share one time axis, per modality and mode: (first member, members cut alike)
ALIGNED_MEMBERS = {
    ("text", "features"): ("text_ids.npy", "text.npy"),
    ("text", "raw"): ("text_ids.npy",),
    ("audio", "features"): ("audio.npy", "audio_mask.npy"),
    ("audio", "raw"): ("fbank.npy", "audio_mask.npy"),
    ("vision", "features"): ("vision.npy", "vision_mask.npy"),
    ("vision", "raw"): ("face.npy", "vision_mask.npy"),
}


class ModalityLength(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(0, ge=0, description="cap on time steps; 0 = no cap")
    how: Literal["subsample", "truncate"] = "subsample"
    pool_hz: float = Field(0.0, ge=0.0, description="features mode: average-pool steps to about this rate; 0 = off")


class LengthConfig(BaseModel):
    """Per-modality caps, recorded in the run's config.json and checkpoint."""

    model_config = ConfigDict(extra="forbid")

    text: ModalityLength = ModalityLength(max_steps=128, how="truncate")
    audio: ModalityLength = ModalityLength(max_steps=1000)
    vision: ModalityLength = ModalityLength(max_steps=500)

    @model_validator(mode="after")
    def _text_is_truncated(self) -> "LengthConfig":
        if self.text.how != "truncate" or self.text.pool_hz:
            raise ValueError("text: only `how: truncate` without pooling (skipping or averaging tokens changes the sentence)")
        if 0 < self.text.max_steps < 2:
            raise ValueError("text: max_steps must be 0 or at least 2 ([CLS] and [SEP])")
        return self


def keep_indices(n: int, max_steps: int, how: str) -> np.ndarray | None:
    """Indices of the steps kept out of n, or None when all are kept."""
    if max_steps <= 0 or n <= max_steps:
        return None
    if how == "truncate":
        return np.arange(max_steps)
    return np.floor(np.arange(max_steps) * (n / max_steps)).astype(np.int64)  # evenly spread, first step kept


def pool_steps(x: np.ndarray, present: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each window of `window` steps over its present steps; present where any step is."""
    n = len(x)
    if window <= 1 or n == 0:
        return x, present
    n_out = -(-n // window)
    pad = n_out * window - n
    weights = np.pad(present.astype(np.float32), (0, pad)).reshape(n_out, window)
    values = np.pad(x, ((0, pad), (0, 0))).reshape(n_out, window, -1)
    sums = (values * weights[..., None]).sum(1)
    counts = weights.sum(1)
    pooled = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 0.0).astype(x.dtype)
    return pooled, counts > 0


def control_sample(arrays: dict[str, np.ndarray], mode: str, cfg: LengthConfig,
                   rates: dict[str, float | None]) -> dict[str, np.ndarray]:
    """One sample's members (name -> array) with every modality capped; pure, inputs untouched."""
    out = dict(arrays)
    for modality in MODALITIES:
        members = [m for m in ALIGNED_MEMBERS[(modality, mode)] if m in out]
        if not members:
            continue
        spec: ModalityLength = getattr(cfg, modality)
        first = members[0]
        if spec.pool_hz and mode == "features" and modality != "text":
            rate = rates.get(first)
            window = int(round(rate / spec.pool_hz)) if rate else 1
            mask = f"{modality}_mask.npy"
            out[first], out[mask] = pool_steps(out[first], out[mask], window)
        if modality == "text":
            keep = keep_indices(len(out[first]), spec.max_steps, "truncate")
            if keep is not None:  # the first max_steps - 1 tokens, then the sequence's own last ([SEP])
                keep = np.append(keep[:-1], len(out[first]) - 1)
        else:
            how = "truncate" if (mode == "raw" and modality == "audio") else spec.how
            keep = keep_indices(len(out[first]), spec.max_steps, how)
        if keep is None:
            continue
        for m in members:
            out[m] = out[m][keep]
        if modality == "audio" and "wav.npy" in out:  # raw audio: the waveform of the kept fbank steps
            out["wav.npy"] = out["wav.npy"][: len(keep) * WAV_HOP]
    return out


def control_padded(tensors: dict, cfg: LengthConfig) -> dict:
    """The same caps on whole padded tensors of an in-memory split (MMSA pickles; no pooling there)."""
    import torch  # here only: the workflow config imports this module, and needs no torch

    out = dict(tensors)
    for modality, key in (("text", "text_ids"), ("audio", "audio"), ("vision", "vision")):
        spec: ModalityLength = getattr(cfg, modality)
        if key not in out or spec.max_steps <= 0 or out[key].shape[1] <= spec.max_steps:
            continue
        lengths = out[f"{modality}_lengths"]
        steps = torch.arange(spec.max_steps)
        if modality == "text":  # keep the first max_steps - 1 tokens and each row's last ([SEP])
            last = (lengths - 1).clamp(min=0)
            index = torch.minimum(steps[None, :].expand(len(lengths), -1), last[:, None])
            index[:, -1] = torch.where(lengths > spec.max_steps, last, index[:, -1])
        elif spec.how == "truncate":
            index = steps[None, :].expand(len(lengths), -1)
        else:  # per row: evenly spread over that row's own length
            spread = torch.floor(steps[None, :].double() * (lengths[:, None].double() / spec.max_steps)).long()
            index = torch.where(lengths[:, None] > spec.max_steps, spread, steps[None, :])
        gather = index if out[key].ndim == 2 else index[..., None].expand(-1, -1, out[key].shape[-1])
        out[key] = torch.gather(out[key], 1, gather)
        out[f"{modality}_lengths"] = lengths.clamp(max=spec.max_steps)
    return out
