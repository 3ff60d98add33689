"""MMSA pickle reading, `msaflow train` (determinism, exact resume) and `msaflow evaluate` on real MOSI."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from model_helpers import mosi_path
from msaflow.pipeline.cli import main as cli
from msaflow.pipeline.data.mmsa_pickle import MMSAPickleError, load_mmsa_pickle

TINY_YAML = {"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "head_dim": 32, "pred_hidden_global": 8,
                       "pred_hidden_text": 16, "pred_hidden_audio": 4},
             "optim": {"batch_size": 8, "grad_accum": 2}}


def test_reads_the_real_mosi_pickle(shared_data):
    splits = load_mmsa_pickle(mosi_path(shared_data))
    assert {k: len(v) for k, v in splits.items()} == {"train": 1284, "valid": 229, "test": 686}
    train = splits["train"]
    assert train.modalities == ["text", "audio"]  # this release has no vision
    assert train.tensors["text_ids"][:, 0].eq(101).all()
    lengths = train.tensors["text_lengths"]
    assert train.tensors["text_ids"][np.arange(len(train)), lengths - 1].eq(102).all()  # [SEP] at length - 1
    audio = train.tensors["audio"][:, 0]
    assert audio.mean(0).abs().max() < 1e-3 and (audio.std(0) - 1).abs().max() < 1e-2  # z-scored on train
    batch = train.batch([0, 1, 2])
    assert batch["text_ids"].shape[1] == int(lengths[:3].max()) and batch["audio_present"].all()


def _small_pickle(shared_data: Path, path: Path, edit) -> Path:
    with mosi_path(shared_data).open("rb") as f:
        data = pickle.load(f)
    small = {s: {k: v[:10] for k, v in d.items()} for s, d in data.items()}
    edit(small)
    path.write_bytes(pickle.dumps(small))
    return path


def test_text_cache_prebuilds_train_and_valid_at_the_asked_rates(shared_data, tmp_path, monkeypatch):
    from msaflow.pipeline.training import text_cache

    data = _small_pickle(shared_data, tmp_path / "small.pkl", lambda d: None)
    monkeypatch.setattr(sys, "argv", ["text_cache", "--data", str(data), "--cache", str(tmp_path / "cache"),
                                      "--splits", "valid,train", "--train-rates", "0.1,0.3,0.1", "--threads", "1"])
    assert text_cache.main() == 0
    built = {(f.name.split("-")[0], f.name.rsplit("-r", 1)[1]) for f in (tmp_path / "cache").glob("*.npy")}
    assert built == {(s, r) for s in ("train", "valid") for r in ("0.10.npy", "0.30.npy")}


def test_sanitizes_inf_and_tolerates_absent_modalities(shared_data, tmp_path):
    def inject(d):
        d["train"]["audio"] = d["train"]["audio"].copy()
        d["train"]["audio"][3, 0, :5] = -np.inf

    splits = load_mmsa_pickle(_small_pickle(shared_data, tmp_path / "inf.pkl", inject), zscore=False)
    assert np.isfinite(splits["train"].tensors["audio"].numpy()).all()
    assert (splits["train"].tensors["audio"][3, 0, :5] == 0).all()

    def text_only(d):
        for s in d.values():
            del s["audio"], s["audio_lengths"]

    assert load_mmsa_pickle(_small_pickle(shared_data, tmp_path / "t.pkl", text_only))["test"].modalities == ["text"]


def test_bad_pickles_name_the_problem(shared_data, tmp_path):
    def bad_lengths(d):
        d["valid"]["audio_lengths"] = d["valid"]["audio_lengths"].copy()
        d["valid"]["audio_lengths"][4] = 9

    with pytest.raises(MMSAPickleError, match=r"'valid'.*audio_lengths out of range at row 4"):
        load_mmsa_pickle(_small_pickle(shared_data, tmp_path / "a.pkl", bad_lengths))
    with pytest.raises(MMSAPickleError, match=r"missing split\(s\) \['test'\]"):
        load_mmsa_pickle(_small_pickle(shared_data, tmp_path / "b.pkl", lambda d: d.pop("test")))
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_mmsa_pickle(tmp_path / "nope.pkl")


def _train_args(shared_data, tmp, run: str, seed: int, epochs: int = 4) -> list[str]:
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_YAML))
    return ["train", "--data", str(mosi_path(shared_data)), "--model", "emt-dlfr", "--protocol", "single-model",
            "--seed", str(seed), "-o", str(tmp / run), "--limit", "40", "--epochs", str(epochs),
            "--config", str(config), "--text-cache", str(tmp / "cache"), "--threads", "1",
            "--valid-rates", "0.0,0.6"]


@pytest.fixture(scope="module")
def finished_run(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    assert cli(_train_args(shared_data, tmp, "a", seed=0)) == 0
    return tmp


def test_run_directory_holds_state_dicts_and_metrics(finished_run):
    import torch

    run = finished_run / "a"
    assert {"config.json", "best.pt", "last.pt", "history.json", "metrics.json"} <= {p.name for p in run.iterdir()}
    from msaflow.model.weights import FINGERPRINT_KEY

    state = torch.load(run / "best.pt", weights_only=True)
    prints = state.pop(FINGERPRINT_KEY)  # the frozen text encoder: its fingerprint, not its 90 MB
    assert list(prints) == ["text_encoder.model."] and not any(k.startswith("text_encoder.model.") for k in state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["rates"]) == [repr(round(0.1 * i, 1)) for i in range(11)]
    assert metrics["n_test"] == 40 and len(json.loads((run / "history.json").read_text())) == 4


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(shared_data, finished_run):
    """Same seed → same metrics; and a run killed after its first checkpoint, resumed, ends identically."""
    tmp = finished_run
    args = _train_args(shared_data, tmp, "b", seed=0)
    proc = subprocess.Popen([sys.executable, "-m", "msaflow.pipeline.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    history = tmp / "b" / "history.json"
    deadline = time.time() + 600
    while not history.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    done = len(json.loads(history.read_text()))
    assert 1 <= done < 4 and not (tmp / "b" / "metrics.json").exists()
    assert cli(args) == 0  # resumes from last.pt
    a = json.loads((tmp / "a" / "metrics.json").read_text())
    b = json.loads((tmp / "b" / "metrics.json").read_text())
    assert a["rates"] == b["rates"]
    ha = json.loads((tmp / "a" / "history.json").read_text())
    hb = json.loads((tmp / "b" / "history.json").read_text())
    assert [h["valid"] for h in ha] == [h["valid"] for h in hb]


def test_a_finished_run_extended_with_more_epochs_equals_the_longer_run(shared_data, finished_run):
    """--epochs raised on an existing run folder continues it: 2 epochs + 2 more = run a's 4
    epochs, validation and test alike. Any other change is still refused."""
    tmp = finished_run
    assert cli(_train_args(shared_data, tmp, "d", seed=0, epochs=2)) == 0
    assert cli(_train_args(shared_data, tmp, "d", seed=0, epochs=4)) == 0
    ha = json.loads((tmp / "a" / "history.json").read_text())
    hd = json.loads((tmp / "d" / "history.json").read_text())
    assert [h["valid"] for h in ha] == [h["valid"] for h in hd]
    a = json.loads((tmp / "a" / "metrics.json").read_text())
    d = json.loads((tmp / "d" / "metrics.json").read_text())
    assert a["rates"] == d["rates"]
    assert json.loads((tmp / "d" / "config.json").read_text())["optim_config"]["max_epochs"] == 4
    with pytest.raises(SystemExit, match="seed"):
        cli(_train_args(shared_data, tmp, "d", seed=1, epochs=4))


def test_evaluate_aggregates_seeds_with_auilc(shared_data, finished_run):
    tmp = finished_run
    assert cli(_train_args(shared_data, tmp, "c", seed=1)) == 0
    a = json.loads((tmp / "a" / "metrics.json").read_text())
    c = json.loads((tmp / "c" / "metrics.json").read_text())
    assert a["rates"] != c["rates"]  # another seed, another model
    out = tmp / "agg" / "metrics.json"
    assert cli(["evaluate", str(tmp / "a"), str(tmp / "c"), "--data", str(mosi_path(shared_data)), "-o", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["n_test"] == 40  # the runs' --limit applies to evaluation too
    assert len(m["rates"]) == 11 and set(m["AUILC"]) >= {"MAE", "Corr", "Acc-7", "Acc-2_non0", "F1_has0"}
    mae = [m["rates"][r]["MAE"] for r in m["rates"]]
    assert abs(mae[0] - (a["rates"]["0.0"]["MAE"] + c["rates"]["0.0"]["MAE"]) / 2) < 1e-9
    expected_auilc = 0.1 * (mae[0] / 2 + sum(mae[1:-1]) + mae[-1] / 2)
    assert abs(m["AUILC"]["MAE"] - expected_auilc) < 1e-9
    assert m["rates_std"]["0.0"]["MAE"] == pytest.approx(abs(a["rates"]["0.0"]["MAE"] - c["rates"]["0.0"]["MAE"]) / 2)
    assert out.with_suffix(".csv").read_text().startswith("rate,MAE,MAE_std")
