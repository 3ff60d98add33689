"""Shard loader throughput vs what a training step consumes, on this machine's CPU or its GPU.

Can the streaming shard loader feed the GPU? The CPU run (the default; both shard modes,
0/1/2 workers):

    python benchmarks/bench_loader.py [--work DIR] [--features-samples 512] [--raw-samples 96] [--json PATH]

The GPU run (one GPU, 16 CPU cores; under 3 minutes: 512 synthetic raw samples, 1.6 GB, ~10 s
to write; warm-up and sweep 13 passes of <= 6 s; steps ~30 s at ~0.25 s a step; imports and
model ~20 s), from the repository root in the environment that `bash benchmarks/gpu_check.sh
setup` installs (PYTHONPATH=/tmp/msaflow-site, python3):

    PYTHONPATH=/tmp/msaflow-site python3 benchmarks/bench_loader.py --device cuda --modes raw \\
        --workers 0,1,2,4,8,16 --raw-samples 512 --repeat 8 --raw-batch 32 --pass-seconds 6 \\
        --steps 16 --fed-steps 64 --json $OUT/loader.json

and over real shards (the raw shards `benchmarks/scale_corpus.py` writes, OUT/n<N>/shards-raw:
real clips of varying length, up to 60 s, so a batch is padded to its longest clip):

    PYTHONPATH=/tmp/msaflow-site python3 benchmarks/bench_loader.py --device cuda \\
        --shards /tmp/msaflow-scale/n100/shards-raw --workers 0,1,2,4,8,16 --raw-batch 32 \\
        --pass-seconds 6 --steps 16 --fed-steps 64 --json $OUT/real.json

Shards. Without --shards: synthetic shards of 3-second clips with the shapes the pipeline
produces (docs/data-contracts.md §3; features: MiniLM text states 384-d, CREPE-tiny audio 258-d
on the 10 ms grid, FER face 135-d at 25 fps; raw: 112x112 RGB uint8 face crops at 25 fps,
16 kHz int16 waveform, 80-bin fbank), random values (the loader's cost depends on sizes, not
on content), written once under --work (reused while their sample count matches). `--repeat K`
makes the index list those shards K times: an epoch of K x samples that the file cache holds
once, so that 16 workers get several batches each without writing gigabytes. With `--shards DIR`
(layout DIR/<split>/index.json + <split>-*.tar) the mode is the index's (`--modes` must then
include it) and the feature widths are the index's. `--limit N` reads only the first N samples
of an epoch (`make_loader(limit=N)`). The file cache is warm (one untimed pass per mode first,
cut like the others by --pass-seconds): the figures are decoding, collation and worker transfer,
not disk reads.

Measurements (samples/s):

- loader: one epoch through `make_loader` per worker count of `--workers` (worker start-up
  included, as at the start of every training epoch; `--pass-seconds S` stops a pass after S s,
  the rate is then over the samples read). Counts above `os.cpu_count()` are run and flagged.
  On cuda the loader pins memory (`pin_memory=True`) and each count is run twice: the loader
  alone ("host"), and the loader plus the host-to-device copy of every tensor of each batch
  (`.to(device, non_blocking=True)`, dtypes kept: the face crops cross as uint8, the model
  converts them on the GPU) with one `torch.cuda.synchronize()` per batch ("+copy").
- step (in memory): forward + backward + Adam step of the real models on batches already
  where the step runs (on cuda: resident on the GPU): features mode EMT-DLFR (MOSI
  configuration, text states precomputed), raw mode the end-to-end model (FER and CREPE-tiny
  front-ends trained, EMT-DLFR fusion); both with the missing-feature simulation at rate 0.5
  (complete + incomplete views, drawn where the batch is). `--steps 0` skips the steps.
- fed: the same step taking its batches from a fresh loader (`--fed-workers`, default the
  sweep's fastest count; pin_memory and the copy to the GPU inside the step on cuda), worker
  start-up included, `--fed-steps` steps (default --steps; 0 = one epoch). The batch crosses
  to the GPU once and the views are drawn there (pipeline/training/train.py draws them on the
  host and copies the two views with `views_to_device`, which also copies the face crops they
  share once). On a CPU-only machine the workers and the step share the cores.

On cuda the steps are timed between `torch.cuda.synchronize()` calls, and the GPU idle fraction
is measured with CUDA events recorded before each step's first GPU work (the copy) and after its
optimiser step: the share of the timed span (first step's start to last step's end; the wait for
the first fed batch, its `first_batch_s`, is outside it) in which the GPU had nothing queued
between steps.

Prints a Markdown table. Figures of merit: fed / in memory (target >= 0.8: the GPU busy at
least 80% of the time with the loader feeding it) and loader (best) / step (target >= 3).
`--json PATH` writes every figure, the machine and the date.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from msaflow.device import usable_cores
from msaflow.model.config import ModelConfig
from msaflow.model.missing import simulate_missing
from msaflow.model.registry import build_model
from msaflow.pipeline.data.loader import make_loader
from msaflow.pipeline.data.shard_index import SplitIndex, shard_location
from msaflow.pipeline.training.distributed import to_device  # dtypes kept: uint8 crops stay uint8
from msaflow.tario import TarWriter, atomic_path, write_json_atomic

DURATION, FPS, STEPS_PER_S, SAMPLE_RATE = 3.0, 25, 100, 16000
FEATURE_DIMS = {"text": 384, "audio": 258, "vision": 135}
FACE, N_MELS = 112, 80
SHARD_SAMPLES = 100
MODES = ("features", "raw")
MISSING_RATE = 0.5
FEW_BATCHES_PER_WORKER = 4  # fewer per worker in a pass: worker start-up dominates the rate
# counts above the CPU count are wanted here (and flagged in the table): no DataLoader warning for each
warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)


# ---------------------------------------------------------------------------- synthetic shards


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


def write_shards(root: Path, mode: str, n_samples: int, repeat: int = 1) -> Path:
    """Synthetic shards of `n_samples` clips in root/mode/train (kept while the count matches);
    the index lists them `repeat` times (an epoch of repeat x n_samples)."""
    split_dir = root / mode / "train"
    index_path = split_dir / "index.json"
    index = read_json(index_path)
    if index is None or index.get("bench_samples") != n_samples:
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
        index = {"split": "train", "mode": mode, "shards": shards, "modalities": schema, "frontends": {},
                 "config_hash": "bench", "manifest_hash": "bench", "msaflow_version": "bench",
                 "bench_samples": n_samples, "bench_unique_shards": len(shards)}
    elif index.get("bench_repeat") == repeat:
        return root / mode
    shards = index["shards"][: index["bench_unique_shards"]]
    write_json_atomic(index_path, {**index, "shards": shards * repeat, "n_samples": n_samples * repeat,
                                   "bench_repeat": repeat})
    return root / mode


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- helpers


def tensor_bytes(batch: dict) -> int:
    return sum(v.nbytes for v in batch.values() if isinstance(v, torch.Tensor))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epochs(loader, first_epoch: int = 0) -> Iterator[dict]:
    """The loader's batches, epoch after epoch (workers restarted each epoch, as in training)."""
    epoch = first_epoch
    while True:
        loader.dataset.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader yields no batch (fewer samples than one batch with drop_last?)")
        epoch += 1


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- loader alone


def loader_pass(loader, epoch: int, device: torch.device | None, max_seconds: float, pinning: bool = False) -> dict:
    """One epoch (or `max_seconds` of it) through the loader; with `device`, each batch copied there
    (one synchronize per batch). `pinning`: record whether the batches came pinned."""
    loader.dataset.set_epoch(epoch)
    seen = n_bytes = 0
    first = None
    pinned = None
    dtypes: dict[str, str] = {}
    start = time.perf_counter()
    batches = iter(loader)
    for batch in batches:
        if first is None:
            first = time.perf_counter() - start
            pinned = all(v.is_pinned() for v in batch.values() if isinstance(v, torch.Tensor)) if pinning else None
        if device is not None:
            moved = to_device(batch, device)
            torch.cuda.synchronize(device)
            dtypes = dtypes or {k: str(v.dtype).removeprefix("torch.") for k, v in moved.items()
                                if isinstance(v, torch.Tensor)}
            del moved
        n_bytes += tensor_bytes(batch)
        seen += len(batch["id"])
        if max_seconds and time.perf_counter() - start >= max_seconds:
            break
    seconds = time.perf_counter() - start
    del batches  # stops the workers of a pass cut short
    out = {"samples": seen, "seconds": seconds, "samples_per_s": seen / seconds, "first_batch_s": first,
           "whole_epoch": seen == loader.dataset.index.n_samples, "bytes_per_sample": n_bytes / max(seen, 1),
           "pinned": pinned}
    if device is not None:
        out["device_dtypes"] = dtypes
        out["gb_per_s"] = n_bytes / seconds / 1e9
    return out


def loader_sweep(shard_dir: Path, split: str, batch: int, workers: list[int], device: torch.device,
                 limit: int, max_seconds: float) -> tuple[dict, list[dict]]:
    """(the untimed warm-up pass, one row per worker count: host pass and, on cuda, the +copy pass)."""
    cuda = device.type == "cuda"
    cpus = os.cpu_count() or 1
    # one untimed pass first, to warm the file cache (the largest count that fits the cores)
    warm_workers = max([w for w in workers if w <= cpus] or [min(workers)])
    warm = make_loader(shard_dir, split, batch, shuffle=True, seed=0, num_workers=warm_workers, limit=limit)
    rows = [{"warm_workers": warm_workers, **loader_pass(warm, 0, None, max_seconds)}]
    for w in workers:
        loader = make_loader(shard_dir, split, batch, shuffle=True, seed=0, num_workers=w, pin_memory=cuda,
                             limit=limit)
        row = {"workers": w, "over_cpu_count": w > cpus, "epoch_samples": loader.dataset.index.n_samples,
               "epoch_batches": len(loader), "batches_per_worker": len(loader) / max(w, 1)}
        row["host"] = loader_pass(loader, 1, None, max_seconds, cuda)
        msg = f"{w} worker(s): {row['host']['samples_per_s']:.0f} samples/s"
        if cuda:
            row["device"] = loader_pass(loader, 2, device, max_seconds, cuda)
            msg += f", {row['device']['samples_per_s']:.0f} with the copy to the GPU"
        rows.append(row)
        log(f"loader with {msg}")
    return rows[0], rows[1:]


def best_rate(row: dict) -> float:
    return row["device" if "device" in row else "host"]["samples_per_s"]


# ---------------------------------------------------------------------------- the training step


def build_step_model(mode: str, dims: dict[str, int] | None = None) -> torch.nn.Module:
    dims = {**FEATURE_DIMS, **(dims or {})}
    cfg = ModelConfig(d_text=dims["text"], d_audio=dims["audio"], d_vision=dims["vision"])
    if mode == "features":
        return build_model("emt-dlfr", replace(cfg, freeze_text=True))
    from msaflow.model.end_to_end import EndToEndConfig, build_end_to_end

    e2e = EndToEndConfig(policies={"vision": "trained", "audio": "trained"})
    return build_end_to_end(replace(cfg, freeze_text=True), e2e)


def train_step(model, optimizer, batch: dict, seed: int) -> None:
    # the end-to-end model draws raw-mode masks itself; features models use the shared simulation
    simulate = getattr(model, "simulate_missing", None) or simulate_missing
    loss, _ = model.compute_loss(batch, simulate(batch, MISSING_RATE, seed=seed))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def timed_steps(model, optimizer, batches: Iterator[dict], n_steps: int, device: torch.device) -> dict:
    """`n_steps` steps on batches from `batches` (copied to `device` inside the step), timed."""
    cuda = device.type == "cuda"
    marks: list[tuple] = []
    seen, first = 0, None
    synchronize(device)
    start = time.perf_counter()
    for i in range(n_steps):
        batch = next(batches)
        if first is None:
            first = time.perf_counter() - start
        if cuda:
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
        train_step(model, optimizer, to_device(batch, device), i)
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            marks.append((begin, end))
        seen += len(batch["id"])
    synchronize(device)
    seconds = time.perf_counter() - start
    out = {"steps": n_steps, "samples": seen, "seconds": seconds, "samples_per_s": seen / seconds,
           "first_batch_s": first}
    if marks:
        span = marks[0][0].elapsed_time(marks[-1][1])
        idle = sum(prev[1].elapsed_time(cur[0]) for prev, cur in itertools.pairwise(marks))
        out["gpu_idle_fraction"] = max(idle, 0.0) / span if span > 0 else None
    return out


def step_rates(mode: str, shard_dir: Path, split: str, batch: int, steps: int, fed_steps: int, fed_workers: int,
               device: torch.device, limit: int, dims: dict[str, int]) -> dict:
    """In-memory and fed step rates (samples/s) of one mode's model."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_step_model(mode, dims).to(device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # in memory: up to 16 distinct batches, already where the step runs, cycled
    source = make_loader(shard_dir, split, batch, shuffle=True, seed=1, num_workers=0, drop_last=True, limit=limit)
    held_iter = epochs(source)
    held = [to_device(b, device) for _, b in zip(range(min(steps + 1, 16)), held_iter, strict=False)]
    held_iter.close()
    synchronize(device)
    in_memory_batches = itertools.cycle(held)
    train_step(model, optimizer, next(in_memory_batches), 0)  # warm-up (kernels, allocator)
    in_memory = timed_steps(model, optimizer, in_memory_batches, steps, device)
    log(f"{mode}: step in memory {in_memory['samples_per_s']:.3g} samples/s")
    del held, in_memory_batches
    fed_loader = make_loader(shard_dir, split, batch, shuffle=True, seed=2, num_workers=fed_workers,
                             drop_last=True, pin_memory=cuda, limit=limit)
    n_fed = fed_steps or len(fed_loader)
    fed_batches = epochs(fed_loader)
    fed = timed_steps(model, optimizer, fed_batches, n_fed, device)
    fed_batches.close()
    fed["workers"] = fed_workers
    log(f"{mode}: step fed by the loader ({fed_workers} workers) {fed['samples_per_s']:.3g} samples/s")
    return {"in_memory": in_memory, "fed": fed, "fed_over_in_memory": fed["samples_per_s"] / in_memory["samples_per_s"]}


# ---------------------------------------------------------------------------- main


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of integers") from exc
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of integers >= 0")
    return values


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: modes are a comma list of {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to torch")
    return torch.device(name)


def machine(device: torch.device) -> dict:
    return {"node": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpus_usable": usable_cores(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def feature_dims(index: SplitIndex) -> dict[str, int]:
    """Feature widths from a features index (text/audio/vision .npy last axis), where it states them."""
    dims = {}
    for m in FEATURE_DIMS:
        shape = index.shapes.get(f"{m}.npy") or ()
        if shape and isinstance(shape[-1], int):
            dims[m] = shape[-1]
    return dims


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def table(results: dict, workers: list[int], device: torch.device) -> str:
    cpus = os.cpu_count() or 1
    cuda = device.type == "cuda"
    heads = [f"loader {w} worker{'' if w == 1 else 's'}{'*' if w > cpus else ''}" for w in workers]
    cols = ["mode", "batch", "epoch samples", *heads, "step (in memory)", "step fed by loader", "fed / in memory",
            "loader (best) / step"] + (["GPU idle in memory / fed"] if cuda else [])
    lines = ["| " + " | ".join(cols) + " |", "| --- | " + " | ".join("---:" for _ in cols[1:]) + " |"]
    few = False
    for mode, r in results.items():
        cells = []
        for row in r["loader"]:
            cell = fmt(row["host"]["samples_per_s"])
            if cuda:
                cell += f" / {fmt(row['device']['samples_per_s'])}"
            if row["batches_per_worker"] < FEW_BATCHES_PER_WORKER:
                cell += " †"
                few = True
            cells.append(cell)
        step = r.get("step")
        if step:
            rate = step["in_memory"]["samples_per_s"]
            idle = f"{pct(step['in_memory'].get('gpu_idle_fraction'))} / {pct(step['fed'].get('gpu_idle_fraction'))}"
            tail = [fmt(rate), f"{fmt(step['fed']['samples_per_s'])} ({step['fed']['workers']} workers)",
                    f"{step['fed_over_in_memory']:.2f}", f"{r['best_loader_samples_per_s'] / rate:.1f}x"]
        else:
            tail, idle = ["-", "-", "-", "-"], "-"
        lines.append("| " + " | ".join([mode, str(r["batch"]), str(r["epoch_samples"]), *cells, *tail]
                                       + ([idle] if cuda else [])) + " |")
    notes = ["", ("samples/s; step = forward + backward + Adam step of EMT-DLFR (features) or the end-to-end "
                  f"model (raw), missing rate {MISSING_RATE}; worker start-up included")]
    if cuda:
        notes.append("loader cells: host (pinned) / +copy (every tensor .to(cuda, non_blocking=True), "
                     "torch.cuda.synchronize() per batch); in memory = batches resident on the GPU")
    if any(w > cpus for w in workers):
        notes.append(f"* more workers than the {cpus} CPUs of os.cpu_count()")
    if few:
        notes.append(f"† fewer than {FEW_BATCHES_PER_WORKER} batches per worker in the epoch: start-up weighs on the "
                     "rate (more samples, or --repeat)")
    return "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/msaflow-bench-loader"), help="where shards go")
    parser.add_argument("--shards", help="an existing shard folder (DIR/<split>/index.json) instead of synthetic "
                        "shards")
    parser.add_argument("--split", default="train", help="the split of --shards to read")
    parser.add_argument("--modes", type=parse_modes, default=None, help="comma list of features,raw (default both; "
                        "with --shards, the index's mode)")
    parser.add_argument("--features-samples", type=int, default=512)
    parser.add_argument("--raw-samples", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=1, help="synthetic shards: the index lists them K times")
    parser.add_argument("--features-batch", type=int, default=32, help="the MOSI batch size")
    parser.add_argument("--raw-batch", type=int, default=8)
    parser.add_argument("--limit", type=int, default=0, help="read only the first N samples of an epoch (0: all)")
    parser.add_argument("--workers", type=parse_ints, default=[0, 1, 2], help="comma list of loader worker counts")
    parser.add_argument("--pass-seconds", type=float, default=0.0, help="cut a loader pass after S s (0: whole epochs)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps in memory per mode (0: no steps)")
    parser.add_argument("--fed-steps", type=int, default=None, help="timed steps fed by the loader "
                        "(default --steps; 0: one epoch)")
    parser.add_argument("--fed-workers", type=int, default=None, help="workers of the fed step (default: the fastest "
                        "count of the sweep)")
    parser.add_argument("--json", type=Path, help="write all figures, the machine and the date here")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    device = pick_device(args.device)
    batches = {"features": args.features_batch, "raw": args.raw_batch}
    plan: list[tuple[str, Path, bool, dict[str, int]]] = []  # (mode, shard dir, synthetic, feature dims)
    if args.shards:
        index = SplitIndex.load(shard_location(args.shards) / args.split)
        if args.modes and index.mode not in args.modes:
            parser.error(f"--shards {args.shards}: the shards are in {index.mode!r} mode, not in --modes {args.modes}")
        plan.append((index.mode, Path(args.shards), False, feature_dims(index) if index.mode == "features" else {}))
    else:
        counts = {"features": args.features_samples, "raw": args.raw_samples}
        for mode in args.modes or list(MODES):
            log(f"{mode}: synthetic shards of {counts[mode]} samples in {args.work / mode}")
            plan.append((mode, write_shards(args.work, mode, counts[mode], args.repeat), True, {}))
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    info = machine(device)
    print(f"# {info['node']} | {info['cpu_count']} CPUs, {info['torch_threads']} torch threads | torch {info['torch']}"
          f" | {device}{' ' + info['gpu'] if info['gpu'] else ''} | {date}")
    split = args.split if args.shards else "train"
    results: dict[str, dict] = {}
    for mode, shard_dir, synthetic, dims in plan:
        batch = batches[mode]
        warm, sweep = loader_sweep(shard_dir, split, batch, args.workers, device, args.limit, args.pass_seconds)
        best = max(sweep, key=best_rate)
        r = {"shards": str(shard_dir), "split": split, "synthetic": synthetic,
             "repeat": args.repeat if synthetic else None, "limit": args.limit, "batch": batch,
             "epoch_samples": sweep[0]["epoch_samples"], "warm_pass": warm, "loader": sweep,
             "best_workers": best["workers"], "best_loader_samples_per_s": best_rate(best)}
        if args.steps > 0:
            fed_workers = best["workers"] if args.fed_workers is None else args.fed_workers
            fed_steps = args.steps if args.fed_steps is None else args.fed_steps
            r["step"] = step_rates(mode, shard_dir, split, batch, args.steps, fed_steps, fed_workers, device,
                                   args.limit, dims)
        results[mode] = r
    print()
    print(table(results, args.workers, device))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, {"date": date, "machine": info, "argv": sys.argv[1:] if argv is None else argv,
                                      "device": str(device), "workers": args.workers, "missing_rate": MISSING_RATE,
                                      "modes": results})
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
