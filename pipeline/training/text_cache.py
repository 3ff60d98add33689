"""Frozen-encoder mode: text encoder hidden states cached once per split and missing rate.

With a frozen text encoder the states of a sequence depend only on its token ids, and
with fixed (per-sample seeded) masks the ids at rate r are fixed too. So the states of
every split at every rate of a grid are computed once, stored as float16 `.npy` files,
and every later run (any model, any training seed) reads them instead of running the
encoder: training then costs only the fusion model. The price, documented in
docs/model.md: the train masks are the fixed per-sample draw of the released code (not
redrawn per batch); train and validation use the rates 0.0, 0.2, ..., 1.0 (the
single-model protocol draws its rate from them instead of U[0, 1]); test uses 0.0, 0.1, ..., 1.0.

Not the same job as model/text_memo.py (the memo of a frozen encoder's pooled output inside the
baselines), and the two are kept apart on purpose: this cache holds every token's hidden state
(N, L, D), which EMT's token-level attention reads, in float16 (an (N, L, D) file per split and
rate); it is keyed by position (split, sample ids, mask seed, rate), so it exists only for fixed
per-sample masks at the grid's rates, is built before training for an MMSA pickle and is attached
to the batch by the training loop (`batch["text"]`), for any model. The memo holds one float32
pooled vector per distinct id sequence, keyed by content, filled lazily inside the model under any
masks (redrawn per batch too). One store serving both would change results: pooled float16
states are not the memo's float32 pooled vectors, and a pooled vector cannot feed EMT's attention.

Prebuild (optional; `msaflow train --text-cache DIR` builds what is missing):
    python -m msaflow.pipeline.training.text_cache --data PKL --cache DIR [--splits test,valid,train]
        [--train-rates 0.0:1.0:0.1]   (train/valid rates: per-rate runs at other rates than the default grid)
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from msaflow.contract import UNK_ID
from msaflow.model.missing import simulate_missing
from msaflow.pipeline.data.mmsa_pickle import Split, load_mmsa_pickle
from msaflow.pipeline.training.rates import COARSE_GRID as COARSE_SPEC
from msaflow.pipeline.training.rates import TEST_GRID, parse_rates
from msaflow.tario import atomic_path

log = logging.getLogger("msaflow.train")  # built by `msaflow train` / `evaluate`, or by main() below

GRID = tuple(parse_rates(TEST_GRID))  # test rates
COARSE_GRID = tuple(parse_rates(COARSE_SPEC))  # train/valid rates of the cached mode (CPU budget)
TRAIN_SEED_OFFSET = 7  # train masks use mask_seed + 7 so they differ from the valid/test draw


def split_mask_seed(split_name: str, mask_seed: int) -> int:
    return mask_seed + TRAIN_SEED_OFFSET if split_name == "train" else mask_seed


def _key(split: Split, text_model: str, seed: int, unk_id: int) -> str:
    h = hashlib.sha256()
    h.update(f"{text_model}|{seed}|{unk_id}|".encode())
    h.update("\n".join(split.ids).encode())
    h.update(split.tensors["text_ids"].numpy().tobytes())
    h.update(split.tensors["text_lengths"].numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_ids(encoder, ids: torch.Tensor, lengths: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """(N, L, D) float16 states of padded ids.

    Identical sequences are encoded once (at high rates many are all-[UNK]), and batches are
    length-sorted so little time goes to padding.
    """
    n, width = ids.shape
    unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
    unique_lengths = torch.zeros(len(unique), dtype=lengths.dtype).scatter_(0, inverse, lengths)
    states_u = None
    order = torch.argsort(unique_lengths, descending=True)
    for start in range(0, len(unique), batch_size):
        idx = order[start : start + batch_size]
        t = max(int(unique_lengths[idx].max()), 2)
        mask = (torch.arange(t)[None, :] < unique_lengths[idx][:, None]).long()
        states = encoder(input_ids=unique[idx, :t], attention_mask=mask).last_hidden_state
        if states_u is None:
            states_u = np.zeros((len(unique), width, states.shape[-1]), dtype=np.float16)
        states_u[idx.numpy(), :t] = states.numpy().astype(np.float16)
    return states_u[inverse.numpy()]


class TextStateCache:
    """Cached states per (split, rate); `states(split_name, rate, index)` → (B, L, D) float32."""

    def __init__(self, cache_dir: str | Path, splits: dict[str, Split], text_model: str, mask_seed: int,
                 unk_id: int = UNK_ID, rates: tuple[float, ...] = GRID):
        self.dir = Path(cache_dir)
        self.splits, self.text_model, self.mask_seed, self.unk_id = splits, text_model, mask_seed, unk_id
        self.rates = tuple(rates)
        self.arrays: dict[tuple[str, float], np.ndarray] = {}

    def path(self, split_name: str, rate: float) -> Path:
        split = self.splits[split_name]
        seed = split_mask_seed(split_name, self.mask_seed)
        return self.dir / f"{split_name}-{_key(split, self.text_model, seed, self.unk_id)}-r{rate:.2f}.npy"

    def build(self, needed: list[tuple[str, float]] | None = None, encoder=None) -> None:
        """Compute the missing (split, rate) files (default: every split at every rate); existing files are kept."""
        needed = needed if needed is not None else [(s, r) for s in self.splits for r in self.rates]
        todo = [(s, r) for s, r in needed if not self.path(s, r).is_file()]
        if not todo:
            return
        if encoder is None:
            from msaflow.extractors.text import load_text_encoder

            encoder = load_text_encoder(self.text_model).eval()
        for split_name, rate in tqdm(todo, desc="caching frozen text states", disable=None):
            split = self.splits[split_name]
            full = split.batch(torch.arange(len(split)))
            ids = simulate_missing(full, rate, unk_id=self.unk_id,
                                   seed=split_mask_seed(split_name, self.mask_seed))["text_ids"]
            states = encode_ids(encoder, ids, full["text_lengths"])
            with atomic_path(self.path(split_name, rate)) as tmp:
                with tmp.open("wb") as f:
                    np.save(f, states, allow_pickle=False)
            log.info(f"cached {split_name} r={rate:.1f} ({len(split)} samples)")

    def states(self, split_name: str, rate: float, index: torch.Tensor, width: int) -> torch.Tensor:
        key = (split_name, round(rate, 6))
        if key not in self.arrays:
            self.arrays[key] = np.load(self.path(split_name, rate), mmap_mode="r", allow_pickle=False)
        return torch.from_numpy(np.asarray(self.arrays[key][index.numpy(), :width], dtype=np.float32))

    def attach(self, batch: dict, split_name: str, rate: float) -> dict:
        """The batch with `text` = the cached states of its ids at `rate` (masks must be the cache's)."""
        out = dict(batch)
        out["text"] = self.states(split_name, rate, batch["index"], batch["text_ids"].shape[1])
        return out


def main() -> int:
    p = argparse.ArgumentParser(description="prebuild the frozen text-state cache of an MMSA pickle")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--cache", required=True, type=Path)
    p.add_argument("--text-model", default="minilm")
    p.add_argument("--mask-seed", type=int, default=0)
    p.add_argument("--splits", default="test,valid,train", help="comma-separated splits, built in this order")
    p.add_argument("--train-rates", default=",".join(map(str, COARSE_GRID)),
                   help="missing rates cached for train and valid, e.g. 0.0:1.0:0.1 (test: always the 0.1 grid)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # "cached ..." lines
    torch.set_num_threads(args.threads)
    splits = load_mmsa_pickle(args.data)
    train_rates = sorted(set(parse_rates(args.train_rates)))
    needed = [(s, r) for s in args.splits.split(",") for r in (GRID if s == "test" else train_rates)]
    TextStateCache(args.cache, splits, args.text_model, args.mask_seed).build(needed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
