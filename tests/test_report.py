"""`msaflow report` on shards laid out as the data contracts say, with real metrics."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np

from loader_shards import write_split
from msaflow.model.metrics import auilc, compute_metrics


def write_metrics(path, rng, noise_per_rate):
    labels = rng.uniform(-3, 3, 200)
    rates = {}
    for i, noise in enumerate(noise_per_rate):
        rates[f"{i / 10:.1f}"] = compute_metrics(labels + rng.normal(0, noise, labels.size), labels)
    keys = next(iter(rates.values())).keys()
    grid = [float(r) for r in rates]
    result = {"rates": rates, "AUILC": {k: auilc(grid, [rates[r][k] for r in rates]) for k in keys},
              "n_test": int(labels.size)}
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(result))
    return result


def test_report_sections_curves_contact_sheet_and_failures(tmp_path):
    shards = tmp_path / "shards"
    for split, sizes in {"train": [3, 2], "valid": [2], "test": [2]}.items():
        write_split(shards, split, "raw", sizes, seed=len(split))
    with (shards / "failures.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "stage", "reason"])
        w.writerow(["vid9/1", "/data/vid9/1.mp4", "decode", "truncated file: moov atom not found"])
    rng = np.random.default_rng(0)
    emt = write_metrics(tmp_path / "emt" / "metrics.json", rng, np.linspace(0.3, 1.5, 11))
    write_metrics(tmp_path / "text-only" / "metrics.json", rng, np.linspace(0.4, 2.0, 11))
    out = tmp_path / "report"
    subprocess.run([sys.executable, "-m", "msaflow.pipeline.cli", "report", "-o", str(out), "--shards", str(shards),
                    "--metrics", str(tmp_path / "emt" / "metrics.json"), f"TXT={tmp_path / 'text-only' / 'metrics.json'}"],
                   check=True)
    md = (out / "report.md").read_text(encoding="utf-8")
    for title in ["## Data", "## Clips left out", "## Face crops", "## Robustness to missing features"]:
        assert title in md
    assert "truncated file: moov atom not found" in md and "1 clip(s) could not be used" in md
    assert "**emt** per missing rate" in md and "**TXT** per missing rate" in md
    assert f"{emt['AUILC']['MAE']:.3f}" in md
    for png in ["robustness.png", "faces/faces_train.png", "faces/faces_valid.png", "faces/faces_test.png"]:
        assert (out / png).stat().st_size > 1000
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 4

    # each table of the page is also a CSV of its own (the workflow's `snakemake --report` items)
    tables = {p.stem: list(csv.reader(p.open(encoding="utf-8"))) for p in (out / "tables").glob("*.csv")}
    assert sorted(tables) == ["auilc", "data", "failures", "rates"]  # no --timings: no timings table
    assert tables["failures"] == [["id", "path", "stage", "reason"],
                                  ["vid9/1", "/data/vid9/1.mp4", "decode", "truncated file: moov atom not found"]]
    assert [row[0] for row in tables["data"][1:]] == ["test", "train", "valid"]  # from index.json: no summary.json
    assert tables["auilc"][0][:2] == ["model", "n_test"] and [r[0] for r in tables["auilc"][1:]] == ["emt", "TXT"]
    assert tables["auilc"][1][tables["auilc"][0].index("MAE")] == f"{emt['AUILC']['MAE']:.3f}"
    assert len(tables["rates"]) == 1 + 2 * 11 and tables["rates"][1][:2] == ["emt", "0.0"]


def test_report_handles_undefined_metrics_and_features_shards(tmp_path):
    shards = tmp_path / "shards"
    write_split(shards, "test", "features", [2])
    labels = np.zeros(10)  # constant labels: Corr is undefined, reported as n/a, never a crash
    m = compute_metrics(np.linspace(-1, 1, 10), labels)
    assert m["Corr"] is None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"rates": {"0.0": m, "0.1": m}, "AUILC": {}, "n_test": 10}))
    out = tmp_path / "report"
    subprocess.run([sys.executable, "-m", "msaflow.pipeline.cli", "report", "-o", str(out), "--shards", str(shards),
                    "--metrics", str(tmp_path / "run" / "metrics.json")], check=True)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "features shards hold embeddings, not crops" in md
    assert "n/a" in md
    assert (out / "faces").is_dir() and not list((out / "faces").iterdir())  # no crops, the folder is there
