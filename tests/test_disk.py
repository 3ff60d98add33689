"""A finished run keeps the raw data once: `msaflow shards --remove-packed` deletes the clip tars
it packed, only after every shard output is written; a rerun keeps the finished shards (also
after a kill during the removal) or says clearly that the clips must be extracted again.
Slow: the workflow on real GRID clips removes the clip tars, a second run does nothing, and a
run killed in the shards step resumes to byte-identical shards."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_shards import CLIPS, make_extraction
from test_workflow import REPO, SNAKEMAKE, small_dataset, snakemake, write_config

from msaflow.pipeline.cli import main as cli_main
from msaflow.lock import host_name
from msaflow.datasets.manifest import sanitize_key


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def shards(extract_dir: Path, manifest: Path, out: Path, *extra: str) -> int:
    return cli_main(["shards", str(extract_dir), "--manifest", str(manifest), "-o", str(out),
                     "--max-samples", "2", *extra])


@pytest.fixture
def packed(tmp_path):
    """An extraction with a failed clip, its shards built once without removal (the reference)."""
    manifest, extract_dir = make_extraction(tmp_path, CLIPS, failed={"bad/zero": "decode: zero-byte file"})
    tars = {p.name: p.read_bytes() for p in (extract_dir / "clips").glob("*.tar")}
    assert shards(extract_dir, manifest, tmp_path / "reference") == 0
    return manifest, extract_dir, tars, hashes(tmp_path / "reference")


def test_remove_packed_deletes_clip_tars_after_writing_identical_shards(packed, tmp_path, capsys):
    manifest, extract_dir, tars, reference = packed
    out = tmp_path / "shards"
    assert shards(extract_dir, manifest, out, "--remove-packed") == 0
    assert hashes(out) == reference  # the same shards, index.json, failures.csv, summary.json
    assert not list((extract_dir / "clips").glob("*.tar"))  # the raw data is kept once: in the shards
    assert (extract_dir / "failures" / "bad_zero.json").is_file()  # failure records stay
    record = json.loads((extract_dir / "packed.json").read_text())
    assert record["clips"] == sorted(sanitize_key(c) for c, _ in CLIPS)
    assert record["shard_dir"] == str(out.resolve())
    assert "removed the packed clip tars" in capsys.readouterr().err


def test_rerun_after_removal_keeps_the_finished_shards(packed, tmp_path, capsys):
    manifest, extract_dir, tars, reference = packed
    out = tmp_path / "shards"
    assert shards(extract_dir, manifest, out, "--remove-packed") == 0
    capsys.readouterr()
    # the same command again (e.g. a workflow rerun): nothing to pack, the shards are kept
    assert shards(extract_dir, manifest, out, "--remove-packed") == 0
    assert "are complete for this manifest and config" in capsys.readouterr().err
    assert hashes(out) == reference

    # a kill during the removal: some clip tars are left, so is the killed job's lock file, and
    # Snakemake deletes the job's summary.json before it reruns the job; the rerun keeps the
    # shards, finishes the removal and takes over (then removes) the stale lock
    for name in list(tars)[:3]:
        (extract_dir / "clips" / name).write_bytes(tars[name])
    (out / "summary.json").unlink()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".msaflow.lock").write_text(json.dumps({"pid": dead.pid, "host": host_name(), "command": "msaflow shards"}))
    assert shards(extract_dir, manifest, out, "--remove-packed") == 0
    assert hashes(out) == reference
    assert not list((extract_dir / "clips").glob("*.tar"))
    # without the flag the shards are kept too, and clips left over stay
    (extract_dir / "clips" / list(tars)[0]).write_bytes(tars[list(tars)[0]])
    assert shards(extract_dir, manifest, out) == 0
    assert hashes(out) == reference and len(list((extract_dir / "clips").glob("*.tar"))) == 1


@pytest.mark.parametrize("change", ["shard settings", "manifest", "shard file gone", "other folder"])
def test_rerun_that_cannot_reuse_the_shards_says_to_re_extract(packed, tmp_path, capsys, change):
    manifest, extract_dir, tars, reference = packed
    out = tmp_path / "shards"
    assert shards(extract_dir, manifest, out, "--remove-packed") == 0
    capsys.readouterr()
    args = []
    if change == "shard settings":
        args = ["--max-samples", "3"]  # the later one wins
    elif change == "manifest":
        manifest.write_text(manifest.read_text() + "\n")  # any edit changes its hash
    elif change == "shard file gone":
        (out / "train" / "train-000001.tar").unlink()
    else:
        out = tmp_path / "elsewhere"
    assert shards(extract_dir, manifest, out, *args) == 2
    err = capsys.readouterr().err
    assert f"{len(CLIPS)} of {len(CLIPS)} clip tars in {extract_dir / 'clips'} were removed after they were packed" \
        in err
    assert "Re-extract the clips" in err and "snakemake --forcerun extract" in err
    reason = {"shard settings": "the shard settings differ", "manifest": "changed since",
              "shard file gone": "train/train-000001.tar", "other folder": "not into"}[change]
    assert reason in err


def test_re_extracted_clips_are_packed_again_and_the_record_goes(packed, tmp_path):
    manifest, extract_dir, tars, reference = packed
    out = tmp_path / "shards"
    assert shards(extract_dir, manifest, out, "--remove-packed") == 0
    for name, data in tars.items():  # what re-extraction brings back
        (extract_dir / "clips" / name).write_bytes(data)
    assert shards(extract_dir, manifest, out, "--max-samples", "3") == 0  # other settings: a fresh build
    assert json.loads((out / "train" / "index.json").read_text())["shards"][0]["n_samples"] == 3
    assert not (extract_dir / "packed.json").exists() and len(list((extract_dir / "clips").glob("*.tar"))) == 6


# ----------------------------------------------------------------- slow: the workflow


def workflow_cmd(workdir: Path, config: Path, *extra: str) -> list[str]:
    return [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(config), "--cores", "2", *extra]


TARGET = "results/small/shards/summary.json"


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disk")
    dataset = small_dataset(tmp / "data", 6)
    config = write_config(tmp / "small.yaml", dataset, chunks=2)
    run = tmp / "clean"
    proc = snakemake(run, config, TARGET)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return config, run


@pytest.mark.slow
def test_workflow_keeps_raw_data_once_and_a_second_run_does_nothing(clean_run):
    config, run = clean_run
    (extract_dir,) = (run / "results" / "small").glob("extract-*")
    assert not list(extract_dir.glob("clips/*.tar"))  # packed, then removed
    assert not list(extract_dir.glob("chunks/*.json"))  # temporary: gone once the shards were built
    assert json.loads((run / "results" / "small" / "shards" / "summary.json").read_text())["total"]["samples"] == 6
    dry = snakemake(run, config, "-n", TARGET)
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr
    again = snakemake(run, config, TARGET)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("when", ["shards step started", "clip tars being removed"])
def test_workflow_killed_in_the_shards_step_resumes_to_identical_shards(clean_run, tmp_path, when):
    config, clean = clean_run
    killed = tmp_path / "killed"
    small = killed / "results" / "small"

    def reached() -> bool:
        if when == "shards step started":
            return (small / "logs" / "shards.log").exists()
        return any(small.glob("extract-*/packed.json"))

    proc = subprocess.Popen(workflow_cmd(killed, config, TARGET), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and not reached():
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and the shards job it started
    proc.wait()
    # the shards job did not finish: Snakemake had not yet removed the temporary chunk summaries
    assert len(list(small.glob("extract-*/chunks/*.json"))) == 2

    assert snakemake(killed, config, "--unlock").returncode == 0
    resumed = snakemake(killed, config, "--rerun-incomplete", TARGET)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert hashes(small / "shards") == hashes(clean / "results" / "small" / "shards")
    assert not list(small.glob("extract-*/clips/*.tar")) and not list(small.glob("extract-*/chunks/*.json"))
    again = snakemake(killed, config, TARGET)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
