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


FROZEN_TEXT = ModelConfig(modalities=("text", "audio"), d_audio=3, head_dim=8, freeze_text=True)


def _frozen_text_run(tmp_path) -> RunDir:
    """An empty run folder whose config.json is a late-fusion model with a frozen text encoder."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_config({"model": "late-fusion", "model_config": FROZEN_TEXT.to_dict()})
    return run


def test_a_frozen_text_encoder_is_stored_as_a_fingerprint_and_rebuilt_at_load(tmp_path):
    """best.pt and last.pt of a frozen-text run leave the 90-MB pretrained encoder out; loading
    rebuilds it from the local text model and gives back every weight the run had."""
    from msaflow.model.weights import FINGERPRINT_KEY

    torch.manual_seed(0)
    model = build_model("late-fusion", FROZEN_TEXT)
    run = _frozen_text_run(tmp_path)
    run.save_best(model)
    stored = torch.load(run.best, weights_only=True)
    assert not any(k.startswith("text_encoder.model.") for k in stored)
    assert set(stored[FINGERPRINT_KEY]) == {"text_encoder.model."}
    assert run.best.stat().st_size < 1_000_000  # the encoder alone is 90 MB
    loaded = run.build_model()
    expected = model.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())

    run.save_checkpoint({"model": stored, "optimizer": {}, "state": {"epoch": 1}})  # last.pt: the same form
    assert RunDir.of_checkpoint(run.last).build_model() is not None


def test_weights_of_other_pretrained_text_weights_are_refused(tmp_path):
    from msaflow.model.weights import FINGERPRINT_KEY

    model = build_model("late-fusion", FROZEN_TEXT)
    run = _frozen_text_run(tmp_path)
    run.save_best(model)
    stored = torch.load(run.best, weights_only=True)
    stored[FINGERPRINT_KEY] = {"text_encoder.model.": "0" * 64}
    torch.save(stored, run.best)
    with pytest.raises(RunDirError, match="other pretrained weights"):
        run.build_model()
    # the same weights under a config that fine-tunes the text encoder: the encoder is missing
    run.write_config({"model": "late-fusion", "model_config": {**FROZEN_TEXT.to_dict(), "freeze_text": False}})
    with pytest.raises(RunDirError, match="freeze_text"):
        run.build_model()


def test_weights_saved_whole_still_load(tmp_path):
    """A best.pt that holds the frozen encoder too (saved whole) loads as before."""
    torch.manual_seed(1)
    model = build_model("late-fusion", FROZEN_TEXT)
    run = _frozen_text_run(tmp_path)
    torch.save(model.state_dict(), run.best)
    loaded = run.build_model()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
