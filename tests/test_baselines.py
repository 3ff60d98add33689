"""Baselines on a tiny batch of real CMU-MOSI (text ids + COVAREP audio from the MMSA pickle)."""

from __future__ import annotations

import json

import pytest
import torch

from msaflow.model.config import for_dataset
from msaflow.model.missing import simulate_missing
from msaflow.model.registry import available_models, build_model
from msaflow.pipeline.data.mmsa_pickle import load_mmsa_pickle

BASELINES = ("text-only", "late-fusion", "tfn-style", "lmf-style", "gated")  # DynMM: below, from trained experts
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


def test_tfn_and_lmf_are_named_style_variants():
    models = available_models()
    assert {"tfn-style", "lmf-style"} <= set(models) and not {"tfn", "lmf"} & set(models)


# ---------------------------------------------------------------- DynMM as released: two stages


def save_run(folder, name: str, model) -> str:
    """A run folder as `msaflow train` leaves it, as far as a DynMM expert needs: config.json + best.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model": name, "model_config": model.cfg.to_dict()}))
    torch.save(model.state_dict(), folder / "best.pt")
    return str(folder)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Stage 1: a text-only and a late-fusion run folder (weights from a seeded init)."""
    root = tmp_path_factory.mktemp("experts")
    torch.manual_seed(1)
    cheap = build_model("text-only", config())
    expensive = build_model("late-fusion", config())
    return {"cheap": save_run(root / "text-only", "text-only", cheap),
            "expensive": save_run(root / "late-fusion", "late-fusion", expensive)}


@pytest.fixture
def batch(real_batch, text_states):
    return {**only(real_batch, ("text", "audio")), "text": text_states}


def dynmm(experts, **extra):
    torch.manual_seed(0)
    return build_model("dynmm", config(dynmm_experts=experts, **extra))


def test_dynmm_needs_its_experts(tmp_path):
    with pytest.raises(ValueError, match="needs trained experts"):
        build_model("dynmm", config())
    with pytest.raises(FileNotFoundError, match="not a finished training run"):
        build_model("dynmm", config(dynmm_experts={"cheap": str(tmp_path), "expensive": str(tmp_path)}))


def test_dynmm_experts_load_from_run_folders_and_stay_frozen(experts, batch):
    model = dynmm(experts)
    saved = torch.load(f"{experts['expensive']}/best.pt", weights_only=True)
    for k, v in model.expensive.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    assert not [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("gate.")]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(p for g in model.param_groups(for_dataset("mosi")[1]) for p in g["params"])
    model.train()
    assert not model.cheap.training and not model.expensive.training  # frozen experts: no dropout
    loss, _ = model.compute_loss(batch, simulate_missing(batch, 0.3, seed=1))
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = sorted({k.split(".")[0] for k in after if not torch.equal(after[k], before[k])})
    assert changed == ["gate"]
    # fine-tuning the experts too (dynmm_freeze: false): their encoders join the released groups
    tuned = dynmm(experts, dynmm_freeze=False)
    groups = {g["name"]: len(g["params"]) for g in tuned.param_groups(for_dataset("mosi")[1])}
    assert groups.get("audio") and groups.get("other") and tuned.expensive.training is tuned.training


@pytest.mark.parametrize("hard", [False, True])
def test_dynmm_gate_is_the_same_function_in_training_and_at_test(experts, batch, hard):
    model = dynmm(experts, dynmm_hard=hard, dynmm_tau=0.5)
    with torch.no_grad():  # centre the gate: about half of the samples to each expert
        logits = model.gate(model.gate_inputs(batch))
        model.gate[-1].weight.mul_(10.0)
        model.gate[-1].bias.copy_(torch.tensor([0.0, -10.0 * float((logits[:, 1] - logits[:, 0]).median())]))
    model.train()
    w_train = model.weights(batch)
    out_train = model(batch)  # gradients on: the straight-through path, both experts on every sample
    model.eval()
    with torch.no_grad():
        w_test = model.weights(batch)
        out_test = model(batch)  # hard: the expensive expert only where its weight is 1
    torch.testing.assert_close(w_train, w_test)
    torch.testing.assert_close(out_train["pred"], out_test["pred"])
    expected = (model.gate(model.gate_inputs(batch)) / 0.5).softmax(-1)  # softmax with temperature, no noise
    if hard:
        expected = torch.nn.functional.one_hot(expected.argmax(-1), 2).float()
    torch.testing.assert_close(w_test, expected)
    share = float(out_test["report"]["expensive_share"])
    assert share == pytest.approx(float((expected[:, 1] > expected[:, 0]).float().mean()))
    assert 0.0 < share < 1.0  # both experts in use: the test says something


def train_gate(model, batch, steps: int = 25) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for step in range(steps):
        loss, logs = model.compute_loss(batch, simulate_missing(batch, 0.3, seed=step))
        assert logs["loss"] == pytest.approx(logs["l1"] + model.lam * logs["expensive_weight"], rel=1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_dynmm_large_lambda_never_uses_the_expensive_expert_and_saves_its_flops(experts, batch):
    from msaflow.model.dynmm import baseline_flops

    penalised = dynmm(experts, dynmm_hard=True, dynmm_lambda=100.0)
    train_gate(penalised, batch)
    always = dynmm(experts, dynmm_hard=True)
    with torch.no_grad():
        always.gate[-1].bias.copy_(torch.tensor([-1e4, 1e4]))  # every sample to the multimodal expert
    penalised.eval(), always.eval()
    with torch.no_grad():
        cheap_only, full = penalised(batch)["report"], always(batch)["report"]
        cheap_pred = penalised.cheap(batch)["pred"]
        torch.testing.assert_close(penalised(batch)["pred"], cheap_pred)
    assert float(cheap_only["expensive_share"]) == 0.0 and float(full["expensive_share"]) == 1.0
    # the executed FLOPs drop by what the expensive expert adds beyond the shared frozen text encoder
    exclusive = baseline_flops(always.expensive, batch, shared_text=True).mean().item() / 1e6
    assert penalised.shared_text
    assert float(full["mflops_per_sample"]) - float(cheap_only["mflops_per_sample"]) == pytest.approx(exclusive)
    assert float(cheap_only["mflops_saved"]) > float(full["mflops_saved"])
    # DynMM's own count (mean weight x each expert's FLOPs, encoders counted per expert)
    cheap_alone = baseline_flops(penalised.cheap, batch).mean().item() / 1e6
    assert float(cheap_only["mflops_dynmm_count"]) == pytest.approx(cheap_alone)
    assert float(full["mflops_dynmm_count"]) == pytest.approx(float(full["mflops_expensive_alone"]))


def test_flops_of_the_text_encoder_match_torchs_flop_counter(experts):
    from msaflow.model.dynmm import module_flops, text_encoder_flops

    encoder = build_model("text-only", config()).text_encoder
    ids = torch.randint(1000, 2000, (1, 24))
    counted = module_flops(lambda: encoder.model(input_ids=ids, attention_mask=torch.ones_like(ids)))
    assert float(text_encoder_flops(encoder, torch.tensor([24]))) == pytest.approx(counted, rel=0.02)


def test_dynmm_seeds_pool_in_evaluate_despite_their_own_experts(experts):
    from msaflow.model.dynmm import pooling_view

    cfg = config(dynmm_experts=experts).to_dict()
    other = config(dynmm_experts={"cheap": experts["cheap"], "expensive": experts["expensive"] + "-other-seed"}).to_dict()
    assert pooling_view(cfg)["extra"]["dynmm_experts"] == {"cheap": "text-only", "expensive": "late-fusion"}
    assert pooling_view(cfg) != pooling_view(other)  # an unreadable expert folder is compared by its path
