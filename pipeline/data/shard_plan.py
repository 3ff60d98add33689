"""`msaflow shards`' settings and what it checks before it writes a shard: the manifest rows,
the extraction's failure records, front-ends and extract config, and every clip's headers,
planned per split in manifest order (the clips to pack and the rows that fail)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, PositiveInt
from tqdm import tqdm

from msaflow.contract import SPLITS
from msaflow.extractors.asr import text_source
from msaflow.datasets.manifest import MANIFEST_COLUMNS, read_manifest, sanitize_key
from msaflow.pipeline.data.clip_tar import Clip, ClipError, member_schema, read_clip
from msaflow.pipeline.extraction.settings import ExtractConfig, output_settings


FAILURE_COLUMNS = ["id", "path", "stage", "reason"]


class ShardsConfig(BaseModel):
    """The `shards:` section of the workflow config."""

    model_config = ConfigDict(extra="forbid")

    max_samples: PositiveInt = 1000
    max_bytes: PositiveInt = 1 << 30


class ShardsError(RuntimeError):
    """The inputs cannot be sharded as a whole (not one clip: the run)."""


@dataclass
class SplitResult:
    split: str
    manifest_rows: int = 0
    shards: list[dict] = field(default_factory=list)
    modalities: dict[str, dict] = field(default_factory=dict)
    mode: str | None = None
    clips: list[tuple[str, Clip]] = field(default_factory=list)  # (key, clip) to write, manifest order
    failures: int = 0
    no_face: int = 0
    no_audio: int = 0
    empty_text: int = 0
    text_given: int = 0
    text_recognised: int = 0
    asr: dict | None = None  # the recogniser of the recognised transcripts (name, weights, sha256)

    @property
    def samples(self) -> int:
        return sum(s["n_samples"] for s in self.shards)


def manifest_rows(path: Path) -> list[dict]:
    """Every manifest row, in order (labels as floats, NaN = empty); a bad split is an error naming the row."""
    try:
        df = read_manifest(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ShardsError(f"{path}: unreadable manifest ({exc})") from exc
    if list(df.columns) != MANIFEST_COLUMNS:
        raise ShardsError(f"{path}: manifest columns {list(df.columns)} differ from {MANIFEST_COLUMNS}")
    rows = df.to_dict("records")
    for line, row in enumerate(rows, start=2):  # the header is row 1
        if row["split"] not in SPLITS:
            raise ShardsError(f"{path}, row {line}: unknown split {row['split']!r} (expected one of {SPLITS})")
    return rows


def read_failure_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardsError(f"{path}: unreadable failure record ({exc})") from exc
    return {col: str(record.get(col, "")) for col in FAILURE_COLUMNS}


def read_frontends(extract_dir: Path) -> dict:
    """Front-end descriptions the extraction step recorded in its chunk summaries (all must agree)."""
    found: dict | None = None
    for summary in sorted((extract_dir / "chunks").glob("*.json")):
        frontends = json.loads(summary.read_text(encoding="utf-8")).get("frontends")
        if frontends is None:
            continue
        if found is not None and frontends != found:
            raise ShardsError(f"{summary}: front-ends {frontends} differ from another chunk's {found}; "
                              f"extraction ran with different front-ends: re-extract")
        found = frontends
    return found or {}


def extract_config(extract_dir: Path, given: dict | None) -> dict:
    """The validated extract config the clips were made with.

    The chunk summaries record it; they must agree with each other and with `given` (the
    `extract:` section of --config) when one is given, on every setting that changes the
    output (not on runtime settings such as the device). Without either, the defaults.
    """
    recorded = {}
    for summary in sorted((extract_dir / "chunks").glob("*.json")):
        if (used := json.loads(summary.read_text(encoding="utf-8")).get("config")) is not None:
            recorded[summary] = ExtractConfig.model_validate(used).model_dump(mode="json")
    reference = ExtractConfig.model_validate(given or {}).model_dump(mode="json") if given is not None \
        else next(iter(recorded.values()), ExtractConfig().model_dump(mode="json"))
    expected = output_settings(reference)
    for summary, used in recorded.items():
        used = output_settings(used)
        if differing := [f"{k}: {used.get(k)!r} (expected {expected.get(k)!r})"
                         for k in sorted(expected) if used.get(k) != expected.get(k)]:
            raise ShardsError(f"{summary}: clips were extracted with another extract config than "
                              f"{'--config gives' if given is not None else 'other chunks'}: "
                              f"{'; '.join(differing)}")
    return reference


def _check_not_extracted(rows: list[dict], extract_dir: Path) -> None:
    missing = [row for row in rows if not (extract_dir / "clips" / f"{sanitize_key(row['id'])}.tar").exists()
               and not (extract_dir / "failures" / f"{sanitize_key(row['id'])}.json").exists()]
    if missing:
        shown = "\n".join(f"  {row['id']}: no clips/{sanitize_key(row['id'])}.tar and no "
                          f"failures/{sanitize_key(row['id'])}.json" for row in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise ShardsError(f"{len(missing)} of {len(rows)} manifest rows were not extracted in {extract_dir} "
                          f"(run `msaflow extract` for all chunks first):\n{shown}{more}")


# json field -> manifest column it must equal (a clip tar made from an older manifest is stale)
_FROM_MANIFEST = ("video_id", "clip_id", "text", "split", "label", "label_T", "label_A", "label_V")


def stale_fields(meta: dict, row: dict) -> list[str]:
    """Fields where a clip's json disagrees with its manifest row (labels compared as numbers; a
    recognised transcript is compared by the manifest's text it replaced, `given_text`)."""
    if "given_text" in meta:
        meta = {**meta, "text": meta["given_text"]}
    def same(a, b) -> bool:
        if isinstance(b, float) or isinstance(a, float):
            a_missing = a is None or (isinstance(a, float) and math.isnan(a))
            b_missing = b is None or (isinstance(b, float) and math.isnan(b))
            return a_missing == b_missing and (a_missing or math.isclose(float(a), float(b), abs_tol=1e-9))
        return a == b
    return [f"{name} {meta.get(name)!r} (manifest: {row[name]!r})"
            for name in _FROM_MANIFEST if name in row and not same(meta.get(name), row[name])]


def _plan_split(split: str, rows: list[dict], extract_dir: Path, failures: list[dict],
                stale: list[str], progress: tqdm) -> SplitResult:
    """Read and check every clip of a split (headers only); the clips to write, in manifest order."""
    result = SplitResult(split, manifest_rows=len(rows))
    for row in rows:
        progress.update()
        key = sanitize_key(row["id"])
        tar_path = extract_dir / "clips" / f"{key}.tar"
        if not tar_path.exists():
            failures.append(read_failure_record(extract_dir / "failures" / f"{key}.json") | {"id": row["id"]})
            result.failures += 1
            continue
        try:
            clip = read_clip(tar_path, key, row["id"])
            if differing := stale_fields(clip.meta, row):
                stale.append(f"  {tar_path}: {'; '.join(differing)}")
                continue
            schema = member_schema(clip)
            if result.mode is None:
                result.mode, result.modalities = clip.meta["mode"], schema
            elif clip.meta["mode"] != result.mode:
                raise ClipError(f"mode {clip.meta['mode']!r} differs from the split's {result.mode!r}")
            elif schema != result.modalities:
                raise ClipError(f"members {schema} differ from the split's {result.modalities}")
        except ClipError as exc:
            failures.append({"id": row["id"], "path": row["path"], "stage": "shards",
                             "reason": f"{tar_path}: {exc}"})
            progress.write(f"msaflow shards: clip {row['id']} not packed: {tar_path}: {exc}", file=sys.stderr)
            result.failures += 1
            continue
        result.clips.append((key, clip))
        result.no_face += clip.meta.get("n_face_frames") == 0
        result.no_audio += not clip.meta.get("has_audio", True)
        result.empty_text += not clip.meta.get("has_text", True)
        source = text_source(clip.meta)
        result.text_given += source == "given"
        result.text_recognised += source == "recognised"
        if source == "recognised" and result.asr is None:
            result.asr = {k: clip.meta["asr"].get(k) for k in ("recogniser", "weights", "sha256")}
    return result


def _plan_splits(rows: list[dict], extract_dir: Path) -> tuple[list[SplitResult], list[dict]]:
    """Every split's clips to write (headers checked) and the failures; ShardsError when a clip tar
    is stale (extracted from an older manifest)."""
    failures: list[dict] = []
    stale: list[str] = []
    with tqdm(total=len(rows), desc="check clips", unit="clip", file=sys.stderr) as progress:
        results = [_plan_split(split, [row for row in rows if row["split"] == split], extract_dir, failures,
                               stale, progress) for split in SPLITS]
    if stale:
        more = f"\n  ... and {len(stale) - 20} more" if len(stale) > 20 else ""
        raise ShardsError(f"{len(stale)} clip tar(s) in {extract_dir} were extracted from an older manifest "
                          f"(delete them and run the extraction again):\n" + "\n".join(stale[:20]) + more)
    return results, failures


def _one_mode(results: list[SplitResult], extract_dir: Path) -> str | None:
    """The clips' mode (raw or features; None without clips): one for every split."""
    modes = {r.mode for r in results if r.mode}
    if len(modes) > 1:
        raise ShardsError(f"clips in {extract_dir} mix modes {sorted(modes)}: re-extract with one mode")
    return modes.pop() if modes else None
