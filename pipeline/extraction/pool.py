"""Crash isolation for extraction: clips are decoded in a worker process.

Decoders are native code; a corrupt file can crash one (segfault, abort) instead of
raising. Each clip therefore runs in a single spawned worker process that is reused
across clips (the detector, tokenizer and front-ends load once). When the worker dies,
the clip it was working on is recorded as failed ("decoder crashed (signal ...)"), a
fresh worker starts, and the run goes on. A clip that takes longer than `timeout_s`
has its worker killed the same way.

What is the machine's fault, not the clip's, is never recorded against the clip: an
OSError writing the output (no space, permission, I/O error, read-only file system), or a
worker stopped from outside (SIGTERM, SIGINT, SIGHUP). The result then says "transient" and
the run stops; a rerun retries the clip. A worker killed by SIGKILL (most often the kernel's
out-of-memory killer, which a clip can cause) stops the run the same way the first time, and a
marker beside the failure records remembers it; when a rerun's worker is killed on the same clip
again, the clip is recorded as failed (so one clip too big for the machine does not stop every
run). The worker dies with its parent (Linux:
PR_SET_PDEATHSIG), so a killed run leaves no worker behind finishing a clip for nobody.

Fault injection for tests: when MSAFLOW_FAULT_ABORT_ON names a media file (its base
name), the worker calls os.abort() on that file, which is indistinguishable from a
decoder crash for the parent process; MSAFLOW_FAULT_KILL_ON makes it SIGKILL itself, as the
out-of-memory killer would.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import sys
import signal
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path

FAULT_ENV = "MSAFLOW_FAULT_ABORT_ON"
FAULT_KILL_ENV = "MSAFLOW_FAULT_KILL_ON"

_WORKER = {}  # the worker process's ClipExtractor


# errors that are the machine's, whatever file they name (a clip cannot cause them)
ENVIRONMENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EROFS", "EIO", "EMFILE", "ENFILE", "ENOMEM", "ENOLCK", "ESTALE") if hasattr(errno, name))
# a worker ended by one of these was stopped from outside (a scheduler, a user), not by its clip
EXTERNAL_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def _inside(name, folder: Path) -> bool:
    try:
        return Path(os.path.abspath(os.fsdecode(name))).is_relative_to(Path(os.path.abspath(folder)))
    except (TypeError, ValueError):
        return False


def environment_error(exc: BaseException, out_dir: Path) -> OSError | None:
    """The OSError in `exc`'s chain that is the machine's fault, not the clip's: an errno of
    ENVIRONMENT_ERRNOS, or any OSError on a path inside the output folder `out_dir` (except a
    name too long: that comes from the clip's id)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            if exc.errno in ENVIRONMENT_ERRNOS:
                return exc
            if exc.errno != errno.ENAMETOOLONG and any(
                    _inside(f, out_dir) for f in (exc.filename, exc.filename2) if f is not None):
                return exc
        exc = exc.__cause__ or exc.__context__
    return None


def describe_os_error(exc: OSError) -> str:
    """'FILE: problem' (or the problem alone), on one line; FILE with links resolved (the worker
    writes through its process folder: the message names the file in the output folder)."""
    problem = exc.strerror or str(exc) or type(exc).__name__
    names = [os.path.realpath(os.fsdecode(f)) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{' -> '.join(names)}: {problem}" if names else problem


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: the kernel kills this process when its parent ends, however it ends."""
    if parent_pid is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent ended before the call above took effect
        os._exit(1)


def _init_worker(cfg_json: str, device: str, threads: int, frontend_spec: str | None,
                 parent_pid: int | None = None) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the run and this worker
    _bounded_malloc()
    try:
        _build_extractor(cfg_json, device, threads, frontend_spec)
    except Exception as exc:  # reported with the first clip, and the run stops
        _WORKER["init_error"] = f"{type(exc).__name__}: {exc}"


def _bounded_malloc() -> None:
    """Keep the worker's heap from growing with clip length (Linux/glibc; a no-op elsewhere).

    - glibc raises its mmap threshold after each large free, so the many ~40 MB frame
      buffers of a long clip fragment the heap (measured: 3.8 GB anonymous memory after
      2,500 cropped frames vs 1.1 GB with a fixed 1 MB threshold);
    - each torch intra-op thread gets its own malloc arena, which kept growing across MTCNN
      calls (+0.9 GB, then +0.6 GB per call on 2 threads; flat after the first call with one
      arena). Set before torch starts its threads.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 1)  # M_ARENA_MAX
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _build_extractor(cfg_json: str, device: str, threads: int, frontend_spec: str | None) -> None:
    import torch

    from msaflow.extractors.clip import ClipExtractor
    from msaflow.pipeline.extraction.settings import ExtractConfig

    if threads > 0:
        torch.set_num_threads(threads)
    cfg = ExtractConfig.model_validate_json(cfg_json)
    frontends = None
    if frontend_spec is not None:
        from msaflow.extractors import frontends as fe

        frontends = fe.build(fe.parse_spec(frontend_spec), device)
    _WORKER["extractor"] = ClipExtractor(cfg, device=device, frontends=frontends)


def _extract_in_worker(job_fields: dict, out_dir: str) -> dict:
    from msaflow.extractors.clip import ClipJob
    from msaflow.extractors.video import DecodeError

    if "init_error" in _WORKER:
        return {"ok": False, "fatal": f"extraction worker failed to start: {_WORKER['init_error']}"}
    job = ClipJob(**job_fields)
    if os.environ.get(FAULT_ENV) and Path(job.path).name == os.environ[FAULT_ENV]:
        os.abort()
    if os.environ.get(FAULT_KILL_ENV) and Path(job.path).name == os.environ[FAULT_KILL_ENV]:
        os.kill(os.getpid(), signal.SIGKILL)
    output = output_folder(Path(out_dir))
    try:
        return {"ok": True, **_WORKER["extractor"].extract(job, Path(out_dir))}
    except DecodeError as exc:
        if (env := environment_error(exc, output)) is not None:
            return {"ok": False, "transient": describe_os_error(env)}
        return {"ok": False, "stage": exc.stage, "reason": exc.reason}
    except Exception as exc:  # a bug or an unexpected decoder error: this clip only
        if (env := environment_error(exc, output)) is not None:
            return {"ok": False, "transient": describe_os_error(env)}
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return {"ok": False, "stage": "extract",
                "reason": f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})"}


def _describe_in_worker() -> dict | None:
    frontends = _WORKER["extractor"].frontends if "extractor" in _WORKER else None
    if not frontends:
        return None
    from msaflow.extractors.frontends import describe

    return describe(frontends)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class IsolatedExtractor:
    """Runs `ClipExtractor.extract` for one clip at a time in a reusable worker process."""

    def __init__(self, cfg, device: str, threads: int = 0, frontend_spec: str | None = None,
                 timeout_s: float | None = None):
        self._initargs = (cfg.model_dump_json(), device, threads, frontend_spec, os.getpid())
        self._timeout = timeout_s
        self._pool: ProcessPoolExecutor | None = None
        self.restarts = 0

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=self._initargs)
        return self._pool

    def _worker_processes(self) -> list:
        return list(getattr(self._pool, "_processes", {}).values()) if self._pool else []

    def _discard(self, kill: bool, procs: list) -> str:
        for proc in procs:
            if kill and proc.is_alive():
                proc.kill()
            proc.join(timeout=10)
            # the pool's own thread reaps the dead worker too; whichever of the two waits second
            # sees no exit code until the first has stored it
            deadline = time.monotonic() + 5
            while proc.exitcode is None and time.monotonic() < deadline:
                time.sleep(0.05)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        self.restarts += 1
        return ", ".join(_describe_exit(p.exitcode) for p in procs) or "unknown exit"

    def extract(self, job, out_dir: Path) -> dict:
        """The worker's result dict: {"ok": True, counts, seconds}, {"ok": False, stage, reason}
        (the clip's fault) or {"ok": False, "transient": message} (the machine's: stop the run)."""
        future = self._start().submit(_extract_in_worker, asdict(job), str(out_dir))
        # the pool forgets a dead worker's process object when it notices the crash: hold on to
        # it now, to report how it ended
        procs = self._worker_processes()
        try:
            return future.result(timeout=self._timeout)
        except BrokenProcessPool:
            how = self._discard(kill=False, procs=procs)
            if any(p.exitcode is not None and -p.exitcode in EXTERNAL_SIGNALS for p in procs):
                return {"ok": False, "transient": f"the extraction worker was stopped from outside ({how}) "
                                                  f"while on {job.path}"}
            if any(p.exitcode == -signal.SIGKILL for p in procs):  # most often the kernel's out-of-memory killer
                return _killed(job, Path(out_dir), how)
            return {"ok": False, "stage": "worker", "reason": f"decoder crashed ({how}); worker restarted"}
        except FutureTimeout:
            self._discard(kill=True, procs=procs)
            return {"ok": False, "stage": "timeout",
                    "reason": f"no result after {self._timeout:g} s; worker killed and restarted"}

    def describe_frontends(self) -> dict | None:
        """The worker's front-ends as `frontends.describe()` gives them (features mode)."""
        return self._start().submit(_describe_in_worker).result(timeout=self._timeout)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._worker_processes() if p.pid is not None]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def kill(self) -> None:
        """Stop the worker now (the run is stopping: its clip is not waited for)."""
        if self._pool is None:
            return
        procs = self._worker_processes()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def __enter__(self) -> "IsolatedExtractor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.kill()


def _killed(job, out_dir: Path, how: str) -> dict:
    """The result for a worker killed by SIGKILL on `job`: the first time the machine's fault (stop,
    a rerun retries), the second time in a row the clip's (it is recorded as failed)."""
    output = output_folder(out_dir)
    marker = output / "failures" / f".{job.key}.killed"
    if marker.exists():
        marker.unlink()
        return {"ok": False, "stage": "worker",
                "reason": f"worker killed twice on this clip ({how}: most likely out of memory); worker "
                          f"restarted (remove this failure record to retry the clip)"}
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(how, encoding="utf-8")
    return {"ok": False, "transient": f"the extraction worker was killed ({how}: out of memory, or by hand) "
                                      f"while on {job.path}; if a rerun is killed on it again, the clip is "
                                      f"recorded as failed"}


def output_folder(out_dir: Path) -> Path:
    """The run's output folder: `out_dir` may be a process's view of it (its `clips` a link there)."""
    return (out_dir / "clips").resolve().parent
