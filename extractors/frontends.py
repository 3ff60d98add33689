"""Pretrained front-ends: one registered class each, and the raw -> features conversion.

A front-end maps one raw-mode member of a clip (face crops, waveform, fbank or token ids)
to per-frame features. The same object serves frozen extraction (`msaflow extract --mode
features`) and end-to-end training (`unfreeze()`): adding a front-end is adding a class
decorated with `@register`.

Spec strings name one front-end per modality: "face=fer,audio=crepe-tiny,text=minilm";
"face" is an alias of "vision", and a front-end that takes an argument (a local model
folder, for instance) is written "name:argument" ("text=hf-text:/models/bert").
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

MODALITIES = ("vision", "audio", "text")
MODALITY_ALIASES = {"face": "vision", "video": "vision", "vision": "vision", "audio": "audio", "text": "text"}
INPUT_MEMBERS = {"face": "face.npy", "wav": "wav.npy", "fbank": "fbank.npy", "text_ids": "text_ids.npy"}
MASK_MEMBERS = {"vision": "vision_mask.npy", "audio": "audio_mask.npy"}
DEFAULT_SPEC = "face=fer,audio=crepe-tiny,text=minilm"

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


# ------------------------------------------------------------------------- specs


def parse_spec(spec: str | None) -> dict[str, str]:
    """'face=fer,audio=crepe-tiny' -> {'vision': 'fer', 'audio': 'crepe-tiny', 'text': 'minilm'}.

    Modalities left out keep their default front-end.
    """
    result = dict(_parse_pairs(DEFAULT_SPEC))
    if spec:
        result.update(_parse_pairs(spec))
    return check_spec(result)


def check_spec(spec: dict[str, str]) -> dict[str, str]:
    """`spec` itself, once every modality and front-end name in it is known and consistent."""
    for modality, entry in spec.items():
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r} in front-end spec (use {', '.join(MODALITIES)})")
        name = entry.split(":", 1)[0]
        if name not in REGISTRY:
            raise ValueError(
                f"unknown front-end {name!r} for {modality}; registered: {', '.join(sorted(REGISTRY))}"
            )
        if REGISTRY[name].modality != modality:
            raise ValueError(
                f"front-end {name!r} is a {REGISTRY[name].modality} front-end, not {modality}; "
                f"{modality} front-ends: {', '.join(n for n, c in sorted(REGISTRY.items()) if c.modality == modality)}"
            )
    return spec


def _parse_pairs(spec: str) -> list[tuple[str, str]]:
    pairs = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip():
            raise ValueError(f"front-end spec {spec!r}: {item!r} is not MODALITY=NAME")
        modality = MODALITY_ALIASES.get(key.strip().lower())
        if modality is None:
            raise ValueError(f"front-end spec {spec!r}: unknown modality {key!r} (use face/vision, audio, text)")
        pairs.append((modality, value.strip()))
    return pairs


def build(spec: dict[str, str] | str | None, device: str | torch.device = "cpu") -> dict[str, FrontEnd]:
    """Instantiate the front-ends of a spec: frozen, in eval mode, on `device`.

    A string spec fills the modalities it leaves out with the defaults; a dict builds
    exactly the modalities it names (end-to-end training may want vision and audio only).
    """
    spec = check_spec(dict(spec)) if isinstance(spec, dict) else parse_spec(spec)
    built = {}
    for modality in MODALITIES:
        if modality not in spec:
            continue
        name, _, argument = spec[modality].partition(":")
        built[modality] = REGISTRY[name](argument or None).freeze().to(device)
    return built


def describe(frontends: dict[str, FrontEnd]) -> dict:
    """{modality: {"name", "weights", "sha256", "dim", "rate"}}, as index.json records it."""
    return {modality: fe.describe() for modality, fe in frontends.items()}


# ------------------------------------------------------------- raw -> features


def _load(value, member: str) -> np.ndarray:
    """An array member given as an array or as the path of a .npy file (memory-mapped)."""
    if isinstance(value, (str, os.PathLike)):
        try:
            return np.load(value, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"member {member}: cannot read {value}: {err}") from err
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"member {member}: expected a numpy array or a .npy path, got {type(value).__name__}")


def raw_to_features(members: dict, frontends: dict[str, FrontEnd], timings: dict[str, float] | None = None) -> dict:
    """Features-mode members of one clip from its raw-mode members (docs/data-contracts.md §3).

    Frame counts are the raw ones: a front-end's rows follow its modality's mask (vision
    T_v, audio T_a on the fbank grid, text one row per token). Masked steps are zero rows.
    `timings`, when given, accumulates seconds per modality.
    """
    meta = dict(members["json"])
    out: dict = {}
    for modality in MODALITIES:
        if modality not in frontends:
            continue
        fe = frontends[modality]
        member = INPUT_MEMBERS[fe.input]
        if member not in members:
            raise KeyError(f"{meta.get('id', '?')}: raw member {member} missing (needed by front-end {fe.name})")
        source = _load(members[member], member)
        mask_member = MASK_MEMBERS.get(modality)
        mask = np.asarray(_load(members[mask_member], mask_member), bool) if mask_member else None
        n_steps = len(mask) if mask is not None else len(source)
        started = time.perf_counter()
        try:
            features = fe.extract(source, n_steps, mask)
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"{meta.get('id', '?')}: front-end {fe.name} on {member}: {err}") from err
        if timings is not None:
            timings[modality] = timings.get(modality, 0.0) + time.perf_counter() - started
        out[f"{modality}.npy"] = features
        if mask_member:
            out[mask_member] = mask
    if "text_ids.npy" in members:
        out["text_ids.npy"] = np.asarray(_load(members["text_ids.npy"], "text_ids.npy"), dtype=np.int64)
    meta["mode"] = "features"
    meta["frontends"] = describe(frontends)
    out["json"] = meta
    return out


# The built-in front-ends register themselves on import.
from msaflow.extractors import crepe, facenet, fer, opensmile, text_frontend  # noqa: E402,F401
