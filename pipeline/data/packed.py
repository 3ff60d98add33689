"""`msaflow shards --remove-packed`: the record of the clip tars removed after packing
(EXTRACT_DIR/packed.json), their removal, and a rerun's reuse of the finished shards."""

from __future__ import annotations

import json
from pathlib import Path

from msaflow.pipeline.data.clip_tar import sha256_file
from msaflow.pipeline.data.shard_plan import ShardsConfig, ShardsError, SplitResult
from msaflow.tario import write_json_atomic


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
