"""Cost of EMT (global-local) vs the two local-local fusions as the sequence length grows.

Synthetic inputs (cost does not depend on the values): three modalities of length T
(text as precomputed encoder states, so the text encoder itself is not part of the cost),
equal width and depth for every model (the MOSI preset: d_model 128, 3 layers, 4 heads).
Per model and T it reports:
- parameters of the model without the text encoder;
- FLOPs of one forward pass (torch.utils.flop_counter.FlopCounterMode);
- activation memory: bytes of the tensors autograd saves for backward during the forward
  pass (counted once per storage with torch.autograd.graph.saved_tensors_hooks) — what a
  training step must keep, on CPU or GPU alike;
- step time: forward + backward, median of `--reps` after one warm-up, on this machine.

    python benchmarks/bench_model_cost.py [--lengths 50,200,500,1000] [--batch 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from msaflow.model.config import ModelConfig, for_dataset
from msaflow.model.registry import build_model

MODELS = ("emt", "emt-one-to-one", "emt-one-to-all")
DIMS = {"text": 384, "audio": 74, "vision": 35}


def synthetic_config(**overrides) -> ModelConfig:
    cfg, _ = for_dataset("mosi", modalities=("text", "audio", "vision"), d_text=DIMS["text"],
                         d_audio=DIMS["audio"], d_vision=DIMS["vision"], freeze_text=True)
    return replace(cfg, **overrides)


def synthetic_batch(batch: int, length: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.full((batch,), length, dtype=torch.long)
    out = {"id": [str(i) for i in range(batch)], "label": torch.zeros(batch)}
    out["text_ids"] = torch.ones(batch, length, dtype=torch.long)
    out["text_lengths"] = lengths
    out["text"] = torch.randn(batch, length, DIMS["text"], generator=g)
    for m in ("audio", "vision"):
        out[m] = torch.randn(batch, length, DIMS[m], generator=g)
        out[f"{m}_lengths"] = lengths
    return out


def fusion_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("text_encoder."))


def flops(model, batch) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(batch)
    return counter.get_total_flops()


def activation_bytes(model, batch) -> int:
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)["pred"].sum()
    del out
    return sum(seen.values())


def step_seconds(model, batch, reps: int) -> float:
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(batch)["pred"].sum().backward()
        if i:  # the first pass warms up allocators
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="50,200,500,1000")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = synthetic_config()
    models = {name: build_model(name, cfg).train() for name in MODELS}
    print(f"d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, 3 modalities, batch {args.batch}, "
          f"{torch.get_num_threads()} CPU threads\n")
    print(f"{'T':>5} {'model':<15} {'params':>9} {'GFLOPs':>9} {'act. MB':>9} {'step s':>8}")
    rows = {}
    for t in (int(x) for x in args.lengths.split(",")):
        batch = synthetic_batch(args.batch, t)
        for name, model in models.items():
            rows[t, name] = (fusion_parameters(model), flops(model, batch) / 1e9,
                             activation_bytes(model, batch) / 2**20, step_seconds(model, batch, args.reps))
            n, f, mem, sec = rows[t, name]
            print(f"{t:>5} {name:<15} {n:>9,} {f:>9.2f} {mem:>9.1f} {sec:>8.3f}", flush=True)
    print("\nEMT / local-local ratios (lower = EMT cheaper)")
    print(f"{'T':>5} {'vs':<15} {'FLOPs':>7} {'act. mem':>9} {'step time':>10}")
    for t in sorted({t for t, _ in rows}):
        for other in MODELS[1:]:
            e, o = rows[t, "emt"], rows[t, other]
            print(f"{t:>5} {other:<15} {e[1] / o[1]:>7.2f} {e[2] / o[2]:>9.2f} {e[3] / o[3]:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
