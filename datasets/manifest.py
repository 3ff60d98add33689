"""The clip manifest: one normalized table, one row per clip (docs/data-contracts.md §1).

`msaflow manifest DATASET_ROOT -o manifest.csv` reads a dataset in one of the registered
formats (`msaflow.datasets.adapters.ADAPTERS`), validates all of it, and writes the table
atomically. Every problem found is reported at once, each with its file and CSV row; the
command then exits with status 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from msaflow.configfile import load_yaml, read_section
from msaflow.contract import SPLITS
from msaflow.datasets.adapters import ADAPTERS, select_adapter
from msaflow.datasets.base import ClipRecord, ManifestError, Problems
from msaflow.tario import atomic_path

log = logging.getLogger("msaflow.manifest")

MANIFEST_COLUMNS = ["id", "video_id", "clip_id", "path", "start", "end", "text", "label", "split",
                    "label_T", "label_A", "label_V"]
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

FormatName = Literal[tuple(["auto", *ADAPTERS])]  # type: ignore[valid-type]
DefaultSplit = Literal[tuple([*SPLITS, "by-video"])]  # type: ignore[valid-type]
VIDEO_EXTENSIONS = (".mp4", ".mpg", ".mpeg", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv",
                    ".wmv", ".ts", ".3gp")


MAX_KEY_LENGTH = 64  # tar members are <key>.<member>: USTAR names hold 100 bytes; files <key>.tar + temp suffixes
KEY_HASH_LENGTH = 8


def sanitize_key(clip_id: str) -> str:
    """WebDataset key of a clip, and the name of its output files: every character outside
    [A-Za-z0-9_-] becomes `_`. A key longer than MAX_KEY_LENGTH keeps a readable prefix and
    ends with `-` + 8 hex digits of the SHA-1 of the whole id, so that tar member names
    (`<key>.vision_mask.npy`) fit the 100 bytes of a USTAR name, output file names stay far
    below the file system's 255-byte limit, and different long ids keep different keys."""
    key = _KEY_UNSAFE.sub("_", clip_id)
    if len(key) <= MAX_KEY_LENGTH:
        return key
    digest = hashlib.sha1(clip_id.encode("utf-8", "surrogatepass")).hexdigest()[:KEY_HASH_LENGTH]
    return f"{key[:MAX_KEY_LENGTH - KEY_HASH_LENGTH - 1]}-{digest}"


class ManifestConfig(BaseModel):
    """How to read a dataset into a manifest (the workflow config's `dataset` section, less `root`)."""

    model_config = ConfigDict(extra="forbid")

    format: FormatName = Field("auto", description="dataset layout; auto detects it")
    labels: str | None = Field(None, description="the format's CSV, if not its default file in the root "
                                                 "(label.csv, segments.csv, labels.csv); relative to the "
                                                 "current directory")
    label_range: tuple[float, float] = Field((-3.0, 3.0), description="inclusive range of valid labels")
    default_split: DefaultSplit = Field(
        "test", description="split of clips whose CSV gives none: train/valid/test, or by-video "
                            "(a seeded split of the video ids, so no video is in two splits)")
    split_seed: int = Field(0, description="seed of the by-video split")
    split_fractions: tuple[float, float, float] = Field((0.6, 0.2, 0.2),
                                                        description="train/valid/test shares of by-video")
    video_extensions: tuple[str, ...] = Field(VIDEO_EXTENSIONS, description="file endings taken as video")

    @field_validator("video_extensions")
    @classmethod
    def _dotted_lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in value)

    @model_validator(mode="after")
    def _ranges(self) -> "ManifestConfig":
        lo, hi = self.label_range
        if not lo < hi:
            raise ValueError(f"label_range: low {lo} must be below high {hi}")
        if min(self.split_fractions) < 0 or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions {self.split_fractions} must be >= 0 and sum to 1")
        return self


def load_config(path: str | Path) -> tuple[ManifestConfig, str | None]:
    """(options, dataset root or None) from a YAML that holds the options (and optionally
    `root`) at the top level, or a workflow config whose `dataset:` section holds them.
    ValueError naming the file when it is not YAML or not a mapping; ValidationError for
    options that are not valid."""
    data = load_yaml(path)
    section = dict(read_section(path, "dataset") if "dataset" in data else data)
    root = section.pop("root", None)
    return ManifestConfig.model_validate(section), root


def by_video_split(video_ids: list[str], seed: int, fractions: tuple[float, float, float]) -> dict[str, str]:
    """Seeded split of whole videos: sorted ids, permuted, cut by `fractions` (rounded counts)."""
    ids = sorted(set(video_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train = round(fractions[0] * len(ids))
    n_valid = round(fractions[1] * len(ids))
    names = ["train"] * n_train + ["valid"] * n_valid + ["test"] * (len(ids) - n_train - n_valid)
    return {ids[i]: split for i, split in zip(order, names)}


def assign_default_splits(records: list[ClipRecord], cfg: ManifestConfig) -> None:
    """Give a split to every record without one (in place)."""
    missing = [r for r in records if r.split is None]
    if cfg.default_split != "by-video":
        for r in missing:
            r.split = cfg.default_split
        return
    given: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.split is not None:
            given[r.video_id].add(r.split)
    # A video with some rows already in one split keeps its other rows there too.
    fixed = {v: next(iter(s)) for v, s in given.items() if len(s) == 1}
    drawn = by_video_split([r.video_id for r in missing if r.video_id not in fixed],
                           cfg.split_seed, cfg.split_fractions)
    for r in missing:
        r.split = fixed.get(r.video_id) or drawn[r.video_id]


def _where(record: ClipRecord) -> str:
    return f"{record.source}, row {record.row}" if record.row is not None else record.source


def check_unique(records: list[ClipRecord], problems: Problems) -> None:
    """Ids must be unique, and so must their WebDataset keys."""
    first_by_id: dict[str, ClipRecord] = {}
    first_by_key: dict[str, ClipRecord] = {}
    for r in records:
        if r.id in first_by_id:
            problems.add(r.source, r.row, f"duplicate id {r.id!r} (first at {_where(first_by_id[r.id])})")
            continue
        first_by_id[r.id] = r
        key = sanitize_key(r.id)
        if key in first_by_key:
            other = first_by_key[key]
            problems.add(r.source, r.row, f"id {r.id!r} has the same key {key!r} as id {other.id!r} "
                                          f"({_where(other)}); rename one of them")
            continue
        first_by_key[key] = r


def build_manifest(root: str | Path, cfg: ManifestConfig | None = None) -> pd.DataFrame:
    """Read and validate the dataset at `root`; the manifest table, or ManifestError listing all problems.

    `df.attrs["format"]` names the adapter that read it.
    """
    cfg = cfg or ManifestConfig()
    root = Path(root).resolve()
    problems = Problems()
    if not root.is_dir():
        problems.add(root, None, "dataset root is not a folder")
        problems.raise_if_any()
    adapter = select_adapter(root, cfg)
    records = adapter.read(root, cfg, problems)
    if not records and not problems:
        problems.add(root, None, f"no clips found (read as {adapter.name}). Expected layouts: "
                                 "mmsa-raw = Raw/<video_id>/<clip_id>.<ext> + label.csv; segments = "
                                 "segments.csv with start,end columns; folder = video files "
                                 f"({' '.join(cfg.video_extensions)})")
    check_unique(records, problems)
    problems.raise_if_any()
    assign_default_splits(records, cfg)
    df = pd.DataFrame([{"id": r.id, "video_id": r.video_id, "clip_id": r.clip_id, "path": str(r.path),
                        "start": r.start, "end": r.end, "text": r.text, "label": r.label,
                        "split": r.split, "label_T": r.label_T, "label_A": r.label_A,
                        "label_V": r.label_V} for r in records], columns=MANIFEST_COLUMNS)
    for column in ("start", "end", "label", "label_T", "label_A", "label_V"):
        df[column] = df[column].astype("float64")
    df.attrs["format"] = adapter.name
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> None:
    """UTF-8 CSV, written atomically; empty cells for missing numbers."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, encoding="utf-8", lineterminator="\n", na_rep="")


def read_manifest(path: str | Path) -> pd.DataFrame:
    """The manifest as written: strings kept exactly (no NA guessing), numbers as float (NaN = empty)."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    for column in ("start", "end", "label", "label_T", "label_A", "label_V"):
        df[column] = pd.to_numeric(df[column].replace("", np.nan)).astype("float64")
    return df


def split_leaks(df: pd.DataFrame) -> list[str]:
    """Video ids whose clips are in more than one split (speaker/video leakage)."""
    n_splits = df.groupby("video_id")["split"].nunique()
    return sorted(n_splits[n_splits > 1].index)


def summary_table(df: pd.DataFrame) -> str:
    rows = []
    for split in SPLITS:
        part = df[df["split"] == split]
        rows.append((split, len(part), int(part["label"].notna().sum()), int((part["text"] == "").sum()),
                     part["video_id"].nunique()))
    rows.append(("all", len(df), int(df["label"].notna().sum()), int((df["text"] == "").sum()),
                 df["video_id"].nunique()))
    lines = [f"{'split':<6} {'clips':>7} {'labeled':>8} {'no text':>8} {'videos':>7}"]
    lines += [f"{s:<6} {n:>7} {lab:>8} {nt:>8} {v:>7}" for s, n, lab, nt, v in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", nargs="?", help="dataset root folder (default: `dataset.root` of --config)")
    parser.add_argument("-o", "--output", required=True, help="manifest CSV to write")
    parser.add_argument("--format", choices=["auto", *ADAPTERS], help="dataset layout (default: auto)")
    parser.add_argument("--labels", help="the format's CSV, if not its default file in the root")
    parser.add_argument("--label-range", nargs=2, type=float, metavar=("LO", "HI"),
                        help="inclusive range of valid labels (default: -3 3)")
    parser.add_argument("--default-split", choices=[*SPLITS, "by-video"],
                        help="split of clips without one (default: test)")
    parser.add_argument("--split-seed", type=int, help="seed of the by-video split")
    parser.add_argument("--config", help="YAML: the manifest options, or a workflow config "
                                         "whose `dataset:` section holds them and `root`")
    parser.add_argument("--require-labels", metavar="SPLITS", default="",
                        help="comma list of splits whose clips must all have a label (the workflow, which "
                             "trains on them: train,valid); an unlabeled one is an error, nothing written")


def config_from_args(args: argparse.Namespace) -> tuple[ManifestConfig, str | None]:
    """Options from --config, overridden by the flags given; and the dataset root."""
    cfg, root = load_config(args.config) if args.config else (ManifestConfig(), None)
    overrides = {"format": args.format, "labels": args.labels, "label_range": args.label_range,
                 "default_split": args.default_split, "split_seed": args.split_seed}
    cfg = ManifestConfig.model_validate(cfg.model_dump() | {k: v for k, v in overrides.items() if v is not None})
    return cfg, args.root or root


def unlabeled_rows(df: pd.DataFrame, splits: list[str]) -> list[str]:
    """Ids of the clips in `splits` without a label."""
    if not splits or df.empty:
        return []
    return df.loc[df["split"].isin(splits) & df["label"].isna(), "id"].astype(str).tolist()


def main(args: argparse.Namespace) -> int:
    try:
        cfg, root = config_from_args(args)
    except (ValidationError, ValueError) as exc:
        log.error(f"msaflow manifest: invalid config {args.config}: {exc}")
        return 2
    if root is None:
        log.error("msaflow manifest: give DATASET_ROOT (or `dataset.root` in --config)")
        return 2
    try:
        df = build_manifest(root, cfg)
    except ManifestError as exc:
        log.error("\n".join([f"msaflow manifest: {len(exc.problems)} problem(s) in {root}; nothing written:",
                             *(f"  {problem}" for problem in exc.problems)]))
        return 2
    unlabeled = unlabeled_rows(df, [x.strip() for x in args.require_labels.split(",") if x.strip()])
    if unlabeled:
        log.error(f"msaflow manifest: {len(unlabeled)} {args.require_labels} clip(s) of {root} have no label "
                  f"({', '.join(unlabeled[:5])}{' ...' if len(unlabeled) > 5 else ''}); nothing written: training "
                  f"needs them. Give labels (and splits, transcripts) in the dataset's labels CSV "
                  f"(docs/datasets.md), or set their split to test")
        return 2
    write_manifest(df, args.output)
    log.info(f"{args.output}: {len(df)} clips read as {df.attrs['format']}")
    log.info(summary_table(df))
    leaks = split_leaks(df)
    if leaks:
        log.warning(f"warning: {len(leaks)} video(s) have clips in more than one split: "
                    f"{', '.join(leaks[:10])}{' ...' if len(leaks) > 10 else ''}")
    return 0
