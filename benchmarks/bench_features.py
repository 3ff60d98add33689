"""Features-mode extraction speed beside raw mode, and seconds per front-end.

On the GRID clips (3 s, 25 fps), in one process with the same torch threads and the same
extraction settings: (1) raw mode, `ClipExtractor` without front-ends; (2) features mode,
the same extractor with the front-ends of --frontends (built once, frozen); (3) every
front-end of --frontends and of --extra alone, run by `raw_to_features` on the raw clips
of (1): seconds per clip and input steps per second. Prints Markdown tables.

Memory (--memory MINUTES): the raw members of a long clip (a GRID clip repeated) as .npy
files, converted by `raw_to_features` in a fresh process; its peak RSS beside that of a
process that only builds the front-ends, and the size of the inputs.

    .venv/bin/python benchmarks/bench_features.py [--data ../shared/data] [--clips 11]
        [--frontends face=fer,audio=crepe-tiny,text=minilm] [--extra crepe-full,egemaps]
        [--device cpu|cuda] [--threads N] [--memory MINUTES]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch  # before decord (see extractors/video.py)

REPO = Path(__file__).resolve().parents[1]

from msaflow.extractors import frontends as F  # noqa: E402
from msaflow.extractors.clip import ClipExtractor, ClipJob  # noqa: E402
from msaflow.extractors.video_checks import TailCheck  # noqa: E402
from msaflow.pipeline.extraction.settings import ExtractConfig  # noqa: E402
from msaflow.tario import read_sample_tar  # noqa: E402

GRID_TEXT = {"b": "bin", "l": "lay", "p": "place", "s": "set"}  # first word of the GRID sentence


def _jobs(clips: list[Path]) -> list[ClipJob]:
    return [ClipJob(row=i + 1, id=f"grid/{p.stem}", key=f"grid_{p.stem}", video_id="grid", clip_id=p.stem,
                    path=str(p), start=None, end=None, text=f"{GRID_TEXT.get(p.stem[0], 'bin')} blue now",
                    label=0.0, split="train")
            for i, p in enumerate(clips)]


def _run_modes(extractors: dict[str, ClipExtractor], jobs: list[ClipJob], out: Path) -> dict[str, dict]:
    """Each clip through every mode in turn (interleaved: a busy shared machine slows both alike).

    Per mode: wall seconds, CPU seconds of this process (all threads), seconds per stage.
    """
    result = {mode: {"wall": 0.0, "cpu": 0.0, "stages": defaultdict(float)} for mode in extractors}
    for job in jobs:
        for mode, extractor in extractors.items():
            TailCheck._verdicts.clear()  # each mode checks the file anew, as a fresh run would
            wall, cpu = time.perf_counter(), time.process_time()
            seconds = extractor.extract(job, out / mode)["seconds"]
            result[mode]["wall"] += time.perf_counter() - wall
            result[mode]["cpu"] += time.process_time() - cpu
            for stage, s in seconds.items():
                result[mode]["stages"][stage] += s
    return result


def _per_frontend(raw_dir: Path, names: list[str], device: str) -> list[dict]:
    samples = [read_sample_tar(p)[1] for p in sorted((raw_dir / "clips").glob("*.tar"))]
    rows = []
    for entry in names:
        name = entry.split(":", 1)[0]
        modality = F.REGISTRY[name].modality
        started = time.perf_counter()
        try:
            fe = F.build({modality: entry}, device)[modality]
        except (FileNotFoundError, ModuleNotFoundError) as err:
            print(f"skipping {entry}: {err}", file=sys.stderr)
            continue
        load_s = time.perf_counter() - started
        F.raw_to_features(samples[0], {modality: fe})  # warm-up (first-call allocations)
        timings: dict[str, float] = {}
        steps = 0
        cpu = time.process_time()
        for members in samples:
            F.raw_to_features(members, {modality: fe}, timings)
            source = members[F.INPUT_MEMBERS[fe.input]]
            steps += len(members.get(F.MASK_MEMBERS.get(modality, ""), source))
        cpu = time.process_time() - cpu
        seconds = timings[modality]
        duration = sum(m["json"]["duration"] for m in samples)
        rows.append({"name": name, "modality": modality, "dim": fe.out_dim, "load_s": load_s,
                     "s_per_clip": seconds / len(samples), "cpu_per_clip": cpu / len(samples), "steps_per_s": steps / seconds,
                     "realtime": duration / seconds})
    return rows


def _long_clip(raw_tar: Path, minutes: float, out: Path) -> dict[str, Path]:
    """Raw members of a clip `minutes` long, written as .npy files by repeating one clip."""
    import numpy as np

    _, m = read_sample_tar(raw_tar)
    reps = int(np.ceil(minutes * 60 / m["json"]["duration"]))
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for member in ("face.npy", "vision_mask.npy", "wav.npy", "fbank.npy", "audio_mask.npy"):
        part = m[member]
        big = np.lib.format.open_memmap(out / member, mode="w+", dtype=part.dtype, shape=(len(part) * reps, *part.shape[1:]))
        for i in range(reps):  # written piece by piece: this process stays small too
            big[i * len(part):(i + 1) * len(part)] = part
        big.flush()
        del big
        paths[member] = out / member
    paths["text_ids.npy"] = out / "text_ids.npy"
    np.save(paths["text_ids.npy"], m["text_ids.npy"])
    return paths


def _child_rss(spec: str, members: dict[str, Path] | None, threads: int) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a fresh process that builds the front-ends and, if given, converts `members`."""
    import json
    import subprocess

    code = (
        "import json, resource, sys, time, torch\n"
        f"torch.set_num_threads({max(threads, 1)})\n"
        "from pathlib import Path\n"
        "from msaflow.extractors import frontends as F\n"
        "spec, members = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
        "fes = F.build(spec, 'cpu')\n"
        "t = time.perf_counter()\n"
        "if members:\n"
        "    members = {k: Path(v) for k, v in members.items()}\n"
        "    members['json'] = {'id': 'long'}\n"
        "    F.raw_to_features(members, fes)\n"
        "print(json.dumps([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t]))\n"
    )
    args = [sys.executable, "-c", code, json.dumps(F.parse_spec(spec)),
            json.dumps({k: str(v) for k, v in (members or {}).items()})]
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    rss, seconds = json.loads(result.stdout.strip().splitlines()[-1])
    return rss, seconds


def memory(args, jobs: list[ClipJob]) -> int:
    cfg = ExtractConfig(device="cpu")
    with tempfile.TemporaryDirectory(prefix="bench_features_mem_") as tmp:
        tmp = Path(tmp)
        ClipExtractor(cfg, device="cpu").extract(jobs[0], tmp / "raw")
        members = _long_clip(tmp / "raw" / "clips" / f"{jobs[0].key}.tar", args.memory, tmp / "long")
        input_mb = sum(p.stat().st_size for p in members.values()) / 2**20
        base_rss, _ = _child_rss(args.frontends, None, args.threads)
        rss, seconds = _child_rss(args.frontends, members, args.threads)
    print(f"## features-mode memory, one {args.memory:g}-minute clip ({jobs[0].key} repeated), "
          f"front-ends {args.frontends}\n")
    print(f"date {datetime.date.today()}, {os.cpu_count()} cores, torch threads {max(args.threads, 1)}, cpu\n")
    print("| process | peak RSS MB | raw inputs on disk MB | seconds |")
    print("|---|---|---|---|")
    print(f"| build the front-ends only | {base_rss:.0f} | | |")
    print(f"| build + raw_to_features | {rss:.0f} | {input_mb:.0f} | {seconds:.1f} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("MSAFLOW_SHARED_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--clips", type=int, default=11, help="how many GRID clips")
    parser.add_argument("--frontends", default=F.DEFAULT_SPEC)
    parser.add_argument("--extra", default="crepe-full,egemaps", help="more front-ends to time alone")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--memory", type=float, metavar="MINUTES", help="measure peak memory on one long clip instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    clips = sorted((args.data / "raw" / "grid").glob("*.mpg"))[: args.clips]
    if not clips:
        print(f"no GRID clips under {args.data / 'raw' / 'grid'}", file=sys.stderr)
        return 1
    jobs = _jobs(clips)
    if args.memory:
        return memory(args, jobs)
    cfg = ExtractConfig(device=args.device)
    spec = F.parse_spec(args.frontends)
    build_started = time.perf_counter()
    built = F.build(spec, args.device)
    build_s = time.perf_counter() - build_started

    with tempfile.TemporaryDirectory(prefix="bench_features_") as tmp:
        tmp = Path(tmp)
        raw = ClipExtractor(cfg, device=args.device)
        feat = ClipExtractor(cfg, device=args.device, frontends=built)
        raw.extract(jobs[0], tmp / "warmup")  # MTCNN's first call allocates
        feat.extract(jobs[0], tmp / "warmup")
        modes = _run_modes({"raw": raw, "features": feat}, jobs, tmp)
        names = list(spec.values()) + [n for n in args.extra.split(",") if n and n not in spec.values()]
        per_fe = _per_frontend(tmp / "raw", names, args.device)

    n = len(jobs)
    print(f"## features-mode extraction, {n} GRID clips (3 s, 25 fps, 360x288)\n")
    print(f"date {datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
          + f"; front-ends {args.frontends} (built in {build_s:.1f} s)\n")
    stages = sorted(set().union(*(m["stages"] for m in modes.values())), key=lambda s: (s == "features", s))
    print("| mode | clips/s | s/clip | CPU s/clip | " + " | ".join(f"{s} s/clip" for s in stages) + " |")
    print("|---|---|---|---|" + "---|" * len(stages))
    for mode, m in modes.items():
        print(f"| {mode} | {n / m['wall']:.2f} | {m['wall'] / n:.2f} | {m['cpu'] / n:.2f} | "
              + " | ".join(f"{m['stages'].get(s, 0.0) / n:.3f}" for s in stages) + " |")
    ratio = modes["features"]["wall"] / modes["raw"]["wall"]
    cpu_ratio = modes["features"]["cpu"] / modes["raw"]["cpu"]
    print(f"\nfeatures mode takes {ratio:.2f}x raw mode's wall time per clip ({cpu_ratio:.2f}x its CPU time)\n")
    print("| front-end | modality | dim | load s | s/clip | CPU s/clip | input steps/s | x real time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in per_fe:
        print(f"| {r['name']} | {r['modality']} | {r['dim']} | {r['load_s']:.1f} | {r['s_per_clip']:.3f} | "
              f"{r['cpu_per_clip']:.3f} | "
              f"{r['steps_per_s']:.0f} | {r['realtime']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
