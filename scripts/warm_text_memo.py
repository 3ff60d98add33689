"""Fill the frozen-text-encoder memo with every corrupted version a fixed-mask run can draw.

With fixed per-sample uniforms (`msaflow train --fixed-train-masks`), dropping at rate r
removes the tokens whose uniform is below r, so a sample with n droppable tokens has exactly
n + 1 versions over all rates. Encoding them once, in large length-sorted batches, is much
cheaper than meeting them a few at a time inside training batches.

Usage: python scripts/warm_text_memo.py --data PKL --memo DIR [--split train --mask-seed 7]
(`msaflow train` draws fixed train masks with seed mask_seed + 7, i.e. 7 for the default 0.)
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from msaflow.model.config import for_dataset
from msaflow.model.missing import sample_uniforms, valid_positions
from msaflow.model.registry import build_model
from msaflow.pipeline.data.mmsa_pickle import load_mmsa_pickle


def all_versions(ids: torch.Tensor, length: int, uniforms: torch.Tensor, droppable: torch.Tensor,
                 unk_id: int) -> list[torch.Tensor]:
    """The n + 1 nested corrupted versions of one unpadded id sequence."""
    order = [int(i) for i in torch.argsort(uniforms) if droppable[i]]
    versions, current = [ids[:length].clone()], ids[:length].clone()
    for pos in order:
        current = current.clone()
        current[pos] = unk_id
        versions.append(current)
    return versions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--memo", required=True, help="the directory given as model.extra.text_memo")
    p.add_argument("--split", default="train")
    p.add_argument("--mask-seed", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    split = load_mmsa_pickle(args.data)[args.split]
    cfg, _ = for_dataset("mosi", modalities=("text",), freeze_text=True, extra={"text_memo": args.memo})
    model = build_model("text-only", cfg).eval()
    full = split.batch(list(range(len(split))))
    uniforms = sample_uniforms(full["id"], full["text_ids"].shape[1], args.mask_seed, "text")
    droppable = valid_positions(full, "text")
    versions = []
    for i in range(len(split)):
        versions += all_versions(full["text_ids"][i], int(full["text_lengths"][i]), uniforms[i], droppable[i],
                                 cfg.unk_id)
    versions.sort(key=len)  # little padding inside a batch
    print(f"{len(split)} samples, {len(versions)} versions, memo holds {len(model.memo)} before", flush=True)
    with torch.no_grad():
        for start in tqdm(range(0, len(versions), args.batch_size), desc="encode"):
            chunk = versions[start : start + args.batch_size]
            lengths = torch.tensor([len(v) for v in chunk])
            ids = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
            for j, v in enumerate(chunk):
                ids[j, : len(v)] = v
            model.text_vector({"text_ids": ids, "text_lengths": lengths})
    model.memo.flush()
    print(f"memo: {model.memo.stats()}", flush=True)


if __name__ == "__main__":
    main()
