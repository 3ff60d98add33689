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

import os
import time

import numpy as np
import torch

# The built-in front-ends register themselves on import (the registry is frontend_base's).
from msaflow.extractors import crepe, facenet, fer, opensmile, text_frontend  # noqa: F401
from msaflow.extractors.frontend_base import INPUT_MEMBERS, MODALITIES, REGISTRY, FrontEnd
from msaflow.extractors.frontend_base import register  # noqa: F401 (front-ends outside the package import it from here)

MODALITY_ALIASES = {"face": "vision", "video": "vision", "vision": "vision", "audio": "audio", "text": "text"}
MASK_MEMBERS = {"vision": "vision_mask.npy", "audio": "audio_mask.npy"}
DEFAULT_SPEC = "face=fer,audio=crepe-tiny,text=minilm"


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
