"""Multi-process (DDP) plumbing: torchrun's environment to a process group, and rank helpers.

`torchrun --nproc-per-node N ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set. `init_distributed()` reads them and joins the process
group (NCCL on GPUs, Gloo on CPU); started without them (plain `python`), it returns a
one-process context and creates no group, so the same training code runs either way:

    with distributed() as ctx:
        seed_everything(seed, ctx.rank)
        model = wrap_model(build(...).to(ctx.device), ctx)
        loader = make_loader(..., rank=ctx.rank, world_size=ctx.world_size)
        for batch in loader:
            loss = weighted_mean(per_sample_loss, batch["weight"])
            ...

Every helper is a no-op (or the identity) in a one-process run.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the number of processes, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: one process, no process group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) when none is set."""
    present = {k: environ[k] for k in ENV_VARS if k in environ}
    if not present:
        return 0, 1, 0
    missing = [k for k in ("RANK", "WORLD_SIZE") if k not in present]
    if missing:
        raise ValueError(f"distributed launch: {', '.join(missing)} not set (got {present}); start with torchrun")
    try:
        rank, world = int(present["RANK"]), int(present["WORLD_SIZE"])
        local = int(present.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise ValueError(f"distributed launch: non-integer value in {present}") from exc
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"distributed launch: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} are inconsistent")
    return rank, world, local


def pick_device(device: str, local_rank: int) -> torch.device:
    """`auto`: this process's GPU (LOCAL_RANK) when CUDA is available, else the CPU."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but CUDA is not available")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun set up (if any); returns this process's context."""
    rank, world, local = read_env()
    dev = pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return DistContext(device=dev)
    backend = BACKENDS[dev.type]
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world, local, backend, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(device: str = "auto") -> Iterator[DistContext]:
    """`init_distributed` for the block's duration; the group is destroyed even on errors."""
    ctx = init_distributed(device)
    try:
        yield ctx
    finally:
        cleanup()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a one-process run): the process that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor | float) -> torch.Tensor | float:
    """Sum over ranks of a tensor (a new tensor, input untouched) or a Python number."""
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        if _active():
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out
    if not _active():
        return value
    # gloo reduces CPU tensors, nccl only GPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return float(all_reduce_sum(torch.tensor(float(value), dtype=torch.float64, device=device)))


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """Mean over ranks (e.g. of a logged loss)."""
    total = all_reduce_sum(value)
    return total / get_world_size()


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable; e.g. predictions with ids), in rank order, on every rank."""
    if not _active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """This rank's share of the global weighted mean of a per-sample loss.

    Scaled so that DDP's averaging of gradients over ranks yields exactly the gradient of
    sum_all(w * l) / sum_all(w) over the global batch, whatever each rank holds: uneven last
    batches and the loader's weight-0 padding are handled. Equals the plain weighted mean
    in a one-process run.
    """
    weight = weight.to(per_sample.dtype)
    total_weight = all_reduce_sum(weight.detach().sum())
    return (per_sample * weight).sum() * get_world_size() / total_weight.clamp(min=torch.finfo(per_sample.dtype).tiny)


def seed_everything(seed: int, rank: int | None = None) -> int:
    """Seed Python, NumPy and torch with seed + rank (per-rank dropout and corruption draws).

    Model weights still start equal on every rank: DDP copies rank 0's at wrap time.
    Returns the seed used.
    """
    used = seed + (get_rank() if rank is None else rank)
    random.seed(used)
    np.random.seed(used % 2**32)
    torch.manual_seed(used)
    return used


def wrap_model(model: nn.Module, ctx: DistContext, *, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` when the run has several processes, else `model`.

    `find_unused_parameters=True` is needed when some parameters get no gradient in a step
    (e.g. a front-end frozen for the first epochs, or a modality absent from a batch).
    """
    if not ctx.is_distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (what checkpoints save), or the model itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch dict with its tensors on `device` (ids and other values unchanged)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
