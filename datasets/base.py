"""What every dataset adapter shares: clip records, collected validation problems, strict CSV
reading with human row numbers, and the checks on labels, splits, times and paths.

Adapters never raise on the first bad row: they report each problem to a `Problems`
collector and go on, so that the user sees every error of a dataset in one run.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from msaflow.contract import SPLITS

# Other names datasets use for the same splits (compared lower-cased, stripped).
SPLIT_ALIASES = {"val": "valid", "validation": "valid", "dev": "valid", "training": "train",
                 "testing": "test"}


@dataclass(frozen=True)
class Problem:
    """One validation error: the file it is in, the CSV row (header = row 1) if any, what is wrong."""

    file: str
    row: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}, row {self.row}" if self.row is not None else self.file
        return f"{where}: {self.message}"


class ManifestError(ValueError):
    """A dataset failed validation; `problems` lists every error found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = "\n".join(str(p) for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the dataset:\n{lines}")


@dataclass
class Problems:
    """Collects validation errors; `raise_if_any` raises them all at once."""

    items: list[Problem] = field(default_factory=list)

    def add(self, file: str | os.PathLike, row: int | None, message: str) -> None:
        self.items.append(Problem(str(file), row, message))

    def raise_if_any(self) -> None:
        if self.items:
            raise ManifestError(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class ClipRecord:
    """One clip as an adapter read it, with where it came from (for error messages)."""

    video_id: str
    clip_id: str
    path: Path
    source: str            # file the clip was declared in (CSV, or the media file itself)
    row: int | None        # CSV row, header = 1; None for clips found by scanning a folder
    start: float | None = None
    end: float | None = None
    text: str = ""
    label: float | None = None
    split: str | None = None  # None = not given; the manifest assigns the default split
    label_T: float | None = None
    label_A: float | None = None
    label_V: float | None = None

    @property
    def id(self) -> str:
        return f"{self.video_id}/{self.clip_id}"


class ReadOptions(Protocol):
    """What adapters read of the manifest options (`manifest.ManifestConfig` has these and more):
    adapters depend on this, not on the manifest module, which imports them."""

    @property
    def format(self) -> str: ...

    @property
    def labels(self) -> str | None: ...

    @property
    def label_range(self) -> tuple[float, float]: ...

    @property
    def video_extensions(self) -> tuple[str, ...]: ...


class DatasetAdapter(Protocol):
    """A dataset format: recognises its layout and reads it into clip records."""

    name: ClassVar[str]

    def detect(self, root: Path, cfg: ReadOptions) -> bool:
        """True when `root` looks like this format (used by `--format auto`)."""

    def read(self, root: Path, cfg: ReadOptions, problems: Problems) -> list[ClipRecord]:
        """Every valid clip; each invalid row is reported to `problems` and left out."""


@dataclass
class CsvTable:
    path: Path
    columns: list[str]
    rows: list[tuple[int, dict[str, str]]]  # (row number as a human counts it, values)


def read_layout_csv(csv_path: Path, layout: str, columns, required, problems: Problems) -> "CsvTable | None":
    """The CSV a layout is built on, or None with the problem recorded (missing or unreadable)."""
    if not csv_path.is_file():
        problems.add(csv_path, None, f"missing file: the {layout} layout needs this CSV")
        return None
    return read_csv_table(csv_path, columns, required, problems)


def read_csv_table(path: Path, allowed: set[str], required: set[str], problems: Problems,
                   ) -> CsvTable | None:
    """Read a UTF-8 CSV strictly. Returns None (after reporting why) if the file is unusable.

    Rows are numbered as a spreadsheet shows them: the header is row 1. A row with the
    wrong number of fields is reported and skipped; the others are kept.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        problems.add(path, None, f"cannot read the CSV ({exc.strerror or exc})")
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        rows = _rows_with_bad_bytes(raw)
        more = f"; rows {', '.join(map(str, rows[:10]))}{' ...' if len(rows) > 10 else ''} affected" \
            if len(rows) > 1 else ""
        problems.add(path, rows[0] if rows else None,
                     f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}{more}); "
                     "the file looks like Latin-1/Windows-1252: re-encode it as UTF-8, e.g. "
                     f"`iconv -f latin1 -t utf-8 '{path.name}' > utf8.csv`")
        return None
    try:
        records = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        problems.add(path, None, f"malformed CSV ({exc})")
        return None
    if not records or not any(cell.strip() for cell in records[0]):
        problems.add(path, 1, "empty file: expected a header row")
        return None
    columns = [c.strip() for c in records[0]]
    bad = False
    for col in columns:
        if col not in allowed:
            problems.add(path, 1, f"unknown column {col!r} (allowed: {', '.join(sorted(allowed))})")
            bad = True
    for col in sorted(required - set(columns)):
        problems.add(path, 1, f"missing required column {col!r}")
        bad = True
    for col in {c for c in columns if columns.count(c) > 1}:
        problems.add(path, 1, f"column {col!r} appears more than once")
        bad = True
    if bad:
        return None
    rows = []
    for number, record in enumerate(records[1:], start=2):
        if not record or (len(record) == 1 and not record[0].strip()):
            continue  # blank line
        if len(record) != len(columns):
            problems.add(path, number, f"{len(record)} fields, the header has {len(columns)}")
            continue
        rows.append((number, dict(zip(columns, record))))
    return CsvTable(path, columns, rows)


def _rows_with_bad_bytes(raw: bytes) -> list[int]:
    """CSV rows (header = 1) holding bytes that are not UTF-8; quoted line breaks are respected."""
    text = raw.decode("utf-8", errors="surrogateescape")  # bad bytes become lone surrogates
    try:
        records = csv.reader(io.StringIO(text, newline=""))
        return [n for n, record in enumerate(records, start=1)
                if any("\udc80" <= ch <= "\udcff" for cell in record for ch in cell)]
    except csv.Error:
        return []


def parse_float(value: str, what: str, file: Path, row: int, problems: Problems) -> float | None:
    """A finite float, or None for an empty cell; anything else is reported."""
    value = value.strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        problems.add(file, row, f"{what} {value!r} is not a number")
        return None
    if not math.isfinite(number):
        problems.add(file, row, f"{what} {value!r} is not a finite number")
        return None
    return number


def parse_label(value: str, what: str, label_range: tuple[float, float], file: Path, row: int,
                problems: Problems) -> float | None:
    number = parse_float(value, what, file, row, problems)
    lo, hi = label_range
    if number is not None and not lo <= number <= hi:
        problems.add(file, row, f"{what} {number:g} is outside the dataset's label range [{lo:g}, {hi:g}]")
        return None
    return number


def parse_split(value: str, file: Path, row: int, problems: Problems) -> str | None:
    """'train' / 'valid' / 'test' (aliases such as 'val', 'dev' accepted); None when empty."""
    name = value.strip().lower()
    if not name:
        return None
    name = SPLIT_ALIASES.get(name, name)
    if name not in SPLITS:
        aliases = ", ".join(sorted(SPLIT_ALIASES))
        problems.add(file, row, f"unknown split {value!r} (accepted: {', '.join(SPLITS)}; aliases: {aliases})")
        return None
    return name


def parse_times(start: str, end: str, file: Path, row: int, problems: Problems,
                ) -> tuple[float | None, float | None] | None:
    """(start, end) in seconds, both None for the whole file; None when invalid (reported)."""
    t0 = parse_float(start, "start", file, row, problems)
    t1 = parse_float(end, "end", file, row, problems)
    if t0 is None and t1 is None:
        if start.strip() or end.strip():
            return None  # not numbers: already reported
        return None, None
    if t0 is None or t1 is None:
        if bool(start.strip()) != bool(end.strip()):
            problems.add(file, row, "start and end must both be given, or both be empty (whole file)")
        return None
    if t0 < 0 or t1 < 0:
        problems.add(file, row, f"negative time (start {t0:g}, end {t1:g})")
        return None
    if t0 >= t1:
        problems.add(file, row, f"start {t0:g} is not before end {t1:g}")
        return None
    return t0, t1


def read_row_fields(values: dict[str, str], cfg: ReadOptions, file: Path, row: int,
                    problems: Problems, split_column: str) -> dict | None:
    """Text, labels and split of one CSV row (absent columns = empty); None if any is invalid."""
    before = len(problems)
    fields = {"text": values.get("text", ""),  # kept exactly as written (non-ASCII included)
              "split": parse_split(values.get(split_column, ""), file, row, problems)}
    for column in ("label", "label_T", "label_A", "label_V"):
        fields[column] = parse_label(values.get(column, ""), column, cfg.label_range, file, row, problems)
    return fields if len(problems) == before else None


def peek_header(path: Path) -> set[str]:
    """Column names of a CSV's first line, for format detection only (never raises)."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            return {c.strip() for c in next(csv.reader(f), [])}
    except OSError:
        return set()


def check_name(value: str, what: str, file: Path | str, row: int | None, problems: Problems) -> bool:
    """An id used as a file or folder name: non-empty, one path component, not '.' or '..'."""
    if not value.strip():
        problems.add(file, row, f"empty {what}")
        return False
    if "/" in value or "\\" in value or value in (".", "..") or "\x00" in value:
        problems.add(file, row, f"{what} {value!r} escapes the dataset root (path separators or '..' "
                                "are not allowed in ids)")
        return False
    return True


def resolve_inside(root: Path, relative: str, what: str, file: Path | str, row: int | None,
                   problems: Problems) -> Path | None:
    """`root/relative` as an absolute path if it stays inside `root` (symlinks followed).

    `root` must already be resolved. Absolute paths are accepted when they lie inside the root.
    """
    candidate = Path(os.path.normpath(root / relative))  # root / absolute = absolute
    if not candidate.is_relative_to(root):
        problems.add(file, row, f"{what} {relative!r} escapes the dataset root {root}")
        return None
    if candidate.exists() and not Path(os.path.realpath(candidate)).is_relative_to(root):
        problems.add(file, row, f"{what} {relative!r} leads through a symlink to "
                                f"{os.path.realpath(candidate)}, outside the dataset root {root}")
        return None
    return candidate


class VideoIndex:
    """Video files of a folder by stem, listed once per folder (fast on 20k-clip datasets)."""

    def __init__(self, extensions: tuple[str, ...]):
        self.extensions = extensions
        self._listing: dict[Path, dict[str, list[Path]]] = {}

    def is_video(self, path: Path) -> bool:
        return path.suffix.lower() in self.extensions

    def candidates(self, folder: Path, stem: str) -> list[Path]:
        if folder not in self._listing:
            by_stem: dict[str, list[Path]] = {}
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                entries = []
            for entry in entries:
                p = Path(entry.path)
                if self.is_video(p) and not entry.is_dir():
                    by_stem.setdefault(p.stem, []).append(p)
            self._listing[folder] = by_stem
        return self._listing[folder].get(stem, [])

    def find(self, root: Path, folder: Path, stem: str, file: Path, row: int, problems: Problems,
             ) -> Path | None:
        """The one video `folder/<stem>.<video ext>`; missing or ambiguous files are reported."""
        found = self.candidates(folder, stem)
        pattern = folder / f"{stem}.*"
        if not found:
            problems.add(file, row, f"missing file: no video {pattern} "
                                    f"(extensions: {' '.join(self.extensions)})")
            return None
        if len(found) > 1:
            problems.add(file, row, f"ambiguous: several videos match {pattern}: "
                                    f"{', '.join(p.name for p in found)}")
            return None
        return resolve_inside(root, str(found[0].relative_to(root)), "file", file, row, problems)
