"""A corpus at scale from real clips: long videos, a segments CSV, extraction and shards at N, 4N, 16N.

Videos: the real clips in ../shared/data (11 GRID clips, 2 HDTF clips, the stage clip) are
re-encoded once to one common format (640x360, letterboxed; 25 fps H.264 yuv420p, CRF 23;
AAC 16 kHz mono) and joined, in a seeded order and repeated as needed, into long videos
with FFmpeg's concat demuxer (stream copy, no second re-encode). The HDTF clips are for
research use only: the corpus stays in the scratch folder, never in the repository.

Segments: N clips with lengths drawn from a lognormal (mean 7 s, sigma 0.9 in log space,
at least 1 s, capped at 60 s: long-tailed like CMU-MOSEI's, a few clips over 30 s), laid
back to back (0.5 s apart) over N/5 long videos. Labels are drawn uniformly from [-3, 3]
(drawn, not real: the corpus measures throughput and size, not accuracy); transcripts are
GRID-grammar sentences, about 2.5 words per second of clip; splits 70/15/15 by video.

Then, per mode (raw, and features with the default front-ends):
`msaflow manifest` (segments layout), `msaflow extract` (timed: clips/s), `msaflow shards`.
The 4N and 16N corpora replicate the N-clip extraction outputs under new clip ids (new
video ids, fresh drawn labels, same media segment and split as the source clip): extraction
is per clip and independent, so its throughput is measured at N only, and replication stands
in for extracting 4N and 16N clips. What does depend on the corpus size (reading the manifest,
checking every finished clip's tar before going on) is measured by a sample: in each corpus the
outputs of the same `--sample` clips (N's every (N/K)-th clip; in 4N and 16N its copies in the
last replica) are removed and `msaflow extract` is run again over the whole manifest, timed:
the same K clips extracted within a corpus of N, 4N and 16N clips. Then the shards are written,
for 4N and 16N with `msaflow shards --remove-packed` (the clip tars are removed once packed).

    nice -n 10 python benchmarks/scale_corpus.py                  # N=100 into /tmp/msaflow-scale
    python benchmarks/scale_corpus.py --n 20 --out /tmp/s --factors 1,4 --modes raw

Prints a table (corpus, clips, hours of video, extraction clips/s, shard GB per mode) and
writes OUT/scale.json. Steps whose outputs exist are not redone (delete OUT to start over).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
MSAFLOW = str(Path(sys.executable).parent / "msaflow")
MODES = ("raw", "features")

# the GRID grammar (Cooke et al. 2006): command colour preposition letter digit adverb
GRID_WORDS = (
    ("bin", "lay", "place", "set"),
    ("blue", "green", "red", "white"),
    ("at", "by", "in", "with"),
    tuple("abcdefghijklmnopqrstuvxyz"),  # no w
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    ("again", "now", "please", "soon"),
)
MEAN_S, SIGMA, MIN_S, MAX_S = 7.0, 0.9, 1.0, 60.0
GAP_S = 0.5
WORDS_PER_S = 2.5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], log_path: Path | None = None) -> float:
    """Run a command (its output to log_path); the wall seconds it took. A failure stops the script."""
    start = time.perf_counter()
    with open(log_path, "w") if log_path else open(os.devnull, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = Path(log_path).read_text()[-3000:] if log_path else ""
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - start


def du(path: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


# ---------------------------------------------------------------------------- media


def source_clips(data: Path) -> list[Path]:
    clips = sorted((data / "raw" / "grid").glob("*.mpg")) + sorted((data / "raw" / "hdtf").glob("*.mp4"))
    clips += sorted((data / "raw" / "hamilton").glob("*.mp4"))
    if not clips:
        raise SystemExit(f"no real clips under {data}/raw (grid, hdtf, hamilton)")
    return clips


def normalize_sources(data: Path, out: Path) -> list[tuple[Path, float]]:
    """Each real clip re-encoded once to the common format; (file, duration in s)."""
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for src in source_clips(data):
        dst = out / f"{src.parent.name}-{src.stem}.mp4"
        if not dst.is_file():
            tmp = dst.with_name(f".{dst.name}.tmp.mp4")
            run(["ffmpeg", "-nostdin", "-y", "-v", "error", "-i", str(src),
                 "-vf", "scale=640:360:force_original_aspect_ratio=decrease,pad=640:360:(ow-iw)/2:(oh-ih)/2,"
                        "setsar=1,fps=25",
                 "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
                 "-c:a", "aac", "-ar", "16000", "-ac", "1", "-b:a", "48k", "-movflags", "+faststart",
                 str(tmp)])
            tmp.replace(dst)
        done.append((dst, probe_duration(dst)))
    return done


def probe_duration(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return float(out.strip())


def long_video(dst: Path, length: float, sources: list[tuple[Path, float]], rng: np.random.Generator) -> None:
    """Real clips in a seeded order (repeated as needed) joined to at least `length` seconds."""
    if dst.is_file():
        return
    parts, total = [], 0.0
    while total < length:
        for i in rng.permutation(len(sources)):
            parts.append(sources[i][0])
            total += sources[i][1]
            if total >= length:
                break
    listing = dst.with_suffix(".txt")
    listing.write_text("".join(f"file '{p.resolve()}'\n" for p in parts))
    tmp = dst.with_name(f".{dst.name}.tmp.mp4")
    run(["ffmpeg", "-nostdin", "-y", "-v", "error", "-f", "concat", "-safe", "0", "-i", str(listing),
         "-c", "copy", "-movflags", "+faststart", str(tmp)])
    tmp.replace(dst)
    listing.unlink()


# ---------------------------------------------------------------------------- corpus


def draw_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    mu = math.log(MEAN_S) - SIGMA ** 2 / 2  # a lognormal with mean MEAN_S
    return np.clip(rng.lognormal(mu, SIGMA, n), MIN_S, MAX_S).round(2)


def transcript(seconds: float, rng: np.random.Generator) -> str:
    n_words = max(1, round(seconds * WORDS_PER_S))
    words = [GRID_WORDS[i % 6][int(rng.integers(len(GRID_WORDS[i % 6])))] for i in range(n_words)]
    return " ".join(words)


def split_of_videos(n_videos: int, rng: np.random.Generator) -> list[str]:
    n_valid = n_test = max(1, round(0.15 * n_videos))
    splits = ["valid"] * n_valid + ["test"] * n_test + ["train"] * (n_videos - n_valid - n_test)
    return [splits[i] for i in rng.permutation(n_videos)]


def build_dataset(root: Path, n: int, seed: int, sources: list[tuple[Path, float]]) -> dict:
    """ROOT/<video_id>.mp4 + ROOT/segments.csv; what was drawn."""
    csv_path = root / "segments.csv"
    rng = np.random.default_rng(seed)
    lengths = draw_lengths(n, rng)
    n_videos = max(3, n // 5)
    splits = split_of_videos(n_videos, rng)
    # clip -> its video: every video gets one clip, the others land at random
    owner = np.sort(np.concatenate([np.arange(n_videos), rng.integers(n_videos, size=max(0, n - n_videos))]))[:n]
    rows, ends = [], {}
    for i, (video, length) in enumerate(zip(owner, lengths)):
        vid = f"talk{video:03d}"
        start = ends.get(vid, GAP_S)
        end = round(start + float(length), 2)
        ends[vid] = round(end + GAP_S, 2)
        rows.append({"video_id": vid, "clip_id": f"seg{i:05d}", "start": f"{start:.2f}", "end": f"{end:.2f}",
                     "text": transcript(float(length), rng),
                     "label": f"{rng.uniform(-3, 3):.3f}", "split": splits[video]})
    root.mkdir(parents=True, exist_ok=True)
    for vid, length in ends.items():
        long_video(root / f"{vid}.mp4", length, sources, np.random.default_rng([seed, int(vid[4:])]))
    if not csv_path.is_file():
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    return {"clips": n, "videos": n_videos, "seconds": float(lengths.sum()),
            "over_30s": int((lengths > 30).sum()), "longest_s": float(lengths.max()),
            "mean_s": float(lengths.mean()), "median_s": float(np.median(lengths))}


# ---------------------------------------------------------------------------- replication


def read_rows(manifest: Path) -> tuple[list[str], list[dict]]:
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def replicate(base_manifest: Path, base_extract: Path, factor: int, manifest: Path, extract: Path,
              seed: int) -> None:
    """`factor` copies of every clip under new ids (new video ids, fresh labels), manifest and clip tars."""
    from msaflow.datasets.manifest import sanitize_key
    from msaflow.tario import write_sample_tar

    fields, rows = read_rows(base_manifest)
    rng = np.random.default_rng([seed, factor])
    out_rows = []
    for r in range(factor):
        for row in rows:
            new = dict(row)
            if r:
                new["video_id"] = f"{row['video_id']}r{r:02d}"
                new["id"] = f"{new['video_id']}/{row['clip_id']}"
                new["label"] = f"{rng.uniform(-3, 3):.3f}"
            out_rows.append((row, new))
    (extract / "clips").mkdir(parents=True, exist_ok=True)
    (extract / "failures").mkdir(parents=True, exist_ok=True)
    (extract / "chunks").mkdir(parents=True, exist_ok=True)
    for summary in (base_extract / "chunks").glob("*.json"):  # the config and front-ends they were made with
        shutil.copy(summary, extract / "chunks" / summary.name)
    for old, new in out_rows:
        src_key, key = sanitize_key(old["id"]), sanitize_key(new["id"])
        dst = extract / "clips" / f"{key}.tar"
        failure = base_extract / "failures" / f"{src_key}.json"
        if failure.is_file():
            record = json.loads(failure.read_text(encoding="utf-8")) | {"id": new["id"]}
            (extract / "failures" / f"{key}.json").write_text(json.dumps(record), encoding="utf-8")
            continue
        if dst.is_file():
            continue
        members = {}
        with tarfile.open(base_extract / "clips" / f"{src_key}.tar") as tar:
            for info in tar:
                suffix = info.name.partition(".")[2]
                data = tar.extractfile(info).read()
                if suffix == "json":
                    meta = json.loads(data.decode("utf-8"))
                    meta.update(id=new["id"], video_id=new["video_id"], label=float(new["label"]))
                    members[suffix] = meta
                else:
                    members[suffix] = data
        write_sample_tar(dst, key, members)
    tmp = manifest.with_name(f".{manifest.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(new for _, new in out_rows)
    tmp.replace(manifest)


# ---------------------------------------------------------------------------- main


def sample_keys(manifest: Path, n: int, factor: int, k: int) -> list[str]:
    """The tar keys of the timed sample: N's every (N/k)-th clip, in the corpus's last replica."""
    from msaflow.datasets.manifest import sanitize_key

    _, rows = read_rows(manifest)
    last_replica = rows[(factor - 1) * n: factor * n]
    return [sanitize_key(row["id"]) for row in last_replica[:: max(1, n // k)][:k]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="clips of the base corpus (default 100)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/msaflow-scale"), help="scratch folder")
    parser.add_argument("--data", type=Path, default=DATA, help="the real media (../shared/data)")
    parser.add_argument("--seed", type=int, default=18,
                        help="draw seed (18: at N=100 a mean of 7.0 s, two clips over 30 s, one at the 60-s cap)")
    parser.add_argument("--factors", default="1,4,16", help="corpus sizes as multiples of N")
    parser.add_argument("--modes", default="raw,features")
    parser.add_argument("--sample", type=int, default=20,
                        help="clips re-extracted in each corpus, timed (0: none)")
    args = parser.parse_args()
    factors = [int(f) for f in args.factors.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "scale.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    log("re-encoding the real clips to the common format")
    sources = normalize_sources(args.data, out / "sources")
    log(f"{len(sources)} source clips, {sum(d for _, d in sources):.1f} s; building the long videos")
    dataset = out / "dataset"
    drawn = build_dataset(dataset, args.n, args.seed, sources)
    results["dataset"] = drawn | {"root": str(dataset), "videos_bytes": du(dataset, "*.mp4")}
    log(f"corpus: {drawn['clips']} clips over {drawn['videos']} videos, {drawn['seconds'] / 3600:.3f} h, "
        f"mean {drawn['mean_s']:.1f} s, longest {drawn['longest_s']:.1f} s, {drawn['over_30s']} over 30 s")

    base = out / f"n{args.n}"
    base.mkdir(exist_ok=True)
    base_manifest = base / "manifest.csv"
    if not base_manifest.is_file():
        run([MSAFLOW, "manifest", str(dataset), "-o", str(base_manifest), "--format", "segments"],
            base / "manifest.log")

    for factor in factors:
        n = args.n * factor
        corpus = out / f"n{n}"
        corpus.mkdir(exist_ok=True)
        entry = results.setdefault(f"n{n}", {"clips": n, "factor": factor})
        entry["hours"] = drawn["seconds"] * factor / 3600
        manifest = base_manifest if factor == 1 else corpus / "manifest.csv"
        for mode in modes:
            extract, shards = corpus / f"extract-{mode}", corpus / f"shards-{mode}"
            m = entry.setdefault(mode, {})
            if factor == 1:
                if "extract_s" not in m:
                    log(f"N={n}: msaflow extract --mode {mode} (timed)")
                    m["extract_s"] = run([MSAFLOW, "extract", str(manifest), "-o", str(extract), "--mode", mode],
                                         corpus / f"extract-{mode}.log")
                m["clips_per_s"] = n / m["extract_s"]
                m["video_s_per_s"] = drawn["seconds"] / m["extract_s"]
                m["extract_bytes"] = du(extract / "clips", "*.tar")
                m["failures"] = len(list((extract / "failures").glob("*.json")))
            elif not (shards / "summary.json").is_file():
                log(f"{n} clips, {mode}: replicating the N-clip extraction outputs under new ids")
                replicate(base_manifest, base / f"extract-{mode}", factor, manifest, extract, args.seed)
                m["extract_bytes"] = du(extract / "clips", "*.tar")
            if args.sample and "sample_extract_s" not in m and not (shards / "summary.json").is_file():
                keys = sample_keys(manifest, args.n, factor, args.sample)
                log(f"{n} clips, {mode}: {len(keys)} clips' outputs removed, msaflow extract over all {n} (timed)")
                for key in keys:
                    for stale in (extract / "clips" / f"{key}.tar", extract / "failures" / f"{key}.json"):
                        stale.unlink(missing_ok=True)
                m["sample_extract_s"] = run([MSAFLOW, "extract", str(manifest), "-o", str(extract), "--mode", mode],
                                            corpus / f"extract-sample-{mode}.log")
                m["sample_clips"] = len(keys)
            if not (shards / "summary.json").is_file():
                log(f"{n} clips, {mode}: msaflow shards")
                cmd = [MSAFLOW, "shards", str(extract), "--manifest", str(manifest), "-o", str(shards)]
                m["shards_s"] = run(cmd + (["--remove-packed"] if factor > 1 else []), corpus / f"shards-{mode}.log")
            m["shards_dir"] = str(shards)
            m["shard_bytes"] = du(shards, "*/*.tar")
            m["samples"] = json.loads((shards / "summary.json").read_text())["total"]["samples"]
            results_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")

    print(table(results, args.n, factors, modes))
    print("\nThe whole extraction was timed at N; the 4N and 16N corpora replicate the N-clip extraction "
          "outputs under new clip ids (extraction is per clip and independent). The same sample of clips "
          "re-extracted within each corpus times what grows with its size (the manifest, the resume check "
          "of every finished clip). Labels are drawn uniformly from [-3, 3], not real.")
    for factor in factors:
        for mode in modes:
            print(f"  n{args.n * factor} {mode}: {results[f'n{args.n * factor}'][mode]['shards_dir']}")
    return 0


def table(results: dict, n: int, factors: list[int], modes: list[str]) -> str:
    head = ["corpus", "clips", "hours of video", *(f"extract clips/s ({m})" for m in modes),
            *(f"same {results[f'n{n}'][m].get('sample_clips', 0)} clips re-extracted, s ({m})" for m in modes),
            *(f"shards GB ({m})" for m in modes)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for factor in factors:
        e = results[f"n{n * factor}"]
        name = "N" if factor == 1 else f"{factor}N"
        speed = [f"{e[m]['clips_per_s']:.3f}" if factor == 1 else "(replicated)" for m in modes]
        sample = [f"{e[m]['sample_extract_s']:.1f}" if "sample_extract_s" in e[m] else "-" for m in modes]
        size = [f"{e[m]['shard_bytes'] / 1e9:.3f}" for m in modes]
        lines.append("| " + " | ".join([name, str(e["clips"]), f"{e['hours']:.3f}", *speed, *sample, *size]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
