"""`msaflow export-text`: a run's fine-tuned encoder as a model folder another run starts from."""

from __future__ import annotations

import json

import torch
import yaml

from model_helpers import mosi_path
from msaflow.pipeline.cli import main as cli

TINY = {"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "head_dim": 32, "pred_hidden_global": 8,
                  "pred_hidden_text": 16, "pred_hidden_audio": 4},
        "optim": {"batch_size": 8, "grad_accum": 1}}


def _train(shared_data, tmp, name: str, model: str, *extra: str) -> int:
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    return cli(["train", "--data", str(mosi_path(shared_data)), "--model", model, "--protocol", "per-rate",
                "--seed", "0", "-o", str(tmp / name), "--limit", "16", "--epochs", "1", "--config", str(config),
                "--threads", "1", *extra])


def test_exported_encoder_is_the_runs_and_a_new_run_starts_from_it(shared_data, tmp_path, capsys):
    from msaflow.extractors.text import load_text_encoder

    assert _train(shared_data, tmp_path, "text", "text-only") == 0  # MiniLM fine-tuned
    assert cli(["export-text", str(tmp_path / "text"), "-o", str(tmp_path / "encoder")]) == 0
    best = torch.load(tmp_path / "text" / "best.pt", weights_only=True)
    exported = load_text_encoder(str(tmp_path / "encoder")).state_dict()
    original = load_text_encoder("minilm").state_dict()
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(exported[key], best[f"text_encoder.model.{key}"])
    assert not torch.equal(exported[key], original[key])  # one epoch of fine-tuning moved it
    assert torch.equal(exported["pooler.dense.weight"], original["pooler.dense.weight"])  # unused by the run: kept

    assert _train(shared_data, tmp_path, "warm", "emt-dlfr", "--text-model", str(tmp_path / "encoder")) == 0
    run = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert run["model_config"]["text_model"] == str(tmp_path / "encoder")


def test_a_run_with_a_frozen_encoder_has_nothing_to_export(shared_data, tmp_path, capsys):
    assert _train(shared_data, tmp_path, "frozen", "text-only", "--freeze-text") == 0
    assert cli(["export-text", str(tmp_path / "frozen"), "-o", str(tmp_path / "encoder")]) == 2
    assert "kept its text encoder frozen" in capsys.readouterr().err
    assert not (tmp_path / "encoder").exists()
    assert cli(["export-text", str(tmp_path / "nothing"), "-o", str(tmp_path / "encoder")]) == 2
    assert "not a finished training run" in capsys.readouterr().err
