"""End-to-end training step: where the time goes, bf16 against fp32, and how busy the GPU is.

Data: raw members of real GRID clips (3 s, 25 fps by default), extracted once with the
product's per-clip extraction into --work and reused. A batch larger than the number of
extracted clips repeats the clips (10 clips are enough for batch 128). Model: EMT-DLFR
(MOSI preset) behind FER + CREPE tiny; the MiniLM text encoder is frozen so the figures
isolate the front-ends. The step is the trainer's: missing-feature simulation on the CPU,
both views to the device (shared tensors copied once), `compute_loss`, backward, Adam.

Every (config, batch) runs in its own process, so peak memory is its own and a failure
(CUDA out of memory, a compiler missing for --compile) only marks that row "failed";
after an out-of-memory failure the larger batches of that config are skipped.

What it prints:

1. Training step table: config | batch | samples/s | s/step | first step s | peak MiB |
   GPU busy % | GPU s/step | loss. samples/s and s/step: `--steps` timed steps after one
   warm-up step ("first step s": that warm-up, which for +compile is the compile time).
   Peak MiB: on CUDA `torch.cuda.max_memory_allocated` over the timed steps; on CPU the
   process's peak RSS (includes ~1 GB of libraries and weights: compare rows, not values).
   GPU busy (CUDA only): `--profile-steps` more steps under torch.profiler (CPU + CUDA);
   GPU s/step = the union of the CUDA kernel intervals (overlapping kernels on several
   streams count once) per profiled step, GPU busy % = that union / the wall time of the
   profiled steps. The profiler slows the host a little, so GPU s/step / s/step is the
   busy fraction of an unprofiled step.
2. FLOPs per training sample (torch.utils.flop_counter over one forward+backward+Adam step
   of `trained` at the smallest batch; matmuls, convolutions and attention are counted;
   elementwise ops, normalisation, pooling and fused LSTM kernels (cuDNN, oneDNN) are not);
   per row of a trained config the achieved TFLOP/s = FLOPs/sample x samples/s, on CUDA also as a
   fraction of the peak bf16 dense rate (--peak-tflops, 989 = H100/H200 SXM).
3. With --breakdown: module | fp32 ms | bf16 ms | bf16/fp32, forward+backward of each
   piece alone on one batch (--breakdown-batch), called as the model calls it: the whole
   compute_loss, each front-end through `EndToEnd._run_frontend` (FER with NCHW and with
   channels_last weights), CREPE's first (512x1) convolution alone, the fusion model's
   compute_loss on precomputed front-end features, and each LSTM encoder on both views.
   Median of --breakdown-reps runs after a warm-up, with cuda synchronize around each.

Configs: `frozen` | `trained`, then any of `+bf16` (bfloat16 autocast), `+ckpt` (activation
checkpointing of the front-ends), `+channels_last` (the vision front-end's weights in
channels_last: its input is built inside its forward, and cuDNN follows the weights'
layout), `+compile` (torch.compile; --compile-scope parts: each front-end's network and the
fusion's compute_loss, step: the whole compute_loss, falling back to parts if that fails).
--compile adds a +compile twin of every selected config. On the CPU (torch 2.14.1) fp32
backward through FER with channels_last weights aborts the process (heap corruption in a 1x1
stride-2 convolution), and so does trained+compile (Inductor picks channels_last there too):
those rows fail on the CPU and the sweep goes on.

--profile DIR writes, per (config, batch), DIR/<config>-b<batch>.txt (the profiler's
key_averages table, sorted by self CUDA time on CUDA, self CPU time on CPU) and
DIR/<config>-b<batch>.json.gz (chrome trace of the profiled steps; chrome://tracing or
ui.perfetto.dev open it). --json PATH writes every row and figure with the machine,
the torch version and the date.

GPU run, in two commands so each stays well under 10 minutes (each (config, batch) process
adds start-up, model building, profiling and a trace export to its steps: estimated 15-30 s,
not yet measured on a GPU; the first command also extracts the 10 clips; each command prints
its tables and writes its JSON):

    python benchmarks/bench_end_to_end.py --device cuda --clips 10 --batches 8,32,128 --steps 10 \
        --configs frozen,trained,trained+bf16,trained+bf16+ckpt --breakdown --child-timeout 240 \
        --profile $OUT/profile --json $OUT/e2e.json
    python benchmarks/bench_end_to_end.py --device cuda --clips 10 --batches 8,128 --steps 10 \
        --configs trained+channels_last,trained+bf16+channels_last,trained+compile,trained+bf16+compile \
        --no-flops --child-timeout 240 --profile $OUT/profile --json $OUT/e2e-variants.json

CPU dry run (this machine, 2 cores: about 2 min per (config, batch), 4 for the breakdown):

    python benchmarks/bench_end_to_end.py --device cpu --clips 2 --batches 2,4 --steps 2 --threads 2 \
        --configs trained,trained+bf16 --breakdown --profile /tmp/e2e-prof --json /tmp/e2e.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GRID = ("bbaf2n", "brbk7n", "lbax4n", "lbbc2a", "lrwp9a", "lwbsza", "pwij3p", "sbia1a", "sbwe5n", "swiz3n")

# name -> (policy of both front-ends, bf16, checkpointing): the default sweep
CONFIGS = {
    "frozen": ("frozen", False, False),
    "trained": ("trained", False, False),
    "trained+bf16": ("trained", True, False),
    "trained+ckpt": ("trained", False, True),
    "trained+bf16+ckpt": ("trained", True, True),
}
# further variants for --configs (any base + flags combination parses; these are the ones meant)
VARIANTS = ("trained+channels_last", "trained+bf16+channels_last")
FLAGS = ("bf16", "ckpt", "channels_last", "compile")
MIB = 2**20


@dataclass(frozen=True)
class Spec:
    """A config name parsed: `<frozen|trained>[+bf16][+ckpt][+channels_last][+compile]`."""

    policy: str
    bf16: bool = False
    ckpt: bool = False
    channels_last: bool = False
    compile: bool = False


def parse_config(name: str) -> Spec:
    base, *flags = name.split("+")
    unknown = [f for f in flags if f not in FLAGS]
    if base not in ("frozen", "trained") or unknown or len(set(flags)) != len(flags):
        raise ValueError(f"config {name!r}: expected frozen|trained followed by any of "
                         f"{', '.join('+' + f for f in FLAGS)} (e.g. {', '.join(VARIANTS)})")
    return Spec(base, **{f: True for f in flags})


def expand_configs(names: list[str], add_compiled: bool) -> list[str]:
    """The selected configs (validated), then with --compile a +compile twin of each."""
    for n in names:
        parse_config(n)
    twins = [f"{n}+compile" for n in names if add_compiled and not parse_config(n).compile]
    return list(dict.fromkeys(names + twins))


def parse_batches(text: str | None, single: int) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()] if text else [single]
    if not values or min(values) < 1:
        raise ValueError(f"--batches: positive integers expected, got {text!r}")
    return list(dict.fromkeys(values))


def batch_indices(n_samples: int, batch_size: int) -> list[list[int]]:
    """Sample indices of each batch: consecutive slices of the samples, repeated as often as
    needed for one batch of `batch_size` (so batch 128 can be built from 10 clips)."""
    reps = -(-batch_size // n_samples)
    pool = [i % n_samples for i in range(n_samples * reps)]
    return [pool[i : i + batch_size] for i in range(0, len(pool) - batch_size + 1, batch_size)]


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


# ---------------------------------------------------------------- data


def shared_data() -> Path:
    return Path(os.environ.get("MSAFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def clips_root(work: Path, fps: float) -> Path:
    """Where the tars of one frame rate live (25 fps: --work itself, as before)."""
    return work if fps == 25.0 else work / f"fps{fps:g}"


def extract(work: Path, n_clips: int, fps: float, device: str) -> list[Path]:
    from msaflow.extractors.clip import ClipExtractor, ClipJob
    from msaflow.pipeline.extraction.settings import ExtractConfig

    root = clips_root(work, fps)
    tars, extractor = [], None
    for i, name in enumerate(GRID[:n_clips]):
        tar = root / "clips" / f"{name}.tar"
        if not tar.is_file():
            extractor = extractor or ClipExtractor(ExtractConfig(fps=fps), device=device)
            extractor.extract(ClipJob(row=i + 1, id=f"grid/{name}", key=name, video_id="grid", clip_id=name,
                                      path=str(shared_data() / "raw" / "grid" / f"{name}.mpg"), start=None,
                                      end=None, text="bin blue at f two now", label=float(i % 7 - 3),
                                      split="train"), root)
        tars.append(tar)
    return tars


def load_batches(tars: list[Path], batch_size: int) -> list[dict]:
    from msaflow.pipeline.data.loader import collate
    from msaflow.pipeline.data.shard_index import MODE_LAYOUTS
    from msaflow.pipeline.data.shard_reader import Sample

    from msaflow.tario import read_sample_tar

    members: list[dict[str, Any]] = [read_sample_tar(t)[1] for t in tars]
    layout = MODE_LAYOUTS["raw"].members
    samples = [Sample(m["json"]["id"], m["json"], {k: m[k] for k in layout}, 1.0) for m in members]
    return [collate([samples[i] for i in idx], layout) for idx in batch_indices(len(samples), batch_size)]


# ---------------------------------------------------------------- model and step


def build(spec: Spec, device: str):
    import torch
    from msaflow.model.config import for_dataset
    from msaflow.model.end_to_end import EndToEndConfig, build_end_to_end

    model_cfg, optim_cfg = for_dataset("mosi")
    model_cfg = replace(model_cfg, freeze_text=True)
    e2e = EndToEndConfig(policies={"vision": spec.policy, "audio": spec.policy}, bf16=spec.bf16,
                         checkpoint=spec.ckpt)
    torch.manual_seed(0)
    model = build_end_to_end(model_cfg, e2e, device=device).train()
    if spec.channels_last:
        model.frontends["vision"].to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.param_groups(optim_cfg))
    return model, optimizer


def compile_model(model, scope: str) -> Callable:
    """torch.compile the model; returns the loss function the step calls.

    step: the whole `compute_loss` (Dynamo unrolls the Python loops of the front-end calls,
    over time chunks and, where a front-end calls its network per clip, over clips, so the
    graph and compile time can grow with the batch). parts: each front-end's network (CREPE:
    its `frames_to_features`) and the fusion model's `compute_loss`, compiled separately.
    """
    import torch

    if scope == "step":
        return torch.compile(model.compute_loss)
    for fe in model.frontends.values():
        if hasattr(fe, "frames_to_features"):
            fe.frames_to_features = torch.compile(fe.frames_to_features)
        else:
            fe.compile()
    model.fusion.compute_loss = torch.compile(model.fusion.compute_loss)
    return model.compute_loss


def make_step(model, optimizer, loss_fn: Callable, device: str) -> Callable[[dict], float]:
    import torch
    from msaflow.pipeline.training.distributed import views_to_device

    gen = torch.Generator().manual_seed(0)

    def step(batch: dict) -> float:
        optimizer.zero_grad(set_to_none=True)
        incomplete = model.simulate_missing(batch, 0.3, generator=gen)  # on the CPU, as the loader does
        loss, _ = loss_fn(*views_to_device((batch, incomplete), torch.device(device)))
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warm_up(model, optimizer, spec: Spec, batches: list[dict], scope: str, device: str) -> tuple[Callable, dict]:
    """The step function and the first step's figures (under +compile: the compile time).

    A whole-step compile that fails is retried compiled in parts; compiled models then see
    every batch once more, so that the timed steps recompile nothing.
    """
    import torch

    loss_fn = compile_model(model, scope) if spec.compile else model.compute_loss
    step = make_step(model, optimizer, loss_fn, device)
    out: dict = {}
    t0 = time.perf_counter()
    try:
        step(batches[0])
    except Exception as err:
        if not (spec.compile and scope == "step"):
            raise
        out["compile_fallback"] = f"{type(err).__name__}: {str(err)[:300]}"
        print(f"compile of the whole step failed ({out['compile_fallback']}); compiling in parts", file=sys.stderr)
        torch._dynamo.reset()
        scope = "parts"
        step = make_step(model, optimizer, compile_model(model, scope), device)
        t0 = time.perf_counter()
        step(batches[0])
    sync(device)
    out["first_step_s"] = time.perf_counter() - t0
    if spec.compile:
        out["compile_scope"] = scope
        for b in batches[1:]:
            step(b)
    return step, out


# ---------------------------------------------------------------- profiling and FLOPs


def device_busy(prof, wall_s: float, n_steps: int) -> dict:
    """CUDA kernel time of a profile: the union of the kernel intervals (and of every device
    activity, copies included), and the sum of self CUDA time of the ops, each per step."""
    from torch.autograd import DeviceType

    out: dict = {}
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.device_type() == DeviceType.CUDA]
        spans = [(e.start_ns() / 1e9, e.end_ns() / 1e9, str(e.activity_type())) for e in events]
        if not spans:
            raise ValueError("the profiler recorded no CUDA activity (CUPTI unavailable?)")
        kernels = [(a, b) for a, b, kind in spans if "kernel" in kind.lower()] or [(a, b) for a, b, _ in spans]
        out["gpu_kernel_s_per_step"] = union_length(kernels) / n_steps
        out["gpu_active_s_per_step"] = union_length([(a, b) for a, b, _ in spans]) / n_steps
        out["gpu_busy_measure"] = "union of CUDA kernel intervals"
    except Exception as err:  # noqa: BLE001 - a profiler API change: fall back to summed self CUDA time
        out["gpu_busy_measure"] = f"sum of self CUDA time (kernel intervals unavailable: {err})"
    self_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
    out["gpu_self_time_s_per_step"] = self_us / 1e6 / n_steps
    out.setdefault("gpu_kernel_s_per_step", out["gpu_self_time_s_per_step"])
    busy = out["gpu_kernel_s_per_step"] * n_steps / wall_s
    out["gpu_busy"] = busy if busy > 0 else None  # nothing recorded is no measurement, not an idle GPU
    return out


def profile_steps(step: Callable, batches: list[dict], n_steps: int, device: str, prefix: Path | None) -> dict:
    """`n_steps` steps under torch.profiler; busy figures on CUDA, table + trace under `prefix`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        sync(device)
        t0 = time.perf_counter()
        for i in range(n_steps):
            step(batches[i % len(batches)])
        sync(device)
        wall = time.perf_counter() - t0
    out: dict = {"profiled_steps": n_steps, "profiled_step_s": wall / n_steps}
    if device == "cuda":
        out.update(device_busy(prof, wall, n_steps))
    if prefix is not None:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        sort_by = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=25)
        prefix.with_suffix(".txt").write_text(f"{n_steps} profiled steps, {wall:.3f} s wall\n{table}\n")
        trace = prefix.with_suffix(".json.gz")
        prof.export_chrome_trace(str(trace))
        out["profile_files"] = [str(prefix.with_suffix(".txt")), str(trace)]
    return out


def count_flops(step: Callable, batch: dict) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    total = counter.get_total_flops()
    return {"flops_per_step": total, "flops_per_sample": total / len(batch["id"]), "batch": len(batch["id"])}


# ---------------------------------------------------------------- one (config, batch)


def run_one(name: str, tars: list[Path], batch_size: int, steps: int, device: str, args) -> dict:
    import torch

    spec = parse_config(name)
    batches = load_batches(tars, batch_size)
    model, optimizer = build(spec, device)
    step, warm = warm_up(model, optimizer, spec, batches, args.compile_scope, device)
    row: dict = {"config": name, "batch": batch_size, **warm}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    n, losses = 0, []
    for i in range(steps):
        batch = batches[i % len(batches)]
        losses.append(step(batch))
        n += len(batch["id"])
    sync(device)
    seconds = time.perf_counter() - t0
    row.update(samples_per_s=n / seconds, step_s=seconds / steps, peak_mib=peak_mib(device), loss=losses[-1])
    if device == "cuda" or args.profile:
        prefix = args.profile / f"{name}-b{batch_size}" if args.profile else None
        row.update(profile_steps(step, batches, args.profile_steps, device, prefix))
    if args.count_flops:
        row["flops"] = count_flops(step, batches[0])
    return row


def run_flops_only(name: str, tars: list[Path], batch_size: int, device: str) -> dict:
    """FLOPs of one step when no selected config could count them on the side."""
    model, optimizer = build(parse_config(name), device)
    step = make_step(model, optimizer, model.compute_loss, device)
    return {"config": name, "batch": batch_size, "flops": count_flops(step, load_batches(tars, batch_size)[0])}


# ---------------------------------------------------------------- per-module breakdown

# fp32 backward of FER with channels_last weights corrupts the heap on the CPU (torch 2.14.1:
# a 1x1 stride-2 convolution with channels_last weights over an NCHW input of 60x60 that needs
# a gradient aborts with "double free or corruption"); the CPU breakdown leaves that cell out
CPU_CHANNELS_LAST_FP32 = "fp32 channels_last FER backward aborts on the CPU (heap corruption, torch 2.14.1)"


@dataclass
class Piece:
    """One breakdown row: `forward()` returns a scalar to backpropagate, called as the model calls it."""

    label: str
    forward: Callable
    setup: Callable | None = None  # run once before the piece (e.g. a weight layout)
    in_sum: bool = False  # one of the parts that add up to the step
    cpu_fp32_skip: str | None = None


def time_fwd_bwd(model, fn: Callable, device: str, bf16: bool, reps: int) -> float:
    """Median ms of forward (under the model's autocast) + backward of `fn`'s scalar, after a warm-up."""
    import torch

    model.cfg.bf16 = bf16  # the model's own switch: `_autocast` reads it at every call

    def once() -> float:
        model.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        with model._autocast(torch.device(device)):
            loss = fn()
        loss.float().backward()
        sync(device)
        return time.perf_counter() - t0

    once()
    return statistics.median(once() for _ in range(reps)) * 1000


def breakdown_pieces(model, batch: dict, incomplete: dict) -> list[Piece]:
    """The whole loss, each front-end, CREPE's first convolution, the fusion model and its LSTM
    encoders; FER with channels_last weights last (the riskiest layout change)."""
    import torch
    from msaflow.extractors.crepe import normalize_frames, window_frames
    from msaflow.model.encoders import SequenceEncoder
    from msaflow.model.end_to_end import _wav_chunk, drop_features

    with torch.no_grad():
        feats_c = model.features(batch)  # fp32 front-end outputs: the fusion model's input
    feats_i = drop_features(feats_c, incomplete)
    pieces = [Piece("full step: compute_loss + backward (no Adam)", lambda: model.compute_loss(batch, incomplete)[0])]
    late = []
    for m, fe in model.frontends.items():
        def frontend(m=m):
            return model._run_frontend(m, batch)[m].sum()
        if m == "vision":
            pieces.append(Piece(f"{m}: {fe.name} front-end (NCHW weights)", frontend, in_sum=True))
            late.append(Piece(f"{m}: {fe.name} front-end (channels_last weights)", frontend,
                              setup=lambda fe=fe: fe.to(memory_format=torch.channels_last),
                              cpu_fp32_skip=CPU_CHANNELS_LAST_FP32))
        else:
            pieces.append(Piece(f"{m}: {fe.name} front-end", frontend, in_sum=True))
        net: Any = getattr(fe, "net", None)
        if fe.input == "wav" and hasattr(net, "conv1"):  # CREPE: its first (512, 1) convolution alone
            n_steps = batch["audio_present"].shape[1]
            piece, ctx = _wav_chunk(batch["wav"], 0, n_steps)  # the chunk the model hands the front-end
            frames = torch.cat([normalize_frames(window_frames(w, 0, n_steps + 2 * ctx)) for w in piece])

            def conv1(net=net, frames=frames):  # every window of the batch in one call
                return net.layer(frames[:, None, :, None], net.conv1, net.conv1_BN, (0, 0, 254, 254)).sum()
            pieces.append(Piece(f"{m}: {fe.name} conv1 {tuple(net.conv1.kernel_size)} + BN only", conv1))
    pieces.append(Piece(f"fusion: {model.cfg.fusion} compute_loss on precomputed features",
                        lambda: model.compute_loss(feats_c, feats_i)[0], in_sum=True))
    for name, mod in model.fusion.named_modules():
        m = name.rsplit(".", 1)[-1]
        if isinstance(mod, SequenceEncoder) and m in feats_c:
            def lstm(mod=mod, m=m):
                outs = [mod(f[m], f[f"{m}_lengths"]) for f in (feats_c, feats_i)]
                return sum(o.utterance.float().sum() + o.local.float().sum() for o in outs)
            pieces.append(Piece(f"fusion: LSTM encoder {m} (both views)", lstm))
    return pieces + late


def run_breakdown(tars: list[Path], batch_size: int, device: str, reps: int) -> dict:
    """Each piece timed in fp32 and bf16; every row is printed (a JSON line) as soon as it is done,
    so a crash later on leaves the rows before it to the parent."""
    import torch
    from msaflow.model.end_to_end import cpu_bf16_problem
    from msaflow.pipeline.training.distributed import views_to_device

    model, _ = build(parse_config("trained"), device)
    batch_cpu = load_batches(tars, batch_size)[0]
    incomplete_cpu = model.simulate_missing(batch_cpu, 0.3, generator=torch.Generator().manual_seed(0))
    batch, incomplete = views_to_device((batch_cpu, incomplete_cpu), torch.device(device))
    no_bf16 = cpu_bf16_problem() if device == "cpu" else None
    rows: list[dict[str, Any]] = []
    for piece in breakdown_pieces(model, batch, incomplete):
        print(f"# breakdown: {piece.label}", file=sys.stderr, flush=True)
        if piece.setup is not None:
            piece.setup()
        skip = piece.cpu_fp32_skip if device == "cpu" else None
        rows.append({"module": piece.label, "in_sum": piece.in_sum, "note": skip,
                     "fp32_ms": None if skip else time_fwd_bwd(model, piece.forward, device, False, reps),
                     "bf16_ms": None if no_bf16 else time_fwd_bwd(model, piece.forward, device, True, reps)})
        print(json.dumps({"breakdown_row": rows[-1]}), flush=True)
    return {"batch": batch_size, "reps": reps, "rows": rows, "bf16_unavailable": no_bf16}


def breakdown_sum(rows: list[dict]) -> dict:
    """The row adding up the front-ends (NCHW) and the fusion model, to hold against the full step."""
    parts = [r for r in rows if r.get("in_sum")]
    return {"module": "sum: front-ends (NCHW) + fusion", "in_sum": False, "note": None,
            **{k: (sum(r[k] for r in parts) if parts and all(r[k] is not None for r in parts) else None)
               for k in ("fp32_ms", "bf16_ms")}}


# ---------------------------------------------------------------- the sweep (parent process)


@dataclass
class ChildResult:
    result: dict | None  # the JSON of the last stdout line, None on failure
    error: str  # stderr tail on failure
    lines: list[dict]  # every JSON line printed (partial results of a child that crashed)


def child(args, device: str, mode: list[str], batch: int, steps: int | None = None) -> ChildResult:
    """Run this script in a fresh process for one result."""
    cmd = [sys.executable, __file__, *mode, "--device", device, "--clips", str(args.clips), "--batch", str(batch),
           "--steps", str(args.steps if steps is None else steps), "--fps", str(args.fps),
           "--threads", str(args.threads), "--work", str(args.work), "--profile-steps", str(args.profile_steps),
           "--compile-scope", args.compile_scope, "--breakdown-reps", str(args.breakdown_reps)]
    if args.profile:
        cmd += ["--profile", str(args.profile)]
    try:
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired as err:
        stdout, stderr = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                          for x in (err.stdout, err.stderr))
        return ChildResult(None, f"timeout after {args.child_timeout} s\n{stderr[-2000:]}", json_lines(stdout))
    lines = json_lines(out.stdout)
    if out.returncode == 0 and lines:
        return ChildResult(lines[-1], "", lines)
    signal = f"killed by signal {-out.returncode}\n" if out.returncode < 0 else ""
    return ChildResult(None, signal + (out.stderr[-2000:] or f"exit {out.returncode}, no result"), lines)


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def failure_reason(error: str) -> str:
    low = error.lower()
    if "out of memory" in low:
        return "out of memory"
    if low.startswith("timeout"):
        return error.splitlines()[0]
    last = [line for line in error.strip().splitlines() if line.strip()]
    reason = last[-1][:100] if last else "error"
    return f"{error.splitlines()[0]}: {reason}" if low.startswith("killed by signal") and len(last) > 1 else reason


def flops_config(configs: list[str]) -> str | None:
    """The row that also counts FLOPs: `trained`, else a trained config doing the same work (bf16,
    channels_last; not +ckpt, whose recomputed forward would count twice, nor +compile); None: a
    process of its own counts `trained`."""
    if "trained" in configs:
        return "trained"
    same = [c for c in configs if (s := parse_config(c)).policy == "trained" and not (s.ckpt or s.compile)]
    return same[0] if same else None


def sweep(args, device: str, configs: list[str], batches: list[int]) -> tuple[list[dict], dict | None]:
    """Every (config, batch) in its own process; FLOPs counted on the side of one row."""
    rows: list[dict] = []
    flops = None
    counter = flops_config(configs) if args.flops else None
    for name in configs:
        oom_at = None
        for b in batches:
            if oom_at is not None and b > oom_at:
                rows.append({"config": name, "batch": b, "failed": f"skipped: out of memory at batch {oom_at}"})
                continue
            mode = ["--one", name] + (["--count-flops"] if name == counter and b == min(batches) else [])
            print(f"# {name} batch {b}", file=sys.stderr, flush=True)
            run = child(args, device, mode, b)
            row: dict[str, Any]
            if run.result is None:
                print(f"{name} batch {b}: failed\n{run.error}", file=sys.stderr)
                row = {"config": name, "batch": b, "failed": failure_reason(run.error), "error": run.error}
                oom_at = b if row["failed"] == "out of memory" else oom_at
            else:
                row = run.result
                if "flops" in row:
                    flops = {**row.pop("flops"), "config": name}
            rows.append(row)
    if args.flops and flops is None:
        print("# FLOP count", file=sys.stderr, flush=True)
        run = child(args, device, ["--one-flops", "trained"], min(batches), steps=1)
        if run.result is None:
            print(f"FLOP count: failed\n{run.error}", file=sys.stderr)
        else:
            flops = {**run.result["flops"], "config": "trained"}
    return rows, flops


def breakdown(args, device: str, batch: int) -> dict:
    """The breakdown child's result; the rows it printed before failing if it failed."""
    print("# breakdown", file=sys.stderr, flush=True)
    run = child(args, device, ["--one-breakdown"], batch)
    if run.result is not None:
        return run.result
    print(f"breakdown: failed\n{run.error}", file=sys.stderr)
    rows = [line["breakdown_row"] for line in run.lines if "breakdown_row" in line]
    return {"batch": batch, "reps": args.breakdown_reps, "rows": rows, "bf16_unavailable": None,
            "failed": failure_reason(run.error), "error": run.error}


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_rows(rows: list[dict], device: str) -> None:
    peak = "peak MiB (CUDA allocated)" if device == "cuda" else "peak RSS MiB"
    print(f"| config | batch | samples/s | s/step | first step s | {peak} | GPU busy % | GPU s/step | loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "failed" in r:
            print(f"| {r['config']} | {r['batch']} | failed ({r['failed']}) | - | - | - | - | - | - |")
            continue
        busy = fmt(r.get("gpu_busy") and 100 * r["gpu_busy"], ".0f")
        print(f"| {r['config']} | {r['batch']} | {r['samples_per_s']:.2f} | {r['step_s']:.3f} | "
              f"{r['first_step_s']:.2f} | {r['peak_mib']:.0f} | {busy} | {fmt(r.get('gpu_kernel_s_per_step'), '.3f')} "
              f"| {r['loss']:.3f} |")
    fallbacks = [r for r in rows if r.get("compile_fallback")]
    for r in fallbacks:
        print(f"\n{r['config']} b{r['batch']}: whole-step compile failed, compiled in parts ({r['compile_fallback']})")


def print_flops(flops: dict | None, rows: list[dict], device: str, peak_tflops: float) -> dict:
    if flops is None:
        print("\nFLOPs per training sample: not counted")
        return {}
    per_sample = flops["flops_per_sample"]
    print(f"\nFLOPs per training sample: {per_sample / 1e9:.1f} GFLOP ({flops['config']}, batch {flops['batch']}, "
          f"forward + backward + Adam; torch.utils.flop_counter counts matmuls, convolutions and attention, not "
          f"elementwise ops, normalisation, pooling or fused LSTM kernels (cuDNN, oneDNN))")
    achieved = [r for r in rows if "failed" not in r and parse_config(r["config"]).policy == "trained"]
    if device == "cuda":
        print(f"Peak assumed: {peak_tflops:g} TFLOP/s bf16 dense (--peak-tflops; 989 = H100/H200 SXM)")
    if not achieved:
        return {}
    print("\n| config | batch | achieved TFLOP/s | % of peak bf16 |")
    print("| --- | ---: | ---: | ---: |")
    out = {}
    for r in achieved:
        tflops = per_sample * r["samples_per_s"] / 1e12
        share = 100 * tflops / peak_tflops if device == "cuda" else None
        r["achieved_tflops"], r["peak_fraction"] = tflops, (None if share is None else share / 100)
        print(f"| {r['config']} | {r['batch']} | {tflops:.3f} | {fmt(share, '.2f')} |")
        out[f"{r['config']}-b{r['batch']}"] = tflops
    return out


def print_breakdown(result: dict) -> None:
    unavailable = result.get("bf16_unavailable")
    print(f"\nPer-module forward+backward, one batch of {result['batch']}, median of {result['reps']} after a "
          f"warm-up (trained front-ends; bf16 = the model's bfloat16 autocast"
          f"{'; bf16 unavailable here: ' + unavailable if unavailable else ''})\n")
    print("| module | fp32 ms | bf16 ms | bf16/fp32 |")
    print("| --- | ---: | ---: | ---: |")
    for r in [*result["rows"], breakdown_sum(result["rows"])]:
        fp32, bf16 = r["fp32_ms"], r["bf16_ms"]
        ratio = bf16 / fp32 if fp32 and bf16 is not None else None
        print(f"| {r['module']} | {fmt(fp32, '.1f')} | {fmt(bf16, '.1f')} | {fmt(ratio, '.2f')} |")
    for note in dict.fromkeys(r["note"] for r in result["rows"] if r.get("note")):
        print(f"\n-: {note}")
    if result.get("failed"):
        print(f"\nbreakdown process failed after {len(result['rows'])} rows: {result['failed']}")


def machine(device: str, threads: int) -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": threads, "device": device,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_mib=props.total_memory // MIB, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), capability=f"{props.major}.{props.minor}")
    return info


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--clips", type=int, default=4, help="GRID clips to extract (batches cycle them)")
    p.add_argument("--batch", type=int, default=4, help="one batch size (alias of --batches B)")
    p.add_argument("--batches", help="comma list of batch sizes, e.g. 8,32,128")
    p.add_argument("--steps", type=int, default=3, help="timed steps per (config, batch)")
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list; also {', '.join(VARIANTS)}")
    p.add_argument("--compile", action="store_true", help="add a +compile twin of every selected config")
    p.add_argument("--compile-scope", default="parts", choices=["parts", "step"])
    p.add_argument("--profile", type=Path, help="folder for each row's profiler table and chrome trace")
    p.add_argument("--profile-steps", type=int, default=2, help="profiled steps per row (GPU busy, --profile)")
    p.add_argument("--breakdown", action="store_true", help="per-module fp32 / bf16 forward+backward table")
    p.add_argument("--breakdown-batch", type=int, help="batch of the breakdown (default: the smallest)")
    p.add_argument("--breakdown-reps", type=int, default=3)
    p.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                   help="count FLOPs per sample (one extra step of `trained` at the smallest batch)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak bf16 dense TFLOP/s of the GPU")
    p.add_argument("--json", type=Path, help="write every row and figure here")
    p.add_argument("--child-timeout", type=int, default=600, help="seconds per (config, batch) process")
    p.add_argument("--work", type=Path, default=Path("/tmp/msaflow-bench-e2e"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--one-flops", help=argparse.SUPPRESS)
    p.add_argument("--one-breakdown", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.profile_steps < 1 or args.breakdown_reps < 1:
        p.error("--steps, --profile-steps and --breakdown-reps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tars = extract(args.work, args.clips, args.fps, device)
    if args.one or args.one_flops or args.one_breakdown:  # a child: one result as the last stdout line
        if args.one:
            result = run_one(args.one, tars, args.batch, args.steps, device, args)
        elif args.one_flops:
            result = run_flops_only(args.one_flops, tars, args.batch, device)
        else:
            result = run_breakdown(tars, args.batch, device, args.breakdown_reps)
        print(json.dumps(result))
        return 0
    configs = expand_configs(args.configs.split(","), args.compile)
    batches = parse_batches(args.batches, args.batch)
    rows, flops = sweep(args, device, configs, batches)
    parts = breakdown(args, device, args.breakdown_batch or min(batches)) if args.breakdown else None

    info = machine(device, args.threads)
    name = info.get("gpu") or f"CPU, {args.threads} threads"
    print(f"\nEnd-to-end training step, EMT-DLFR (MOSI preset, text encoder frozen) behind FER + CREPE tiny; "
          f"{device} ({name}); GRID clips 3 s at {args.fps:g} fps ({args.clips} clips, cycled); batches "
          f"{', '.join(map(str, batches))}; {args.steps} timed steps after 1 warm-up; torch {torch.__version__}\n")
    print_rows(rows, device)
    if device == "cuda":
        print(f"\nGPU busy: {args.profile_steps} more steps under torch.profiler; GPU s/step = union of the CUDA "
              f"kernel intervals per step; busy % = that / the profiled steps' wall time")
    achieved = print_flops(flops, rows, device, args.peak_tflops)
    if parts is not None:
        print_breakdown(parts)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": info, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "configs": configs, "batches": batches, "rows": rows, "flops": flops, "achieved_tflops": achieved,
            "peak_tflops_assumed": args.peak_tflops if device == "cuda" else None,
            "breakdown": parts and {**parts, "sum": breakdown_sum(parts["rows"])},
        }, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
