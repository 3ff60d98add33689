"""`config/custom.yaml` as shipped, on a folder of one's own videos: the whole workflow
(manifest, extraction, shards, end-to-end training, evaluation at every rate, report) on
seven real clips (GRID, HDTF, a stage clip) with a labels.csv, only `dataset.root` given on
the command line. Every shipped config is also checked to be complete: it validates, and a
raw-mode config trains a model that reads the face crops and audio."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from msaflow.pipeline.config import load_workflow_config
from test_workflow import REPO, SNAKEMAKE

CLIPS = {  # file: (source under shared/data/raw, transcript, label)
    "bbaf2n.mpg": ("grid", "bin blue at f two now", -2.0),
    "lbax4n.mpg": ("grid", "lay blue at x four now", -1.0),
    "pwij3p.mpg": ("grid", "place white in j three please", 0.5),
    "swiz3n.mpg": ("grid", "set white in z three now", 1.0),
    "hdtf_aoc.mp4": ("hdtf", "", 2.0),
    "hdtf_katiehill.mp4": ("hdtf", "", -0.5),
    "short_hamilton_clip.mp4": ("hamilton", "", 1.5),
}


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml") if p.name != "extract.yaml"))
def test_every_shipped_config_is_complete(name):
    cfg = load_workflow_config(REPO / "config" / name)
    if cfg.dataset is not None and cfg.extract.mode == "raw":  # raw shards: only end-to-end reads crops and audio
        assert cfg.train.model == "end-to-end", name
        e2e = cfg.train.model_settings["extra"]["end_to_end"]
        assert set(e2e["frontends"]) == {"vision", "audio"}
    assert cfg.evaluate.rates


def own_videos(folder: Path, shared_data: Path) -> Path:
    folder.mkdir(parents=True)
    for name, (source, _, _) in CLIPS.items():
        shutil.copy(shared_data / "raw" / source / name, folder / name)
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "text", "label"])
        for name, (_, text, label) in CLIPS.items():
            writer.writerow([name, text, label])
    return folder


@pytest.mark.slow
def test_custom_config_runs_as_shipped_on_a_folder_of_videos(shared_data, tmp_path):
    videos = own_videos(tmp_path / "my_videos", shared_data)
    work = tmp_path / "work"
    proc = subprocess.run([str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
                           "--configfile", str(REPO / "config" / "custom.yaml"),
                           "--config", f"dataset={{root: {videos}}}", "--cores", "2"],
                          capture_output=True, text=True, timeout=3600)
    out = work / "results" / yaml.safe_load((REPO / "config" / "custom.yaml").read_text())["run_name"]
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted((out / "logs").glob("*.log"))) \
        if (out / "logs").is_dir() else ""
    assert proc.returncode == 0, proc.stderr[-4000:] + logs

    summary = json.loads((out / "shards" / "summary.json").read_text())
    assert summary["total"]["manifest_rows"] == summary["total"]["samples"] == len(CLIPS)
    assert summary["total"]["failures"] == 0 and summary["total"]["no_face"] == 0
    assert all(summary["splits"][s]["samples"] >= 1 for s in ("train", "valid", "test"))  # the by-video split

    (run_dir,) = (out / "runs").iterdir()
    run = json.loads((run_dir / "config.json").read_text())
    assert run["model"] == "end-to-end" and run["modalities"]["used"] == ["text", "audio", "vision"]
    assert run["extract"]["mode"] == "raw" and run["data_hash"]
    assert (run_dir / "history.csv").is_file()
    train_log = next((out / "logs").glob("train-*.log")).read_text()
    assert "epoch 1/" in train_log and "scored test" in train_log  # progress lines in the log file

    (metrics_path,) = (out / "evaluate").glob("*.json")
    metrics = json.loads(metrics_path.read_text())
    assert len(metrics["rates"]) == 11 and metrics["AUILC"]["MAE"] is not None
    assert metrics["data_hash"] == run["data_hash"] and metrics["reused_run_metrics"] == [str(run_dir.relative_to(work))]
    assert metrics["labels"]["distinct"] == metrics["n_test"] >= 1

    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert "## Robustness to missing features" in report and "step 0.1 over 0 to 1" in report
    assert "labels is" not in report  # the labels are not constant: no such note
