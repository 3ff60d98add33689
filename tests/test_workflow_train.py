"""The workflow's training end: train (seeds x rates) -> evaluate -> report, and the pickle route."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from msaflow.pipeline.config import WorkflowConfig

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def dry_run(config: Path) -> str:
    done = subprocess.run([*SNAKEMAKE, "-n", "-p", "--configfile", str(config), "--directory", str(REPO),
                           "--snakefile", str(REPO / "Snakefile")],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def job_count(plan: str, rule: str) -> int:
    table = plan[plan.index("Job stats:"):]
    for line in table.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == rule:
            return int(parts[1])
    return 0


def test_pickle_config_plans_a_run_per_seed_and_rate(tmp_path, shared_data):
    config = yaml.safe_load((REPO / "config" / "mmsa_pickle.yaml").read_text())
    config["pickle"] = str(shared_data / "mosi_utt" / "mosi_utt_ta.pkl")
    config["run_name"] = f"test-plan-{tmp_path.name}"
    path = tmp_path / "pickle.yaml"
    path.write_text(yaml.safe_dump(config))
    plan = dry_run(path)
    assert job_count(plan, "train") == 11 * 3 and job_count(plan, "evaluate") == 1 and job_count(plan, "report") == 1
    assert job_count(plan, "extract") == 0 and job_count(plan, "manifest") == 0
    assert "--missing-rate 0.7" in plan and "--seed 2" in plan


def test_demo_config_plans_training_evaluation_and_report(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["run_name"] = f"test-plan-{tmp_path.name}"
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    plan = dry_run(path)
    for rule in ("manifest", "shards", "train", "evaluate", "report"):
        assert job_count(plan, rule) == 1, rule
    # the run's options come from the config file's train section, the command names only the seed
    (train,) = [line for line in plan.splitlines() if "msaflow train " in line]
    assert "runs/end-to-end-single-model-s0-" in train and train.split("--threads")[1].split(">")[0].split()[1:] == ["--seed", "0"]
    assert "--config results/" in train and "--model" not in train
    assert "--rates 0.0:1.0:0.1" in plan


@pytest.mark.parametrize("sources", [{}, {"dataset": {"root": "x"}, "pickle": "y.pkl"}])
def test_exactly_one_data_source(sources):
    with pytest.raises(ValueError, match="exactly one of `dataset`"):
        WorkflowConfig.model_validate({"run_name": "x", **sources})


@pytest.mark.parametrize("name", ["config", "custom", "mosi", "mosei", "sims", "mmsa_pickle"])
def test_shipped_configs_are_valid(name):
    WorkflowConfig.model_validate(yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text()))


@pytest.mark.slow
def test_interrupted_end_to_end_training_resumes_to_the_same_result(tmp_path):
    """Raw shards from real GRID clips; `msaflow train --model end-to-end` killed (SIGKILL) after
    its first epoch's checkpoint, restarted with the same command: the same test metrics and
    weights as a run never interrupted."""
    import os
    import signal
    import time

    from test_workflow import small_dataset, snakemake, write_config

    dataset = small_dataset(tmp_path / "data", 4)
    config = write_config(tmp_path / "small.yaml", dataset, chunks=1)
    work = tmp_path / "work"
    assert snakemake(work, config, "results/small/shards/summary.json").returncode == 0
    shards = work / "results" / "small" / "shards"
    cmd = [sys.executable, "-m", "msaflow.pipeline.cli", "train", "--data", str(shards), "--model", "end-to-end",
           "--config", str(config), "--protocol", "single-model", "--seed", "1", "--epochs", "3",
           "--batch-size", "2", "--grad-accum", "1", "--valid-rates", "0.0,0.5", "--freeze-text", "--threads", "1"]

    whole = tmp_path / "whole"
    subprocess.run([*cmd, "-o", str(whole)], check=True, capture_output=True)

    broken = tmp_path / "broken"
    proc = subprocess.Popen([*cmd, "-o", str(broken)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None and not (broken / "last.pt").exists():
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (broken / "metrics.json").exists()
    resumed = subprocess.run([*cmd, "-o", str(broken)], check=True, capture_output=True, text=True)
    assert "resuming" in resumed.stdout

    import torch

    a = torch.load(whole / "best.pt", map_location="cpu", weights_only=True)
    b = torch.load(broken / "best.pt", map_location="cpu", weights_only=True)
    assert a.keys() == b.keys()  # tensors, and a frozen encoder's fingerprint (a dict of strings)
    assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    assert json.loads((whole / "metrics.json").read_text())["rates"] == json.loads((broken / "metrics.json").read_text())["rates"]
