"""End-to-end mode: real pretrained front-ends (FER, CREPE tiny) on raw members of real GRID clips.

The raw members come from the product's own extraction (`ClipExtractor`, 1.5 s of each clip
at 10 fps to stay fast), the batches from the shard loader's collation, the fusion model is EMT-DLFR (small
width) with the packaged MiniLM text encoder kept frozen.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from msaflow.model.config import ModelConfig, OptimConfig
from msaflow.model.end_to_end import EndToEnd, EndToEndConfig, FrontEndPolicy, build_end_to_end
from msaflow.model.registry import build_model

GRID_CLIPS = ("bbaf2n", "lbax4n")  # "bin blue at f two now", "lay blue at x four now"
SMALL = dict(d_model=32, n_layers=1, n_heads=2, head_dim=32, attn_dropout=0.0, ffn_dropout=0.0, head_dropout=0.0,
             freeze_text=True)


@pytest.fixture(scope="module")
def grid_members(shared_data, tmp_path_factory):
    """Raw-mode members of two GRID clips, extracted by `msaflow extract`'s per-clip code."""
    from msaflow.extractors.clip import ClipExtractor, ClipJob
    from msaflow.pipeline.extraction.settings import ExtractConfig
    from msaflow.tario import read_sample_tar

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("grid_raw")
    extractor = ClipExtractor(ExtractConfig(fps=10, detect_every=5), device="cpu")
    members = []
    for i, name in enumerate(GRID_CLIPS):
        path = shared_data / "raw" / "grid" / f"{name}.mpg"
        job = ClipJob(row=i + 1, id=f"grid/{name}", key=f"grid_{name}", video_id="grid", clip_id=name,
                      path=str(path), start=0.5, end=2.0, text=_grid_sentence(name), label=float(i) - 0.5,
                      split="train")
        extractor.extract(job, out)
        members.append(read_sample_tar(out / "clips" / f"{job.key}.tar")[1])
    return members


def _grid_sentence(name: str) -> str:
    return {"bbaf2n": "bin blue at f two now", "lbax4n": "lay blue at x four now"}[name]


def raw_batch(members: list[dict]) -> dict:
    """The loader's raw-mode batch for these clips."""
    from msaflow.pipeline.data.loader import collate
    from msaflow.pipeline.data.shard_index import MODE_LAYOUTS
    from msaflow.pipeline.data.shard_reader import Sample

    samples = [Sample(m["json"]["id"], m["json"], {k: m[k] for k in MODE_LAYOUTS["raw"].members}, 1.0)
               for m in members]
    return collate(samples, MODE_LAYOUTS["raw"].members)


def small_model(policies: dict | None = None, **e2e) -> EndToEnd:
    torch.manual_seed(0)
    cfg = EndToEndConfig(frontends={"vision": "fer", "audio": "crepe-tiny"}, policies=policies or {},
                         **e2e)
    return build_end_to_end(replace(ModelConfig(), **SMALL), cfg)


def one_step(model: EndToEnd, batch: dict, rate: float = 0.3) -> tuple[float, torch.optim.Optimizer]:
    optimizer = torch.optim.Adam(model.param_groups(OptimConfig()))
    incomplete = model.simulate_missing(batch, rate, generator=torch.Generator().manual_seed(1))
    loss, _ = model.compute_loss(batch, incomplete)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), optimizer


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_members_are_real(grid_members):
    for m in grid_members:
        assert m["face.npy"].shape[0] == 15 and m["vision_mask.npy"].mean() >= 0.95
        assert m["fbank.npy"].shape[0] == 150 and m["audio_mask.npy"].all()
        assert m["json"]["has_audio"] and m["wav.npy"].dtype == np.int16


def test_policy_parsing():
    assert FrontEndPolicy.parse("frozen").unfreeze_after is None
    assert FrontEndPolicy.parse("trained").trainable_at(0)
    p = FrontEndPolicy.parse("unfreeze_after: 2")
    assert not p.trainable_at(1) and p.trainable_at(2)
    assert FrontEndPolicy.parse({"unfreeze_after": 1}) == FrontEndPolicy(1)
    with pytest.raises(ValueError, match="unfreeze_after: N"):
        FrontEndPolicy.parse("sometimes")
    with pytest.raises(ValueError, match="no front-end for it"):
        EndToEndConfig(frontends={"vision": "fer"}, policies={"audio": "trained"})
    with pytest.raises(ValueError, match="text is read by the fusion model"):
        EndToEndConfig(frontends={"text": "minilm"})


def test_frozen_frontends_get_no_gradient_and_stay_identical(grid_members):
    model = small_model()
    model.train()
    before = state(model.frontends)
    fusion_before = state(model.fusion)
    loss, _ = one_step(model, raw_batch(grid_members))
    assert np.isfinite(loss)
    assert all(p.grad is None for p in model.frontends.parameters())
    after = state(model.frontends)
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    changed = [k for k, v in state(model.fusion).items() if not torch.equal(v, fusion_before[k])]
    assert any(k.startswith("seq_encoders.vision") for k in changed)
    assert any(k.startswith("seq_encoders.audio") for k in changed)


def test_trained_frontends_change(grid_members):
    model = small_model({"vision": "trained", "audio": "trained"}, lr={"vision": 1e-3, "audio": 1e-3})
    model.train()
    before = state(model.frontends)
    one_step(model, raw_batch(grid_members))
    for m in ("vision", "audio"):
        grads = [p.grad for p in model.frontends[m].parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), m
        moved = [k for k, v in state(model.frontends[m]).items()
                 if v.is_floating_point() and not torch.equal(v, before[f"{m}.{k}"])]
        assert len(moved) > 10, m
    names = [g["name"] for g in model.param_groups(OptimConfig())]
    assert {"frontend_vision", "frontend_audio", "other"} <= set(names)
    lrs = {g["name"]: g["lr"] for g in model.param_groups(OptimConfig())}
    assert lrs["frontend_vision"] == 1e-3 and lrs["other"] == OptimConfig().lr_other


def test_unfreeze_after_one_epoch(grid_members):
    model = small_model({"vision": "unfreeze_after: 1"})
    model.train()
    assert not model.trainable("vision") and not model.frontends["vision"].training
    optimizer = torch.optim.Adam(model.param_groups(OptimConfig()))  # built once, before unfreezing
    batch = raw_batch(grid_members)
    before = state(model.frontends["vision"])
    for epoch in range(2):
        model.on_epoch_start(epoch)
        optimizer.zero_grad(set_to_none=True)
        incomplete = model.simulate_missing(batch, 0.3, generator=torch.Generator().manual_seed(epoch))
        model.compute_loss(batch, incomplete)[0].backward()
        optimizer.step()
        after = state(model.frontends["vision"])
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same == (epoch == 0), f"epoch {epoch}"
    assert model.trainable("vision") and model.frontends["vision"].training
    assert not model.trainable("audio")  # no policy: frozen for good


def test_frozen_features_equal_features_mode_extraction(grid_members):
    """The wrapper's chunked front-end pass = `msaflow extract --mode features` on the same clips."""
    from msaflow.extractors.frontends import raw_to_features

    model = small_model(chunk_frames=7)  # chunks that do not divide the clip: boundaries are exercised
    model.eval()
    with torch.no_grad():
        feats = model.features(raw_batch(grid_members))
    frontends = dict(model.frontends)
    for i, m in enumerate(grid_members):
        expected = raw_to_features(m, frontends)
        for key in ("vision", "audio"):
            got = feats[key][i, : len(expected[f"{key}.npy"])].numpy()
            np.testing.assert_allclose(got, expected[f"{key}.npy"], rtol=1e-4, atol=1e-4, err_msg=key)
            assert np.array_equal(feats[f"{key}_present"][i].numpy(), expected[f"{key}_mask.npy"])


def bf16_vs_fp32_losses(batch) -> dict[bool, float]:
    losses = {}
    for bf16 in (False, True):
        model = small_model({"vision": "trained", "audio": "trained"}, bf16=bf16)
        model.eval()  # no dropout: the two runs differ only by precision
        incomplete = model.simulate_missing(batch, 0.3, generator=torch.Generator().manual_seed(1))
        loss, logs = model.compute_loss(batch, incomplete)
        loss.backward()
        assert loss.dtype == torch.float32 and np.isfinite(float(loss.detach()))
        losses[bf16] = float(loss.detach())
    return losses


def test_bf16_loss_close_to_fp32_or_refused(grid_members):
    """Whatever this CPU is: bf16 trains close to fp32, or is refused up front with a clear message."""
    from msaflow.model.end_to_end import Bf16Unsupported, cpu_bf16_problem

    batch = raw_batch(grid_members)
    if cpu_bf16_problem() is not None:
        with pytest.raises(Bf16Unsupported, match="--bf16 on this CPU"):
            bf16_vs_fp32_losses(batch)
        return
    losses = bf16_vs_fp32_losses(batch)
    # bfloat16 keeps 8 mantissa bits (~0.4% per op); through CNN + LSTM + attention we allow 5%
    assert abs(losses[True] - losses[False]) <= 0.05 * abs(losses[False]), losses


def test_bf16_on_a_cpu_without_avx512(grid_members, tmp_path):
    """oneDNN limited to AVX2 (as on CPUs without AVX-512) has no bf16 LSTM; the encoders keep it in fp32."""
    script = tmp_path / "bf16_avx2.py"
    script.write_text(
        "import torch\n"
        "from torch import nn\n"
        "from msaflow.model.encoders import SequenceEncoder\n"
        "lstm, x = nn.LSTM(8, 16, batch_first=True), torch.randn(2, 5, 8)\n"
        "try:\n"
        "    with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "        lstm(x)\n"
        "    print('plain LSTM ok')\n"
        "except RuntimeError:\n"
        "    print('plain LSTM fails')\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    out = SequenceEncoder(8, 16, 4)(x, torch.tensor([5, 3]))\n"
        "assert torch.isfinite(out.utterance.float()).all()\n"
        "print('encoder ok')\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "encoder ok" in done.stdout
    # the emulation must really remove the bf16 LSTM, or this test proves nothing
    assert "plain LSTM fails" in done.stdout, done.stdout


def test_checkpointing_gives_identical_loss_gradients_and_statistics(grid_members):
    batch = raw_batch(grid_members)
    runs = {}
    for ckpt in (False, True):
        model = small_model({"vision": "trained", "audio": "trained"}, checkpoint=ckpt, chunk_frames=64)
        model.train()  # BatchNorm in training mode: recomputation must not count the batch twice
        torch.manual_seed(3)
        incomplete = model.simulate_missing(batch, 0.3, generator=torch.Generator().manual_seed(1))
        loss, _ = model.compute_loss(batch, incomplete)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.frontends.named_parameters() if p.grad is not None}
        buffers = {n: b.clone() for n, b in model.frontends.named_buffers()}
        runs[ckpt] = (float(loss.detach()), grads, buffers)
    assert runs[True][0] == runs[False][0]
    assert runs[True][1].keys() == runs[False][1].keys() and runs[True][1]
    for n, g in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][n], g, rtol=1e-5, atol=1e-7, msg=n)
    for n, b in runs[False][2].items():
        assert torch.equal(runs[True][2][n], b), n


def test_registered_build_and_forward(grid_members):
    cfg = replace(ModelConfig(), **SMALL,
                  extra={"end_to_end": {"fusion": "emt", "frontends": {"face": "fer"}, "chunk_frames": 32}})
    model = build_model("end-to-end", cfg)
    assert isinstance(model, EndToEnd) and model.fusion.cfg.modalities == ("text", "vision")
    model.eval()
    with torch.no_grad():
        out = model(raw_batch(grid_members))
    assert out["pred"].shape == (2,) and torch.isfinite(out["pred"]).all()
    # a state dict round-trips into a fresh build (what a checkpoint holds)
    clone = build_model("end-to-end", copy.deepcopy(cfg))
    clone.load_state_dict(model.state_dict())
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(raw_batch(grid_members))["pred"], out["pred"])


def test_dropped_steps_zero_the_frontend_outputs(grid_members):
    model = small_model()
    model.eval()
    batch = raw_batch(grid_members)
    incomplete = model.simulate_missing(batch, 0.5, seed=0)
    assert incomplete["vision_missing"].any() and incomplete["audio_missing"].any()
    assert torch.equal(incomplete["face"], batch["face"])  # raw members untouched
    assert (incomplete["text_ids"] == 100).any()  # [UNK]
    from msaflow.model.end_to_end import drop_features

    with torch.no_grad():
        feats = model.features(batch)
    dropped = drop_features(feats, incomplete)
    for m in ("vision", "audio"):
        miss = incomplete[f"{m}_missing"]
        assert (dropped[m][miss] == 0).all() and torch.equal(dropped[m][~miss], feats[m][~miss])
    # seeded masks are the per-sample masks of features mode (same ids, same step axes)
    from msaflow.model.missing import simulate_missing

    feat_view = simulate_missing(feats, 0.5, seed=0)
    for m in ("text", "vision", "audio"):
        assert torch.equal(feat_view[f"{m}_missing"], incomplete[f"{m}_missing"]), m


def test_raw_view_without_step_masks_is_refused(grid_members):
    from msaflow.model.missing import simulate_missing

    model = small_model()
    batch = raw_batch(grid_members)
    text_only_view = simulate_missing(batch, 0.5, seed=0)  # sees no `audio`/`vision` keys: drops text only
    with pytest.raises(KeyError, match="EndToEnd.simulate_missing"):
        model.compute_loss(batch, text_only_view)


def test_simulation_has_the_features_mode_signature(grid_members):
    """The training loop calls `model.simulate_missing(batch, rate, unk_id=..., generator=... | seed=...)`."""
    model = small_model()
    batch = raw_batch(grid_members)
    a = model.simulate_missing(batch, 0.4, unk_id=100, seed=3)
    b = model.simulate_missing(batch, 0.4, unk_id=100, generator=torch.Generator().manual_seed(0))
    assert {"text_missing", "audio_missing", "vision_missing"} <= set(a) & set(b)
    assert not torch.equal(a["audio_missing"], b["audio_missing"])
