"""DDP plumbing: torchrun's environment, rank helpers, and 2 gloo processes == 1 process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from loader_shards import write_split
from torch import nn

from msaflow.pipeline import distributed as D
from msaflow.pipeline.loader import make_loader

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp_shards")
    write_split(root, "train", "features", [6, 4, 3], seed=5)  # 13 samples: the last global step is short
    return root


def test_env_parsing():
    assert D.read_env({}) == (0, 1, 0)
    assert D.read_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    assert D.read_env({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2, 1)
    with pytest.raises(ValueError, match="WORLD_SIZE not set"):
        D.read_env({"RANK": "0"})
    with pytest.raises(ValueError, match="inconsistent"):
        D.read_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="non-integer"):
        D.read_env({"RANK": "a", "WORLD_SIZE": "2"})


def test_one_process_run_needs_no_group(monkeypatch):
    for var in D.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    with D.distributed(device="cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main, ctx.is_distributed) == (0, 1, None, True, False)
        assert not torch.distributed.is_initialized()
        model = nn.Linear(3, 1)
        assert D.wrap_model(model, ctx) is model and D.unwrap(model) is model
        D.barrier()
        assert D.is_main() and D.all_reduce_mean(2.5) == 2.5 and D.gather_objects("x") == ["x"]
        x = torch.tensor([1.0, 2.0])
        assert torch.equal(D.all_reduce_sum(x), x)
        loss = D.weighted_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0]))
        assert loss.item() == pytest.approx(2.0)  # weight-0 padding does not count
    assert D.seed_everything(10, rank=1) == 11
    a = torch.rand(3)
    D.seed_everything(10, rank=1)
    assert torch.equal(a, torch.rand(3))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world_size: int, port: int, shard_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with D.distributed(device="cpu") as ctx:
        # 1. the loader, rank/world from the process group, 2 workers per rank
        batches = list(make_loader(shard_dir, "train", 3, shuffle=True, seed=2, num_workers=2))
        seen = [(i, float(w)) for b in batches for i, w in zip(b["id"], b["weight"])]
        # 2. DDP gradient of weighted_mean on this rank's (uneven, padded) batches vs the full batch
        torch.manual_seed(0)
        model = D.wrap_model(nn.Linear(32, 1), ctx)
        grads = []
        for batch in batches:
            model.zero_grad()
            x = batch["audio"].mean(dim=1)
            D.weighted_mean((model(x).squeeze(-1) - batch["label"]).abs(), batch["weight"]).backward()
            grads.append(model.module.weight.grad.clone())
        everything = D.gather_objects({"seen": seen, "batches": [
            {"x": b["audio"].mean(dim=1), "y": b["label"], "w": b["weight"]} for b in batches]})
        if ctx.is_main:
            reference = nn.Linear(32, 1)
            reference.load_state_dict(model.module.state_dict())
            errors = []
            for step, grad in enumerate(grads):
                parts = [r["batches"][step] for r in everything]
                x, y, w = (torch.cat([p[k] for p in parts]) for k in ("x", "y", "w"))
                reference.zero_grad()
                ((reference(x).squeeze(-1) - y).abs() * w).sum().div(w.sum()).backward()
                errors.append((grad - reference.weight.grad).abs().max().item())
            Path(out).write_text(json.dumps({"seen": [r["seen"] for r in everything], "grad_errors": errors,
                                             "mean_rank": D.all_reduce_mean(float(ctx.rank))}))
        else:
            D.all_reduce_mean(float(ctx.rank))


def test_two_gloo_processes_see_each_sample_once_and_average_gradients_exactly(shard_dir, tmp_path):
    out = tmp_path / "result.json"
    # fork: the ranks start in a second instead of re-importing torch
    mp.start_processes(_gloo_rank, args=(2, free_port(), str(shard_dir), str(out)), nprocs=2, join=True,
                       start_method="fork")
    result = json.loads(out.read_text())
    expected = Counter(i for b in make_loader(shard_dir, "train", 64, shuffle=False) for i in b["id"])
    real = Counter(i for rank in result["seen"] for i, w in rank if w == 1.0)
    assert real == expected and len(expected) == 13
    assert len(result["seen"][0]) == len(result["seen"][1])  # padded to equal length
    assert result["grad_errors"] and max(result["grad_errors"]) < 1e-6
    assert result["mean_rank"] == 0.5


@pytest.mark.slow
def test_emt_two_gloo_processes_match_one_process(shard_dir, tmp_path):
    """EMT, 2 epochs (8 SGD steps) of global batch 4: torchrun x2 (batch 2 each) vs 1 process.

    Tolerance: parameters within atol 1e-5 (measured: about 1e-7).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in D.ENV_VARS:
        env.pop(var, None)
    job = [str(TESTS / "ddp_job.py"), str(shard_dir)]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, *job, str(one)], check=True, env=env, timeout=600)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    *job, str(two)], check=True, env=env, timeout=600)
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert len(a["losses"]) == 8 and torch.allclose(a["losses"], b["losses"], atol=1e-5)
    assert a["losses"][0] != a["losses"][-1]
    for name, value in a["state"].items():
        torch.testing.assert_close(b["state"][name], value, atol=1e-5, rtol=0, msg=name)
    # and the two-process epoch covered every sample once
    real = Counter(i for rank in b["seen"] for i, w in rank if w == 1.0)
    assert sorted(real.values()) == [1] * 13
