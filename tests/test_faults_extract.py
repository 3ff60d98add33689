"""Faults of the machine during `msaflow extract` and `msaflow shards`: nothing lost or damaged.

Disk full (an ENOSPC injected at the tar writer, and a real small tmpfs), two runs on one
folder, `kill -9` and SIGTERM of the parent, a clip tar damaged after it was written, a
read-only or full shard folder. Real GRID clips; after every fault a rerun must give shards
byte-identical to those of one uninterrupted run.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from msaflow import tario
from msaflow.pipeline.extraction.extract import run
from msaflow.pipeline.extraction.settings import ExtractConfig
from msaflow.pipeline.extraction.pool import environment_error
from msaflow.lock import LockError, host_name, lock_path, output_lock
from msaflow.datasets.manifest import MANIFEST_COLUMNS
from msaflow.pipeline.data.shard_plan import ShardsConfig
from msaflow.pipeline.data.shards import build_shards

sys.path.insert(0, str(Path(__file__).parent))
from test_shards import CLIPS, make_extraction  # noqa: E402  (small synthetic clip tars)

REPO = Path(__file__).resolve().parents[1]
# chunk_frames 4: the 15-frame clips are decoded in chunks, so the scratch files a chunked decode writes
# are there for the concurrent-run, kill and disk-full faults to meet (a runtime knob: outputs do not change)
FAST = {"fps": 5.0, "detect_every": 2, "threads": 1, "chunk_frames": 4}
GRID = ["bbaf2n", "brbk7n", "lbax4n", "lbbc2a", "lrwp9a", "lwbsza", "pwij3p", "sbia1a"]
FIRST_FOUR = GRID[:4]

# An ENOSPC at the tar writer, in every process that has FAULTS_ENOSPC_ON=<clip key> in its
# environment (the spawned extraction worker included): Python runs sitecustomize at start-up.
SITECUSTOMIZE = textwrap.dedent("""
    import os
    _key = os.environ.get("FAULTS_ENOSPC_ON")
    if _key:
        import errno, tarfile
        _real_addfile = tarfile.TarFile.addfile
        def _addfile(self, tarinfo, fileobj=None):
            if tarinfo.name.startswith(_key + "."):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return _real_addfile(self, tarinfo, fileobj)
        tarfile.TarFile.addfile = _addfile
""")


def _write_manifest(path: Path, names: list[str], shared_data: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for i, name in enumerate(names):
            writer.writerow({c: "" for c in MANIFEST_COLUMNS} | {
                "id": f"grid/{name}", "video_id": "grid", "clip_id": name,
                "path": str(shared_data / "raw" / "grid" / f"{name}.mpg"), "text": f"clip {name}",
                "label": "0.0", "split": "test" if i % 4 == 3 else "train"})
    return path


def _extract_cmd(manifest: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "msaflow.pipeline.cli", "extract", str(manifest), "-o", str(out),
            "--config", str(config), "--device", "cpu", *extra]


def _env(marker: str | None = None, **extra: str) -> dict:
    env = {**os.environ, **extra}
    if marker:
        env["FAULTS_TEST_RUN"] = marker
    return env


def _extract(manifest: Path, out: Path, config: Path, *extra: str, env: dict | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(_extract_cmd(manifest, out, config, *extra), capture_output=True, text=True,
                          env=env or _env(), cwd=REPO, timeout=timeout)


def _processes_with(marker: str) -> list[str]:
    """'pid cmdline' of every process whose environment holds the marker (a run's processes)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"FAULTS_TEST_RUN={marker}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    found.append(f"{proc.name} {cmdline}")
        except OSError:
            continue
    return found


def _wait_gone(marker: str, seconds: float = 8.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _wait_for(condition, seconds: float = 300.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended first (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def _leftovers(out: Path) -> list[str]:
    """Temp files, scratch folders and lock files under an extraction folder."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.name.endswith(".tmp") or p.name.endswith(".lock") or p.parent == out / "tmp")


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _shards(extract_dir: Path, manifest: Path, out: Path) -> dict[str, str]:
    build_shards(extract_dir, manifest, out, ShardsConfig(max_samples=3), "0" * 64)
    return _tree_hashes(out)


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    config = d / "workflow.yaml"
    config.write_text(yaml.safe_dump({"extract": FAST}), encoding="utf-8")
    return {"dir": d, "config": config, "data": shared_data,
            "four": _write_manifest(d / "four.csv", FIRST_FOUR, shared_data),
            "eight": _write_manifest(d / "eight.csv", GRID, shared_data)}


@pytest.fixture(scope="module")
def reference(setup):
    """One uninterrupted run of the eight clips: its clip tars and shards, and those of the first
    four (a clip's tar does not depend on the other clips of the run)."""
    out = setup["dir"] / "ref-extract"
    result = _extract(setup["eight"], out, setup["config"])
    assert result.returncode == 0, result.stderr[-3000:]
    clips = _tree_hashes(out / "clips")
    assert len(clips) == len(GRID)
    four = {f"grid_{name}.tar": clips[f"grid_{name}.tar"] for name in FIRST_FOUR}
    return {"extract": out,
            "eight": {"clips": clips, "shards": _shards(out, setup["eight"], setup["dir"] / "ref-shards-eight")},
            "four": {"clips": four, "shards": _shards(out, setup["four"], setup["dir"] / "ref-shards-four")}}


@pytest.fixture
def tmpfs(tmp_path):
    """mount(folder, size, ro=False): a real tmpfs of that size (root only); unmounted after the test."""
    mounted = []

    def mount(folder: Path, size: str, ro: bool = False) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if ro else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and a sandbox that allows mount): "
                        f"{result.stderr.strip() or result.returncode}")
        mounted.append(folder)
        return folder

    def remount(folder: Path, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)

    mount.remount = remount
    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


# ---------------------------------------------------------------- units: lock, classification, tars


def test_second_holder_of_a_folder_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from msaflow.lock import output_lock
        with output_lock({str(tmp_path)!r}, "msaflow train --out run1"):
            print("held", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError) as caught:
            with output_lock(tmp_path, "msaflow train --out run1"):
                pass
        message = str(caught.value)
        assert "\n" not in message and f"pid {holder.pid}" in message and "msaflow train --out run1" in message
        assert str(lock_path(tmp_path)) in message  # how to clear it when the holder is gone
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not lock_path(tmp_path).exists()  # released on exit
    with output_lock(tmp_path, "msaflow train"):  # free again
        assert json.loads(lock_path(tmp_path).read_text())["pid"] == os.getpid()
    assert not lock_path(tmp_path).exists()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock_path(tmp_path, "extract-1-of-1").write_text(json.dumps(
        {"pid": dead.pid, "host": host_name(), "command": "msaflow extract", "started": "2026-01-01T00:00:00"}))
    with output_lock(tmp_path, "msaflow extract", name="extract-1-of-1") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    err = caplog.text  # the msaflow.lock logger: stderr under the CLI
    assert "took over the stale lock" in err and f"pid {dead.pid}" in err


def test_lock_of_another_host_is_refused_with_how_to_clear_it(tmp_path):
    lock_path(tmp_path).write_text(json.dumps(
        {"pid": 1, "host": "elsewhere", "command": "msaflow shards", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(LockError, match="elsewhere.*delete"):
        with output_lock(tmp_path, "msaflow shards"):
            pass


def test_machine_faults_are_told_from_the_clips_own(tmp_path):
    out = tmp_path / "extract"
    clip = tmp_path / "media" / "a.mp4"

    def oserror(code, name=None):
        return OSError(code, os.strerror(code), None if name is None else str(name))

    assert environment_error(oserror(errno.ENOSPC), out) is not None  # no space: wherever it happens
    assert environment_error(oserror(errno.EIO), out) is not None
    assert environment_error(oserror(errno.EROFS, out / "clips" / "a.tar"), out) is not None
    assert environment_error(oserror(errno.EACCES, out / "clips" / "a.tar"), out) is not None  # our output
    assert environment_error(oserror(errno.EACCES, clip), out) is None  # the clip's file: the clip's fault
    assert environment_error(oserror(errno.ENAMETOOLONG, out / "clips" / ("x" * 300)), out) is None
    try:
        try:
            raise oserror(errno.ENOSPC)
        except OSError as exc:
            raise RuntimeError("decoder failed") from exc
    except RuntimeError as wrapped:
        assert environment_error(wrapped, out).errno == errno.ENOSPC
    assert environment_error(ValueError("cannot decode"), out) is None


def test_temp_file_of_a_process_killed_mid_write_is_removed_later(tmp_path):
    target = tmp_path / "clips" / "a.tar"
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal
        from msaflow.tario import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x" * 100000)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        """)], cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in target.parent.iterdir()]
    assert len(left) == 1 and not target.exists(), left
    owner_pid, owner_host = tario.temp_owner(left[0])
    assert owner_host == host_name() and owner_pid != os.getpid()
    with tario.atomic_path(tmp_path / "clips" / "b.tar") as mine:  # a running process's temp file stays
        mine.write_bytes(b"y")
        assert tario.remove_stale_temp(target.parent) == [target.parent / left[0]]
        assert mine.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.tar"]


def test_check_tar_finds_cut_tars_and_cut_npy_members(tmp_path):
    path = tmp_path / "a.tar"
    tario.write_sample_tar(path, "k", {"json": {"id": "k"}, "face.npy": np.ones((5, 16, 16, 3), np.uint8),
                                       "wav.npy": np.ones(1000, np.int16)})
    tario.check_tar(path)
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    cuts = {"mid-member": members[0].offset_data + 100, "at a member boundary": members[-1].offset,
            "before the end blocks": members[-1].offset_data + 2048 + 512}
    for what, cut in cuts.items():
        bad = tmp_path / "cut.tar"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            tario.check_tar(bad)
            pytest.fail(f"a tar cut {what} passed")
    header_only = tario.encode_member("face.npy", np.ones((5, 16, 16, 3), np.uint8))[:128]
    for face in (header_only, b""):  # an intact tar whose face.npy is cut or empty
        with tario.atomic_path(tmp_path / "b.tar") as tmp, tario.TarWriter(tmp) as writer:
            writer.add_bytes("k.face.npy", face)
            writer.add_bytes("k.json", b"{}")
        with pytest.raises(ValueError, match="face.npy"):
            tario.check_tar(tmp_path / "b.tar")


# ---------------------------------------------------------------- shards: read-only and full folders


def _shards_cli(extract_dir: Path, manifest: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msaflow.pipeline.cli", "shards", str(extract_dir),
                           "--manifest", str(manifest), "-o", str(out)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_extract_into_a_read_only_folder_is_one_line_and_status_2(setup, tmp_path, tmpfs):
    ro = tmpfs(tmp_path / "ro", "1m", ro=True)
    result = _extract(setup["four"], ro / "extract", setup["config"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("msaflow extract: error: ") and "Read-only file system" in lines[0]
    assert str(ro / "extract") in lines[0]


def test_shards_into_a_read_only_folder_is_one_line_and_status_2(tmp_path, tmpfs):
    manifest, extract_dir = make_extraction(tmp_path, CLIPS)
    ro = tmpfs(tmp_path / "ro", "1m", ro=True)
    result = _shards_cli(extract_dir, manifest, ro / "shards")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("msaflow shards: error: ") and "Read-only file system" in lines[0]
    assert str(ro / "shards") in lines[0]


def test_shards_on_a_full_disk_is_one_line_and_status_2_then_a_rerun_finishes(tmp_path, tmpfs):
    manifest, extract_dir = make_extraction(tmp_path, CLIPS)
    full = tmpfs(tmp_path / "small", "96k")
    result = _shards_cli(extract_dir, manifest, full / "shards")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr, result.stderr
    assert last.startswith("msaflow shards: error: ") and "No space left on device" in last
    assert str(full / "shards" / "train" / "train-000000.tar") in last
    assert not [p for p in full.rglob("*") if p.is_file() and p.suffix in (".tmp", ".tar", ".lock")]
    tmpfs.remount(full, "16m")
    assert _shards_cli(extract_dir, manifest, full / "shards").returncode == 0
    assert json.loads((full / "shards" / "train" / "index.json").read_text())["n_samples"] == 5


# ---------------------------------------------------------------- extract: disk full


@pytest.mark.slow
def test_injected_enospc_stops_the_run_and_a_rerun_extracts_every_clip(setup, reference, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    out = tmp_path / "extract"
    env = _env(FAULTS_ENOSPC_ON="grid_lbax4n",
               PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    first = _extract(setup["four"], out, setup["config"], env=env)
    assert first.returncode == 2, first.stderr[-3000:]
    last = first.stderr.strip().splitlines()[-1]
    assert "Traceback" not in first.stderr
    assert last.startswith("msaflow extract: error: ") and "No space left on device" in last
    assert str((out / "clips" / "grid_lbax4n.tar").resolve()) in last and "grid/lbax4n" in last
    assert not list((out / "failures").glob("*")), "a full disk is not the clip's fault"
    assert not (out / "chunks").exists(), "the chunk did not finish"
    assert sorted(p.name for p in (out / "clips").iterdir()) == ["grid_bbaf2n.tar", "grid_brbk7n.tar"]
    assert _leftovers(out) == []

    second = _extract(setup["four"], out, setup["config"])
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((out / "chunks" / "1-of-1.json").read_text())
    assert summary["counts"]["ok"] == 4 and summary["counts"]["failed"] == 0
    assert summary["counts"]["resumed"] == 2
    assert _tree_hashes(out / "clips") == reference["four"]["clips"]
    assert _shards(out, setup["four"], tmp_path / "shards") == reference["four"]["shards"]


@pytest.mark.slow
def test_real_full_disk_then_free_space_and_rerun(setup, reference, tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "disk", "2m")  # room for two of the four clip tars (768 kB each)
    out = disk / "extract"
    first = _extract(setup["four"], out, setup["config"])
    assert first.returncode == 2, first.stderr[-3000:]
    last = first.stderr.strip().splitlines()[-1]
    assert "Traceback" not in first.stderr and "No space left on device" in last, first.stderr[-3000:]
    assert not list((out / "failures").glob("*")), "a full disk is not the clip's fault"
    assert _leftovers(out) == []
    tmpfs.remount(disk, "64m")  # space freed
    second = _extract(setup["four"], out, setup["config"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert _tree_hashes(out / "clips") == reference["four"]["clips"]
    assert _shards(out, setup["four"], tmp_path / "shards") == reference["four"]["shards"]


# ---------------------------------------------------------------- extract: two runs on one folder


@pytest.mark.slow
def test_concurrent_runs_on_one_folder(setup, reference, tmp_path):
    out, config, manifest = tmp_path / "extract", setup["config"], setup["eight"]
    chunks = [subprocess.Popen(_extract_cmd(manifest, out, config, "--chunk", f"{k}/2"), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    try:
        _wait_for(lambda: lock_path(out, "extract-1-of-2").exists() and lock_path(out, "extract-2-of-2").exists(),
                  proc=chunks[0])
        # the same chunk again: refused, naming the running one
        again = _extract(manifest, out, config, "--chunk", "1/2")
        assert again.returncode == 2, again.stderr[-2000:]
        line = again.stderr.strip().splitlines()[-1]
        assert f"pid {chunks[0].pid}" in line and "in use by" in line and "extract-1-of-2.lock" in line
        # another chunking of the same manifest overlaps both chunks: refused too
        whole = _extract(manifest, out, config)
        assert whole.returncode == 2 and "overlap" in whole.stderr, whole.stderr[-2000:]
        for proc in chunks:  # the two chunks of one chunking run side by side, as under Snakemake
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in chunks:
            proc.kill()
    assert _leftovers(out) == []
    assert _tree_hashes(out / "clips") == reference["eight"]["clips"]
    assert _shards(out, manifest, tmp_path / "shards") == reference["eight"]["shards"]


# ---------------------------------------------------------------- extract: the parent killed


def _start_and_wait_for_first_clip(setup, out: Path, marker: str) -> subprocess.Popen:
    proc = subprocess.Popen(_extract_cmd(setup["eight"], out, setup["config"]), cwd=REPO, env=_env(marker),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "clips").is_dir() and any((out / "clips").glob("*.tar")), proc=proc)
    assert len(list((out / "clips").glob("*.tar"))) < len(GRID), "the run should still be going"
    assert len(_processes_with(marker)) >= 2, "parent and worker"
    return proc


@pytest.mark.slow
def test_kill_9_of_the_parent_leaves_no_process_and_a_rerun_gives_the_same_shards(setup, reference, tmp_path):
    out, marker = tmp_path / "extract", uuid.uuid4().hex
    proc = _start_and_wait_for_first_clip(setup, out, marker)
    proc.kill()
    proc.communicate(timeout=60)
    assert _wait_gone(marker) == [], "the worker dies with its parent"
    assert _leftovers(out), "a killed run leaves its lock and scratch folder behind"
    assert (out / "tmp" / f"{proc.pid}@{host_name()}").is_dir(), "scratch files live in a folder of the process"
    # a process killed in the middle of a tar write leaves its temp file behind too
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal
        from msaflow.tario import atomic_path
        with atomic_path({str(out / "clips" / "grid_pwij3p.tar")!r}) as tmp:
            open(tmp, "wb").write(b"partial" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        """)], cwd=REPO)
    assert any(p.name.endswith(".tmp") for p in (out / "clips").iterdir())

    rerun = _extract(setup["eight"], out, setup["config"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "took over the stale lock" in rerun.stderr and "removed" in rerun.stderr
    assert _leftovers(out) == []
    assert _tree_hashes(out / "clips") == reference["eight"]["clips"]
    assert _shards(out, setup["eight"], tmp_path / "shards") == reference["eight"]["shards"]


@pytest.mark.slow
def test_sigterm_of_the_parent_stops_cleanly_and_a_rerun_gives_the_same_shards(setup, reference, tmp_path):
    out, marker = tmp_path / "extract", uuid.uuid4().hex
    proc = _start_and_wait_for_first_clip(setup, out, marker)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 15, "stops without finishing the clip"
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM" in err.strip().splitlines()[-1]
    assert _wait_gone(marker) == []
    assert _leftovers(out) == [], "its temp files, scratch folder and lock are removed"
    assert not list((out / "failures").glob("*")) and not (out / "chunks").exists()
    rerun = _extract(setup["eight"], out, setup["config"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _tree_hashes(out / "clips") == reference["eight"]["clips"]
    assert _shards(out, setup["eight"], tmp_path / "shards") == reference["eight"]["shards"]


# ---------------------------------------------------------------- damaged clip tars


def _cut_member(tar_path: Path, member: str, keep: int) -> None:
    """Rewrite a clip tar, intact as a tar, with `member` cut to its first `keep` bytes."""
    members = list(tario.iter_tar_members(tar_path))
    with tario.atomic_path(tar_path) as tmp, tario.TarWriter(tmp) as writer:
        for name, data in members:
            writer.add_bytes(name, data[:keep] if name.endswith("." + member) else data)


@pytest.mark.slow
def test_damaged_clip_tars_are_not_packed_and_are_redone_on_resume(setup, reference, tmp_path, capsys, caplog):
    out = tmp_path / "extract"
    shutil.copytree(reference["extract"], out, ignore=lambda folder, names: [
        n for n in names if Path(folder).name == "clips" and n not in reference["four"]["clips"]])
    cut = out / "clips" / "grid_brbk7n.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # power loss: the end never reached the disk
    _cut_member(out / "clips" / "grid_lbax4n.tar", "face.npy", 4096)  # a cut face.npy in an intact tar

    summary = build_shards(out, setup["four"], tmp_path / "shards-damaged", ShardsConfig(), "0" * 64)
    assert summary["total"]["samples"] == 2 and summary["total"]["failures"] == 2
    err = capsys.readouterr().err
    assert "grid/brbk7n" in err and "grid/lbax4n" in err and "face.npy" in err
    with open(tmp_path / "shards-damaged" / "failures.csv", newline="", encoding="utf-8") as f:
        failed = {row["id"]: row["reason"] for row in csv.DictReader(f)}
    assert set(failed) == {"grid/brbk7n", "grid/lbax4n"} and all("damaged" in r for r in failed.values())

    cfg = ExtractConfig(**FAST, device="cpu")
    result = run(setup["four"], out, cfg, progress=False)
    err = caplog.text  # the msaflow.extract logger's notes (stderr under the CLI)
    assert str(cut) in err and "damaged" in err and "grid_lbax4n.tar" in err
    assert result["counts"]["redone"] == 2 and result["counts"]["ok"] == 4 and result["counts"]["resumed"] == 2
    assert _tree_hashes(out / "clips") == reference["four"]["clips"]
    assert _shards(out, setup["four"], tmp_path / "shards") == reference["four"]["shards"]


# ---------------------------------------------------------------- damaged failure records


@pytest.mark.parametrize("content", [b"", b'{"id": "grid/bbaf2n", "pa', b'{"id": "grid/bbaf2n"}'],
                         ids=["empty", "cut short", "fields missing"])
def test_a_damaged_failure_record_is_named_removed_and_its_clip_redone(content, tmp_path, caplog):
    from types import SimpleNamespace

    from msaflow.pipeline.extraction.extract import _resume, _Tally

    (tmp_path / "failures").mkdir()
    good = {"id": "grid/brbk7n", "path": "b.mpg", "stage": "decode", "reason": "empty file (0 bytes)"}
    (tmp_path / "failures" / "grid_brbk7n.json").write_text(json.dumps(good), encoding="utf-8")
    damaged = tmp_path / "failures" / "grid_bbaf2n.json"
    damaged.write_bytes(content)
    jobs = [SimpleNamespace(key="grid_bbaf2n"), SimpleNamespace(key="grid_brbk7n")]
    tally = _Tally()
    todo = _resume(tmp_path, jobs, tally)
    assert [j.key for j in todo] == ["grid_bbaf2n"] and not damaged.exists()
    assert tally.failures == [good] and tally.counts["resumed"] == 1 and tally.counts["redone"] == 1
    assert f"{damaged} is damaged" in caplog.text  # the msaflow.extract logger: stderr under the CLI


# ---------------------------------------------------------------- a worker killed by SIGKILL


def test_a_worker_killed_by_sigkill_stops_the_run_once_and_is_recorded_when_killed_again(setup, tmp_path):
    """The out-of-memory killer is the machine's fault the first time (nothing recorded, the run
    stops, a rerun retries); killed again on the same clip, the clip is recorded and the run goes on."""
    out = tmp_path / "extract"
    env = {**_env(), "MSAFLOW_FAULT_KILL_ON": "brbk7n.mpg"}
    first = _extract(setup["four"], out, setup["config"], env=env)
    assert first.returncode == 2, first.stderr[-2000:]
    assert "SIGKILL" in first.stderr and "brbk7n.mpg" in first.stderr
    assert not (out / "failures" / "grid_brbk7n.json").exists()
    second = _extract(setup["four"], out, setup["config"], env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    record = json.loads((out / "failures" / "grid_brbk7n.json").read_text(encoding="utf-8"))
    assert record["stage"] == "worker" and "killed twice" in record["reason"]
    assert not list((out / "failures").glob(".*.killed"))
    assert sorted(p.name for p in (out / "clips").glob("*.tar")) == \
        sorted(f"grid_{name}.tar" for name in FIRST_FOUR if name != "brbk7n")
