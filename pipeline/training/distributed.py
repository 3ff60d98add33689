"""Multi-process (DDP) plumbing: torchrun's environment to a process group, and rank helpers.

`torchrun --nproc-per-node N ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set. `init_distributed()` reads them and joins the process
group (NCCL on GPUs, Gloo on CPU); started without them (plain `python`), it returns a
one-process context and creates no group, so `msaflow train` runs the same code either
way: the model wrapped by `wrap_model`, each rank reading its own share of the data
(`msaflow.pipeline.data.sources`), validation sums added with `all_reduce_sum`.

Every helper is a no-op (or the identity) in a one-process run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from msaflow.device import resolve_device

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


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun set up (if any); returns this process's context."""
    rank, world, local = read_env()
    dev = resolve_device(device, local)  # auto: this process's LOCAL_RANK GPU, else the CPU
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


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


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


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable; e.g. predictions with ids), in rank order, on every rank."""
    if not _active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, ctx: DistContext, *, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` when the run has several processes, else `model`.

    `find_unused_parameters=True` is needed when some parameters get no gradient in a step
    (e.g. a front-end frozen for the first epochs, or a modality absent from a batch).
    """
    if not ctx.is_distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch dict with its tensors on `device` (ids and other values unchanged)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def views_to_device(views: tuple[dict, ...], device: torch.device) -> tuple[dict, ...]:
    """`to_device` of several views of one batch, each tensor they share copied once.

    The complete and incomplete views hold the same raw members (face crops, waveforms:
    megabytes per clip); copying them once halves the host-to-device traffic of a step.
    """
    moved: dict[int, torch.Tensor] = {}  # id of a host tensor -> its copy (the views keep the host tensors alive)

    def move(value):
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) not in moved:
            moved[id(value)] = value.to(device, non_blocking=True)
        return moved[id(value)]

    return tuple({k: move(v) for k, v in view.items()} for view in views)
