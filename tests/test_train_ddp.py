"""Two training processes (torchrun, gloo on CPU) against one, same seed and global batch.

Every process draws the same global batch order and trains on its contiguous block of rows;
DDP averages the gradients. With train masks fixed per sample id and dropout off (both are
drawn per process otherwise, so they cannot match a one-process run) the weights after
training agree with the one-process run to float32 reduction-order error.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

NO_DROPOUT = "model:\n  attn_dropout: 0.0\n  ffn_dropout: 0.0\n  head_dropout: 0.0\n"
TOLERANCE = 1e-4  # max abs difference of any weight after one epoch (measured: ~1e-6)


def train_args(pkl, out, config):
    return ["train", "--data", str(pkl), "--model", "emt", "--freeze-text", "--limit", "64", "--epochs", "1",
            "--batch-size", "16", "--grad-accum", "1", "--protocol", "per-rate", "--missing-rate", "0.3",
            "--seed", "3", "--threads", "1", "--device", "cpu", "--config", str(config), "--fixed-train-masks",
            "-o", str(out)]


def test_two_processes_match_one(tmp_path, shared_data):
    pkl = shared_data / "mosi_utt" / "mosi_utt_ta.pkl"
    config = tmp_path / "no_dropout.yaml"
    config.write_text(NO_DROPOUT)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "msaflow.pipeline.cli", *train_args(pkl, one, config)], check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "msaflow.pipeline.cli", *train_args(pkl, two, config)], check=True)

    a = torch.load(one / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(two / "last.pt", map_location="cpu", weights_only=True)
    assert b["state"]["world_size"] == 2 and a["state"]["world_size"] == 1
    tensors = [k for k, v in a["model"].items() if torch.is_tensor(v)]  # besides: a frozen encoder's fingerprint
    assert {k: v for k, v in a["model"].items() if k not in tensors} == \
        {k: v for k, v in b["model"].items() if k not in tensors}
    worst = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in tensors)
    assert worst < TOLERANCE, f"weights differ by {worst:.2e}"
    steps = len(json.loads((one / "history.json").read_text()))
    assert steps == 1 and a["optimizer"]["state"], "the one-process run took no optimiser step"
    m1 = json.loads((one / "metrics.json").read_text())["rates"]
    m2 = json.loads((two / "metrics.json").read_text())["rates"]
    assert m1.keys() == m2.keys()
    for rate in m1:
        assert abs(m1[rate]["MAE"] - m2[rate]["MAE"]) < 1e-3
