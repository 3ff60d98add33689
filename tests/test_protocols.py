"""The lnln protocol (per-sample, per-modality training rates; tested at 0.0 ... 0.9, averaged) and
the `--paper` switch, on real CMU-MOSI where data is needed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from model_helpers import mosi_path
from msaflow.model.missing import drop_masks, simulate_missing
from msaflow.pipeline.training import protocols
from msaflow.pipeline.cli import main as cli
from msaflow.pipeline.training.text_cache import COARSE_GRID

N, T = 400, 60


def synthetic_batch(n: int = N) -> dict:
    lengths = torch.full((n,), T)
    ids = torch.randint(1000, 2000, (n, T))
    ids[:, 0], ids[:, -1] = 101, 102
    return {"id": [f"s{i}" for i in range(n)], "index": torch.arange(n), "text_ids": ids, "text_lengths": lengths,
            "audio": torch.randn(n, T, 5) + 3.0, "audio_lengths": lengths, "label": torch.zeros(n)}


def run_config(**kw):
    base = dict(protocol="lnln", complete_share=0.5, text_cache="", fixed_train_masks=False, mask_seed=0,
                model_config={"unk_id": 100})
    return SimpleNamespace(**{**base, **kw})


def test_lnln_training_rates_are_per_sample_and_per_modality():
    run = run_config()
    spec = protocols.train_rate(run, torch.Generator().manual_seed(0), COARSE_GRID)
    assert isinstance(spec, protocols.SampleRates) and spec.complete_share == 0.5
    batch = synthetic_batch()
    _, view = protocols.sample_rate_views(batch, spec, run, "train", torch.Generator().manual_seed(1), None,
                                          simulate_missing, mask_seed=7)
    rates = {m: view[f"{m}_missing_rate"] for m in ("text", "audio")}
    for m, r in rates.items():
        assert r.shape == (N,) and 0.0 <= float(r.min()) and float(r.max()) <= 1.0
        assert 0.4 < float((r == 0).float().mean()) < 0.6  # about half the samples complete, per modality
        assert len(torch.unique(r)) > N // 3  # continuous U(0, 1) for the others
    assert not torch.equal(rates["text"], rates["audio"])  # each modality its own rate
    both_complete = ((rates["text"] == 0) & (rates["audio"] == 0)).float().mean()
    assert 0.15 < float(both_complete) < 0.35  # independent across modalities (0.25 expected)
    # the drawn masks follow each sample's own rate
    dropped = {"text": view["text_missing"][:, 1:-1].float().mean(1), "audio": view["audio_missing"].float().mean(1)}
    for m in ("text", "audio"):
        assert dropped[m][rates[m] == 0].sum() == 0
        assert (dropped[m] - rates[m]).abs().mean() < 0.06
        assert torch.corrcoef(torch.stack([dropped[m], rates[m]]))[0, 1] > 0.95
    assert torch.equal(view["text_ids"][view["text_missing"]], torch.full((int(view["text_missing"].sum()),), 100))
    assert float(view["audio"][view["audio_missing"]].abs().sum()) == 0.0
    # the training loop's own path (`views` in msaflow train) draws the same way
    from msaflow.pipeline.training.train import views

    _, looped = views(batch, spec, run, "train", generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(looped[f"{m}_missing_rate"], rates[m]) for m in rates)
    assert torch.equal(looped["text_missing"], view["text_missing"])


def test_lnln_complete_share_is_configurable_and_rates_redraw_every_batch():
    batch = synthetic_batch()
    g = torch.Generator().manual_seed(0)
    spec = protocols.SampleRates(complete_share=0.9)
    first = protocols.draw_sample_rates(N, ["text", "audio"], spec, g)
    second = protocols.draw_sample_rates(N, ["text", "audio"], spec, g)
    assert 0.85 < float((first["text"] == 0).float().mean()) < 0.95
    assert not torch.equal(first["audio"], second["audio"])
    none = protocols.draw_sample_rates(N, ["text"], protocols.SampleRates(complete_share=0.0), g)["text"]
    assert float((none == 0).float().mean()) == 0.0
    # with cached text states, text rates are rounded onto the cached grid; audio stays continuous
    cached = protocols.draw_sample_rates(N, ["text", "audio"], protocols.SampleRates(0.5, 1.0, COARSE_GRID), g)
    assert {round(r, 6) for r in cached["text"].tolist()} <= set(COARSE_GRID) and len(torch.unique(cached["audio"])) > N // 3
    with pytest.raises(ValueError, match="per-sample missing rates"):
        drop_masks(batch, {"text": torch.zeros(3)}, seed=0)


def test_per_sample_rates_equal_to_one_rate_give_the_one_rate_masks():
    batch = synthetic_batch(50)
    same = {m: torch.full((50,), 0.3) for m in ("text", "audio")}
    for kw in ({"seed": 5}, {}):
        a = drop_masks(batch, 0.3, generator=torch.Generator().manual_seed(2), **kw)
        b = drop_masks(batch, same, generator=torch.Generator().manual_seed(2), **kw)
        assert all(torch.equal(a[m], b[m]) for m in a)


def test_lnln_tests_at_0_to_0_9_and_validates_there():
    grid = [round(0.1 * i, 1) for i in range(10)]
    assert protocols.scored_rates({"protocol": "lnln", "dataset": "mosi"}) == grid
    assert protocols.scored_rates({"protocol": "lnln", "dataset": "sims"}) == grid  # LNLN: the same grid on SIMS
    assert protocols.default_valid_rates("lnln", "mosi", 0.0) == grid
    per_rate = {repr(r): {"MAE": r, "Corr": None if r == 0.5 else 1.0} for r in grid + [1.0]}
    avg = protocols.rate_average(per_rate)
    assert avg["MAE"] == pytest.approx(0.45) and avg["Corr"] is None  # 1.0 is left out; undefined stays undefined
    assert protocols.rate_average({"0.0": {"MAE": 1.0}}) is None


def test_paper_switch_sets_the_released_masks_normalisation_and_selection():
    from msaflow.pipeline.training.run_config import RunConfig

    run = RunConfig(data="x.pkl", protocol="per-rate", missing_rate=0.3, valid_rates=[0.0, 0.3],
                    optim_config={"select_on": "l1"}, model_config={"modalities": ["text", "audio"]})
    paper = protocols.apply_paper(run)
    assert paper.paper and paper.fixed_train_masks and not paper.zscore
    assert paper.optim_config["select_on"] == "loss" and paper.valid_rates == [0.3]
    assert protocols.apply_paper(RunConfig(data="x.pkl", dataset="sims", protocol="per-rate")).zscore  # SIMS: z-scored
    with pytest.raises(ValueError, match="--protocol per-rate"):
        protocols.apply_paper(RunConfig(data="x.pkl", protocol="single-model"))
    settings = protocols.run_settings(paper.__dict__)
    assert settings["paper"] and settings["protocol"] == "per-rate" and settings["text_encoder"] == "minilm fine-tuned"
    deviations = " | ".join(settings["deviations_from_paper"])
    assert "minilm" in deviations and "redrawn" not in deviations and "z-scored" not in deviations
    assert "redrawn" in " | ".join(protocols.paper_deviations({**paper.__dict__, "fixed_train_masks": False}))


@pytest.fixture(scope="module")
def lnln_runs(shared_data, tmp_path_factory):
    """Two tiny lnln runs (text-only, frozen encoder, 40 samples per split), then `msaflow evaluate`."""
    tmp = tmp_path_factory.mktemp("lnln")
    data = str(mosi_path(shared_data))
    for seed in (0, 1):
        assert cli(["train", "--data", data, "--model", "late-fusion", "--protocol", "lnln", "--complete-share", "0.4",
                    "--freeze-text", "--limit", "40", "--epochs", "1", "--batch-size", "8", "--grad-accum", "1",
                    "--valid-rates", "0.0,0.5", "--seed", str(seed), "--threads", "1", "-o", str(tmp / f"s{seed}")]) == 0
    out = tmp / "agg.json"
    assert cli(["evaluate", str(tmp / "s0"), str(tmp / "s1"), "--data", data, "--threads", "1", "-o", str(out)]) == 0
    return tmp, json.loads(out.read_text())


def test_lnln_run_is_scored_at_0_to_0_9_and_evaluate_reports_the_average(lnln_runs):
    tmp, metrics = lnln_runs
    config = json.loads((tmp / "s0" / "config.json").read_text())
    assert config["protocol"] == "lnln" and config["complete_share"] == 0.4 and not config["paper"]
    own = json.loads((tmp / "s0" / "metrics.json").read_text())
    assert list(own["rates"]) == [repr(round(0.1 * i, 1)) for i in range(10)]
    assert list(metrics["rates"]) == list(own["rates"]) and "AUILC" in metrics
    mae = [metrics["rates"][r]["MAE"] for r in metrics["rates"]]
    assert metrics["AVG"]["MAE"] == pytest.approx(sum(mae) / 10) and metrics["AVG_rates"] == "0.0:0.9:0.1"
    assert metrics["AVG_std"]["MAE"] >= 0.0
    assert metrics["settings"]["protocol"] == "lnln" and metrics["settings"]["complete_share"] == 0.4
    assert metrics["settings"]["text_encoder"] == "minilm frozen" and metrics["paper"] is False
    assert "protocol lnln (paper: per-rate)" in metrics["settings"]["deviations_from_paper"]
    assert "AVG_0.0-0.9" in (tmp / "agg.csv").read_text()


def test_paper_switch_refuses_other_protocols(shared_data, tmp_path):
    assert cli(["train", "--data", str(mosi_path(shared_data)), "--model", "text-only", "--protocol", "single-model",
                "--paper", "--freeze-text", "--limit", "20", "-o", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_paper_run_records_its_settings_in_metrics_json(shared_data, tmp_path):
    data = str(mosi_path(shared_data))
    run = tmp_path / "paper"
    assert cli(["train", "--data", data, "--model", "late-fusion", "--protocol", "per-rate", "--missing-rate", "0.3",
                "--paper", "--freeze-text", "--limit", "40", "--epochs", "1", "--batch-size", "8", "--grad-accum", "1",
                "--threads", "1", "-o", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["paper"] and config["fixed_train_masks"] and not config["zscore"]
    assert config["optim_config"]["select_on"] == "loss" and config["valid_rates"] == [0.3]
    assert not (run / "normaliser.json").exists()  # MOSI as released: raw features, a dropped step is a raw zero
    out = tmp_path / "paper.json"
    assert cli(["evaluate", str(run), "--data", data, "--threads", "1", "-o", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["paper"] is True and list(metrics["rates"]) == ["0.3"]
    assert metrics["settings"]["paper"] and not metrics["settings"]["zscore"]
    assert "gradient accumulation 1 (released: 4)" in metrics["settings"]["deviations_from_paper"]
