"""A folder of videos (searched recursively), each file one whole clip, with an optional CSV
(`labels.csv` or `label.csv` in the root, or `--labels`) of `file` or `video_id` plus `[text], [label],
[split], [label_T, label_A, label_V]`.

A clip's `video_id` is its path relative to the root without the extension (`talk.mp4` ->
`talk`, `day1/talk.mov` -> `day1/talk`) and its `clip_id` is `whole`. Videos without a CSV
row are kept: unlabeled, no text, the default split.
"""

from __future__ import annotations

import os
from pathlib import Path

from msaflow.datasets.base import (ClipRecord, Problems, ReadOptions, VideoIndex, read_csv_table,
                                   read_row_fields, resolve_inside)

WHOLE_FILE_CLIP_ID = "whole"


def video_id_of(root: Path, path: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def scan_videos(root: Path, videos: VideoIndex, problems: Problems) -> list[Path]:
    """Video files under root, sorted; hidden files/folders skipped, symlinked folders not entered."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith(".") or not videos.is_video(path):
                continue
            inside = resolve_inside(root, str(path.relative_to(root)), "file", path, None, problems)
            if inside is not None:
                found.append(inside)
    return found


class FolderAdapter:
    name = "folder"
    default_csvs = ("labels.csv", "label.csv")  # the first that exists in the root
    columns = {"file", "video_id", "text", "label", "split", "label_T", "label_A", "label_V"}

    def csv_path(self, root: Path, cfg: ReadOptions) -> Path | None:
        if cfg.labels:
            return Path(cfg.labels)
        return next((root / name for name in self.default_csvs if (root / name).is_file()), None)

    def detect(self, root: Path, cfg: ReadOptions) -> bool:
        return True  # any folder is a folder of videos: the fallback format

    def read(self, root: Path, cfg: ReadOptions, problems: Problems) -> list[ClipRecord]:
        videos = VideoIndex(cfg.video_extensions)
        paths = scan_videos(root, videos, problems)
        by_video_id: dict[str, list[Path]] = {}
        for path in paths:
            by_video_id.setdefault(video_id_of(root, path), []).append(path)
        for video_id, same in by_video_id.items():
            if len(same) > 1:
                problems.add(same[-1], None, f"files {', '.join(p.name for p in same)} give the same video id "
                                             f"{video_id!r} (path without extension); rename all but one")
        records = {path: ClipRecord(video_id=video_id_of(root, path), clip_id=WHOLE_FILE_CLIP_ID,
                                    path=path, source=str(path), row=None)
                   for path in paths if len(by_video_id[video_id_of(root, path)]) == 1}
        csv_path = self.csv_path(root, cfg)
        if csv_path is not None:
            self._apply_csv(root, csv_path, cfg, records, by_video_id, problems)
        return list(records.values())

    def _apply_csv(self, root: Path, csv_path: Path, cfg: ReadOptions,
                   records: dict[Path, ClipRecord], by_video_id: dict[str, list[Path]],
                   problems: Problems) -> None:
        if not csv_path.is_file():
            problems.add(csv_path, None, "missing file: labels CSV not found")
            return
        table = read_csv_table(csv_path, self.columns, set(), problems)
        if table is None:
            return
        if not {"file", "video_id"} & set(table.columns):
            problems.add(csv_path, 1, "needs a 'file' or a 'video_id' column to match rows to videos")
            return
        first_row: dict[Path, int] = {}
        for row, values in table.rows:
            path = self._match(root, csv_path, row, values, by_video_id, cfg.video_extensions, problems)
            fields = read_row_fields(values, cfg, csv_path, row, problems, split_column="split")
            if path is None or fields is None:
                continue
            if path in first_row:
                problems.add(csv_path, row, f"duplicate row for {path.relative_to(root)} "
                                            f"(first given in row {first_row[path]})")
                continue
            first_row[path] = row
            if path not in records:  # dropped for a video id clash, already reported
                continue
            record = records[path]
            record.source, record.row = str(csv_path), row
            for name, value in fields.items():
                setattr(record, name, value)

    def _match(self, root: Path, csv_path: Path, row: int, values: dict[str, str],
               by_video_id: dict[str, list[Path]], extensions: tuple[str, ...],
               problems: Problems) -> Path | None:
        file, video_id = values.get("file", "").strip(), values.get("video_id", "").strip()
        if not file and not video_id:
            problems.add(csv_path, row, "neither 'file' nor 'video_id' given")
            return None
        path = None
        if file:
            path = resolve_inside(root, file, "file", csv_path, row, problems)
            if path is None:
                return None
            if not path.is_file():
                problems.add(csv_path, row, f"missing file: {path}")
                return None
            if path not in by_video_id.get(video_id_of(root, path), []):
                problems.add(csv_path, row, f"{file!r} is not a video file (extensions: "
                                            f"{' '.join(extensions)})")
                return None
        if video_id:
            if ".." in Path(video_id).parts or Path(video_id).is_absolute():
                problems.add(csv_path, row, f"video_id {video_id!r} escapes the dataset root")
                return None
            matches = by_video_id.get(video_id, [])
            if path is not None:
                if video_id_of(root, path) != video_id:
                    problems.add(csv_path, row, f"file {file!r} and video_id {video_id!r} disagree "
                                                f"(the file's video_id is {video_id_of(root, path)!r})")
                    return None
                return path
            if not matches:
                problems.add(csv_path, row, f"missing file: no video {root / video_id}.* under the root")
                return None
            if len(matches) > 1:
                problems.add(csv_path, row, f"ambiguous: video_id {video_id!r} matches "
                                            f"{', '.join(p.name for p in matches)}; use a 'file' column")
                return None
            return matches[0]
        return path
