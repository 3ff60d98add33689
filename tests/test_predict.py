"""`msaflow predict` on real GRID clips with a checkpoint from a tiny real training run.

The run: four GRID clips through the product's features-mode extraction (MTCNN crops,
FER, CREPE tiny, MiniLM states), collated as the shard loader does, EMT-DLFR (small width)
trained a few Adam steps on its real DLFR loss with simulated missing features, saved as
a training run directory (config.json + best.pt state dict, as `msaflow train` writes it)
with the extraction settings recorded beside the model config.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from msaflow.pipeline.cli import main as cli

sys.path.insert(0, str(Path(__file__).parent))
import media  # noqa: E402

TRAIN_CLIPS = {"bbaf2n": -1.5, "lbax4n": 0.5, "pwij3p": 1.0, "swiz3n": 2.0}  # labels: arbitrary but fixed
FAST_EXTRACT = dict(mode="features", fps=5.0, detect_every=2, threads=1,
                    frontends="face=fer,audio=crepe-tiny,text=minilm")
SMALL = dict(d_model=32, n_layers=1, n_heads=2, head_dim=32, freeze_text=True)


@pytest.fixture(scope="module")
def run_dir(shared_data, tmp_path_factory) -> Path:
    from msaflow.extractors import frontends as fe
    from msaflow.extractors.clip import ClipExtractor, ClipJob
    from msaflow.model.config import ModelConfig, OptimConfig
    from msaflow.model.missing import simulate_missing
    from msaflow.model.registry import build_model
    from msaflow.pipeline.extract import ExtractConfig
    from msaflow.pipeline.predict import members_to_batch
    from msaflow.pipeline.tario import atomic_path, read_sample_tar, write_json_atomic

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("predict_run")
    cfg = ExtractConfig(**FAST_EXTRACT)
    frontends = fe.build(fe.parse_spec(cfg.frontends), "cpu")
    extractor = ClipExtractor(cfg, device="cpu", frontends=frontends)
    members = []
    for i, (name, label) in enumerate(TRAIN_CLIPS.items()):
        job = ClipJob(row=i + 1, id=f"grid/{name}", key=name, video_id="grid", clip_id=name,
                      path=str(shared_data / "raw" / "grid" / f"{name}.mpg"), start=None, end=None,
                      text="bin blue at f two now", label=label, split="train")
        extractor.extract(job, tmp / "extract")
        members.append(read_sample_tar(tmp / "extract" / "clips" / f"{name}.tar")[1])
    assert members_to_batch(members[0], "features")["vision"].shape[0] == 1
    from msaflow.pipeline.loader import MODE_LAYOUTS, Sample, collate

    batch = collate([Sample(m["json"]["id"], m["json"], {k: m[k] for k in MODE_LAYOUTS["features"].members}, 1.0)
                     for m in members], MODE_LAYOUTS["features"].members)
    assert batch["vision"].shape[0] == 4

    torch.manual_seed(0)
    model_cfg = replace(ModelConfig(), **SMALL, d_audio=frontends["audio"].out_dim,
                        d_vision=frontends["vision"].out_dim)
    model = build_model("emt-dlfr", model_cfg)
    optimizer = torch.optim.Adam(model.param_groups(OptimConfig()))
    generator = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(4):
        optimizer.zero_grad(set_to_none=True)
        incomplete = simulate_missing(batch, 0.3, generator=generator)
        loss, _ = model.compute_loss(batch, incomplete)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses))

    out = tmp / "run"
    out.mkdir()
    write_json_atomic(out / "config.json", {"model": "emt-dlfr", "model_config": model_cfg.to_dict(),
                                            "extract": cfg.model_dump(mode="json")})
    with atomic_path(out / "best.pt") as path:
        torch.save(model.state_dict(), path)
    return out


def test_predict_prints_score_and_presence(run_dir, shared_data, capsys):
    video = shared_data / "raw" / "grid" / "sbia1a.mpg"  # not a training clip
    assert cli(["predict", str(video), "--checkpoint", str(run_dir), "--text", "set blue in a one again"]) == 0
    text = capsys.readouterr().out
    assert "sentiment score:" in text and "face:  15/15 frames" in text
    assert "audio: yes" in text and "text:  yes" in text

    assert cli(["predict", str(video), "--checkpoint", str(run_dir / "best.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert np.isfinite(result["score"]) and result["mode"] == "features"
    assert result["n_frames"] == 15 and result["n_face_frames"] == 15
    assert result["has_audio"] is True and result["has_text"] is False  # no --text: text missing


def test_predict_video_without_audio(run_dir, shared_data, tmp_path, capsys):
    video = media.make_video_without_audio(shared_data / "raw" / "grid" / "sbia1a.mpg", tmp_path / "silent.mpg")
    assert cli(["predict", str(video), "--checkpoint", str(run_dir), "--json", "--text", "set blue"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert np.isfinite(result["score"]) and result["has_audio"] is False and result["has_text"] is True


@pytest.mark.parametrize("make, reason", [
    (lambda d, src: media.make_zero_bytes(d / "zero.mp4"), "0 bytes"),
    (lambda d, src: media.make_text_as_video(d / "notes.mp4"), "cannot be used"),
    (lambda d, src: media.make_truncated(src, d / "cut.mpg", fraction=0.002), "cannot be used"),
])
def test_unusable_video_is_a_clear_error(make, reason, run_dir, shared_data, tmp_path, capsys):
    video = make(tmp_path, shared_data / "raw" / "grid" / "sbia1a.mpg")
    assert cli(["predict", str(video), "--checkpoint", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert str(video) in err and reason in err, err


def test_missing_checkpoint_is_a_clear_error(shared_data, tmp_path, capsys):
    video = shared_data / "raw" / "grid" / "sbia1a.mpg"
    assert cli(["predict", str(video), "--checkpoint", str(tmp_path)]) == 2
    assert "config.json not found" in capsys.readouterr().err
