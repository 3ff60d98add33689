"""The Python API (`msaflow.train`, `evaluate`, `extract_clip`, `load_run(...).predict`,
`results`) and `msaflow predict` over a folder or a manifest, writing a CSV."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from loader_shards import write_split

import msaflow
from msaflow.pipeline.cli import main as cli

sys.path.insert(0, str(Path(__file__).parent))
from test_predict import TRAIN_CLIPS, run_dir  # noqa: E402,F401  (the fixture: a run on real GRID features shards)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api_shards")
    write_split(root, "train", "features", [6, 4], seed=1)
    write_split(root, "valid", "features", [4], seed=2, first_number=100)
    write_split(root, "test", "features", [5], seed=3, first_number=200)
    return root


def test_train_evaluate_results_from_python(shards, tmp_path):
    run = msaflow.train(shards, tmp_path / "s0", model="emt", epochs=1, batch_size=4, grad_accum=1,
                        freeze_text=True, threads=1, device="cpu", protocol="single-model",
                        config={"model": {"d_model": 32}})
    assert isinstance(run, msaflow.Run) and run.name == "emt" and run.config["model_config"]["d_model"] == 32
    assert set(run.metrics["rates"]) == {repr(round(0.1 * i, 1)) for i in range(11)}
    metrics = msaflow.evaluate(run.dir, shards, rates="0.0,0.5")
    assert sorted(metrics["rates"]) == ["0.0", "0.5"] and metrics["model"] == "emt"
    assert metrics["rates"]["0.5"]["MAE"] == run.metrics["rates"]["0.5"]["MAE"]  # same data: the run's own scores
    rows = msaflow.results([run.dir], out=tmp_path / "results.csv")
    assert rows[0]["model"] == "emt" and rows[0]["AUILC_MAE"] is not None
    with pytest.raises(TypeError, match="unknown option"):
        msaflow.train(shards, tmp_path / "x", epochz=1)
    with pytest.raises(ValueError, match="unknown model"):
        msaflow.train(shards, tmp_path / "y", model="nope")
    assert not (tmp_path / "y").exists()


def test_extract_clip_returns_arrays(shared_data):
    arrays = msaflow.extract_clip(shared_data / "raw" / "grid" / "bbaf2n.mpg", "bin blue at f two now",
                                  config={"mode": "raw", "fps": 5.0, "detect_every": 2, "threads": 1})
    meta = arrays["meta"]
    assert arrays["face"].shape[0] == meta["n_frames"] == 15 and arrays["face"].dtype == np.uint8
    assert arrays["fbank"].shape[1] == 80 and arrays["text_ids"][0] == 101
    assert meta["n_face_frames"] == 15 and meta["has_audio"]


@pytest.mark.slow
def test_load_run_predicts_like_the_command_and_keeps_the_model(run_dir, shared_data, tmp_path, capsys):  # noqa: F811
    from msaflow.pipeline.training.predict import predict

    grid = shared_data / "raw" / "grid"
    run = msaflow.load_run(run_dir)
    model = run.model
    first = run.predict(grid / "lbax4n.mpg", text="bin blue at f two now")
    again = run.predict(grid / "lbax4n.mpg", text="bin blue at f two now")
    assert run.model is model and first.score == again.score
    assert first.score == predict(grid / "lbax4n.mpg", run_dir, "bin blue at f two now").score

    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("lbax4n", "sbia1a"):
        shutil.copy(grid / f"{name}.mpg", folder / f"{name}.mpg")
    (folder / "broken.mp4").write_bytes(b"")  # unusable: its row says why, the others are scored
    out = tmp_path / "scores.csv"
    assert cli(["predict", str(folder), "--checkpoint", str(run_dir), "--no-asr", "-o", str(out)]
               if _has_no_asr() else ["predict", str(folder), "--checkpoint", str(run_dir), "-o", str(out)]) == 0
    with open(out, newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"lbax4n", "sbia1a", "broken"}
    assert "empty file" in rows["broken"]["error"] and rows["lbax4n"]["error"] == ""
    assert "scored 2 of 3 clip(s)" in capsys.readouterr().out

    manifest = tmp_path / "clips.csv"
    manifest.write_text("id,path,text\nA,clips/lbax4n.mpg,bin blue at f two now\n")
    out2 = tmp_path / "manifest_scores.csv"
    assert cli(["predict", "--manifest", str(manifest), "--checkpoint", str(run_dir), "-o", str(out2)]) == 0
    with open(out2, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["id"] == "A" and float(row["score"]) == pytest.approx(first.score, abs=1e-6)


def _has_no_asr() -> bool:
    import argparse

    from msaflow.pipeline.training import predict

    p = argparse.ArgumentParser()
    predict.add_arguments(p)
    return any(a.dest == "no_asr" for a in p._actions)


def test_api_is_documented():
    doc = msaflow.__doc__
    for name in ("msaflow.train(", "msaflow.evaluate(", "msaflow.extract_clip(", "msaflow.load_run(", ".predict(",
                 "msaflow.results("):
        assert name in doc
    assert json.dumps(msaflow.__all__)
