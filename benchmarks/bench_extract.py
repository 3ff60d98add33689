"""Raw-mode extraction speed and memory.

Speed (default): on the GRID clips, side by side in one process with the same torch
threads, (1) decode only: frames at the output rate + 16 kHz audio, the floor; (2) a naive
per-frame loop as MESM-style scripts do it: every frame decoded one by one, MTCNN on the
full-resolution frame, the crop cut from it; (3) msaflow's `ClipExtractor` at the given
settings (the truncation check included: it runs beside decoding, in its own process). All three compute the same fbank and write the same kind of tar, so the
difference is the vision path. Prints clips/s, seconds per stage and ratios.

Quality (--quality): per clip, IoU of each variant's face boxes with those of detecting
every frame, so a cheaper setting shows what it costs in crop placement.

Memory (--memory): peak RSS of one `msaflow extract` job (CLI and its worker process) on a
1-minute and a 10-minute clip made by concatenating the GRID clips with ffmpeg.

    .venv/bin/python benchmarks/bench_extract.py [--data ../shared/data] [--variants '' min_face_size=20 ...]
    .venv/bin/python benchmarks/bench_extract.py --quality [--variants ...]
    .venv/bin/python benchmarks/bench_extract.py --memory [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch  # before decord (see extractors/video.py)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from msaflow.extractors import audio, face, video, video_checks  # noqa: E402
from msaflow.extractors.clip import ClipExtractor, ClipJob, StageTimer  # noqa: E402
from msaflow.extractors.text import tokenize  # noqa: E402
from msaflow.pipeline.extraction.settings import ExtractConfig  # noqa: E402
from msaflow.tario import write_sample_tar  # noqa: E402

STAGES = ("decode", "verify", "detect", "crop", "fbank", "write")


def _jobs(clips: list[Path]) -> list[ClipJob]:
    return [ClipJob(row=i + 1, id=f"grid/{p.stem}", key=f"grid_{p.stem}", video_id="grid", clip_id=p.stem,
                    path=str(p), start=None, end=None, text="", label=0.0, split="train")
            for i, p in enumerate(clips)]


def _audio_and_write(job: ClipJob, duration: float, faces: np.ndarray, mask: np.ndarray, out: Path,
                     timer: StageTimer, cfg: ExtractConfig) -> None:
    with timer("fbank"):
        wav = audio.decode_audio(job.path, 0.0, 0.0, duration)
        fb, amask = audio.log_mel_fbank(wav, audio.fbank_steps(duration), cfg.n_mels)
    with timer("write"):
        write_sample_tar(out / f"{job.key}.tar", job.key, {
            "json": {"id": job.id}, "face.npy": faces, "vision_mask.npy": mask, "wav.npy": wav,
            "fbank.npy": fb, "audio_mask.npy": amask, "text_ids.npy": np.asarray(tokenize(job.text))})


def decode_only(job: ClipJob, cfg: ExtractConfig, out: Path) -> dict:
    timer = StageTimer()
    with timer("decode"):
        reader, info = video.open_video(job.path)
        n = video.n_output_frames(info.duration_s, cfg.fps)
        idx = video.source_indices(info, 0.0, n, cfg.fps)
        for _ in video.iter_frame_chunks(reader, idx, cfg.chunk_frames):
            pass
        audio.decode_audio(job.path, info.begin_s, 0.0, info.duration_s)
    return dict(timer.seconds)


class NaiveLoop:
    """Frame by frame: decode one frame, MTCNN on it at full resolution, crop the best face."""

    def __init__(self, cfg: ExtractConfig, device: str = "cpu"):
        from facenet_pytorch import MTCNN

        self.cfg = cfg
        self.mtcnn = MTCNN(keep_all=False, device=device)  # facenet-pytorch's defaults, as such scripts use it

    def __call__(self, job: ClipJob, out: Path) -> dict:
        from facenet_pytorch.models.utils.detect_face import extract_face

        cfg, timer = self.cfg, StageTimer()
        with timer("decode"):
            reader, info = video.open_video(job.path)
            n = video.n_output_frames(info.duration_s, cfg.fps)
            idx = video.source_indices(info, 0.0, n, cfg.fps)
        faces = np.zeros((n, cfg.face_size, cfg.face_size, 3), np.uint8)
        mask = np.zeros(n, bool)
        for i, j in enumerate(idx):
            with timer("decode"):
                frame = reader[int(j)].asnumpy()
            with timer("detect"):
                boxes, probs = self.mtcnn.detect(frame)
            if boxes is None:
                continue
            with timer("crop"):
                crop = extract_face(torch.from_numpy(frame), boxes[0], cfg.face_size, margin=0)
                faces[i] = crop.permute(1, 2, 0).clamp(0, 255).byte().numpy()
                mask[i] = True
        _audio_and_write(job, info.duration_s, faces, mask, out, timer, cfg)
        return dict(timer.seconds)


def speed(args) -> None:
    clips = sorted((args.data / "raw" / "grid").glob("*.mpg"))
    if not clips:
        sys.exit(f"no GRID clips under {args.data}/raw/grid")
    jobs = _jobs(clips[: args.clips] if args.clips else clips)
    torch.set_num_threads(args.threads)
    base = ExtractConfig(device=args.device)
    variants = {"decode only (floor)": None, "naive per-frame MTCNN": "naive"}
    for overrides in args.variants:
        name = "msaflow " + (", ".join(f"{k}={v}" for k, v in overrides.items()) or "(defaults)")
        variants[name] = ExtractConfig.model_validate(base.model_dump() | overrides)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        naive = NaiveLoop(base, args.device)
        extractors = {name: ClipExtractor(cfg, device=args.device) for name, cfg in variants.items()
                      if isinstance(cfg, ExtractConfig)}
        for name in variants:  # warm-up: first calls pay one-time initialisation
            _run_one(name, variants[name], jobs[0], naive, extractors, base, Path(tmp) / "warm")
        for rep in range(args.repeats):
            for job in jobs:
                for name in variants:  # interleaved per clip, so load changes hit every variant alike
                    out = Path(tmp) / f"{rep}-{list(variants).index(name)}"
                    video_checks.TailCheck._verdicts.clear()  # every variant checks the file anew
                    totals = results.setdefault(name, defaultdict(float))
                    t0 = time.perf_counter()
                    for stage, s in _run_one(name, variants[name], job, naive, extractors, base, out).items():
                        totals[stage] += s
                    totals["wall"] += time.perf_counter() - t0
                print(f"done {job.id}: " + ", ".join(f"{n} {results[n]['wall']:.1f}s" for n in results),
                      file=sys.stderr, flush=True)
    n_clips = len(jobs) * args.repeats
    floor = results["decode only (floor)"]["wall"]
    naive_wall = results["naive per-frame MTCNN"]["wall"]
    where = f"cuda ({torch.cuda.get_device_name()})" if args.device == "cuda" else "cpu"
    print(f"\n{len(jobs)} GRID clips x {args.repeats} repeats, {os.cpu_count()} CPUs, torch threads {args.threads}, "
          f"device {where}, {time.strftime('%Y-%m-%d')}\n")
    print("| pipeline | clips/s | " + " | ".join(f"{s} s/clip" for s in STAGES) + " | x decode-only time | x naive clips/s |")
    print("|---|---:|" + "---:|" * len(STAGES) + "---:|---:|")
    for name, t in results.items():
        per = {s: t.get(s, 0.0) / n_clips for s in STAGES}
        print(f"| {name} | {n_clips / t['wall']:.2f} | " + " | ".join(f"{per[s]:.4f}" for s in STAGES)
              + f" | {t['wall'] / floor:.2f} | {naive_wall / t['wall']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({k: dict(v) for k, v in results.items()}, indent=2))


def _run_one(name, cfg, job, naive, extractors, base, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if cfg is None:
        return decode_only(job, base, out)
    if cfg == "naive":
        return naive(job, out)
    (out / "clips").mkdir(exist_ok=True)
    seconds = extractors[name].extract(job, out)["seconds"]
    seconds["fbank"] = seconds.get("fbank", 0.0) + seconds.pop("text", 0.0)  # tokenizing: negligible
    return seconds


def memory(args) -> None:
    import media

    clips = sorted((args.data / "raw" / "grid").glob("*.mpg"))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-extract-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"\npeak RSS of one `msaflow extract` job (largest process: the CLI or its worker), "
          f"default config, {time.strftime('%Y-%m-%d')}\n")
    print("| clip | duration s | frames | wall s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    for minutes, repeat in ((1, 2), (10, 18)):
        src = work / f"grid_{minutes}min.mp4"
        if not src.exists():  # reused from an earlier --work run
            media.make_concatenated(clips, src, repeat=repeat)
        _, info = video.open_video(src)
        manifest = work / f"{minutes}min.csv"
        manifest.write_text("id,video_id,clip_id,path,start,end,text,label,split\n"
                            f"long/{minutes}min,long,{minutes}min,{src},,,,0,train\n", encoding="utf-8")
        out = work / f"out{minutes}"
        shutil.rmtree(out, ignore_errors=True)
        probe = ("import resource, subprocess, sys; "
                 "r = subprocess.run(sys.argv[1:]); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "msaflow.pipeline.cli",
                              "extract", str(manifest), "-o", str(out), "--device", "cpu"],
                             capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(res.stderr[-2000:])
        peak_mb = int(res.stdout.strip().splitlines()[-1]) / 1024
        n = video.n_output_frames(info.duration_s, 25.0)
        print(f"| {minutes} min (GRID x {repeat * len(clips)}) | {info.duration_s:.1f} | {n} | {wall:.1f} | {peak_mb:.0f} |")


def quality(args) -> None:
    """How far the keyframe track strays from detecting every frame: per clip, IoU of each
    variant's box with the dense track's box, over frames where both have a face."""
    clips = [args.data / "raw" / "hdtf" / n for n in ("hdtf_aoc.mp4", "hdtf_katiehill.mp4")]
    clips += sorted((args.data / "raw" / "grid").glob("*.mpg"))[: args.clips or None]
    torch.set_num_threads(args.threads)
    base = ExtractConfig(device="cpu", chunk_frames=100_000)  # whole clips in memory: no chunking here
    variants = {"dense": base.model_copy(update={"detect_every": 1, "refine_iou": 0.0})}
    for overrides in args.variants:
        name = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
        variants[name] = ExtractConfig.model_validate(base.model_dump() | overrides)
    extractors = {name: ClipExtractor(cfg, device="cpu") for name, cfg in variants.items()}
    print(f"\nbox IoU against detecting every frame (same settings otherwise), {time.strftime('%Y-%m-%d')}\n")
    print("| clip | variant | frames with a face | IoU mean | IoU 5th pct | IoU min |")
    print("|---|---|---:|---:|---:|---:|")
    for clip in clips:
        reader, info = video.open_video(clip)
        idx = video.source_indices(info, 0.0, video.n_output_frames(info.duration_s, base.fps), base.fps)
        whole = next(video.iter_frame_chunks(reader, idx, len(idx)))
        tracks = {name: ex.track(reader, idx, whole, StageTimer()) for name, ex in extractors.items()}
        dense_boxes, _, dense_present = tracks["dense"]
        for name, (boxes, _, present) in tracks.items():
            if name == "dense":
                continue
            both = np.flatnonzero(present & dense_present)
            iou = np.array([face.iou_matrix(dense_boxes[i:i + 1], boxes[i:i + 1])[0, 0] for i in both])
            print(f"| {clip.name} | {name} | {present.sum()}/{dense_present.sum()} | {iou.mean():.3f} | "
                  f"{np.percentile(iou, 5):.3f} | {iou.min():.3f} |")


def _overrides(text: str) -> dict:
    """'detect_every=5,min_face_size=20' -> {'detect_every': '5', 'min_face_size': '20'} (pydantic converts)."""
    return dict(item.split("=", 1) for item in text.split(",") if item)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("MSAFLOW_SHARED_DATA", REPO.parent / "shared" / "data")))
    p.add_argument("--threads", type=int, default=1, help="torch threads (the extraction default is 1)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="speed: where MTCNN and the crops run")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--clips", type=int, default=0, help="only the first N GRID clips (0: all)")
    p.add_argument("--variants", type=_overrides, nargs="+",
                   default=[{}, {"detect_every": 25}, {"min_face_size": 20},
                            {"min_face_size": 20, "detect_every": 5, "refine_iou": 0.0}],
                   metavar="KEY=VALUE[,KEY=VALUE]", help="msaflow extract settings to time ('' = defaults)")
    p.add_argument("--memory", action="store_true", help="peak RSS on a 1- and a 10-minute clip instead")
    p.add_argument("--quality", action="store_true",
                   help="box IoU of each variant against dense detection (HDTF + GRID clips) instead")
    p.add_argument("--work", type=Path, help="--memory: folder for the long clips (reused when present)")
    p.add_argument("--json", type=Path, help="also write the raw seconds here")
    args = p.parse_args()
    memory(args) if args.memory else quality(args) if args.quality else speed(args)


if __name__ == "__main__":
    main()
