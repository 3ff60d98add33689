"""CREPE over a batch of clips: one network call per clip vs one call for the whole batch.

The end-to-end model hands a front-end a padded batch (B clips x T steps). CREPE's forward
loops over the clips (B network calls of T windows each). Whether one call of B*T windows
is faster depends on the device: this script times both on real speech (an HDTF clip cut
into 3-s pieces), forward + backward in training mode:

- per clip: the product's forward, `fe(waves, masks)`;
- batched: every clip's windows stacked and run through the network in one call.

In eval mode both give the same features; in training mode the batched call's BatchNorm
sees the whole batch's windows at once.

    python benchmarks/bench_frontend_calls.py --device cpu --batches 2,8 --repeats 3   # this machine
    python benchmarks/bench_frontend_calls.py --device cuda --batches 8,32,128 --repeats 10
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CLIP_SECONDS = 3.0


def speech(n_clips: int) -> torch.Tensor:
    """(n_clips, 3 s) int16 waveforms cut from a real HDTF clip, repeated as needed."""
    from msaflow.extractors.audio import decode_audio

    data = Path(os.environ.get("MSAFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
    wav = torch.from_numpy(decode_audio(data / "raw" / "hdtf" / "hdtf_aoc.mp4", None, 0.0, None))
    n = int(CLIP_SECONDS * 16_000)
    pieces = [wav[i * n : (i + 1) * n] for i in range(len(wav) // n)]
    return torch.stack([pieces[i % len(pieces)] for i in range(n_clips)])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device: torch.device, repeats: int) -> float:
    """Seconds per call of `step` (after one warm-up call)."""
    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--frontend", default="crepe-tiny")
    parser.add_argument("--batches", default="2,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from msaflow.extractors import frontends as F
    from msaflow.extractors.crepe import n_steps_for, window_frames

    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    fe = F.build(f"audio={args.frontend}", device)["audio"]
    fe.unfreeze().train()
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        waves = speech(batch).to(device)
        masks = torch.ones(batch, n_steps_for(waves.shape[1]), dtype=torch.bool, device=device)

        def per_clip():
            fe(waves, masks).float().square().mean().backward()

        def batched():
            frames = torch.stack([window_frames(w, 0, masks.shape[1]) for w in waves])  # (B, T, 1024)
            out = fe.frames_to_features(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])
            (out * masks[..., None]).float().square().mean().backward()

        loop_s, one_s = timed(per_clip, device, args.repeats), timed(batched, device, args.repeats)
        rows.append((batch, loop_s, one_s))
        print(f"batch {batch}: per clip {loop_s * 1e3:.0f} ms, batched {one_s * 1e3:.0f} ms", file=sys.stderr)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'CPU'}, " \
        f"{args.threads} threads"
    print(f"\n{args.frontend}, trained, forward + backward of 3-s clips (300 windows each); {where}; "
          f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC\n")
    print("| batch | one call per clip, ms | one call per batch, ms | per clip / batched |")
    print("| ---: | ---: | ---: | ---: |")
    for batch, loop_s, one_s in rows:
        print(f"| {batch} | {loop_s * 1e3:.0f} | {one_s * 1e3:.0f} | {loop_s / one_s:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
