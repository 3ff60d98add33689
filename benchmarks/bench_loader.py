"""Shard loader throughput vs what a training step consumes, both shard modes, on this machine.

    python benchmarks/bench_loader.py [--work DIR] [--features-samples 512] [--raw-samples 96]

Writes shards of 3-second clips with the shapes the pipeline produces (docs/data-contracts.md
§3; features: MiniLM text states 384-d, CREPE-tiny audio 258-d on the 10 ms grid, FER face
135-d at 25 fps; raw: 112x112 RGB face crops at 25 fps, 16 kHz int16 waveform, 80-bin fbank),
with random values (the loader's cost depends on sizes, not on content). Then measures:

- loader: samples/s of whole epochs through `make_loader` with 0, 1, 2 workers
  (the second of two epochs: worker start-up included, file cache warm);
- step: samples/s of forward + backward + optimiser step of the real models on batches
  already in memory: features mode EMT-DLFR (MOSI configuration, text states precomputed),
  raw mode the end-to-end model (FER and CREPE-tiny front-ends trained, EMT-DLFR fusion);
  both with the missing-feature simulation at rate 0.5 (complete + incomplete views);
- fed: samples/s of the same step taking its batches from the loader (2 workers) — on a
  CPU-only machine the workers and the step share the cores.

Prints a Markdown table; the ratio loader / step is the figure of merit (target >= 3).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from msaflow.model.config import ModelConfig
from msaflow.model.missing import simulate_missing
from msaflow.model.registry import build_model
from msaflow.pipeline.data.loader import make_loader
from msaflow.tario import TarWriter, atomic_path, write_json_atomic

DURATION, FPS, STEPS_PER_S, SAMPLE_RATE = 3.0, 25, 100, 16000
FEATURE_DIMS = {"text": 384, "audio": 258, "vision": 135}
FACE, N_MELS = 112, 80
SHARD_SAMPLES = 100


def clip_members(mode: str, number: int, rng: np.random.Generator) -> dict:
    t_v, t_a, n_tokens = int(DURATION * FPS), int(DURATION * STEPS_PER_S), int(rng.integers(8, 40))
    ids = np.concatenate([[101], rng.integers(1000, 30000, n_tokens - 2), [102]]).astype(np.int64)
    meta = {"id": f"clip{number:05d}/0", "video_id": f"clip{number:05d}", "clip_id": "0", "text": "",
            "label": float(rng.uniform(-3, 3)), "label_T": None, "label_A": None, "label_V": None,
            "split": "train", "start": None, "end": None, "duration": DURATION, "fps": FPS,
            "sample_rate": SAMPLE_RATE, "n_frames": t_v, "n_face_frames": t_v, "has_audio": True,
            "has_text": True, "mode": mode}
    out = {"json": meta, "text_ids.npy": ids, "vision_mask.npy": rng.random(t_v) > 0.05,
           "audio_mask.npy": np.ones(t_a, dtype=bool)}
    if mode == "features":
        out["text.npy"] = rng.standard_normal((n_tokens, FEATURE_DIMS["text"]), dtype=np.float32)
        out["audio.npy"] = rng.standard_normal((t_a, FEATURE_DIMS["audio"]), dtype=np.float32)
        out["vision.npy"] = rng.standard_normal((t_v, FEATURE_DIMS["vision"]), dtype=np.float32)
    else:
        out["face.npy"] = rng.integers(0, 256, (t_v, FACE, FACE, 3), dtype=np.uint8)
        out["wav.npy"] = rng.integers(-3000, 3000, int(DURATION * SAMPLE_RATE), dtype=np.int16)
        out["fbank.npy"] = rng.standard_normal((t_a, N_MELS), dtype=np.float32)
    return out


def write_shards(root: Path, mode: str, n_samples: int) -> Path:
    split_dir = root / mode / "train"
    if (split_dir / "index.json").exists():
        return root / mode
    shutil.rmtree(split_dir, ignore_errors=True)
    rng = np.random.default_rng(0)
    shards, schema = [], {}
    for start in range(0, n_samples, SHARD_SAMPLES):
        name, count = f"train-{len(shards):06d}.tar", min(SHARD_SAMPLES, n_samples - start)
        with atomic_path(split_dir / name) as tmp, TarWriter(tmp) as writer:
            for number in range(start, start + count):
                members = clip_members(mode, number, rng)
                writer.add_sample(f"clip{number:05d}_0", members)
                schema = {m: {"shape": [None, *a.shape[1:]], "dtype": str(a.dtype), "rate": None}
                          for m, a in members.items() if m.endswith(".npy")}
        shards.append({"name": name, "n_samples": count, "sha256": ""})
    write_json_atomic(split_dir / "index.json", {
        "split": "train", "mode": mode, "n_samples": n_samples, "shards": shards, "modalities": schema,
        "frontends": {}, "config_hash": "bench", "manifest_hash": "bench", "msaflow_version": "bench"})
    return root / mode


def loader_rate(shard_dir: Path, batch: int, workers: int) -> float:
    loader = make_loader(shard_dir, "train", batch, shuffle=True, seed=0, num_workers=workers)
    n = loader.dataset.index.n_samples
    for epoch in range(2):
        loader.dataset.set_epoch(epoch)
        start = time.perf_counter()
        seen = sum(len(b["id"]) for b in loader)
        seconds = time.perf_counter() - start
    assert seen == n
    return n / seconds


def build_step_model(mode: str) -> torch.nn.Module:
    cfg = ModelConfig(d_text=FEATURE_DIMS["text"], d_audio=FEATURE_DIMS["audio"], d_vision=FEATURE_DIMS["vision"])
    if mode == "features":
        return build_model("emt-dlfr", replace(cfg, freeze_text=True))
    from msaflow.model.end_to_end import EndToEndConfig, build_end_to_end

    e2e = EndToEndConfig(policies={"vision": "trained", "audio": "trained"})
    return build_end_to_end(replace(cfg, freeze_text=True), e2e)


def train_step(model, optimizer, batch: dict, seed: int) -> None:
    # the end-to-end model draws raw-mode masks itself; features models use the shared simulation
    simulate = getattr(model, "simulate_missing", None) or simulate_missing
    loss, _ = model.compute_loss(batch, simulate(batch, 0.5, seed=seed))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def step_rates(mode: str, shard_dir: Path, batch: int, steps: int) -> tuple[float, float]:
    """(samples/s on batches in memory, samples/s fed by a 2-worker loader)."""
    torch.manual_seed(0)
    model = build_step_model(mode).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loader = make_loader(shard_dir, "train", batch, shuffle=True, seed=1, num_workers=2, drop_last=True)
    batches = [b for _, b in zip(range(steps + 1), loader)]
    train_step(model, optimizer, batches[0], 0)  # warm-up
    start = time.perf_counter()
    for i, b in enumerate(batches[1:]):
        train_step(model, optimizer, b, i)
    in_memory = steps * batch / (time.perf_counter() - start)
    start, n = time.perf_counter(), 0
    for i, b in zip(range(steps), make_loader(shard_dir, "train", batch, shuffle=True, seed=2, num_workers=2,
                                              drop_last=True)):
        train_step(model, optimizer, b, i)
        n += len(b["id"])
    return in_memory, n / (time.perf_counter() - start)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/msaflow-bench-loader"), help="where shards go")
    parser.add_argument("--features-samples", type=int, default=512)
    parser.add_argument("--raw-samples", type=int, default=96)
    parser.add_argument("--features-batch", type=int, default=32, help="the MOSI batch size")
    parser.add_argument("--raw-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per mode")
    args = parser.parse_args()
    plan = {"features": (args.features_samples, args.features_batch), "raw": (args.raw_samples, args.raw_batch)}
    print(f"# {platform.node()} | {torch.get_num_threads()} torch threads | torch {torch.__version__} | "
          f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC")
    rows = []
    for mode, (n_samples, batch) in plan.items():
        shard_dir = write_shards(args.work, mode, n_samples)
        loader = {}
        for workers in (0, 1, 2):
            loader[workers] = loader_rate(shard_dir, batch, workers)
            log(f"{mode}: loader with {workers} worker(s): {loader[workers]:.0f} samples/s")
        step, fed = step_rates(mode, shard_dir, batch, args.steps)
        log(f"{mode}: step {step:.2f} samples/s in memory, {fed:.2f} fed by the loader")
        rows.append((mode, batch, loader, step, fed))
    print("\n| mode | batch | loader 0 workers | loader 1 worker | loader 2 workers | step (in memory) "
          "| step fed by loader (2 workers) | loader (best) / step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, batch, loader, step, fed in rows:
        best = max(loader.values())
        print(f"| {mode} | {batch} | {loader[0]:.0f} | {loader[1]:.0f} | {loader[2]:.0f} | {step:.3g} | "
              f"{fed:.3g} | {best / step:.0f}x |")
    print("\nsamples/s; step = forward + backward + Adam step of EMT-DLFR (features) or the end-to-end "
          "model (raw), missing rate 0.5")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
