"""What a front-end plugin imports: the `FrontEnd` base class and the `register` decorator.

The registry lives here, apart from `extractors/frontends.py` (specs, building, raw -> features),
which imports every built-in plugin so that they register: plugins import this module, never
`frontends`, so the registry has no import cycle. Read the registry through `frontends.REGISTRY`,
which is filled once `frontends` is imported.
"""

from __future__ import annotations

import hashlib
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

# the order front-ends are built, described and recorded in (index.json, chunk summaries)
MODALITIES = ("vision", "audio", "text")
INPUT_MEMBERS = {"face": "face.npy", "wav": "wav.npy", "fbank": "fbank.npy", "text_ids": "text_ids.npy"}

REGISTRY: dict[str, type[FrontEnd]] = {}


def register(cls: type[FrontEnd]) -> type[FrontEnd]:
    """Class decorator: make a front-end available under `cls.name`."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"front-end name {cls.name!r} is registered twice")
    if cls.modality not in MODALITIES or cls.input not in INPUT_MEMBERS:
        raise ValueError(f"front-end {cls.name!r}: bad modality {cls.modality!r} or input {cls.input!r}")
    REGISTRY[cls.name] = cls
    return cls


@lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached per (path, size, mtime) so repeated describe() calls are free."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def portable_name(path: Path) -> str:
    """A weights path without the machine-specific prefix: relative to its site-packages if inside one."""
    path = Path(path).resolve()
    here = Path(__file__).resolve().parent  # weights shipped in msaflow.extractors: the same name as installed
    if path.is_relative_to(here):
        return f"msaflow/extractors/{path.relative_to(here).as_posix()}"
    for root in sorted({Path(p).resolve() for p in sys.path if p}, key=lambda p: -len(p.parts)):
        if root.name in ("site-packages", "dist-packages") and path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return str(path)


class FrontEnd(nn.Module):
    """Base class: a pretrained network from one raw input to per-frame features.

    Subclasses set the class attributes, load their weights in `__init__` (never from a
    hub), and implement `forward`. `extract` runs one clip in bounded memory.
    """

    name: ClassVar[str]
    modality: ClassVar[str]  # "vision" | "audio" | "text"
    input: ClassVar[str]  # "face" | "wav" | "fbank" | "text_ids"
    licence: ClassVar[str] = ""
    chunk_steps: ClassVar[int] = 256  # time steps per forward pass when extracting one clip

    out_dim: int
    rate: float | None  # output frames per second; None for text (one row per token)
    weights_path: Path

    def __init__(self, argument: str | None = None):
        super().__init__()
        if argument is not None:
            raise ValueError(f"front-end {self.name!r} takes no argument (got {argument!r})")
        self.frozen = False

    # -- weights and training state
    def weights_sha256(self) -> str:
        return file_sha256(self.weights_path)

    def freeze(self) -> FrontEnd:
        """No gradients, eval mode kept even under a parent's .train() (BatchNorm statistics stay put)."""
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def unfreeze(self) -> FrontEnd:
        self.frozen = False
        for p in self.parameters():
            p.requires_grad_(True)
        return self.train(True)

    def train(self, mode: bool = True) -> FrontEnd:
        return super().train(mode and not self.frozen)

    @property
    def device(self) -> torch.device:
        tensor = next(iter(self.parameters()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def describe(self) -> dict:
        return {
            "name": self.name,
            "weights": portable_name(self.weights_path),
            "sha256": self.weights_sha256(),
            "dim": self.out_dim,
            "rate": self.rate,
        }

    # -- computation
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Batched input -> (B, T, out_dim); rows where `mask` is False are zeros."""
        raise NotImplementedError

    @torch.no_grad()
    def extract(self, source: np.ndarray, n_steps: int, mask: np.ndarray | None = None) -> np.ndarray:
        """One clip -> float32 (n_steps, out_dim). `source` may be a memory map; it is read chunk by chunk.

        The default walks the time axis of a frame-aligned input (one input row per output
        step) and runs only the valid steps.
        """
        if len(source) != n_steps:
            raise ValueError(f"{self.name}: input has {len(source)} steps, expected {n_steps}")
        out = np.zeros((n_steps, self.out_dim), dtype=np.float32)
        valid = np.ones(n_steps, bool) if mask is None else np.asarray(mask, bool)
        index = np.flatnonzero(valid)
        for start in range(0, len(index), self.chunk_steps):
            rows = index[start : start + self.chunk_steps]
            batch = torch.from_numpy(np.ascontiguousarray(source[rows])).to(self.device)
            out[rows] = self(batch[None])[0].float().cpu().numpy()
        return out
