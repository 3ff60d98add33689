"""End-to-end training step: samples/s and peak memory with front-ends frozen or trained,
with and without bf16 autocast and gradient checkpointing.

Data: raw members of real GRID clips (3 s, 25 fps by default), extracted once with the
product's per-clip extraction into --work and reused. Model: EMT-DLFR (MOSI preset)
behind FER + CREPE tiny; the MiniLM text encoder is frozen so the table isolates the
front-ends. Every configuration runs in its own process so peak memory is its own:
on CUDA `torch.cuda.max_memory_allocated`, on CPU the process's peak RSS (ru_maxrss,
which includes the ~1 GB of loaded libraries and weights; compare the rows, not the
absolute value).

    python benchmarks/bench_end_to_end.py --device cuda --clips 8 --batch 8 --steps 5
    python benchmarks/bench_end_to_end.py --device cpu --clips 2 --batch 2 --steps 2   # this machine
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRID = ("bbaf2n", "brbk7n", "lbax4n", "lbbc2a", "lrwp9a", "lwbsza", "pwij3p", "sbia1a", "sbwe5n", "swiz3n")

# name -> (policy of both front-ends, bf16, checkpointing)
CONFIGS = {
    "frozen": ("frozen", False, False),
    "trained": ("trained", False, False),
    "trained+bf16": ("trained", True, False),
    "trained+ckpt": ("trained", False, True),
    "trained+bf16+ckpt": ("trained", True, True),
}


def shared_data() -> Path:
    return Path(os.environ.get("MSAFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def extract(work: Path, n_clips: int, fps: float, device: str) -> list[Path]:
    from msaflow.extractors.clip import ClipExtractor, ClipJob
    from msaflow.pipeline.extraction.settings import ExtractConfig

    tars, extractor = [], None
    for i, name in enumerate(GRID[:n_clips]):
        tar = work / "clips" / f"{name}.tar"
        if not tar.is_file():
            extractor = extractor or ClipExtractor(ExtractConfig(fps=fps), device=device)
            extractor.extract(ClipJob(row=i + 1, id=f"grid/{name}", key=name, video_id="grid", clip_id=name,
                                      path=str(shared_data() / "raw" / "grid" / f"{name}.mpg"), start=None,
                                      end=None, text="bin blue at f two now", label=float(i % 7 - 3),
                                      split="train"), work)
        tars.append(tar)
    return tars


def run_one(name: str, tars: list[Path], batch_size: int, steps: int, device: str) -> dict:
    import torch

    from msaflow.model.config import for_dataset
    from msaflow.model.end_to_end import EndToEndConfig, build_end_to_end
    from msaflow.pipeline.training.distributed import to_device
    from msaflow.pipeline.data.loader import collate
    from msaflow.pipeline.data.shard_index import MODE_LAYOUTS
    from msaflow.pipeline.data.shard_reader import Sample
    from msaflow.tario import read_sample_tar

    policy, bf16, ckpt = CONFIGS[name]
    members = [read_sample_tar(t)[1] for t in tars]
    layout = MODE_LAYOUTS["raw"].members
    samples = [Sample(m["json"]["id"], m["json"], {k: m[k] for k in layout}, 1.0) for m in members]
    batches = [collate(samples[i : i + batch_size], layout) for i in range(0, len(samples) - batch_size + 1, batch_size)]
    model_cfg, optim_cfg = for_dataset("mosi")
    model_cfg = replace(model_cfg, freeze_text=True)
    e2e = EndToEndConfig(policies={"vision": policy, "audio": policy}, bf16=bf16, checkpoint=ckpt)
    torch.manual_seed(0)
    model = build_end_to_end(model_cfg, e2e, device=device).train()
    optimizer = torch.optim.Adam(model.param_groups(optim_cfg))
    gen = torch.Generator().manual_seed(0)

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        incomplete = model.simulate_missing(batch, 0.3, generator=gen)  # on the CPU, as the loader does
        loss, _ = model.compute_loss(to_device(batch, device), to_device(incomplete, device))
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    step(batches[0])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    n, losses = 0, []
    for i in range(steps):
        batch = batches[i % len(batches)]
        losses.append(step(batch))
        n += len(batch["id"])
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - t0
    return {"config": name, "samples_per_s": n / seconds, "step_s": seconds / steps, "peak_mib": peak,
            "loss": losses[-1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--work", type=Path, default=Path("/tmp/msaflow-bench-e2e"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tars = extract(args.work, args.clips, args.fps, device)
    if args.one:
        print(json.dumps(run_one(args.one, tars, args.batch, args.steps, device)))
        return 0
    rows = []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--device", device, "--clips", str(args.clips),
               "--batch", str(args.batch), "--steps", str(args.steps), "--fps", str(args.fps),
               "--threads", str(args.threads), "--work", str(args.work)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} threads"
    print(f"\nEnd-to-end training step, EMT-DLFR (MOSI preset, text encoder frozen) behind FER + CREPE tiny; "
          f"{device} ({name}); GRID clips 3 s at {args.fps:g} fps; batch {args.batch}, {args.steps} timed steps\n")
    peak_label = "peak MiB (CUDA allocated)" if device == "cuda" else "peak RSS MiB"
    print(f"| config | samples/s | s/step | {peak_label} | loss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['config']} | {r['samples_per_s']:.2f} | {r['step_s']:.2f} | {r['peak_mib']:.0f} | {r['loss']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
