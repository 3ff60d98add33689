"""MMSA raw layout (CMU-MOSI, CMU-MOSEI, CH-SIMS as released by MMSA):
`Raw/<video_id>/<clip_id>.<video ext>` plus `label.csv` with
`video_id, clip_id, text, label, [label_T, label_A, label_V], annotation, mode`.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from msaflow.datasets.base import (ClipRecord, Problems, ReadOptions, VideoIndex, check_name, peek_header,
                                   read_layout_csv, read_row_fields)


class MmsaRawAdapter:
    name = "mmsa-raw"
    default_csv = "label.csv"
    media_dir = "Raw"
    columns = {"video_id", "clip_id", "text", "label", "label_T", "label_A", "label_V",
               "annotation", "mode"}
    required = {"video_id", "clip_id"}

    def csv_path(self, root: Path, cfg: ReadOptions) -> Path:
        return Path(cfg.labels) if cfg.labels else root / self.default_csv

    def detect(self, root: Path, cfg: ReadOptions) -> bool:
        csv_path = self.csv_path(root, cfg)
        return (root / self.media_dir).is_dir() and csv_path.is_file() and "clip_id" in peek_header(csv_path)

    def read(self, root: Path, cfg: ReadOptions, problems: Problems) -> list[ClipRecord]:
        csv_path = self.csv_path(root, cfg)
        table = read_layout_csv(csv_path, self.name, self.columns, self.required, problems)
        if table is None:
            return []
        videos = VideoIndex(cfg.video_extensions)
        records = []
        for row, values in tqdm(table.rows, desc="manifest rows", unit="row", disable=None):
            video_id, clip_id = values["video_id"], values["clip_id"]
            ok = check_name(video_id, "video_id", csv_path, row, problems)
            ok = check_name(clip_id, "clip_id", csv_path, row, problems) and ok
            fields = read_row_fields(values, cfg, csv_path, row, problems, split_column="mode")
            if not ok:
                continue
            path = videos.find(root, root / self.media_dir / video_id, clip_id, csv_path, row, problems)
            if path is None or fields is None:
                continue
            records.append(ClipRecord(video_id=video_id, clip_id=clip_id, path=path,
                                      source=str(csv_path), row=row, **fields))
        return records
