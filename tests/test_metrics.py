"""Metrics against values computed by hand (MMSA conventions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from msaflow.model.metrics import aggregate, auilc, auilc_table, compute_metrics, metric_keys

# Chosen so that: 2.5 and 1.5 round half to even (2, 2), -0.5 rounds to -0, a prediction of
# exactly 0 meets a positive label (positive in has-0, negative in non-0), a zero label exists.
PRED = [2.5, 0.0, 0.0, -0.5, 1.5, -2.6]
LABEL = [2.0, 1.0, 0.0, -1.0, 2.4, -2.4]


def hand_pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def test_mosi_metrics_by_hand():
    m = compute_metrics(PRED, LABEL)
    assert set(m) == set(metric_keys("mosi"))
    assert m["MAE"] == pytest.approx(3.1 / 6)
    assert m["Corr"] == pytest.approx(hand_pearson(PRED, LABEL))
    # rounded preds [2, 0, 0, -0, 2, -3] vs labels [2, 1, 0, -1, 2, -2]
    assert m["Acc-7"] == pytest.approx(50.0)
    # clipped to +-2: preds [2, 0, 0, -0, 2, -2] vs labels [2, 1, 0, -1, 2, -2]
    assert m["Acc-5"] == pytest.approx(400 / 6)
    assert m["Acc-2_has0"] == pytest.approx(100.0)  # 0.0 >= 0 counts positive
    assert m["F1_has0"] == pytest.approx(100.0)
    # zero label dropped; the 0.0 prediction for label 1.0 counts negative -> 4/5
    assert m["Acc-2_non0"] == pytest.approx(80.0)
    # per class F1 is 0.8 for both classes (P=1,R=2/3 and P=2/3,R=1)
    assert m["F1_non0"] == pytest.approx(80.0)


def test_half_to_even_rounding_is_numpy():
    # half-up rounding would give 3 for 2.5 and match the label 3.0
    assert compute_metrics([2.5, 0.5], [3.0, 0.0])["Acc-7"] == pytest.approx(50.0)
    assert compute_metrics([2.5, -1.5], [2.0, -2.0])["Acc-7"] == pytest.approx(100.0)
    # Acc-5 clips first: 2.9 -> 2, label 3 -> 2
    assert compute_metrics([2.9], [3.0])["Acc-5"] == pytest.approx(100.0)
    assert compute_metrics([2.9], [3.0])["Acc-7"] == pytest.approx(100.0)
    assert compute_metrics([2.4], [3.0])["Acc-7"] == pytest.approx(0.0)


def test_accepts_tensors_and_float32():
    m_np = compute_metrics(PRED, LABEL)
    m_t = compute_metrics(torch.tensor(PRED), torch.tensor(LABEL))
    for k in m_np:
        assert m_t[k] == pytest.approx(m_np[k], rel=1e-5)


def test_undefined_metrics_are_none():
    const_label = compute_metrics([0.1, 0.5, -0.3], [1.0, 1.0, 1.0])
    assert const_label["Corr"] is None
    assert const_label["MAE"] == pytest.approx((0.9 + 0.5 + 1.3) / 3)
    const_pred = compute_metrics([0.0, 0.0, 0.0], [1.0, -1.0, 0.0])
    assert const_pred["Corr"] is None
    all_zero = compute_metrics([0.3, -0.2], [0.0, 0.0])
    assert all_zero["Acc-2_non0"] is None and all_zero["F1_non0"] is None
    assert all_zero["Acc-2_has0"] == pytest.approx(50.0)
    single = compute_metrics([0.3], [0.5])
    assert single["Corr"] is None


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="pred has 2 values but label has 3"):
        compute_metrics([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="non-finite"):
        compute_metrics([float("nan")], [1.0])
    with pytest.raises(ValueError, match="unknown dataset"):
        compute_metrics([1.0], [1.0], dataset="iemocap")


def test_sims_metrics_by_hand():
    pred = [-1.5, -0.1, 0.05, 0.1, 0.75, 0.0]
    label = [-0.8, -0.2, 0.1, 0.2, 1.2, 0.0]
    m = compute_metrics(pred, label, dataset="sims")
    assert set(m) == set(metric_keys("sims"))
    # after clipping to [-1, 1]: errors 0.2, 0.1, 0.05, 0.1, 0.25, 0
    assert m["MAE"] == pytest.approx(0.7 / 6)
    clipped_p = [-1.0, -0.1, 0.05, 0.1, 0.75, 0.0]
    clipped_l = [-0.8, -0.2, 0.1, 0.2, 1.0, 0.0]
    assert m["Corr"] == pytest.approx(hand_pearson(clipped_p, clipped_l))
    assert m["Acc-2"] == pytest.approx(100.0)  # 0.0 is in the negative bin [-1, 0]
    # Acc-3 bins (right-closed): preds [0,0,1,1,2,1] vs labels [0,0,1,2,2,1]
    assert m["Acc-3"] == pytest.approx(500 / 6)
    # Acc-5 bins: preds [0,1,2,2,4,2] vs labels [0,1,2,3,4,2]
    assert m["Acc-5"] == pytest.approx(500 / 6)
    assert m["F1"] == pytest.approx(100.0)


def test_sims_cut_compared_in_input_dtype():
    # float32(0.1) sits exactly on the cut in float32 (MMSA compares float32 tensors): bin (-0.1, 0.1]
    p32 = np.array([0.1], dtype=np.float32)
    assert compute_metrics(p32, np.array([0.05], dtype=np.float32), "sims")["Acc-3"] == 100.0


def test_auilc_by_hand():
    rates = [round(0.1 * i, 1) for i in range(11)]
    assert auilc(rates, [10 - i for i in range(11)]) == pytest.approx(5.0)  # triangle
    assert auilc(rates, [1.0] * 11) == pytest.approx(1.0)  # not divided by the range
    assert auilc([0.0, 0.1], [1.0, 3.0]) == pytest.approx(0.2)
    # SIMS grid 0.0 ... 0.5: 0.1 * (4/2 + 3 + 2 + 1 + 0 + 0/2)
    assert auilc(rates[:6], [4, 3, 2, 1, 0, 0]) == pytest.approx(0.8)
    assert auilc([0.0, 0.1], [1.0, None]) is None
    with pytest.raises(ValueError):
        auilc([0.1, 0.0], [1.0, 2.0])


def test_auilc_table_sorts_rates_numerically():
    per_rate = {"1.0": {"MAE": 2.0}, "0.0": {"MAE": 0.0}, "0.5": {"MAE": 1.0}}
    assert auilc_table(per_rate)["MAE"] == pytest.approx(1.0)


def test_aggregate_mean_std_nested_and_none():
    runs = [
        {"rates": {"0.0": {"MAE": 1.0, "Corr": None}}, "AUILC": {"MAE": 0.5}, "n_test": 686},
        {"rates": {"0.0": {"MAE": 3.0, "Corr": 0.5}}, "AUILC": {"MAE": 1.5}, "n_test": 686},
    ]
    agg = aggregate(runs)
    assert agg["n"] == 2
    assert agg["mean"]["rates"]["0.0"]["MAE"] == pytest.approx(2.0)
    assert agg["std"]["rates"]["0.0"]["MAE"] == pytest.approx(1.0)  # population std
    assert agg["mean"]["rates"]["0.0"]["Corr"] == pytest.approx(0.5)
    assert agg["std"]["rates"]["0.0"]["Corr"] == pytest.approx(0.0)
    assert agg["mean"]["AUILC"]["MAE"] == pytest.approx(1.0)
    assert aggregate([{"Corr": None}])["mean"]["Corr"] is None
