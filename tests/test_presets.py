"""The dataset presets against the released EMT-DLFR configuration (config/config_regression.py,
run_once.py, models/missingTask/EMT_DLFR.py of sunlicai/EMT-DLFR)."""

from __future__ import annotations

import torch
from torch import nn

from msaflow.model.config import RATE_GRIDS, for_dataset, max_rate, rate_grid
from msaflow.model.encoders import SequenceEncoder, build_sequence_encoders
from msaflow.pipeline.training import protocols
from msaflow.pipeline.training.text_cache import COARSE_GRID


def test_sims_preset_has_the_released_dropouts_and_widths():
    model, optim = for_dataset("sims")
    assert (model.attn_dropout, model.ffn_dropout, model.head_dropout) == (0.0, 0.0, 0.0)
    assert (model.d_model, model.n_layers, model.audio_lstm_hidden, model.vision_lstm_hidden) == (32, 4, 16, 32)
    assert (model.w_att, model.w_rec) == (0.5, 0.5)
    assert (optim.lr_text, optim.wd_audio, optim.wd_vision, optim.wd_other) == (2e-5, 0.0, 0.0, 0.0)


def test_mosi_and_mosei_presets_keep_their_released_dropouts():
    mosi, _ = for_dataset("mosi")
    assert (mosi.attn_dropout, mosi.ffn_dropout, mosi.head_dropout) == (0.3, 0.1, 0.3)
    mosei, _ = for_dataset("mosei")
    assert (mosei.attn_dropout, mosei.ffn_dropout, mosei.head_dropout, mosei.head_dim) == (0.0, 0.0, 0.0, 128)


def test_every_preset_selects_on_the_total_validation_loss_as_released():
    # MOSEI too: the dataset config's KeyEval 'Loss' overrides run_once.sh's --KeyEval 'Loss(pred_m)'
    for name in ("mosi", "mosei", "sims"):
        assert for_dataset(name)[1].select_on == "loss", name


def test_sims_rate_grid_is_0_to_0_5_by_default():
    assert rate_grid("sims") == "0.0:0.5:0.1" and max_rate("sims") == 0.5
    assert RATE_GRIDS["mosi"] == RATE_GRIDS["mosei"] == "0.0:1.0:0.1"
    run = {"protocol": "single-model", "dataset": "sims", "text_cache": ""}
    assert protocols.scored_rates(run) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert protocols.scored_rates({**run, "dataset": "mosi"}) == [round(0.1 * i, 1) for i in range(11)]
    assert protocols.default_valid_rates("single-model", "sims", 0.0) == [0.0, 0.2, 0.4]
    assert protocols.default_valid_rates("single-model", "mosi", 0.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    g = torch.Generator().manual_seed(0)
    drawn = [protocols.train_rate(run, g, COARSE_GRID) for _ in range(200)]
    assert max(drawn) <= 0.5 and max(drawn) > 0.4
    cached = [protocols.train_rate({**run, "text_cache": "x"}, g, COARSE_GRID) for _ in range(100)]
    assert set(cached) == {0.0, 0.2, 0.4}
    assert protocols.cached_train_rates(run, COARSE_GRID) == [0.0, 0.2, 0.4]


def test_mosi_single_model_rate_draw_is_unchanged():
    """r ~ U[0, 1] with the same generator draws as before the SIMS grid existed (bit-identical runs)."""
    run = {"protocol": "single-model", "dataset": "mosi", "text_cache": ""}
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [protocols.train_rate(run, a, COARSE_GRID) for _ in range(5)] == \
        [float(torch.rand((), generator=b)) for _ in range(5)]
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    cached = {**run, "text_cache": "x"}
    assert [protocols.train_rate(cached, a, COARSE_GRID) for _ in range(5)] == \
        [COARSE_GRID[int(torch.randint(len(COARSE_GRID), (), generator=b))] for _ in range(5)]


def test_lstm_encoder_uses_identity_where_widths_match():
    assert isinstance(SequenceEncoder(5, 16, 16).linear, nn.Identity)
    assert isinstance(SequenceEncoder(5, 32, 16).linear, nn.Linear)
    mosi, _ = for_dataset("mosi", modalities=("audio", "vision"))
    enc = build_sequence_encoders(mosi)
    assert isinstance(enc["audio"].linear, nn.Linear) and isinstance(enc["vision"].linear, nn.Linear)  # 32->16, 64->32
    same, _ = for_dataset("mosi", modalities=("audio",), audio_lstm_hidden=16, audio_out=16)
    enc = build_sequence_encoders(same)["audio"]
    assert isinstance(enc.linear, nn.Identity) and not any("linear" in n for n, _ in enc.named_parameters())
    out = enc(torch.randn(3, 4, same.d_audio), torch.tensor([4, 2, 1]))
    assert out.utterance.shape == (3, 16) and out.local.shape == (3, 4, 16)
