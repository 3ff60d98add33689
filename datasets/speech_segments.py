"""Long videos -> utterances from their recognised speech -> the segments layout.

`msaflow segment ROOT` (or `python -m msaflow.datasets.speech_segments ROOT`) finds the
stretches of speech of every video of a folder (searched like the folder layout) with the
recogniser's voice-activity detector, recognises each stretch on its own (extractors/asr.py,
word timings; no context carried from one stretch to the next, so a sentence cannot leak into
the next one), and writes `ROOT/segments.csv`: one row per
utterance, `video_id, clip_id, start, end, path` (+ `text` with `--text`). `msaflow manifest
ROOT` then reads the folder as the segments layout (docs/datasets.md), so a folder of long
interviews becomes a corpus of utterance clips. Times are on the extraction's clock (seconds
from the first video frame), so the clips are cut exactly where the words are.

Utterances: words in order; a new one starts where the silence between two words is at least
`--pause` seconds, after a word that ends a sentence (. ? !) once the utterance lasts
`--min-length` seconds, and before a word that would make it longer than `--max-length`
seconds. Each is padded by `--pad` seconds on both sides (never past the neighbouring
utterance or the media), and utterances shorter than `--min-length` without a sentence of
their own are kept (short answers are utterances too) unless shorter than 0.3 s.

Without `--text` the CSV has no text column: run the workflow with `extract.asr` on and each
clip is recognised again from its own audio, so its json says `text_source: recognised` and
keeps word timings relative to the clip. With `--text` the recognised text is written into
the CSV and extraction takes it as given.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from msaflow.device import DEVICES

log = logging.getLogger("msaflow.segment")

SENTENCE_END = (".", "?", "!")
MIN_UTTERANCE_S = 0.3


@dataclass
class Utterance:
    start: float
    end: float
    text: str
    words: list[dict]


def utterances_from_words(words: list[dict], duration: float, pause: float = 0.8, min_length: float = 2.0,
                          max_length: float = 15.0, pad: float = 0.2) -> list[Utterance]:
    """Group recognised words (`word`, `start`, `end` in seconds) into padded utterances."""
    groups: list[list[dict]] = []
    for w in words:
        if groups:
            current = groups[-1]
            gap = w["start"] - current[-1]["end"]
            length = current[-1]["end"] - current[0]["start"]
            sentence_done = current[-1]["word"].rstrip("\"')]").endswith(SENTENCE_END) and length >= min_length
            too_long = w["end"] - current[0]["start"] > max_length
            if gap < pause and not sentence_done and not too_long:
                current.append(w)
                continue
        groups.append([w])
    spans = [(g[0]["start"], g[-1]["end"]) for g in groups]
    out = []
    for i, (group, (first, last)) in enumerate(zip(groups, spans)):
        before = spans[i - 1][1] if i else 0.0
        after = spans[i + 1][0] if i + 1 < len(spans) else duration
        start = max(first - pad, (before + first) / 2 if i else 0.0, 0.0)
        end = min(last + pad, (last + after) / 2 if i + 1 < len(spans) else duration, duration)
        if end - start < MIN_UTTERANCE_S:
            continue
        text = " ".join(w["word"] for w in group).strip()
        out.append(Utterance(round(start, 3), round(end, 3), text, group))
    return out


def media_audio(path: Path):
    """(int16 16 kHz mono samples on the extraction's clock, media duration in seconds), or None
    without an audio stream."""
    from msaflow.extractors import audio, video
    from msaflow.extractors.clip import media_end
    from msaflow.extractors.video import DecodeError

    try:
        _, info = video.open_video(path)
    except DecodeError:
        info = None
    segment = audio.decode_audio_segment(path, info.begin_s if info is not None else None, 0.0, None)
    if segment is None:
        return None
    audio_end = len(segment.wav) / audio.SAMPLE_RATE
    return segment.wav, media_end(info, audio_end)


def segment_folder(root: Path, recogniser, pause: float = 0.8, min_length: float = 2.0, max_length: float = 15.0,
                   pad: float = 0.2, extensions: tuple[str, ...] | None = None, progress: bool = True) -> list[dict]:
    """segments.csv rows (video_id, clip_id, start, end, path, text) of every video under `root`."""
    from tqdm import tqdm

    from msaflow.datasets.base import Problems, VideoIndex
    from msaflow.datasets.folder import scan_videos, video_id_of
    from msaflow.datasets.segments import segment_clip_id
    from msaflow.datasets.manifest import ManifestConfig

    root = root.resolve()
    problems = Problems()
    videos = scan_videos(root, VideoIndex(extensions or ManifestConfig().video_extensions), problems)
    problems.raise_if_any()
    rows, seen = [], {}
    for path in tqdm(videos, desc="segment", unit="video", disable=not progress):
        video_id = video_id_of(root, path).replace("/", "_")  # one path component, as the layout wants
        if video_id in seen:
            raise ValueError(f"{path} and {seen[video_id]} both give the video id {video_id!r}: rename one")
        seen[video_id] = path
        decoded = media_audio(path)
        if decoded is None:
            log.warning(f"msaflow segment: {path}: no audio stream, no utterances")
            continue
        wav, duration = decoded
        words = recogniser.transcribe_regions(wav, recogniser.speech_regions(wav, pause, max_length, pad))
        for u in utterances_from_words(words, duration, pause, min_length, max_length, pad):
            rows.append({"video_id": video_id, "clip_id": segment_clip_id(u.start, u.end), "start": f"{u.start:.3f}",
                         "end": f"{u.end:.3f}", "path": path.relative_to(root).as_posix(), "text": u.text})
    return rows


def write_segments(rows: list[dict], out: Path, with_text: bool) -> None:
    from msaflow.tario import atomic_path

    fields = ["video_id", "clip_id", "start", "end", "path"] + (["text"] if with_text else [])
    with atomic_path(out) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", type=Path, help="folder of long videos (searched recursively)")
    p.add_argument("-o", "--out", type=Path, help="segments CSV to write (default: ROOT/segments.csv)")
    p.add_argument("--text", action="store_true", help="write the recognised text (extraction then takes it as given)")
    p.add_argument("--pause", type=float, default=0.8, help="silence between words that ends an utterance, s")
    p.add_argument("--min-length", type=float, default=2.0, help="a sentence end splits only after this long, s")
    p.add_argument("--max-length", type=float, default=15.0, help="longest utterance, s")
    p.add_argument("--pad", type=float, default=0.2, help="padding around the words, s")
    p.add_argument("--recogniser", default="whisper-tiny-en")
    p.add_argument("--model-dir", help="model folder (default: the packaged one)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--threads", type=int, default=0, help="CPU threads of the recogniser (0: its default)")
    p.add_argument("--force", action="store_true", help="overwrite an existing segments CSV")


def main(args: argparse.Namespace) -> int:
    from msaflow.extractors import asr

    out = args.out or args.root / "segments.csv"
    try:
        if not args.root.is_dir():
            raise ValueError(f"{args.root}: not a folder")
        if out.exists() and not args.force:
            raise ValueError(f"{out} exists (--force overwrites it)")
        device = args.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        recogniser = asr.build(asr.AsrConfig(recogniser=args.recogniser, model_dir=args.model_dir), device,
                               args.threads)
        rows = segment_folder(args.root, recogniser, args.pause, args.min_length, args.max_length, args.pad)
    except (ValueError, RuntimeError) as exc:
        log.error(f"msaflow segment: error: {exc}")
        return 2
    write_segments(rows, out, args.text)
    log.info(f"{out}: {len(rows)} utterances from {len({r['video_id'] for r in rows})} videos "
          f"(read it with `msaflow manifest {args.root}`)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    # run as a module, not through `msaflow`: the same streams (info on stdout, warnings on stderr)
    stdout = logging.StreamHandler(sys.stdout)
    stdout.addFilter(lambda record: record.levelno < logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[stdout, logging.StreamHandler()])
    sys.exit(main(parser.parse_args()))
