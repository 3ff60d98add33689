"""RunDir: the one reader and writer of a training run folder (config.json, weights, checkpoint,
normaliser, metrics, history), used by train, evaluate, predict, export-text and msaflow.load_run."""

from __future__ import annotations

import json

import pytest
import torch

from msaflow.model.config import ModelConfig
from msaflow.model.registry import build_model
from msaflow.pipeline.data.sources import DataError, Normaliser
from msaflow.pipeline.training.run_dir import RunDir, RunDirError

SMALL = ModelConfig(modalities=("audio", "vision"), d_audio=3, d_vision=4, head_dim=8)


def _model():
    torch.manual_seed(0)
    return build_model("late-fusion", SMALL)


@pytest.fixture
def run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_config({"model": "late-fusion", "model_config": SMALL.to_dict(), "seed": 3})
    run.save_best(_model())
    return run


def test_a_written_run_reads_back(run):
    assert run.config()["seed"] == 3
    model = run.build_model()
    assert not model.training
    expected = _model().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert run.metrics() is None and run.checkpoint() is None
    run.write_metrics({"rates": {"0.0": {"MAE": 1.0}}, "n_test": 2})
    assert run.metrics()["n_test"] == 2


def test_a_checkpoint_and_history_round_trip(run):
    model = _model()
    run.save_checkpoint({"model": model.state_dict(), "optimizer": {}, "state": {"epoch": 1}})
    assert run.checkpoint()["state"] == {"epoch": 1}
    from_last = RunDir.of_checkpoint(run.last)  # a .pt file beside config.json: its model weights
    assert from_last.path == run.path and set(from_last.weights()) == set(model.state_dict())
    history = [{"epoch": 0, "seconds": 1.0, "train_seconds": 0.5, "train_samples": 8, "train": {"loss": 2.0},
                "valid": {"loss": 1.5, "l1": 1.0}}]
    run.write_history(history)
    assert json.loads((run.path / "history.json").read_text()) == history
    assert (run.path / "history.csv").read_text().splitlines() == [
        "epoch,seconds,train_seconds,train_samples,train_loss,valid_loss,valid_l1", "0,1.0,0.5,8,2.0,1.5,1.0"]


def test_the_normaliser_is_the_runs(run):
    assert not run.has_normaliser()
    stats = Normaliser({"audio": (torch.zeros(3), torch.ones(3))})
    run.save_normaliser(stats)
    assert run.has_normaliser() and torch.equal(run.normaliser().stats["audio"][1], torch.ones(3))


def test_unusable_run_folders_are_one_line_user_errors(run, tmp_path):
    with pytest.raises(RunDirError, match="config.json not found"):
        RunDir(tmp_path / "nothing").require_finished()
    assert issubclass(RunDirError, DataError)  # exit status 2 from the command line
    torch.save(torch.nn.Linear(2, 2), run.best)  # a pickled object, not a state dict: never unpickled
    with pytest.raises(RunDirError, match="not a state dict"):
        run.weights()
    torch.save({"nope": torch.zeros(1)}, run.best)
    with pytest.raises(RunDirError, match="weights do not fit the model of config.json"):
        run.build_model()
    run.config_path.write_text("{}")
    with pytest.raises(RunDirError, match="not a training run config"):
        run.config()
