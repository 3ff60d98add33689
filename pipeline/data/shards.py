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
import json
import logging
import re
import sys
import tarfile
from pathlib import Path

from tqdm import tqdm

from msaflow import __version__
from msaflow.configfile import read_section
from msaflow.contract import SPLITS
from msaflow.lock import output_lock
from msaflow.pipeline.data.clip_tar import Clip, sha256_file, tar_file_size
from msaflow.pipeline.data.packed import PACKED_RECORD, _unlink_clips, packed_shards, remove_packed_clips
from msaflow.pipeline.data.shard_plan import (FAILURE_COLUMNS, ShardsConfig, ShardsError, SplitResult,
                                              _check_not_extracted, _one_mode, _plan_splits, extract_config,
                                              manifest_rows, read_frontends)
from msaflow.pipeline.extraction.settings import extract_config_hash
from msaflow.tario import TarWriter, atomic_path, remove_stale_temp, write_json_atomic

log = logging.getLogger("msaflow.shards")


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


def shard_folder_lock(extract_dir: Path, out_dir: Path):
    """The lock of `out_dir`: one writer per shard folder (LockError when another process writes
    there); a lock file left by a killed run is taken over."""
    return output_lock(out_dir, f"msaflow shards {extract_dir} -o {out_dir}")


def build_shards(extract_dir: Path, manifest: Path, out_dir: Path, cfg: ShardsConfig, config_hash: str,
                 *args, **kwargs) -> dict:
    """`build_shards_locked` holding the lock of `out_dir`."""
    with shard_folder_lock(extract_dir, out_dir):
        return build_shards_locked(extract_dir, manifest, out_dir, cfg, config_hash, *args, **kwargs)


def build_shards_locked(extract_dir: Path, manifest: Path, out_dir: Path, cfg: ShardsConfig, config_hash: str,
                        *args, **kwargs) -> dict:
    """`_build_shards` for a caller that holds the lock of `out_dir`; temp files of dead
    processes are removed first."""
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
        # Both ways under one hold of the folder's lock: keeping finished shards too takes over
        # (and then removes) the lock file a run killed during the clip removal left behind.
        with shard_folder_lock(args.extract_dir, args.output):
            summary = packed_shards(args.extract_dir, args.manifest, args.output, cfg, config_hash)
            if summary is not None:  # clip tars were removed after packing: the shards are complete, keep them
                log.warning(f"note: shards in {args.output} are complete for this manifest and config; the clip "
                            f"tars were removed after packing ({args.extract_dir / PACKED_RECORD}): kept")
                if args.remove_packed:
                    record = json.loads((args.extract_dir / PACKED_RECORD).read_text(encoding="utf-8"))
                    removed, freed = _unlink_clips(args.extract_dir, record["clips"])
                    log.warning(f"note: removed the {removed} packed clip tar(s) left ({freed / 1e6:.1f} MB)")
            else:
                clips = args.extract_dir / "clips"
                before = sum(p.stat().st_size for p in clips.glob("*.tar")) if args.remove_packed else 0
                summary = build_shards_locked(args.extract_dir, args.manifest, args.output, cfg, config_hash,
                                              used.get("frontends"), remove_packed=args.remove_packed,
                                              extract_settings=used)
                if args.remove_packed:
                    after = sum(p.stat().st_size for p in clips.glob("*.tar"))
                    log.warning(f"note: removed the packed clip tars ({(before - after) / 1e6:.1f} MB); "
                                f"{args.extract_dir / PACKED_RECORD} lists them")
    except (ShardsError, ValueError) as exc:
        log.error(f"msaflow shards: error: {exc}")
        return 2
    log.info(format_summary(summary))
    log.info(f"shards, index.json, failures.csv, summary.json in {args.output}")
    return 0
