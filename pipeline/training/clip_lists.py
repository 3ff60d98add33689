"""The clips `msaflow predict` scores in one go, and the CSV of their scores.

A folder: every video under it (hidden folders skipped), its id the path below the folder
without suffix. A CSV: a `path` (or `file`) column, relative paths taken from the CSV's folder,
optional `id`, `text`, `start`, `end` (an msaflow manifest has them all). The scores: one row
per clip in PREDICTION_COLUMNS, with the reason in `error` for a clip that could not be used.
"""

from __future__ import annotations

import csv
from pathlib import Path

from msaflow.pipeline.data.sources import DataError
from msaflow.tario import atomic_path

VIDEO_SUFFIXES = (".mp4", ".mpg", ".mpeg", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".wmv", ".ts")
PREDICTION_COLUMNS = ("id", "path", "score", "n_frames", "n_face_frames", "has_audio", "has_text", "text_source",
                      "text", "error")


def _number(value) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    return float(value)


def clips_of_manifest(path: Path) -> list[dict]:
    """Clips of a CSV with `path` or `file`, optional `id`, `text`, `start`, `end`."""
    if not path.is_file():
        raise DataError(f"{path}: no such file (--manifest: a CSV of clips)")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a UTF-8 CSV ({exc})") from exc
    column = "path" if rows and "path" in rows[0] else "file" if rows and "file" in rows[0] else None
    if column is None:
        raise DataError(f"{path}: needs a `path` (or `file`) column naming each clip's video")
    clips = []
    for i, row in enumerate(rows, start=2):
        video = Path(row[column])
        if not video.is_absolute():
            video = path.parent / video
        try:
            start, end = _number(row.get("start")), _number(row.get("end"))
        except ValueError as exc:
            raise DataError(f"{path}: row {i}: start/end must be seconds ({exc})") from exc
        clips.append({"id": row.get("id") or Path(row[column]).with_suffix("").as_posix(), "path": str(video),
                      "text": row.get("text") or "", "start": start, "end": end})
    return clips


def clips_of_folder(folder: Path) -> list[dict]:
    videos = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return [{"id": v.relative_to(folder).with_suffix("").as_posix(), "path": str(v)} for v in videos]


def write_predictions(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=PREDICTION_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
