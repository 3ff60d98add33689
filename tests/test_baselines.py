"""Baselines on a tiny batch of real CMU-MOSI (text ids + COVAREP audio from the MMSA pickle)."""

from __future__ import annotations

import pytest
import torch

from msaflow.model.config import for_dataset
from msaflow.model.missing import simulate_missing
from msaflow.model.registry import available_models, build_model
from msaflow.pipeline.mmsa_pickle import load_mmsa_pickle

BASELINES = ("text-only", "late-fusion", "tfn", "lmf", "gated", "dynmm")
N = 16


@pytest.fixture(scope="module")
def mosi(shared_data):
    return load_mmsa_pickle(shared_data / "mosi_utt" / "mosi_utt_ta.pkl")


@pytest.fixture(scope="module")
def real_batch(mosi):
    """16 real training utterances; `vision` is a stand-in built from the real audio features
    (this release has no usable visual features) so three-modality code paths run too."""
    batch = mosi["train"].batch(list(range(N)))
    audio = batch["audio"][:, 0]
    batch["vision"] = torch.stack([audio[:, :20], audio[:, 20:40], audio[:, 40:60]], dim=1)
    batch["vision_lengths"] = torch.tensor([3, 2, 1, 3] * (N // 4))
    batch["vision_present"] = torch.arange(3)[None, :] < batch["vision_lengths"][:, None]
    batch["vision"] = batch["vision"] * batch["vision_present"][..., None]
    return batch


def config(modalities=("text", "audio"), **extra):
    cfg, _ = for_dataset("mosi", modalities=modalities, d_audio=73, d_vision=20, freeze_text=True)
    cfg.extra.update(extra)
    return cfg


@pytest.fixture(scope="module")
def text_states(real_batch):
    """Frozen MiniLM states of the batch, computed once (features mode for the training tests)."""
    model = build_model("text-only", config(("text",)))
    with torch.no_grad():
        return model.text_encoder.states(real_batch)


def only(batch: dict, modalities) -> dict:
    drop = {"text": ("text_ids", "text_lengths", "text"), "audio": ("audio", "audio_lengths", "audio_present"),
            "vision": ("vision", "vision_lengths", "vision_present")}
    out = dict(batch)
    for m, keys in drop.items():
        if m not in modalities:
            for k in keys:
                out.pop(k, None)
    return out


def test_all_baselines_registered():
    assert set(BASELINES) <= set(available_models())


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_trains_on_real_mosi(name, real_batch, text_states):
    torch.manual_seed(0)
    model = build_model(name, config())
    batch = {**only(real_batch, ("text", "audio")), "text": text_states}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for step in range(15):
        incomplete = simulate_missing(batch, 0.3, seed=step)
        loss, logs = model.compute_loss(batch, incomplete)
        assert torch.isfinite(loss) and logs["l1"] >= 0
        opt.zero_grad()
        loss.backward()
        if step == 0:
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            assert trainable and not any(n.startswith("text_encoder.") for n in trainable)  # frozen encoder
            # (a zero gradient is legitimate for the LSTM's hidden-to-hidden weights: this audio has one step)
            no_grad = [n for n, p in trainable.items() if p.grad is None]
            assert no_grad == [], f"{name}: no gradient reaches {no_grad}"
        opt.step()
        losses.append(logs["l1"])
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, f"{name} did not fit a tiny real batch: {losses}"
    model.eval()
    out = model(simulate_missing(batch, 0.5, seed=99))
    assert out["pred"].shape == (N,) and torch.all(torch.isfinite(out["pred"]))


SUBSETS = [("text",), ("audio",), ("vision",), ("text", "audio"), ("audio", "vision"), ("text", "audio", "vision")]


@pytest.mark.parametrize("name", [b for b in BASELINES if b != "text-only"])
def test_any_modality_subset(name, real_batch, text_states):
    for modalities in SUBSETS:
        torch.manual_seed(0)
        model = build_model(name, config(modalities))
        batch = only({**real_batch, "text": text_states}, modalities)
        model.train()
        loss, _ = model.compute_loss(batch, simulate_missing(batch, 0.5, seed=1))
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert torch.isfinite(loss) and not missing, (modalities, missing)
        model.eval()
        assert model(batch)["pred"].shape == (N,)


def test_text_only_needs_text_and_models_reject_a_missing_modality(real_batch):
    with pytest.raises(ValueError, match="text-only needs the text modality"):
        build_model("text-only", config(("audio",)))
    model = build_model("late-fusion", config(("audio", "vision")))
    with pytest.raises(KeyError, match="batch lacks modalities"):
        model(only(real_batch, ("audio",)))


def test_dynmm_hard_routing_at_eval(real_batch, text_states):
    torch.manual_seed(0)
    model = build_model("dynmm", config())
    batch = {**only(real_batch, ("text", "audio")), "text": text_states}
    model.eval()
    out = model(batch)
    assert 0.0 <= float(out["expensive_share"]) <= 1.0
    assert float(out["expensive_share"]) == pytest.approx(out["route"].float().mean().item())
    gate_bias = model.gate[-1].bias
    with torch.no_grad():
        gate_bias.copy_(torch.tensor([1e4, -1e4]))  # everything to the cheap text expert
        cheap = model(batch)
        gate_bias.copy_(torch.tensor([-1e4, 1e4]))  # everything to the multimodal expert
        full = model(batch)
        vectors = model.utterances(batch)
    assert float(cheap["expensive_share"]) == 0.0 and float(full["expensive_share"]) == 1.0
    torch.testing.assert_close(cheap["pred"], model.cheap(vectors["text"]).squeeze(-1))
    torch.testing.assert_close(full["pred"], model.expensive(vectors))


def dynmm_routing_after_training(lam: float, batch: dict) -> tuple[float, float]:
    """(hard share routed to the expensive expert, mean gate probability of it) after 15 steps."""
    torch.manual_seed(0)
    model = build_model("dynmm", config(dynmm_lambda=lam))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(15):
        loss, _ = model.compute_loss(batch, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        share = float(model(batch)["expensive_share"])
        text = model.utterances(batch, ("text",))["text"]
        prob = model.gate(model.gate_inputs(batch, text)).softmax(-1)[:, 1].mean()
    return share, float(prob)


def test_dynmm_compute_penalty_lowers_the_expensive_share(real_batch, text_states):
    batch = {**only(real_batch, ("text", "audio")), "text": text_states}
    (free_share, free_prob), (pen_share, pen_prob) = (dynmm_routing_after_training(lam, batch) for lam in (0.0, 5.0))
    assert pen_share == 0.0 and pen_share <= free_share
    assert pen_prob < free_prob / 10, (pen_prob, free_prob)  # the penalty drives the gate to the cheap expert
