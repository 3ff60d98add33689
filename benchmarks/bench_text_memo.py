"""Frozen text encoder with and without the pooled-vector memo (model/text_memo.py).

Times the text vectors of the first N MOSI training utterances, corrupted at rate 0.5 with
fixed masks, in batches of 32: the encoder every time, a cold memo (encoder + store) and a
warm memo (lookups only, what every epoch after the first costs with fixed masks).

Usage: python benchmarks/bench_text_memo.py --data mosi_utt_ta.pkl [--n 256 --threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from msaflow.model.config import for_dataset
from msaflow.model.missing import simulate_missing
from msaflow.model.registry import build_model
from msaflow.pipeline.data.mmsa_pickle import iterate_batches, load_mmsa_pickle


def timed_pass(model, batches) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model.text_vector(b)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train = load_mmsa_pickle(args.data)["train"]
    batches = [simulate_missing(b, 0.5, seed=7) for b in iterate_batches(train, 32)][: max(args.n // 32, 1)]
    n = sum(len(b["id"]) for b in batches)
    with tempfile.TemporaryDirectory() as memo_dir:
        plain = build_model("text-only", for_dataset("mosi", modalities=("text",), freeze_text=True)[0]).eval()
        memo_cfg = for_dataset("mosi", modalities=("text",), freeze_text=True, extra={"text_memo": memo_dir})[0]
        memoised = build_model("text-only", memo_cfg).eval()
        rows = [("encoder every time", timed_pass(plain, batches)),
                ("memo, cold (encode + store)", timed_pass(memoised, batches)),
                ("memo, warm (lookups)", timed_pass(memoised, batches))]
    print(f"{n} utterances, batches of 32, rate 0.5, torch threads {args.threads}\n")
    print("| text vectors | seconds | ms / utterance |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {1000 * seconds / n:.2f} |")


if __name__ == "__main__":
    main()
