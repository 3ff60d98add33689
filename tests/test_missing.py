"""Missing-feature simulation and noise corruption on real CMU-MOSI batches."""

from __future__ import annotations

import pytest
import torch

from model_helpers import mosi_batch
from msaflow.model.missing import add_noise, corrupt, drop_masks, simulate_missing, valid_positions

CLS, SEP, UNK = 101, 102, 100


def test_full_rate_drops_every_valid_token_but_never_cls_sep_or_padding(shared_data):
    batch = mosi_batch(shared_data, n=16)
    out = simulate_missing(batch, 1.0, seed=0)
    ids, new = batch["text_ids"], out["text_ids"]
    lengths = batch["text_lengths"]
    for i in range(len(ids)):
        n = int(lengths[i])
        assert new[i, 0] == ids[i, 0] == CLS
        assert new[i, n - 1] == ids[i, n - 1] == SEP
        assert torch.equal(new[i, n:], ids[i, n:])  # padding untouched
        assert (new[i, 1 : n - 1] == UNK).all()
    assert torch.equal(out["text_missing"], valid_positions(batch, "text"))
    assert (out["audio"] == 0).all()  # every audio step is valid (T=1) and dropped
    assert torch.equal(out["text_lengths"], lengths) and torch.equal(out["audio_lengths"], batch["audio_lengths"])


def test_rate_zero_changes_nothing(shared_data):
    batch = mosi_batch(shared_data)
    out = simulate_missing(batch, 0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out["text_ids"], batch["text_ids"]) and torch.equal(out["audio"], batch["audio"])
    assert not out["text_missing"].any() and not out["audio_missing"].any()


def test_input_batch_is_not_modified(shared_data):
    batch = mosi_batch(shared_data)
    before = batch["text_ids"].clone(), batch["audio"].clone()
    simulate_missing(batch, 0.7, seed=3)
    assert torch.equal(batch["text_ids"], before[0]) and torch.equal(batch["audio"], before[1])


def test_fixed_masks_depend_on_sample_not_on_batch(shared_data):
    """The same sample gets the same mask whatever batch, order or padding width it comes in."""
    big = mosi_batch(shared_data, n=12)
    small = mosi_batch(shared_data, n=3, start=5)  # samples 5..7, padded to a different width
    m_big = drop_masks(big, 0.5, seed=42)["text"]
    m_small = drop_masks(small, 0.5, seed=42)["text"]
    width = min(m_big.shape[1], m_small.shape[1])
    assert torch.equal(m_big[5:8, :width], m_small[:, :width])
    assert not m_big[5:8, width:].any() or m_big.shape[1] == width  # beyond the small width: padding there
    assert not torch.equal(drop_masks(big, 0.5, seed=43)["text"], m_big)


def test_fixed_masks_are_nested_across_rates(shared_data):
    batch = mosi_batch(shared_data, n=32)
    low, high = drop_masks(batch, 0.3, seed=0)["text"], drop_masks(batch, 0.6, seed=0)["text"]
    assert (low <= high).all() and high.sum() > low.sum()


def test_drop_fraction_matches_rate(shared_data):
    batch = mosi_batch(shared_data, n=200)
    valid = valid_positions(batch, "text")
    for rate in (0.1, 0.5, 0.9):
        frac = drop_masks(batch, rate, generator=torch.Generator().manual_seed(0))["text"].sum() / valid.sum()
        assert abs(float(frac) - rate) < 0.03


def test_per_batch_draws_differ(shared_data):
    batch = mosi_batch(shared_data, n=16)
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(drop_masks(batch, 0.5, generator=g)["text"], drop_masks(batch, 0.5, generator=g)["text"])


def test_noise_touches_audio_only_and_scales(shared_data):
    batch = mosi_batch(shared_data, n=16)
    assert torch.equal(add_noise(batch, 0.0, seed=0)["audio"], batch["audio"])
    a = add_noise(batch, 0.5, seed=0)
    b = corrupt(batch, "noise", 1.0, seed=0)
    assert torch.equal(a["text_ids"], batch["text_ids"])
    delta_a, delta_b = a["audio"] - batch["audio"], b["audio"] - batch["audio"]
    assert torch.allclose(2 * delta_a, delta_b, atol=1e-5)  # same per-sample noise, scaled by the level
    assert 0.8 < float(delta_b.std()) < 1.2


def test_bad_rate_and_unknown_corruption_fail_clearly(shared_data):
    batch = mosi_batch(shared_data, n=2)
    with pytest.raises(ValueError, match="missing rate"):
        simulate_missing(batch, 1.5, seed=0)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(batch, "blur", 0.1, seed=0)


def test_a_batch_on_another_device_gets_its_masks_there(shared_data):
    """Masks are drawn on the CPU (one seed, one mask, whatever the device) and land on the
    batch's device; the 'meta' device stands in for a GPU here."""
    batch = mosi_batch(shared_data, n=8)
    on_meta = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in batch.items()}
    for kw in ({"seed": 0}, {"generator": torch.Generator().manual_seed(0)}):
        masks = drop_masks(on_meta, 0.5, **kw)
        assert {m.device.type for m in masks.values()} == {"meta"}
        out = simulate_missing(on_meta, 0.5, **kw)
        assert out["text_ids"].device.type == out["audio"].device.type == "meta"
    assert add_noise(on_meta, 0.5, seed=0)["audio"].device.type == "meta"
