"""Train EMT for a few epochs on feature shards, alone or under torchrun (test_distributed.py).

    python tests/ddp_job.py SHARD_DIR OUT.pt --global-batch 4
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_job.py SHARD_DIR OUT.pt ...

Rank 0 writes OUT.pt: the final parameters, every step's global loss, and, per rank,
the (id, weight) pairs one shuffled epoch over 2 workers gave it.
"""

from __future__ import annotations

import argparse

import torch

from msaflow.model.config import ModelConfig
from msaflow.model.registry import build_model
from msaflow.pipeline.distributed import (all_reduce_sum, distributed, gather_objects, seed_everything, unwrap,
                                          weighted_mean, wrap_model)
from msaflow.pipeline.loader import make_loader


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("shards")
    parser.add_argument("out")
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with distributed(device="cpu") as ctx:
        torch.manual_seed(0)  # same start on every rank (DDP would copy rank 0's anyway)
        cfg = ModelConfig(d_text=384, d_audio=32, d_vision=64, freeze_text=True, n_layers=2,
                          attn_dropout=0.0, ffn_dropout=0.0, head_dropout=0.0)
        model = wrap_model(build_model("emt", cfg), ctx)
        seed_everything(1, ctx.rank)
        # SGD: Adam divides by sqrt(v), which turns float noise in a gradient that is zero in exact
        # arithmetic (e.g. the bias of a softmax score) into a full-size step of either sign
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        local_batch = args.global_batch // ctx.world_size
        losses = []
        for epoch in range(args.epochs):
            # shuffled shard order and rotation, no shuffle buffer: the global batches are then
            # the same for any number of ranks, which is what makes the runs comparable
            loader = make_loader(args.shards, "train", local_batch, shuffle=True, seed=3, epoch=epoch,
                                 num_workers=args.workers, rank=ctx.rank, world_size=ctx.world_size,
                                 shuffle_buffer=1)
            for batch in loader:
                pred = model(batch)["pred"]
                loss = weighted_mean((pred - batch["label"]).abs(), batch["weight"])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(all_reduce_sum(loss.detach())) / ctx.world_size)
        seen = [(i, float(w)) for batch in make_loader(args.shards, "train", local_batch, shuffle=True, seed=9,
                                                        num_workers=2, rank=ctx.rank, world_size=ctx.world_size)
                for i, w in zip(batch["id"], batch["weight"])]
        seen_by_rank = gather_objects(seen)
        if ctx.is_main:
            state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items() if "text_encoder" not in k}
            torch.save({"state": state, "losses": torch.tensor(losses), "seen": seen_by_rank,
                        "world_size": ctx.world_size}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
