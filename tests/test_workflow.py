"""The workflow (Snakefile + workflow/rules/*.smk): config validation, lint, dry runs, Snakemake's
report, and (slow) end-to-end runs on real GRID clips: second run does nothing, a run killed
mid-extraction resumes to byte-identical shards."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from msaflow.pipeline.config import SCHEMA_PATH, load_workflow_config, schema_text

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
DEMO = REPO / "datasets" / "demo"
DEFAULT_CONFIG = REPO / "config" / "config.yaml"  # the demo


def snakemake(workdir: Path, configfile: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
                           "--configfile", str(configfile), "--cores", "2", *extra],
                          capture_output=True, text=True, timeout=timeout)


def in_repo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """snakemake run in the project root, as a user types it (config/config.yaml is the default)."""
    return subprocess.run([str(SNAKEMAKE), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def job_stats(stdout: str) -> dict[str, int]:
    """rule -> job count, from a dry run's first `Job stats` table."""
    lines = stdout[stdout.index("Job stats:"):].splitlines()[3:]
    rows = [line.split() for line in lines[:next(i for i, line in enumerate(lines) if line.startswith("total"))]]
    return {rule: int(count) for rule, count in rows}


def test_committed_schema_is_generated_from_the_models():
    assert SCHEMA_PATH == REPO / "workflow" / "schemas" / "config.schema.json"
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text(), \
        "run `python -m msaflow.pipeline.config --write-schema` and commit the result"


def test_write_schema_needs_a_source_checkout(tmp_path, monkeypatch):
    """An installed msaflow has no workflow/ folder: --write-schema refuses instead of writing into it
    (code that needs the schema at run time generates it from the models, as schema_text() does)."""
    import msaflow.pipeline.config as workflow_config

    monkeypatch.setattr(workflow_config, "SCHEMA_PATH", tmp_path / "workflow" / "schemas" / "config.schema.json")
    with pytest.raises(SystemExit) as exit_:
        workflow_config.main(["--write-schema"])
    assert exit_.value.code == 2 and not (tmp_path / "workflow").exists()


def test_the_workflow_passes_snakemake_lint():
    proc = in_repo("--lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_plain_snakemake_plans_the_demo():
    """`snakemake --cores 2 -n` with no --configfile: config/config.yaml, the whole demo."""
    proc = in_repo("--cores", "2", "-n", "--forceall")  # --forceall: the same plan after a `make demo`
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "Config file(s): ['config/config.yaml']" in out
    demo = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert job_stats(proc.stdout) == {"manifest": 1, "extract": demo["workflow"]["extract_chunks"], "shards": 1,
                                      "train": 1, "evaluate": 1, "report": 1, "all": 1}
    assert f"results/{demo['run_name']}/report/report.md" in proc.stdout


def test_a_configfile_replaces_the_default_config(tmp_path):
    """A --configfile is complete: nothing of config/config.yaml (the demo's dataset, its end-to-end
    model) is merged into it; --config still edits what it gives."""
    (tmp_path / "features.pkl").write_bytes(b"")
    config = yaml.safe_load((REPO / "config" / "mmsa_pickle.yaml").read_text())
    config.update(run_name=f"test-plan-{tmp_path.name}", pickle=str(tmp_path / "features.pkl"))
    (tmp_path / "pickle.yaml").write_text(yaml.safe_dump(config))
    proc = in_repo("--cores", "2", "-n", "-p", "--configfile", str(tmp_path / "pickle.yaml"),
                   "--config", f"run_name=edited-{tmp_path.name}")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # a merged `dataset` would clash with `pickle`
    (files,) = [line for line in (proc.stdout + proc.stderr).splitlines() if "Config file(s):" in line]
    assert "pickle.yaml" in files and "config/config.yaml" not in files  # what the report lists too
    stats = job_stats(proc.stdout)
    assert "manifest" not in stats and stats["train"] == len(config["train"]["rates"]) * len(config["train"]["seeds"])
    assert f"results/edited-{tmp_path.name}/report/report.md" in proc.stdout
    assert "runs/emt-dlfr-per-rate-" in proc.stdout and "end-to-end" not in proc.stdout


@pytest.mark.parametrize("name", ["config.yaml", "custom.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_workflow_config(REPO / "config" / name)
    assert cfg.run_name and cfg.dataset.root and cfg.workflow.extract_chunks >= 1


def test_dry_run_of_the_demo_plans_manifest_extract_chunks_shards(tmp_path):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["dataset"]["root"] = str(DEMO)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, tmp_path / "demo.yaml", "--dry-run", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = dict(line.split() for line in proc.stdout.splitlines()
                if len(line.split()) == 2 and line.split()[0] in {"manifest", "extract", "shards", "all"})
    assert jobs == {"manifest": "1", "extract": str(config["workflow"]["extract_chunks"]), "shards": "1",
                    "all": "1"}
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def test_invalid_config_fails_schema_validation_clearly(tmp_path):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["shards"]["max_samples"] = 0
    config["extract_chunk"] = 3  # a typo of a key
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, tmp_path / "bad.yaml", "--dry-run", timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Error validating config file" in out
    assert "'extract_chunk' was unexpected" in out or "max_samples" in out


def test_snakemake_report_holds_the_figures_and_tables(tmp_path):
    """`snakemake --report` after a run: the robustness curves, the face-crop contact sheets and the
    tables are items of Snakemake's report, with their captions. Only the report job runs: the steps
    before it are stood in for by outputs laid out as theirs (shards, summary, failures, metrics)."""
    from loader_shards import write_split
    from test_report import write_metrics

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["dataset"]["root"] = str(DEMO)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "results" / config["run_name"]
    counts = {}
    for split, sizes in {"train": [2, 1], "valid": [1], "test": [2]}.items():
        write_split(run / "shards", split, "raw", sizes, seed=len(split))
        counts[split] = {"manifest_rows": sum(sizes), "samples": sum(sizes), "failures": 0}
    counts["train"].update(manifest_rows=4, failures=1)
    (run / "shards" / "failures.csv").write_text("id,path,stage,reason\nvid9/1,Raw/vid9/1.mpg,decode,truncated\n")
    total = {k: sum(c[k] for c in counts.values()) for k in ("manifest_rows", "samples", "failures")}
    (run / "shards" / "summary.json").write_text(json.dumps({"splits": counts, "total": total, "mode": "raw"}))
    write_metrics(run / "evaluate" / f"{config['train']['model']}-{config['train']['protocol']}.json",
                  np.random.default_rng(0), np.linspace(0.3, 1.5, 11))
    (run / "benchmarks").mkdir()
    (run / "benchmarks" / "shards.tsv").write_text("s\th:m:s\tmax_rss\n2.5\t0:00:02\t300.1\n")

    only_report = ("--allowed-rules", "report", "all")  # the files above stand for the steps before
    proc = snakemake(tmp_path, tmp_path / "demo.yaml", *only_report, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = run / "report"
    assert {p.name for p in (out / "faces").glob("*.png")} == {"faces_train.png", "faces_valid.png", "faces_test.png"}
    assert {p.name for p in (out / "tables").iterdir()} == {"data.csv", "failures.csv", "auilc.csv", "rates.csv",
                                                           "timings.csv"}
    assert "truncated" in (out / "tables" / "failures.csv").read_text()

    proc = snakemake(tmp_path, tmp_path / "demo.yaml", *only_report, "--report", str(tmp_path / "report.html"),
                     timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    for item in ("robustness.png", "faces_train.png", "faces_valid.png", "faces_test.png", "auilc.csv", "rates.csv",
                 "data.csv", "failures.csv", "timings.csv", "report.html"):
        assert f"filename={item};base64," in page, item  # embedded, each its own item
    for caption in ("Robustness to missing features", "Face crops of split", "The clips left out",
                    "Samples per split", "AUILC of each model"):
        assert caption in page, caption
    for category in ("Data", "Face crops", "Robustness", "Run"):
        assert f'"{category}"' in page, category
    assert "raw talking-person videos to a trained multimodal" in page  # workflow/report/workflow.rst


# ----------------------------------------------------------------- slow: real runs
def small_dataset(root: Path, n_clips: int, truncated: bool = False) -> Path:
    """The first `n_clips` GRID clips of the demo in the same MMSA raw layout, splits train/valid/test/
    train/...; with `truncated`, one more train clip cut after 3 kB (cannot be decoded)."""
    with open(DEMO / "label.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)[:n_clips]
    for i, row in enumerate(rows):
        row["mode"] = ("train", "valid", "test", "train")[i % 4]
        src = next((DEMO / "Raw" / row["video_id"]).glob(f"{row['clip_id']}.*"))
        (root / "Raw" / row["video_id"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / "Raw" / row["video_id"] / src.name)
    if truncated:
        (root / "Raw" / "truncated").mkdir(parents=True)
        (root / "Raw" / "truncated" / src.name).write_bytes(src.read_bytes()[:3000])
        rows.append({**rows[0], "video_id": "truncated", "clip_id": src.stem, "mode": "train"})
    with open(root / "label.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_config(path: Path, dataset: Path, chunks: int) -> Path:
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["run_name"] = "small"
    config["dataset"]["root"] = str(dataset)
    config["workflow"]["extract_chunks"] = chunks
    config["extract"] = {**config["extract"], "fps": 5.0, "detect_every": 2}  # few frames: fast on 2 CPU cores
    config["shards"]["max_samples"] = 1  # several shards per split
    config["train"] = {**config["train"], "batch_size": 2, "epochs": 1}  # two train clips
    config["evaluate"]["rates"] = "0.0,0.5,1.0"
    path.write_text(yaml.safe_dump(config))
    return path


def shard_hashes(shard_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(shard_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(shard_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_workflow_end_to_end_then_nothing_to_do(tmp_path):
    dataset = small_dataset(tmp_path / "data", 4, truncated=True)
    config = write_config(tmp_path / "small.yaml", dataset, chunks=2)
    run = tmp_path / "run"
    proc = snakemake(run, config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = run / "results" / "small"
    summary = json.loads((out / "shards" / "summary.json").read_text())
    assert summary["total"]["manifest_rows"] == 5 and summary["total"]["samples"] == 4
    assert summary["total"]["failures"] == 1 and summary["total"]["no_face"] == 0
    with open(out / "shards" / "failures.csv", newline="", encoding="utf-8") as f:
        (failure,) = list(csv.DictReader(f))
    assert failure["id"].startswith("truncated/") and failure["stage"] and "truncated" in failure["path"]
    train = json.loads((out / "shards" / "train" / "index.json").read_text())
    assert train["n_samples"] == 2 and len(train["shards"]) == 2 and train["mode"] == "raw"
    assert train["modalities"]["vision_mask.npy"]["rate"] == 5.0
    assert train["manifest_hash"] == hashlib.sha256((out / "manifest.csv").read_bytes()).hexdigest()
    for rule in ("manifest", "extract-1-of-2", "extract-2-of-2", "shards", "evaluate", "report"):
        assert (out / "logs" / f"{rule}.log").is_file() and (out / "benchmarks" / f"{rule}.tsv").is_file()

    # ... then training, evaluation at every rate, and the report
    (run_dir,) = (out / "runs").iterdir()
    assert (run_dir / "best.pt").is_file() and json.loads((run_dir / "config.json").read_text())["model"] == "end-to-end"
    (metrics_path,) = (out / "evaluate").glob("*.json")
    metrics = json.loads(metrics_path.read_text())
    assert metrics["n_test"] == 1 and sorted(metrics["rates"], key=float) == ["0.0", "0.5", "1.0"]
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    for section in ("## Data", "## Clips left out", "## Face crops", "## Robustness to missing features", "## Timings"):
        assert section in report
    assert "truncated/" in report
    assert (out / "report" / "robustness.png").is_file() and (out / "report" / "faces" / "faces_train.png").is_file()
    # Snakemake's own report of the run, as a zip: the figures and tables with their captions
    zipped = snakemake(run, config, "--report", str(tmp_path / "report.zip"))
    assert zipped.returncode == 0, zipped.stderr[-4000:]
    with zipfile.ZipFile(tmp_path / "report.zip") as zf:
        items = {name.rsplit("/", 1)[-1] for name in zf.namelist() if "/data/raw/" in name}  # the report's items
    assert {"robustness.png", "faces_train.png", "auilc.csv", "failures.csv", "report.html"} <= items, items

    again = snakemake(run, config)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_killed_mid_extraction_resumes_to_identical_shards(tmp_path):
    dataset = small_dataset(tmp_path / "data", 8)
    config = write_config(tmp_path / "small.yaml", dataset, chunks=1)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    target = "results/small/shards/summary.json"  # this test is about extraction: stop at the shards
    assert snakemake(clean, config, target).returncode == 0

    n_tars = lambda: len(list((killed / "results" / "small").glob("extract-*/clips/*.tar")))  # noqa: E731
    cmd = [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(killed),
           "--configfile", str(config), "--cores", "2", target]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and n_tars() < 2:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and the extraction job it started
    proc.wait()
    n_done = n_tars()
    assert 0 < n_done < 8, f"the kill came at {n_done} of 8 clip tars"
    assert not (killed / "results" / "small" / "shards" / "summary.json").exists()

    # the documented resume: release the stale lock, then the same command with --rerun-incomplete
    assert snakemake(killed, config, "--unlock").returncode == 0
    resumed = snakemake(killed, config, "--rerun-incomplete", target)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert shard_hashes(killed / "results" / "small" / "shards") == \
        shard_hashes(clean / "results" / "small" / "shards")
