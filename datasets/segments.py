"""Segments of long videos: a CSV `video_id, start, end, [clip_id], [text], [label], [split],
[path], [label_T, label_A, label_V]`. The video is `path` (relative to the dataset root) when
given, else `<root>/<video_id>.<video ext>`. Clips are cut while decoding, never re-encoded.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from msaflow.datasets.base import (ClipRecord, Problems, ReadOptions, VideoIndex, check_name, parse_times,
                                   peek_header, read_layout_csv, read_row_fields, resolve_inside)


def segment_clip_id(start: float, end: float) -> str:
    """Default clip id: the segment's times in milliseconds, stable when rows are reordered."""
    return f"{start:.3f}-{end:.3f}"


class SegmentsAdapter:
    name = "segments"
    default_csv = "segments.csv"
    columns = {"video_id", "start", "end", "clip_id", "text", "label", "split", "path",
               "label_T", "label_A", "label_V"}
    required = {"video_id", "start", "end"}

    def csv_path(self, root: Path, cfg: ReadOptions) -> Path:
        return Path(cfg.labels) if cfg.labels else root / self.default_csv

    def detect(self, root: Path, cfg: ReadOptions) -> bool:
        csv_path = self.csv_path(root, cfg)
        return csv_path.is_file() and {"start", "end"} <= peek_header(csv_path)

    def read(self, root: Path, cfg: ReadOptions, problems: Problems) -> list[ClipRecord]:
        csv_path = self.csv_path(root, cfg)
        table = read_layout_csv(csv_path, self.name, self.columns, self.required, problems)
        if table is None:
            return []
        videos = VideoIndex(cfg.video_extensions)
        records = []
        for row, values in tqdm(table.rows, desc="manifest rows", unit="row", disable=None):
            video_id = values["video_id"]
            ok = check_name(video_id, "video_id", csv_path, row, problems)
            clip_id = values.get("clip_id", "")
            if clip_id:
                ok = check_name(clip_id, "clip_id", csv_path, row, problems) and ok
            times = parse_times(values["start"], values["end"], csv_path, row, problems)
            if times == (None, None):
                problems.add(csv_path, row, "start and end are required in a segments CSV")
                times = None
            fields = read_row_fields(values, cfg, csv_path, row, problems, split_column="split")
            if not ok or times is None or fields is None:
                continue
            if values.get("path", "").strip():
                path = resolve_inside(root, values["path"].strip(), "path", csv_path, row, problems)
                if path is not None and not path.is_file():
                    problems.add(csv_path, row, f"missing file: {path}")
                    path = None
            else:
                path = videos.find(root, root, video_id, csv_path, row, problems)
            if path is None:
                continue
            start, end = times
            records.append(ClipRecord(video_id=video_id, clip_id=clip_id or segment_clip_id(start, end),
                                      path=path, source=str(csv_path), row=row, start=start, end=end,
                                      **fields))
        return records
