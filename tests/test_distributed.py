"""DDP plumbing: torchrun's environment, rank helpers, and the loader under 2 gloo processes
(`msaflow train` under torchrun vs one process: tests/test_streaming.py)."""

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

from msaflow.pipeline.training import distributed as D
from msaflow.pipeline.data.loader import make_loader

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
    ctx = D.init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main, ctx.is_distributed) == (0, 1, None, True, False)
    assert not torch.distributed.is_initialized()
    model = nn.Linear(3, 1)
    assert D.wrap_model(model, ctx) is model
    D.barrier()
    assert D.all_reduce_sum(2.5) == 2.5 and D.gather_objects("x") == ["x"]
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(D.all_reduce_sum(x), x)
    D.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world_size: int, port: int, shard_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = D.init_distributed(device="cpu")
    try:
        # the loader, rank/world from the process group, 2 workers per rank
        batches = list(make_loader(shard_dir, "train", 3, shuffle=True, seed=2, num_workers=2))
        seen = [(i, float(w)) for b in batches for i, w in zip(b["id"], b["weight"])]
        everything = D.gather_objects(seen)
        mean_rank = D.all_reduce_sum(float(ctx.rank)) / world_size
        if ctx.is_main:
            Path(out).write_text(json.dumps({"seen": everything, "mean_rank": mean_rank}))
    finally:
        D.cleanup()


def test_two_gloo_processes_see_each_sample_once(shard_dir, tmp_path):
    out = tmp_path / "result.json"
    # fork: the ranks start in a second instead of re-importing torch
    mp.start_processes(_gloo_rank, args=(2, free_port(), str(shard_dir), str(out)), nprocs=2, join=True,
                       start_method="fork")
    result = json.loads(out.read_text())
    expected = Counter(i for b in make_loader(shard_dir, "train", 64, shuffle=False) for i in b["id"])
    real = Counter(i for rank in result["seen"] for i, w in rank if w == 1.0)
    assert real == expected and len(expected) == 13
    assert len(result["seen"][0]) == len(result["seen"][1])  # padded to equal length
    assert result["mean_rank"] == 0.5


def test_views_of_one_batch_go_to_the_device_sharing_their_tensors():
    """The complete and incomplete views share their raw members: one copy each, not two."""
    face, label = torch.zeros(2, 3, 4, 4, 3, dtype=torch.uint8), torch.ones(2)
    complete = {"id": ["a", "b"], "face": face, "label": label, "text_ids": torch.ones(2, 5, dtype=torch.long)}
    incomplete = dict(complete, text_ids=torch.zeros(2, 5, dtype=torch.long))
    c, i = D.views_to_device((complete, incomplete), torch.device("meta"))  # a real copy, unlike cpu -> cpu
    assert c["face"].device.type == "meta" and c["face"].dtype == torch.uint8  # crops stay uint8 on the way
    assert c["face"] is i["face"] and c["label"] is i["label"]
    assert c["text_ids"] is not i["text_ids"] and c["id"] == i["id"] == ["a", "b"]
    separate = (D.to_device(complete, torch.device("meta")), D.to_device(incomplete, torch.device("meta")))
    assert separate[0]["face"] is not separate[1]["face"]  # what a per-view copy does
