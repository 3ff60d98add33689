"""EMT and its local-local variants: shapes, masking, sharing switches, cost growth."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model_helpers import mosi_batch, tiny_config
from msaflow.model.emt import Attention, sinusoidal_positions
from msaflow.model.registry import available_models, build_model


@pytest.fixture(scope="module")
def batch(shared_data):
    return mosi_batch(shared_data, n=6)


@pytest.fixture(scope="module")
def text_model():
    """One text-encoder load for the module: models below share its weights through the frozen `text` states."""
    return build_model("emt", tiny_config(freeze_text=True))


def with_states(batch, text_model):
    with torch.no_grad():
        return dict(batch, text=text_model.text_encoder.states(batch))


def test_every_emt_variant_is_registered():
    assert {"emt", "emt-dlfr", "emt-one-to-one", "emt-one-to-all"} <= set(available_models())


@pytest.mark.parametrize("name", ["emt", "emt-dlfr", "emt-one-to-one", "emt-one-to-all"])
def test_variants_predict_one_score_per_sample(name, batch, text_model):
    torch.manual_seed(0)
    model = build_model(name, tiny_config(freeze_text=True)).eval()
    out = model(with_states(batch, text_model))
    assert out["pred"].shape == (6,) and torch.isfinite(out["pred"]).all()


@pytest.mark.parametrize("modalities", [("text",), ("audio",), ("text", "audio")])
def test_any_modality_subset(modalities, batch, text_model):
    torch.manual_seed(0)
    model = build_model("emt-dlfr", tiny_config(modalities=modalities, freeze_text=True))
    b = with_states(batch, text_model)
    out = model(b)
    assert out["pred"].shape == (6,)
    assert out["global"].shape == (6, len(modalities) * 16)
    loss, logs = model.compute_loss(b, dict(b))
    assert torch.isfinite(loss) and set(k[4:] for k in logs if k.startswith("att_")) == {"global", *modalities}


def test_batch_missing_a_modality_fails_clearly(batch, text_model):
    model = build_model("emt", tiny_config(freeze_text=True))
    b = with_states(batch, text_model)
    del b["audio"]
    with pytest.raises(KeyError, match="audio"):
        model(b)


def test_extra_padding_does_not_change_predictions(batch, text_model):
    """Masks hide padding from every attention: padding a batch wider leaves its predictions unchanged."""
    torch.manual_seed(0)
    model = build_model("emt-dlfr", tiny_config(freeze_text=True)).eval()
    b = with_states(batch, text_model)
    wide = dict(b)
    wide["text"] = torch.cat([b["text"], torch.randn(6, 7, b["text"].shape[-1])], dim=1)
    wide["text_ids"] = torch.cat([b["text_ids"], torch.zeros(6, 7, dtype=torch.long)], dim=1)
    wide["audio"] = torch.cat([b["audio"], torch.randn(6, 3, 73)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(b)["pred"], model(wide)["pred"], atol=1e-5)


def test_empty_transcript_gives_finite_output(batch, text_model):
    """[CLS][SEP] only: no valid local text position, attention over nothing must not produce NaN."""
    model = build_model("emt-dlfr", tiny_config(freeze_text=True)).eval()
    b = with_states(batch, text_model)
    b["text_lengths"] = b["text_lengths"].clone()
    b["text_lengths"][0] = 2
    with torch.no_grad():
        assert torch.isfinite(model(b)["pred"]).all()
    attn = Attention(8, 2, 0.0)
    out = attn(torch.randn(1, 3, 8), torch.randn(1, 4, 8), torch.ones(1, 4, dtype=torch.bool))
    assert torch.isfinite(out).all()


def test_sharing_switches_change_the_number_of_units():
    shared = build_model("emt", tiny_config(modalities=("audio",)))
    separate = build_model("emt", tiny_config(modalities=("audio",), share_layer=False, share_modality=False,
                                              share_direction=False))
    assert len(shared.mpus.units) == 1
    assert len(separate.mpus.units) == 2 * 1 * 2  # layers x modalities x directions
    assert len(separate.pools) == 2 and len(shared.pools) == 1
    per_layer = build_model("emt", tiny_config(modalities=("audio",), share_layer=False))
    assert len(per_layer.mpus.units) == 2


def test_sinusoidal_positions():
    table = sinusoidal_positions(10, 6)
    assert table.shape == (10, 6)
    assert torch.allclose(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    assert torch.allclose(table[3, 0], torch.sin(torch.tensor(3.0)))


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model_cost.py"
    spec = importlib.util.spec_from_file_location("bench_model_cost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fusion_flops(name: str, t: int) -> int:
    bench = _bench_module()
    synthetic_batch, synthetic_config = bench.synthetic_batch, bench.synthetic_config
    model = build_model(name, synthetic_config(d_model=32, n_layers=1)).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(synthetic_batch(2, t))
    return counter.get_total_flops()


def test_emt_grows_slower_than_local_local():
    """O(M·T²) vs O(M²·T²): at equal width/depth EMT needs well under half the FLOPs of one-to-one at T=200."""
    emt, one_to_one, one_to_all = (_fusion_flops(n, 200) for n in ("emt", "emt-one-to-one", "emt-one-to-all"))
    assert emt < 0.5 * one_to_one < one_to_all
