"""Peak memory and time of `msaflow extract` (raw mode) by frame size, with and without the
decode-size cap (`max_decode_side`).

Makes 5-s clips at 360p, 1080p and 4K from a real clip (HDTF, 512x512, scaled up with ffmpeg and
padded to 16:9, so the face sits in the middle of the frame), then runs one `msaflow extract` job
per clip and setting: `max_decode_side: null` (frames decoded at their own size, as before the
cap) and the default cap (720 px on the longest side). Peak RSS is that of the job's largest
process (the CLI or its decode worker), from getrusage of the job's children.

    .venv/bin/python benchmarks/bench_decode_memory.py [--data ../shared/data] [--seconds 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = (("360p", 640, 360), ("1080p", 1920, 1080), ("4K", 3840, 2160))
SETTINGS = (("cap off", "max_decode_side: null\n"), ("cap 720", ""))


def make_clip(src: Path, dst: Path, width: int, height: int, seconds: float) -> Path:
    if not dst.exists():
        vf = f"scale=-2:{height}:flags=bicubic,pad={width}:{height}:(ow-iw)/2:0"
        subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-i", str(src), "-t", str(seconds), "-vf", vf,
                        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", str(dst)],
                       check=True)
    return dst


def extract_job(manifest: Path, out: Path, config: Path) -> tuple[float, float]:
    """(peak RSS MB of the job's largest process, wall seconds) of one `msaflow extract` run."""
    shutil.rmtree(out, ignore_errors=True)
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "msaflow.pipeline.cli", "extract",
                          str(manifest), "-o", str(out), "--mode", "raw", "--config", str(config), "--device", "cpu"],
                         capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(res.stderr[-2000:])
    return int(res.stdout.strip().splitlines()[-1]) / 1024, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--source", default="raw/hdtf/hdtf_aoc.mp4")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--work", type=Path)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-decode-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, width, height in SIZES:
        clip = make_clip(args.data / args.source, work / f"{name}.mp4", width, height, args.seconds)
        manifest = work / f"{name}.csv"
        manifest.write_text("id,video_id,clip_id,path,start,end,text,label,split\n"
                            f"bench/{name},bench,{name},{clip},,,,0,train\n", encoding="utf-8")
        cells = []
        for label, setting in SETTINGS:
            config = work / f"{label.replace(' ', '_')}.yaml"
            config.write_text(setting or "{}\n", encoding="utf-8")
            out = work / f"out-{name}-{label.replace(' ', '_')}"
            peak, wall = extract_job(manifest, out, config)
            summary = json.loads((out / "chunks" / "1-of-1.json").read_text(encoding="utf-8"))
            c = summary["counts"]
            faces = f"{c['face_frames_missing']} missing" if c["ok"] else "failed"
            cells.append((peak, wall, faces))
            print(f"{name} {label}: peak {peak:.0f} MB, {wall:.1f} s, face frames {faces}", file=sys.stderr)
        rows.append((name, f"{width}x{height}", cells))
    print(f"\n`msaflow extract` raw mode, one {args.seconds:g}-s clip ({args.source} scaled up and padded), "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| clip | frame size | cap off: peak RSS MB | cap off: s | cap 720: peak RSS MB | cap 720: s | "
          "frames without face (off / on) |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, size, ((p0, w0, f0), (p1, w1, f1)) in rows:
        print(f"| {name} | {size} | {p0:.0f} | {w0:.1f} | {p1:.0f} | {w1:.1f} | {f0} / {f1} |")


if __name__ == "__main__":
    main()
