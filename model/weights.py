"""Weights as a run stores them: a frozen pretrained text encoder is left out and rebuilt at load.

A frozen text encoder (MiniLM: 90 MB) never changes in training, so without this every
best.pt and last.pt of every run would hold one more copy of the same pretrained weights
(a sweep of 300 runs: 55 GB). The state dict stores, instead of those tensors, a fingerprint
of them (SHA-256 over names and bytes) under `FINGERPRINT_KEY`; loading rebuilds the encoder
from the local text model, as building the model does anyway, and refuses a model whose
frozen encoder's fingerprint differs (other pretrained weights installed than the run used).
A state dict without the key (weights saved whole) loads as it always did.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

FINGERPRINT_KEY = "_frozen_pretrained_sha256"  # {state-dict prefix: SHA-256 of the weights left out}


def frozen_pretrained(model: nn.Module) -> dict[str, nn.Module]:
    """{state-dict prefix: module} of every frozen pretrained text encoder in `model` (shared ones under each name)."""
    from msaflow.model.encoders import TextEncoder

    return {f"{name}.model." if name else "model.": module.model
            for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, TextEncoder) and module.frozen and module.model is not None}


def fingerprint(module: nn.Module) -> str:
    """SHA-256 over the module's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stored_state_dict(model: nn.Module) -> dict:
    """`model.state_dict()` less its frozen pretrained text encoders' weights, with their fingerprints."""
    state = model.state_dict()
    frozen = frozen_pretrained(model)
    if not frozen:
        return state
    prints = {prefix: _cached_fingerprint(module) for prefix, module in frozen.items()}
    state = {k: v for k, v in state.items() if not _under(k, frozen)}
    state[FINGERPRINT_KEY] = prints
    return state


def load_stored_state(model: nn.Module, state: dict) -> None:
    """Load what `stored_state_dict` wrote (or a whole state dict) into `model`, strictly.

    Raises ValueError when the left-out encoders do not match this model's (other prefixes,
    other pretrained weights) and RuntimeError, as `load_state_dict` does, for any other
    missing or unexpected key."""
    state = dict(state)
    prints = state.pop(FINGERPRINT_KEY, None)
    if prints is None:
        for module in frozen_pretrained(model).values():  # its weights may change: fingerprint them anew
            module.__dict__.pop("_msaflow_fingerprint", None)
        model.load_state_dict(state)
        return
    frozen = frozen_pretrained(model)
    if set(prints) != set(frozen):
        raise ValueError(f"the weights leave out the frozen text encoder(s) {sorted(prints)}, but this model's frozen "
                         f"text encoders are {sorted(frozen) or 'none'} (was the run's freeze_text setting changed?)")
    for prefix, module in frozen.items():
        if _cached_fingerprint(module) != prints[prefix]:
            raise ValueError(f"the frozen text encoder {prefix.rstrip('.')} was trained on other pretrained weights "
                             f"than the local text model holds (SHA-256 {prints[prefix][:12]}... stored, "
                             f"{_cached_fingerprint(module)[:12]}... installed): install the text model the run used")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _under(k, frozen)]
    if missing or unexpected:
        raise RuntimeError(f"Error(s) in loading state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def _under(key: str, prefixes) -> bool:
    """Whether a state-dict key belongs to one of the left-out encoders."""
    return any(key.startswith(prefix) for prefix in prefixes)


def _cached_fingerprint(module: nn.Module) -> str:
    """The fingerprint of a frozen module, computed once (0.1 s for MiniLM) and kept on it."""
    cached = getattr(module, "_msaflow_fingerprint", None)
    if cached is None:
        cached = fingerprint(module)
        module._msaflow_fingerprint = cached
    return cached
