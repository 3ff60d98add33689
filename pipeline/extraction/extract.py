"""`msaflow extract`: manifest rows → per-clip tars (docs/data-contracts.md §2).

Each clip is decoded, face-tracked and cropped in an isolated worker process
(`extract_pool`); a clip that fails gets `failures/<key>.json` and the others go on. A clip
whose tar or failure record exists is skipped (resume). The chunk ends with a summary
`chunks/<K>-of-<N>.json` and a summary table (logged: on stdout, silenced by -q).

Faults of the machine (no space, permission or I/O errors writing the output, a worker stopped
from outside) are never recorded against a clip: the run stops with one line naming the file
and the problem, and a rerun retries the clip. One process per chunk: `.msaflow-extract-K-of-N.lock`
(msaflow/lock.py); scratch files live in a folder of the process (`tmp/<pid>@<host>/`). On
resume every finished tar's index is checked; a damaged one is extracted again.

One module: the manifest reading, resume, signal handling, `_Tally` and summary below all serve
one run of one chunk (its lock and scratch folder) and are called only from `run` and `main`; the
worker processes are already apart (pool.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import tarfile
import threading
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from msaflow.device import DEVICES
from msaflow.pipeline.extraction.settings import ExtractConfig, load_config

log = logging.getLogger("msaflow.extract")


def parse_chunk(text: str) -> tuple[int, int]:
    """'K/N' → (K, N) with 1 <= K <= N: the K-th of N interleaved chunks (rows K-1, K-1+N, ...)."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--chunk {text!r}: expected K/N, e.g. 1/4") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--chunk {text!r}: need 1 <= K <= N")
    return k, n


def _float_or_none(value: str, column: str, row: int) -> float | None:
    if value.strip() == "":
        return None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"row {row}: {column} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"row {row}: {column} {value!r} is not finite")
    return number


def read_jobs(manifest: Path) -> tuple[list, list[dict]]:
    """(ClipJobs, failure records of rows that cannot even be parsed), in manifest order."""
    import pandas as pd

    from msaflow.extractors.clip import ClipJob
    from msaflow.datasets.manifest import sanitize_key

    table = pd.read_csv(manifest, dtype=str, keep_default_na=False, encoding="utf-8")
    missing = {"id", "path"} - set(table.columns)
    if missing:
        raise ValueError(f"{manifest}: missing column(s) {sorted(missing)}")
    jobs, bad = [], []
    for i, rec in enumerate(table.to_dict("records"), start=1):
        get = lambda c: str(rec.get(c, ""))  # noqa: E731
        key = sanitize_key(get("id"))
        try:
            path = Path(get("path"))
            if not path.is_absolute():
                path = manifest.parent / path
            jobs.append(ClipJob(
                row=i, id=get("id"), key=key, video_id=get("video_id"), clip_id=get("clip_id"),
                path=str(path), start=_float_or_none(get("start"), "start", i),
                end=_float_or_none(get("end"), "end", i), text=get("text"),
                label=_float_or_none(get("label"), "label", i), split=get("split"),
                label_T=_float_or_none(get("label_T"), "label_T", i),
                label_A=_float_or_none(get("label_A"), "label_A", i),
                label_V=_float_or_none(get("label_V"), "label_V", i)))
        except ValueError as exc:
            bad.append({"id": get("id"), "key": key, "path": get("path"), "stage": "manifest",
                        "reason": f"{manifest}: {exc}"})
    return jobs, bad


def _clip_meta(tar_path: Path) -> dict:
    """The json member of an existing clip tar (its arrays are not read)."""
    with tarfile.open(tar_path) as tar:
        for info in tar:
            if info.name.endswith(".json"):
                return json.loads(tar.extractfile(info).read())
    raise ValueError(f"{tar_path}: no json member")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, help="manifest CSV (docs/data-contracts.md §1)")
    p.add_argument("-o", "--out", type=Path, required=True, help="EXTRACT_DIR")
    p.add_argument("--mode", choices=["raw", "features"], help="default: the config's (raw)")
    p.add_argument("--config", type=Path, help="YAML: the extract section, or a workflow config with `extract:`")
    p.add_argument("--chunk", type=parse_chunk, default=(1, 1), metavar="K/N",
                   help="process the K-th (1-based) of N interleaved chunks of the manifest")
    p.add_argument("--frontends", help="features mode, e.g. face=fer,audio=crepe-tiny,text=minilm")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--asr", metavar="RECOGNISER", help="recognise the speech of clips without a transcript, e.g. "
                   "whisper-tiny-en ('off' turns the config's off; more settings: extract.asr in --config)")


class TransientError(RuntimeError):
    """The machine's fault, not a clip's (no space, permission, I/O error): the run stops, nothing is
    recorded against the clip, and a rerun retries it."""


def run(manifest: Path, out: Path, cfg: ExtractConfig, chunk: tuple[int, int] = (1, 1),
        progress: bool = True) -> dict:
    """Extract one chunk of the manifest; return (and write) its summary.

    Holds the chunk's lock in `out` (LockError when another process runs this chunk, or a chunking
    whose clips overlap it, on the same folder). Temp files and scratch folders of processes that
    no longer run are removed first. SIGTERM or SIGINT stops the run cleanly (lock.Stopped, after
    the worker is stopped and this run's temp files are removed); a fault of the machine raises
    TransientError.
    """
    from msaflow.lock import output_lock

    k, n = chunk
    with output_lock(out, f"msaflow extract {manifest} -o {out} --chunk {k}/{n}", name=f"extract-{k}-of-{n}"):
        _check_overlapping_chunks(out, k, n)
        if removed := _remove_leftovers(out):
            log.warning(f"msaflow extract: note: removed {removed} temp file(s) or scratch folder(s) in {out} left "
                        f"by processes that no longer run")
        work = _process_dir(out)
        try:
            with _stop_on_signals():
                return _run(manifest, out, cfg, chunk, progress, work)
        finally:
            if work != out:
                shutil.rmtree(work, ignore_errors=True)
            _remove_leftovers(out)  # what a worker stopped mid-clip left


_LOCK_RE = re.compile(r"\.msaflow-extract-(\d+)-of-(\d+)\.lock")
LEFTOVER_FOLDERS = (".", "clips", "failures", "chunks")


def _check_overlapping_chunks(out: Path, k: int, n: int) -> None:
    """Chunks K/N and K'/N hold other clips; any other chunking (e.g. 1/1 beside 2/4) overlaps."""
    from msaflow.lock import LockError, describe_holder, held_by

    for path in sorted(out.glob(".msaflow-extract-*-of-*.lock")):
        m = _LOCK_RE.fullmatch(path.name)
        if m is None or int(m[2]) == n:
            continue
        if (holder := held_by(path)) is not None:
            raise LockError(f"{out} is in use by {describe_holder(holder)}, whose clips overlap chunk {k}/{n}: "
                            f"wait for it to finish (if that process is gone, delete {path})")


def _remove_leftovers(out: Path) -> int:
    """Remove temp files and scratch folders of this host's processes that no longer run."""
    from msaflow.lock import host_name, pid_alive
    from msaflow.tario import remove_stale_temp

    removed = sum(len(remove_stale_temp(out / folder)) for folder in LEFTOVER_FOLDERS)
    me = host_name()
    for entry in (out / "tmp").glob("*@*"):
        pid, _, host = entry.name.partition("@")
        if pid.isdigit() and host == me and not pid_alive(int(pid)) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def _process_dir(out: Path) -> Path:
    """The folder this process's worker writes through: `out/tmp/<pid>@<host>/`, whose `clips`
    links to `out/clips`, so the clip tars land in `out/clips` and the scratch files in a folder
    of this process (`.../tmp/<key>`). `out` itself where links cannot be made."""
    from msaflow.lock import host_name

    work = out / "tmp" / f"{os.getpid()}@{host_name()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        (work / "clips").symlink_to(Path("..") / ".." / "clips", target_is_directory=True)
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
        return out
    return work


@contextmanager
def _stop_on_signals():
    """SIGTERM / SIGINT raise lock.Stopped in the main thread, so the run unwinds: the worker is
    stopped and the temp files removed. Further signals are ignored while it cleans up."""
    from msaflow.lock import Stopped

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = (signal.SIGTERM, signal.SIGINT)

    def stop(signum, frame):
        for s in wanted:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum, f"stopped by {signal.Signals(signum).name}: the worker was stopped and the temp "
                              f"files removed; finished clips are kept (run the same command again to resume)")

    previous = {s: signal.signal(s, stop) for s in wanted}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _finished_clip(tar: Path) -> dict | None:
    """The json of a finished clip tar, after checking its whole index (tario.check_tar); None when
    it is damaged (cut short by a power loss, say): the tar is then removed, with a note."""
    from msaflow.tario import check_tar

    try:
        check_tar(tar)
        return _clip_meta(tar)
    except ValueError as exc:
        return _remove_damaged(tar, exc)


SUMMARY_COUNTS = ("clips", "ok", "failed", "resumed", "redone", "no_face", "face_frames_missing", "no_audio",
                  "empty_text", "segment_clamped", "video_unusable", "audio_unusable", "worker_restarts",
                  "text_given", "text_recognised")
FAILURE_FIELDS = ("id", "path", "stage", "reason")


@dataclass
class _Tally:
    """What a chunk's summary reports, gathered clip by clip (resumed and extracted alike)."""

    counts: Counter = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    failures: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)  # kept clips with a modality dropped or a segment clamped

    def kept(self, job, n_frames: int, n_face: int, has_audio: bool, has_text: bool, text_from: str,
             notes: list[dict]) -> None:
        self.counts.update(ok=1)
        self.counts["face_frames_missing"] += n_frames - n_face
        self.counts["no_face"] += n_face == 0
        self.counts["no_audio"] += not has_audio
        self.counts["empty_text"] += not has_text
        self.counts[f"text_{text_from}"] += 1
        for note in notes:  # extractors/clip.py: segment_clamped, video_unusable, audio_unusable
            self.counts[note["kind"]] += 1
            self.warnings.append({"id": job.id, "path": job.path, "kind": note["kind"], "reason": note["reason"]})

    def failed(self, record: dict) -> None:
        self.counts.update(failed=1)
        self.failures.append(record)


def _run(manifest: Path, out: Path, cfg: ExtractConfig, chunk: tuple[int, int], progress: bool,
         work: Path) -> dict:
    from msaflow.device import resolve_device
    from msaflow.tario import write_json_atomic

    k, n = chunk
    t0 = time.perf_counter()
    device = str(resolve_device(cfg.device))  # "cpu" or "cuda:<index>", as the worker takes it
    jobs, bad_rows = _chunk_jobs(manifest, k, n)
    for folder in ("clips", "failures"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    tally = _Tally(Counter(clips=len(jobs) + len(bad_rows)))
    _record_bad_rows(out, bad_rows, tally)
    todo = _resume(out, jobs, tally)
    spec = cfg.frontends if cfg.mode == "features" else None
    if spec is not None:  # a bad spec fails here, before any worker starts
        from msaflow.extractors.frontends import parse_spec

        parse_spec(spec)
    asr_info = None
    if cfg.asr is not None and todo:  # one line, before any worker
        from msaflow.extractors.asr import check_available

        asr_info = check_available(cfg.asr)
    frontends_info = _extract_clips(todo, out, work, cfg, device, spec, tally, f"extract {k}/{n}", progress) \
        if todo else None
    summary = _summary(f"{k}/{n}", cfg, device, tally, time.perf_counter() - t0)
    if frontends_info is not None:
        summary["frontends"] = frontends_info
    if asr_info is not None:
        summary["asr"] = asr_info
    write_json_atomic(out / "chunks" / f"{k}-of-{n}.json", summary)
    return summary


def _chunk_jobs(manifest: Path, k: int, n: int) -> tuple[list, list[dict]]:
    """The chunk's ClipJobs, and the manifest rows that cannot be parsed (chunk 1 records those)."""
    jobs, bad_rows = read_jobs(manifest)
    return [j for j in jobs if (j.row - 1) % n == k - 1], bad_rows if k == 1 else []


def _record_bad_rows(out: Path, bad_rows: list[dict], tally: _Tally) -> None:
    from msaflow.tario import write_json_atomic

    for bad in bad_rows:
        record = {x: bad[x] for x in FAILURE_FIELDS}
        if not (out / "failures" / f"{bad['key']}.json").exists():
            write_json_atomic(out / "failures" / f"{bad['key']}.json", record)
        tally.failed(record)


def _resume(out: Path, jobs: list, tally: _Tally) -> list:
    """Count the clips a run before finished (a kept tar, or a failure record); the jobs left to do.
    A damaged tar or failure record is removed and its clip done again (counted as redone)."""
    from msaflow.extractors.asr import text_source

    todo = []
    for job in jobs:
        tar, fail = out / "clips" / f"{job.key}.tar", out / "failures" / f"{job.key}.json"
        meta = record = None
        damaged = tar.exists() and (meta := _finished_clip(tar)) is None
        if meta is None and fail.exists():
            damaged |= (record := _failure_record(fail)) is None
        if meta is not None:
            tally.counts.update(resumed=1)
            tally.kept(job, meta["n_frames"], meta["n_face_frames"], meta["has_audio"], meta["has_text"],
                       text_source(meta), meta.get("notes", []))
        elif record is not None:
            tally.counts.update(resumed=1)
            tally.failed(record)
        else:
            tally.counts.update(redone=int(damaged))
            todo.append(job)
    return todo


def _failure_record(path: Path) -> dict | None:
    """A clip's failure record, or None when it is damaged (empty or cut short: a power loss, say):
    the record is then removed, with a note, and the clip done again."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not set(FAILURE_FIELDS) <= set(record):
            raise ValueError(f"not a failure record (needs {', '.join(FAILURE_FIELDS)})")
        return record
    except (ValueError, UnicodeDecodeError) as exc:
        return _remove_damaged(path, exc)


def _remove_damaged(path: Path, exc: Exception) -> None:
    """A damaged output of a clip (its tar or failure record) is removed, with a note: the clip is
    extracted again."""
    log.warning(f"msaflow extract: note: {path} is damaged ({exc}): extracting the clip again")
    path.unlink()


def _extract_clips(todo: list, out: Path, work: Path, cfg: ExtractConfig, device: str, spec: str | None,
                   tally: _Tally, desc: str, progress: bool) -> dict | None:
    """Extract the clips left to do in one isolated worker; the front-ends' describe() in features mode."""
    from tqdm import tqdm

    from msaflow.pipeline.extraction.pool import IsolatedExtractor

    with IsolatedExtractor(cfg, device, cfg.threads, spec, cfg.clip_timeout_s) as worker:
        bar = tqdm(todo, desc=desc, unit="clip", disable=not progress)
        for job in bar:
            _take_result(job, worker.extract(job, work), out, tally, bar)
        tally.counts["worker_restarts"] = worker.restarts
        return worker.describe_frontends() if spec is not None else None


def _take_result(job, result: dict, out: Path, tally: _Tally, bar) -> None:
    """Count one clip's result, or record its failure; the machine's faults stop the run."""
    from msaflow.tario import write_json_atomic

    if "fatal" in result:
        raise RuntimeError(result["fatal"])
    if "transient" in result:
        raise TransientError(f"{result['transient']} (while extracting {job.id}; nothing is recorded "
                             f"for it: fix this and run again, finished clips are kept)")
    if result["ok"]:
        tally.kept(job, result["n_frames"], result["n_face_frames"], result["has_audio"], result["has_text"],
                   result.get("text_source", "none"), result.get("notes", []))
        for stage, s in result["seconds"].items():
            tally.seconds[stage] += s
        return
    record = {"id": job.id, "path": job.path, "stage": result["stage"], "reason": result["reason"]}
    write_json_atomic(out / "failures" / f"{job.key}.json", record)
    tally.failed(record)
    bar.write(f"failed: {job.id} ({job.path}): [{record['stage']}] {record['reason']}")


def _summary(chunk: str, cfg: ExtractConfig, device: str, tally: _Tally, wall: float) -> dict:
    from msaflow.extractors.clip import STAGES

    seconds = tally.seconds
    return {
        "chunk": chunk, "mode": cfg.mode, "device": device,
        "counts": {c: int(tally.counts.get(c, 0)) for c in SUMMARY_COUNTS},
        "seconds": {**{s: round(seconds.get(s, 0.0), 4) for s in STAGES},
                    **({"features": round(seconds["features"], 4)} if "features" in seconds else {}),
                    **({"asr": round(seconds["asr"], 4)} if "asr" in seconds else {}),
                    "wall": round(wall, 4)},
        "failures": tally.failures,
        "warnings": tally.warnings,
        "config": cfg.model_dump(mode="json"),
    }


def format_summary(summary: dict) -> str:
    """The chunk's summary table (logged at info level: on stdout, silenced by -q)."""
    c, s = summary["counts"], summary["seconds"]
    lines = [f"extract {summary['chunk']} ({summary['mode']}, {summary['device']}): "
             f"{c['ok']} ok, {c['failed']} failed of {c['clips']} clips ({c['resumed']} already done"
             f"{', ' + str(c['redone']) + ' damaged clip output(s) redone' if c.get('redone') else ''})",
             f"  missing modalities: {c['no_face']} clips without any face "
             f"({c['face_frames_missing']} frames without face), {c['no_audio']} without audio, "
             f"{c['empty_text']} with empty text"]
    if summary["config"].get("asr") is not None:
        lines.append(f"  transcripts: {c['text_given']} given, {c['text_recognised']} recognised "
                     f"({summary['config']['asr']['recogniser']})")
    lines.append("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()))
    lines += [f"  FAILED {f['id']} ({f['path']}): [{f['stage']}] {f['reason']}" for f in summary["failures"]]
    lines += [f"  WARNING {w['id']} ({w['path']}): [{w['kind']}] {w['reason']}" for w in summary.get("warnings", [])]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
        overrides = {k: v for k, v in (("mode", args.mode), ("frontends", args.frontends),
                                       ("device", args.device)) if v is not None}
        if args.asr is not None:
            overrides["asr"] = None if args.asr == "off" else {**(cfg.asr.model_dump() if cfg.asr else {}),
                                                               "recogniser": args.asr}
        cfg = ExtractConfig.model_validate({**cfg.model_dump(), **overrides})
        if not args.manifest.is_file():
            raise ValueError(f"{args.manifest}: manifest not found")
        summary = run(args.manifest, args.out, cfg, args.chunk)
    except (ValueError, RuntimeError) as exc:
        log.error(f"msaflow extract: error: {exc}")
        return 2
    log.info(format_summary(summary))
    return 0
