"""`msaflow results`: one CSV across runs, appended and deduplicated; the report's honest curves."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from loader_shards import write_split

from msaflow.model.metrics import compute_metrics
from msaflow.pipeline.cli import main as cli

FAST = ["--model", "emt", "--freeze-text", "--epochs", "1", "--batch-size", "4", "--grad-accum", "1",
        "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[Path]]:
    tmp = tmp_path_factory.mktemp("results")
    shards = tmp / "shards"
    write_split(shards, "train", "features", [6, 4], seed=1)
    write_split(shards, "valid", "features", [4], seed=2, first_number=100)
    write_split(shards, "test", "features", [5], seed=3, first_number=200)
    dirs = []
    for name, extra in (("single-s0", ["--protocol", "single-model"]), ("single-s1", ["--protocol", "single-model",
                                                                                      "--seed", "1"]),
                        ("rate0.3", ["--protocol", "per-rate", "--missing-rate", "0.3"])):
        assert cli(["train", "--data", str(shards), "-o", str(tmp / name), *FAST, *extra]) == 0
        dirs.append(tmp / name)
    return shards, dirs


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_one_row_per_run_appended_and_deduplicated(runs, tmp_path):
    shards, (s0, s1, r03) = runs
    table = tmp_path / "results.csv"
    assert cli(["results", str(s0), str(r03), "-o", str(table)]) == 0
    rows = read(table)
    assert len(rows) == 2
    single = next(r for r in rows if r["protocol"] == "single-model")
    assert single["model"] == "emt" and single["seed"] == "0" and single["encoder"] == "minilm"
    assert single["MAE@0.0"] and single["Acc-7@1.0"] and single["AUILC_MAE"]
    assert single["data_hash"] == json.loads((s0 / "config.json").read_text())["data_hash"]
    per_rate = next(r for r in rows if r["protocol"] == "per-rate")
    assert per_rate["missing_rate"] == "0.3" and per_rate["MAE@0.3"] and per_rate["AUILC_MAE"] == ""
    header = list(rows[0])
    assert header[:5] == ["run", "model", "protocol", "missing_rate", "seed"]
    assert header.index("MAE@0.0") < header.index("Corr@0.0") < header.index("MAE@0.1") < header.index("AUILC_MAE")

    assert cli(["results", str(s0), str(s1), "-o", str(table)]) == 0  # s0 again: replaced, not repeated
    rows = read(table)
    assert len(rows) == 3 and sorted(r["seed"] for r in rows) == ["0", "0", "1"]
    assert len({r["run"] for r in rows}) == 3


def test_a_pooled_evaluation_is_one_row(runs, tmp_path):
    shards, (s0, s1, _) = runs
    pooled = tmp_path / "pooled.json"
    assert cli(["evaluate", str(s0), str(s1), "--data", str(shards), "-o", str(pooled)]) == 0
    table = tmp_path / "results.csv"
    assert cli(["results", str(pooled), "-o", str(table)]) == 0
    (row,) = read(table)
    assert row["seed"] == "0 1" and row["AUILC_MAE"] and row["data"] == str(shards)


def test_results_errors_are_one_line(runs, tmp_path, capsys):
    unfinished = tmp_path / "nothing"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    assert cli(["results", str(unfinished), "-o", str(tmp_path / "r.csv")]) == 2
    assert "no metrics.json" in capsys.readouterr().err and not (tmp_path / "r.csv").exists()


# ---------------------------------------------------------------- the report says what is true


def test_report_of_constant_labels_says_so_and_leaves_out_undefined_metrics(tmp_path):
    labels = np.zeros(10)
    per_rate = {r: compute_metrics(np.linspace(-1, 1, 10) * (1 + float(r)), labels) for r in ("0.0", "0.5", "1.0")}
    metrics = {"rates": per_rate, "n_test": 10, "labels": {"n": 10, "distinct": 1, "min": 0.0, "max": 0.0}}
    path = tmp_path / "run" / "metrics.json"
    path.parent.mkdir()
    path.write_text(json.dumps(metrics))
    out = tmp_path / "report"
    assert cli(["report", "-o", str(out), "--metrics", str(path)]) == 0
    md = (out / "report.md").read_text()
    assert "Every one of the 10 test labels is 0" in md and "constant" in md
    assert "Left out, undefined on this test split at every rate: Corr" in md
    assert "trapezoid rule, step 0.5 over 0 to 1" in md and "step 0.1" not in md
    table = md[md.index("per missing rate"):]
    assert "Corr" not in table.splitlines()[2]  # the per-rate table has no Corr column
