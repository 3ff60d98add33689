"""Extraction speed and peak memory with speech recognition on, beside raw mode.

Each variant is one `msaflow extract` job (a fresh output folder, default settings, raw mode,
empty transcripts) run as its own process; peak RSS is the largest process of the job (the CLI
or its worker, where the recogniser runs), seconds per stage come from the chunk summary.
Variants alternate set by set, so load changes hit both alike.

    .venv/bin/python benchmarks/bench_asr.py [--data ../shared/data] [--repeats 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MSAFLOW = Path(sys.executable).parent / "msaflow"
PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def manifest(paths: list[Path], out: Path) -> Path:
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "video_id", "clip_id", "path", "start", "end", "text", "label", "split"])
        for p in paths:
            writer.writerow([f"{p.parent.name}/{p.stem}", p.parent.name, p.stem, str(p), "", "", "", "", "test"])
    return out


def run_job(rows: Path, out: Path, asr: bool, device: str) -> dict:
    config = out.with_suffix(".yaml")
    config.write_text(json.dumps({"extract": {"device": device, **({"asr": {}} if asr else {})}}))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, str(MSAFLOW), "extract", str(rows), "-o", str(out),
                           "--config", str(config)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    peak = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_KB")))
    (summary_path,) = (out / "chunks").glob("*.json")
    summary = json.loads(summary_path.read_text())
    return {"wall": wall, "peak_mb": peak / 1024, "seconds": summary["seconds"], "counts": summary["counts"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("MSAFLOW_SHARED_DATA", REPO.parent / "shared" / "data")))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--work", type=Path, help="folder for the long clip (reused when present)")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    args = p.parse_args()

    sys.path.insert(0, str(REPO / "tests"))
    import media

    grid = sorted((args.data / "raw" / "grid").glob("*.mpg"))
    hdtf = sorted((args.data / "raw" / "hdtf").glob("*.mp4"))
    with tempfile.TemporaryDirectory(prefix="bench-asr-") as tmp:
        tmp = Path(tmp)
        work = args.work or tmp
        long = work / "long" / "grid_x22.mp4"  # about 1 minute: the 11 GRID clips twice
        if not long.exists():
            media.make_concatenated(grid, long, repeat=2)
        sets = {"11 GRID clips (3 s)": grid, "2 HDTF clips (8 s)": hdtf, "1 min (GRID x 22)": [long]}
        results: dict = {}
        for name, paths in sets.items():
            rows = manifest(paths, tmp / f"{len(results)}.csv")
            for rep in range(args.repeats):
                for asr in (False, True):
                    out = tmp / f"{len(results)}-{rep}-{int(asr)}"
                    r = run_job(rows, out, asr, args.device)
                    results.setdefault(name, {}).setdefault("asr" if asr else "raw", []).append(r)
                    print(f"{name} {'asr' if asr else 'raw'} rep {rep}: wall {r['wall']:.1f} s, peak "
                          f"{r['peak_mb']:.0f} MB, asr {r['seconds'].get('asr', 0):.2f} s, recognised "
                          f"{r['counts']['text_recognised']}", file=sys.stderr)
        print("| clips | variant | clips | job wall s | extraction s/clip | asr s/clip | x raw time | peak RSS MB |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for name, variants in results.items():
            n = len(sets[name])
            base = min(r["seconds"]["wall"] for r in variants["raw"])
            for variant, runs in variants.items():
                best = min(runs, key=lambda r: r["seconds"]["wall"])
                per_clip = best["seconds"]["wall"] / n
                print(f"| {name} | {variant} | {n} | {best['wall']:.1f} | {per_clip:.2f} | "
                      f"{best['seconds'].get('asr', 0.0) / n:.2f} | {best['seconds']['wall'] / base:.2f} | "
                      f"{max(r['peak_mb'] for r in runs):.0f} |")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
