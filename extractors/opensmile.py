"""Optional audio front-end: openSMILE eGeMAPSv02 low-level descriptors (25 per 10 ms step).

Never a default: openSMILE is free for research and education only (audEERING's licence),
and it is an optional extra (`pip install opensmile`). Row t holds the descriptors of the
analysis frame starting at 10*t ms (openSMILE's 10 ms step); openSMILE yields a few rows
fewer than the fbank grid at the end of a clip (its longest window is 60 ms), those last
steps repeat its last row.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from msaflow.extractors.frontend_base import FrontEnd, register

SAMPLE_RATE = 16_000
N_DESCRIPTORS = 25


def _require_opensmile():
    if importlib.util.find_spec("opensmile") is None:
        raise ModuleNotFoundError(
            "front-end egemaps needs the optional `opensmile` package (research/education licence): "
            "pip install opensmile  (its wheel bundles the openSMILE library; no download at run time)"
        )
    import opensmile

    return opensmile


@register
class EGeMAPSFrontEnd(FrontEnd):
    name = "egemaps"
    modality = "audio"
    input = "wav"
    licence = "openSMILE: research and education only (audEERING); eGeMAPS by Eyben et al. 2016"

    def __init__(self, argument: str | None = None):
        super().__init__(argument)
        opensmile = _require_opensmile()
        self.smile = opensmile.Smile(
            feature_set=opensmile.FeatureSet.eGeMAPSv02,
            feature_level=opensmile.FeatureLevel.LowLevelDescriptors,
        )
        # The configuration file is what fixes the descriptors: hash it as the "weights".
        self.weights_path = Path(self.smile.config_path)
        self.descriptor_names = list(self.smile.feature_names)
        self.out_dim, self.rate = len(self.descriptor_names), 100.0

    def _descriptors(self, wave: np.ndarray, n_steps: int) -> np.ndarray:
        signal = np.asarray(wave)
        signal = signal.astype(np.float32) / 32768.0 if signal.dtype == np.int16 else signal.astype(np.float32)
        rows = self.smile.process_signal(signal, SAMPLE_RATE).to_numpy(np.float32)
        out = np.zeros((n_steps, self.out_dim), np.float32)
        if len(rows):
            take = min(len(rows), n_steps)
            out[:take] = rows[:take]
            out[take:] = rows[take - 1]
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) waveforms -> (B, T, 25); not differentiable (openSMILE is C++)."""
        n_steps = mask.shape[1] if mask is not None else int(round(x.shape[1] / 160))
        out = torch.stack([torch.from_numpy(self._descriptors(w.cpu().numpy(), n_steps)) for w in x]).to(x.device)
        return out if mask is None else out * mask[..., None].to(out.dtype)

    def extract(self, source: np.ndarray, n_steps: int, mask: np.ndarray | None = None) -> np.ndarray:
        if len(source) == 0:
            return np.zeros((n_steps, self.out_dim), np.float32)
        out = self._descriptors(source, n_steps)
        if mask is not None:
            out[~np.asarray(mask, bool)] = 0.0
        return out
