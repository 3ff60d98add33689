"""DLFR losses and EMT-DLFR training behaviour on real CMU-MOSI batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_helpers import mosi_batch, tiny_config
from msaflow.model.dlfr import attraction_loss, reconstruction_loss
from msaflow.model.missing import simulate_missing
from msaflow.model.registry import build_model


def test_reconstruction_counts_dropped_positions_only():
    torch.manual_seed(0)
    target = torch.randn(2, 5, 3)
    pred = target.clone()
    dropped = torch.zeros(2, 5, dtype=torch.bool)
    dropped[0, 1] = dropped[1, 3] = True
    pred[0, 1] += torch.tensor([1.0, 0.2, -3.0])  # errors at the dropped positions
    pred[1, 3] += torch.tensor([0.0, 0.5, 0.0])
    # hand-computed SmoothL1 (beta 1): 0.5 + 0.02 + 2.5 and 0 + 0.125 + 0, over 2 positions x 3 dims
    expected = (0.5 + 0.02 + 2.5 + 0.125) / (2 * 3 + 1e-6)
    assert abs(float(reconstruction_loss(pred, target, dropped)) - expected) < 1e-5
    pred_far = pred.clone()
    pred_far[~dropped] += 100.0  # kept positions are never part of the loss
    assert torch.equal(reconstruction_loss(pred_far, target, dropped), reconstruction_loss(pred, target, dropped))
    assert float(reconstruction_loss(pred_far, target, torch.zeros_like(dropped))) == 0.0


def test_attraction_stops_gradient_on_targets():
    torch.manual_seed(0)
    p_c, p_i, z_c, z_i = (torch.randn(4, 6, requires_grad=True) for _ in range(4))
    loss = attraction_loss(p_c, p_i, z_c, z_i)
    loss.backward()
    assert p_c.grad is not None and p_i.grad is not None and p_c.grad.abs().sum() > 0
    assert z_c.grad is None and z_i.grad is None
    expected = -0.5 * (F.cosine_similarity(p_i, z_c, dim=-1).mean() + F.cosine_similarity(p_c, z_i, dim=-1).mean())
    assert torch.allclose(loss, expected)


def test_total_loss_is_the_paper_combination(shared_data):
    torch.manual_seed(0)
    cfg = tiny_config(w_att=0.7, w_rec=0.3)
    model = build_model("emt-dlfr", cfg)
    batch = mosi_batch(shared_data, n=8)
    loss, logs = model.compute_loss(batch, simulate_missing(batch, 0.5, seed=1))
    att = sum(v for k, v in logs.items() if k.startswith("att_"))
    rec = sum(v for k, v in logs.items() if k.startswith("rec_"))
    assert set(logs) >= {"att_global", "att_text", "att_audio", "rec_text", "rec_audio"}
    expected = logs["l1"] + 0.7 * (att + logs["l1_complete"]) + 0.3 * rec
    assert abs(loss.item() - expected) < 1e-4


def test_gradients_reach_every_trainable_parameter(shared_data):
    torch.manual_seed(0)
    model = build_model("emt-dlfr", tiny_config())  # text encoder fine-tuned
    batch = mosi_batch(shared_data, n=8)
    incomplete = simulate_missing(batch, 0.5, seed=2)
    assert incomplete["text_missing"].any() and incomplete["audio_missing"].any()
    loss, _ = model.compute_loss(batch, incomplete)
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    # this file's audio is one step per utterance: the LSTM's recurrent weights multiply h0 = 0 and get
    # exactly zero gradient; with longer sequences they get one (checked below on a two-step copy)
    assert batch["audio"].shape[1] == 1 and dead == ["seq_encoders.audio.lstm.weight_hh_l0"], dead
    model.zero_grad()
    two_steps = dict(batch, audio=batch["audio"].repeat(1, 2, 1), audio_lengths=batch["audio_lengths"] * 2)
    loss, _ = model.compute_loss(two_steps, simulate_missing(two_steps, 0.5, seed=2))
    loss.backward()
    assert model.seq_encoders["audio"].lstm.weight_hh_l0.grad.abs().sum() > 0


def test_tiny_model_overfits_a_tiny_batch(shared_data):
    torch.manual_seed(0)
    model = build_model("emt-dlfr", tiny_config(freeze_text=True, head_dropout=0.0))
    batch = mosi_batch(shared_data, n=8)
    with torch.no_grad():  # frozen encoder: compute its states once, as the features mode does
        batch["text"] = model.text_encoder.states(batch)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    first = None
    for step in range(150):
        model.train()
        loss, logs = model.compute_loss(batch, simulate_missing(batch, 0.0, generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else logs["l1"]
    model.eval()
    with torch.no_grad():
        mae = F.l1_loss(model(batch)["pred"], batch["label"]).item()
    assert mae < 0.15 < first, (first, mae)
