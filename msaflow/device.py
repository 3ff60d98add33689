"""Which device a process computes on: one rule for extraction, training and prediction."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The choices of every `--device` and config `device:` field. Importing this module costs no
# torch (config models and argument parsers read DEVICES); resolving a device imports it.
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto", local_rank: int = 0) -> "torch.device":
    """`auto`: this process's GPU (`local_rank`, torchrun's LOCAL_RANK) when CUDA is available,
    else the CPU; `cuda` without CUDA is an error rather than a silent fall-back."""
    import torch

    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but CUDA is not available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible")
    return torch.device("cuda", local_rank)
