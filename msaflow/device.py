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


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a cluster job's share, not the machine's)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def oversubscription(threads: int, processes: int = 1) -> str | None:
    """Why `threads` torch threads in each of `processes` processes are too many for this
    machine's usable cores, or None. Oversubscribed threads wait on each other; bfloat16
    kernels suffer most (a CPU bf16 step took 4.5x as long with 4 threads on 2 cores as with
    2, fp32 1.06x: BENCHMARKS.md)."""
    cores = usable_cores()
    if threads * processes <= cores:
        return None
    return (f"{threads} torch thread(s) x {processes} process(es) on {cores} usable CPU core(s): the threads "
            f"wait on each other (bf16 steps slow down most); use --threads {max(1, cores // processes)}")
