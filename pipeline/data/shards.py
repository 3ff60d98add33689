"""`msaflow shards`: pack the per-clip tars of the extraction step into WebDataset shards.

Per split, samples follow manifest order and shards hold at most `max_samples` samples /
`max_bytes` bytes (a single larger sample gets a shard of its own). Member bytes are copied
from the clip tars unchanged, one member at a time, so memory stays bounded by the largest
member. Every shard goes through `tario.atomic_path` + `TarWriter`, so shards are
byte-identical across runs and never visible half-written (docs/data-contracts.md §3).

Every manifest row ends up either in a shard or in `failures.csv`; a row with neither a
clip tar nor an extraction failure record stops the command ("not extracted").
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import re
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, PositiveInt
from tqdm import tqdm

from msaflow import __version__
from msaflow.configfile import read_section
from msaflow.contract import SPLITS
from msaflow.extractors.audio import STEPS_PER_SECOND
from msaflow.extractors.asr import text_source
from msaflow.datasets.manifest import MANIFEST_COLUMNS, read_manifest, sanitize_key
from msaflow.lock import output_lock
from msaflow.pipeline.extraction.settings import ExtractConfig, extract_config_hash, output_settings
from msaflow.tario import TarWriter, atomic_path, check_tar, npy_data_size, remove_stale_temp, write_json_atomic

FAILURE_COLUMNS = ["id", "path", "stage", "reason"]
FBANK_RATE = float(STEPS_PER_SECOND)  # the 10 ms audio grid of fbank.npy / audio.npy / audio_mask.npy
TAR_BLOCK, TAR_RECORD = 512, 10240  # tar header/data block; the file is padded to whole records


class ShardsConfig(BaseModel):
    """The `shards:` section of the workflow config."""

    model_config = ConfigDict(extra="forbid")

    max_samples: PositiveInt = 1000
    max_bytes: PositiveInt = 1 << 30


# member -> its rate (steps per second) given the clip's json; None: no time axis (tokens)
_RATE: dict[str, Callable[[dict], float | None]] = {
    "face.npy": lambda meta: meta["fps"],
    "vision.npy": lambda meta: meta["fps"],
    "vision_mask.npy": lambda meta: meta["fps"],
    "wav.npy": lambda meta: meta["sample_rate"],
    "fbank.npy": lambda meta: FBANK_RATE,
    "audio.npy": lambda meta: FBANK_RATE,
    "audio_mask.npy": lambda meta: FBANK_RATE,
    "text.npy": lambda meta: None,
    "text_ids.npy": lambda meta: None,
}
REQUIRED_MEMBERS = {
    "raw": ("json", "face.npy", "vision_mask.npy", "wav.npy", "fbank.npy", "audio_mask.npy", "text_ids.npy"),
    "features": ("json", "vision.npy", "vision_mask.npy", "audio.npy", "audio_mask.npy", "text.npy",
                 "text_ids.npy"),
}
# members whose first axis must equal a json count / another member's first axis
_TIME_AXIS_OF_JSON = {"vision_mask.npy": "n_frames", "face.npy": "n_frames", "vision.npy": "n_frames"}
_SAME_TIME_AXIS = {"fbank.npy": "audio_mask.npy", "audio.npy": "audio_mask.npy", "text.npy": "text_ids.npy"}


class ShardsError(RuntimeError):
    """The inputs cannot be sharded as a whole (not one clip: the run)."""


class ClipError(ValueError):
    """One clip tar is unusable; the clip goes to failures.csv and the others go on."""


@dataclass(frozen=True)
class MemberInfo:
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Clip:
    """A validated clip tar: what to copy into the shard and what the index needs to know."""

    path: Path
    meta: dict
    sizes: dict[str, int]  # member suffix -> bytes
    arrays: dict[str, MemberInfo]

    @property
    def tar_bytes(self) -> int:
        return sum(TAR_BLOCK + _blocks(size) for size in self.sizes.values())


def _blocks(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_file_size(member_bytes: int) -> int:
    """Size on disk of a tar whose headers+data take `member_bytes` (end blocks, record padding)."""
    return -(-(member_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _npy_info(fileobj, name: str) -> MemberInfo:
    try:
        shape, dtype, _ = npy_data_size(fileobj)
    except ValueError as exc:
        raise ClipError(f"{name}: not a NumPy .npy array ({exc})") from exc
    if dtype.hasobject:
        raise ClipError(f"{name}: object dtype (would need pickle)")
    return MemberInfo(shape, np.dtype(dtype).name)


def read_clip(path: Path, key: str, clip_id: str) -> Clip:
    """Read the headers of one clip tar (not its arrays) and check it against the contract.

    The whole tar index is checked first (`tario.check_tar`): a tar cut short, or a `.npy`
    member shorter than its header says (an empty or cut face.npy), is not packed."""
    try:
        check_tar(path)
    except ValueError as exc:
        raise ClipError(f"damaged clip tar: {exc}") from exc
    sizes, arrays, meta = {}, {}, None
    try:
        with tarfile.open(path, "r") as tar:
            for info in tar:
                if not info.isfile():
                    raise ClipError(f"member {info.name!r} is not a regular file")
                member_key, _, suffix = info.name.partition(".")
                if member_key != key:
                    raise ClipError(f"member {info.name!r} does not belong to key {key!r}")
                if suffix != "json" and not suffix.endswith(".npy"):
                    raise ClipError(f"member {info.name!r}: only .json and .npy members are allowed")
                sizes[suffix] = info.size
                f = tar.extractfile(info)
                if suffix == "json":
                    meta = json.loads(f.read().decode("utf-8"))
                else:
                    arrays[suffix] = _npy_info(f, info.name)
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClipError(f"unreadable clip tar ({exc})") from exc
    if not sizes:
        raise ClipError("empty clip tar")
    if not isinstance(meta, dict):
        raise ClipError("no json member")
    if meta.get("id") != clip_id:
        raise ClipError(f"json id {meta.get('id')!r} differs from the manifest id {clip_id!r}")
    mode = meta.get("mode")
    if mode not in REQUIRED_MEMBERS:
        raise ClipError(f"json mode {mode!r} is not one of {sorted(REQUIRED_MEMBERS)}")
    missing = [m for m in REQUIRED_MEMBERS[mode] if m not in sizes]
    if missing:
        raise ClipError(f"{mode} mode clip lacks {', '.join(missing)}")
    for member, count_field in _TIME_AXIS_OF_JSON.items():
        if member in arrays and (not arrays[member].shape or arrays[member].shape[0] != meta.get(count_field)):
            raise ClipError(f"{member} has shape {arrays[member].shape} but json {count_field} is "
                            f"{meta.get(count_field)!r}")
    for member, other in _SAME_TIME_AXIS.items():
        if member in arrays and other in arrays and arrays[member].shape[:1] != arrays[other].shape[:1]:
            raise ClipError(f"{member} has {arrays[member].shape[:1]} steps but {other} has "
                            f"{arrays[other].shape[:1]}")
    return Clip(path, meta, sizes, arrays)


def _member_rate(member: str, meta: dict) -> float | None:
    rate = _RATE.get(member, lambda meta: None)(meta)
    return None if rate is None else float(rate)


def member_schema(clip: Clip) -> dict[str, dict]:
    """Per member: shape with a null time axis, dtype, rate: what every sample of a split shares."""
    return {
        name: {"shape": [None, *info.shape[1:]], "dtype": info.dtype, "rate": _member_rate(name, clip.meta)}
        for name, info in sorted(clip.arrays.items())
    }


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


class _ShardSequence:
    """Writes `<split>-NNNNNN.tar` one after another, each atomically, splitting by count and size."""

    def __init__(self, split_dir: Path, split: str, max_samples: int, max_bytes: int):
        self.split_dir, self.split = split_dir, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.written: list[dict] = []
        self._ctx = self._writer = None
        self._n = self._bytes = 0

    def add(self, key: str, clip: Clip) -> None:
        if self._writer is not None and (
            self._n + 1 > self.max_samples or tar_file_size(self._bytes + clip.tar_bytes) > self.max_bytes
        ):
            self._close()
        if self._writer is None:
            self._open()
        with tarfile.open(clip.path, "r") as tar:
            for info in sorted(tar.getmembers(), key=lambda m: m.name):
                self._writer.add_bytes(info.name, tar.extractfile(info).read())
        self._n += 1
        self._bytes += clip.tar_bytes

    def _open(self) -> None:
        self._final = self.split_dir / f"{self.split}-{len(self.written):06d}.tar"
        self._ctx = atomic_path(self._final)
        self._writer = TarWriter(self._ctx.__enter__())

    def _close(self) -> None:
        writer, ctx = self._writer, self._ctx
        self._ctx = self._writer = None
        try:
            writer.close()
        except BaseException:
            writer.discard()
            if not ctx.__exit__(*sys.exc_info()):  # removes the temp file (re-raises naming the shard)
                raise
        ctx.__exit__(None, None, None)
        self.written.append({"name": self._final.name, "n_samples": self._n,
                             "sha256": sha256_file(self._final)})
        self._ctx = self._writer = None
        self._n = self._bytes = 0

    def finish(self) -> list[dict]:
        if self._writer is not None:
            self._close()
        return self.written

    def abort(self) -> None:
        """Drop the shard being written (called while handling the error that stops the split)."""
        if self._writer is not None:
            self._writer.discard()
            ctx, self._ctx, self._writer = self._ctx, None, None
            exc = sys.exc_info()
            # removes the temp file; an OSError of a write comes back naming the shard
            ctx.__exit__(*exc) if exc[0] is not None else ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


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


def _write_split(result: SplitResult, out_dir: Path, cfg: ShardsConfig, progress: tqdm) -> None:
    split_dir = out_dir / result.split
    split_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardSequence(split_dir, result.split, cfg.max_samples, cfg.max_bytes)
    try:
        for key, clip in result.clips:
            writer.add(key, clip)
            progress.update()
        result.shards = writer.finish()
    except BaseException:
        writer.abort()
        raise
    keep = {s["name"] for s in result.shards}
    for old in split_dir.glob(f"{result.split}-*.tar"):  # shards of an earlier, larger run
        if re.fullmatch(rf"{result.split}-\d{{6}}\.tar", old.name) and old.name not in keep:
            old.unlink()


def describe_frontends(spec: str) -> dict:
    """What `extract` records for features mode, rebuilt from the config's front-end spec."""
    from msaflow.extractors import frontends

    return frontends.describe(frontends.build(spec))


def build_shards(extract_dir: Path, manifest: Path, out_dir: Path, cfg: ShardsConfig, config_hash: str,
                 *args, **kwargs) -> dict:
    """`_build_shards` holding the lock of `out_dir` (one writer per shard folder; LockError
    when another process writes there). Temp files of dead processes are removed first."""
    with output_lock(out_dir, f"msaflow shards {extract_dir} -o {out_dir}"):
        for folder in (out_dir, *(out_dir / split for split in SPLITS)):
            remove_stale_temp(folder)
        return _build_shards(extract_dir, manifest, out_dir, cfg, config_hash, *args, **kwargs)


def _build_shards(extract_dir: Path, manifest: Path, out_dir: Path, cfg: ShardsConfig,
                  config_hash: str, frontends_spec: str | None = None, remove_packed: bool = False,
                  extract_settings: dict | None = None) -> dict:
    """Write shards, index.json per split, failures.csv and (last) summary.json; return the summary.

    `frontends_spec` (the extract config's `frontends`) describes the front-ends of features
    mode when no chunk summary recorded them (e.g. every clip was already extracted).
    """
    rows = manifest_rows(manifest)
    _check_not_extracted(rows, extract_dir)
    frontends = read_frontends(extract_dir)
    manifest_hash = sha256_file(manifest)
    results, failures = _plan_splits(rows, extract_dir)
    mode = _one_mode(results, extract_dir)
    if mode == "features" and not frontends and frontends_spec:
        frontends = describe_frontends(frontends_spec)
    with tqdm(total=sum(len(r.clips) for r in results), desc="write shards", unit="clip",
              file=sys.stderr) as progress:
        for r in results:
            _write_split(r, out_dir, cfg, progress)
    for r in results:
        write_json_atomic(out_dir / r.split / "index.json", {
            "split": r.split, "mode": mode, "n_samples": r.samples, "shards": r.shards,
            "modalities": r.modalities, "frontends": frontends, "config_hash": config_hash,
            "text_sources": {"given": r.text_given, "recognised": r.text_recognised}, "asr": r.asr,
            "manifest_hash": manifest_hash, "msaflow_version": __version__,
            **({"extract": extract_settings} if extract_settings else {}),  # the settings `config_hash` hashes
        })
    _write_failures(out_dir / "failures.csv", failures, rows)
    summary = _summary(results, mode, config_hash, manifest_hash)
    write_json_atomic(out_dir / "summary.json", summary)
    if remove_packed:  # only now: every split, index.json, failures.csv and summary.json are on disk
        remove_packed_clips(extract_dir, out_dir, manifest_hash, config_hash, cfg, results, summary)
    else:  # built from the clip tars: an older record of removed clips no longer applies
        (extract_dir / PACKED_RECORD).unlink(missing_ok=True)
    return summary


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


def _write_failures(path: Path, failures: list[dict], rows: list[dict]) -> None:
    """failures.csv, in manifest order."""
    order = {row["id"]: i for i, row in enumerate(rows)}
    failures = sorted(failures, key=lambda f: order[f["id"]])
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=FAILURE_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows({col: fail[col] for col in FAILURE_COLUMNS} for fail in failures)


def _summary(results: list[SplitResult], mode: str | None, config_hash: str, manifest_hash: str) -> dict:
    summary = {
        "mode": mode, "config_hash": config_hash, "manifest_hash": manifest_hash,
        "splits": {r.split: {"manifest_rows": r.manifest_rows, "samples": r.samples, "shards": len(r.shards),
                             "failures": r.failures, "no_face": r.no_face, "no_audio": r.no_audio,
                             "empty_text": r.empty_text, "text_given": r.text_given,
                             "text_recognised": r.text_recognised} for r in results},
    }
    summary["total"] = {k: sum(s[k] for s in summary["splits"].values())
                        for k in next(iter(summary["splits"].values()))}
    return summary


# In EXTRACT_DIR: which clip tars `--remove-packed` removed, and the shards that hold them.
PACKED_RECORD = "packed.json"


def remove_packed_clips(extract_dir: Path, out_dir: Path, manifest_hash: str, config_hash: str,
                        cfg: ShardsConfig, results: list[SplitResult], summary: dict) -> tuple[int, int]:
    """Delete the clip tars packed into the shards (the raw data is then kept once, in the shards).

    First EXTRACT_DIR/packed.json records them with the manifest, settings, shard files and the
    summary, so that a rerun (e.g. after a kill during the removal; Snakemake deletes the
    summary.json of a job it reruns) recognises the finished shards instead of failing on the
    missing clips. Returns (clip tars removed, bytes freed).
    """
    record = {
        "shard_dir": str(out_dir.resolve()), "manifest_hash": manifest_hash, "config_hash": config_hash,
        "shards_config": cfg.model_dump(mode="json"),
        "shard_files": {f"{r.split}/{s['name']}": (out_dir / r.split / s["name"]).stat().st_size
                        for r in results for s in r.shards},
        "outputs": ["failures.csv", *(f"{r.split}/index.json" for r in results)],
        "clips": sorted(key for r in results for key, _ in r.clips),
        "summary": summary,
    }
    write_json_atomic(extract_dir / PACKED_RECORD, record)
    return _unlink_clips(extract_dir, record["clips"])


def _unlink_clips(extract_dir: Path, keys: list[str]) -> tuple[int, int]:
    removed = freed = 0
    for key in keys:
        path = extract_dir / "clips" / f"{key}.tar"
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        removed, freed = removed + 1, freed + size
    return removed, freed


def packed_shards(extract_dir: Path, manifest: Path, out_dir: Path, cfg: ShardsConfig,
                  config_hash: str) -> dict | None:
    """The finished shards' summary when clip tars were removed after packing and these are the shards asked for.

    summary.json is written again from the record (Snakemake deletes it before rerunning a job).
    None when no packed clip tar is missing (build from the clip tars as usual). When some are
    missing and the shards cannot be kept (another manifest, other settings, another folder, a
    shard file missing or of another size), a ShardsError says so and how to re-extract.
    """
    path = extract_dir / PACKED_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        gone = [key for key in record["clips"] if not (extract_dir / "clips" / f"{key}.tar").exists()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ShardsError(f"{path}: unreadable record of removed clip tars ({exc})") from exc
    if not gone:
        return None
    problems = []
    if record.get("shard_dir") != str(out_dir.resolve()):
        problems.append(f"they were packed into {record.get('shard_dir')}, not into {out_dir}")
    if record.get("manifest_hash") != sha256_file(manifest):
        problems.append(f"{manifest} changed since")
    if record.get("config_hash") != config_hash:
        problems.append("the extract config differs")
    if record.get("shards_config") != cfg.model_dump(mode="json"):
        problems.append(f"the shard settings differ ({record.get('shards_config')} then, "
                        f"{cfg.model_dump(mode='json')} now)")
    files = record.get("shard_files", {})
    changed = [name for name, size in files.items()
               if not (out_dir / name).is_file() or (out_dir / name).stat().st_size != size]
    missing = [name for name in record.get("outputs", []) if not (out_dir / name).is_file()]
    if changed or missing:
        problems.append(f"shard outputs missing or changed in {out_dir}: {', '.join((changed + missing)[:10])}")
    if problems:
        raise ShardsError(
            f"{len(gone)} of {len(record['clips'])} clip tars in {extract_dir / 'clips'} were removed after "
            f"they were packed into shards ({path}), and those shards cannot be reused: {'; '.join(problems)}. "
            f"Re-extract the clips (workflow: `snakemake --forcerun extract ...`; by hand: `msaflow extract "
            f"MANIFEST -o {extract_dir} ...`, which redoes only the missing clips), then run this again.")
    write_json_atomic(out_dir / "summary.json", record["summary"])  # the same bytes a fresh run writes
    return record["summary"]


def format_summary(summary: dict) -> str:
    columns = ["manifest_rows", "samples", "shards", "failures", "no_face", "no_audio", "empty_text",
               "text_given", "text_recognised"]
    rows = [[name, *(str(counts.get(c, "")) for c in columns)]
            for name, counts in [*summary["splits"].items(), ("total", summary["total"])]]
    header = ["split", *columns]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), *(line(r) for r in rows)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("extract_dir", type=Path, help="output folder of `msaflow extract` (holds clips/)")
    parser.add_argument("--manifest", type=Path, required=True, help="the manifest CSV the clips came from")
    parser.add_argument("-o", "--output", type=Path, required=True, help="shard folder to write")
    parser.add_argument("--config", type=Path, help="workflow YAML: its `shards:` section sets the limits, "
                                                    "its `extract:` section gives the config hash")
    parser.add_argument("--max-samples", type=int, help="at most N samples per shard (overrides the config)")
    parser.add_argument("--max-bytes", type=int, help="at most B bytes per shard (overrides the config)")
    parser.add_argument("--remove-packed", action="store_true",
                        help="once every split, index.json, failures.csv and summary.json are written, delete "
                             "the clip tars packed into the shards (recorded in EXTRACT_DIR/packed.json; a "
                             "rerun with the same manifest and settings keeps the finished shards)")


def main(args: argparse.Namespace) -> int:
    try:
        section = read_section(args.config, "shards") if args.config else {}
        overrides = {"max_samples": args.max_samples, "max_bytes": args.max_bytes}
        cfg = ShardsConfig.model_validate(section | {k: v for k, v in overrides.items() if v is not None})
        given = read_section(args.config, "extract") if args.config else None
        used = extract_config(args.extract_dir, given)
        if not args.manifest.is_file():
            raise ShardsError(f"{args.manifest}: manifest not found")
        if not (args.extract_dir / "clips").is_dir() and not (args.extract_dir / "failures").is_dir():
            raise ShardsError(f"{args.extract_dir}: no clips/ or failures/ folder: not an extraction output")
        config_hash = extract_config_hash(used)
        # Under the folder's lock like a build: it takes over (and then removes) the lock file a
        # run killed during the clip removal left behind.
        with output_lock(args.output, f"msaflow shards {args.extract_dir} -o {args.output}"):
            summary = packed_shards(args.extract_dir, args.manifest, args.output, cfg, config_hash)
            if summary is not None:  # clip tars were removed after packing: the shards are complete, keep them
                print(f"shards in {args.output} are complete for this manifest and config; the clip tars were "
                      f"removed after packing ({args.extract_dir / PACKED_RECORD}): kept", file=sys.stderr)
                if args.remove_packed:
                    record = json.loads((args.extract_dir / PACKED_RECORD).read_text(encoding="utf-8"))
                    removed, freed = _unlink_clips(args.extract_dir, record["clips"])
                    print(f"removed the {removed} packed clip tar(s) left ({freed / 1e6:.1f} MB)", file=sys.stderr)
        if summary is None:
            clips = args.extract_dir / "clips"
            before = sum(p.stat().st_size for p in clips.glob("*.tar")) if args.remove_packed else 0
            summary = build_shards(args.extract_dir, args.manifest, args.output, cfg, config_hash,
                                   used.get("frontends"), remove_packed=args.remove_packed,
                                   extract_settings=used)
            if args.remove_packed:
                after = sum(p.stat().st_size for p in clips.glob("*.tar"))
                print(f"removed the packed clip tars ({(before - after) / 1e6:.1f} MB); "
                      f"{args.extract_dir / PACKED_RECORD} lists them", file=sys.stderr)
    except (ShardsError, ValueError) as exc:
        print(f"msaflow shards: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"shards, index.json, failures.csv, summary.json in {args.output}")
    return 0
