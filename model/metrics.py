"""Sentiment-regression metrics with MMSA's conventions, AUILC, and seed aggregation.

MOSI/MOSEI (``dataset="mosi"``/``"mosei"``), as MMSA's ``metricsTop.py`` computes them:
  MAE; Pearson Corr; Acc-7 (clip to [-3, 3], round); Acc-5 (clip to [-2, 2], round);
  Acc-2 has-0 (>= 0 vs < 0) and non-0 (zero labels dropped, > 0 vs <= 0, so a
  prediction of exactly 0 counts as negative); weighted F1 for both binary variants.
SIMS (``dataset="sims"``): predictions and labels clipped to [-1, 1] first (MAE/Corr too);
  Acc-2 bins [-1, 0] / (0, 1]; Acc-3 cuts at -0.1, 0.1; Acc-5 cuts at -0.7, -0.1, 0.1, 0.7
  (bins closed on the right); weighted F1 on the Acc-2 bins.

Rounding is numpy's (half to even: 2.5 -> 2). Accuracies and F1 are in percent. A metric
that is undefined on the data (Corr with constant labels or predictions, non-0 metrics with
no non-zero label) is ``None``, never an exception or a NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

Metrics = dict[str, float | None]

MOSI_KEYS = ("MAE", "Corr", "Acc-7", "Acc-5", "Acc-2_has0", "Acc-2_non0", "F1_has0", "F1_non0")
SIMS_KEYS = ("MAE", "Corr", "Acc-2", "Acc-3", "Acc-5", "F1")

# SIMS class boundaries (right-closed bins), from MMSA's metricsTop.py
SIMS_CUTS = {"Acc-2": (0.0,), "Acc-3": (-0.1, 0.1), "Acc-5": (-0.7, -0.1, 0.1, 0.7)}


def _as_vector(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    arr = arr.reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: {int((~np.isfinite(arr)).sum())} non-finite value(s)")
    return arr


def pearson(pred: np.ndarray, label: np.ndarray) -> float | None:
    """Pearson r, or None where it is undefined (fewer than 2 items, a constant input)."""
    if pred.size < 2 or np.ptp(pred) == 0 or np.ptp(label) == 0:
        return None
    from scipy.stats import pearsonr

    return float(pearsonr(pred.astype(np.float64), label.astype(np.float64))[0])


def _pct(x: float) -> float:
    return float(100.0 * x)


def _binary(truth: np.ndarray, pred: np.ndarray) -> tuple[float | None, float | None]:
    """Accuracy and weighted F1 (percent) of two boolean vectors; None when empty."""
    if truth.size == 0:
        return None, None
    return _pct(accuracy_score(truth, pred)), _pct(f1_score(truth, pred, average="weighted"))


def mosi_metrics(pred: np.ndarray, label: np.ndarray) -> Metrics:
    acc7 = np.mean(np.round(np.clip(pred, -3.0, 3.0)) == np.round(np.clip(label, -3.0, 3.0)))
    acc5 = np.mean(np.round(np.clip(pred, -2.0, 2.0)) == np.round(np.clip(label, -2.0, 2.0)))
    acc2_has0, f1_has0 = _binary(label >= 0, pred >= 0)
    non_zero = label != 0
    acc2_non0, f1_non0 = _binary(label[non_zero] > 0, pred[non_zero] > 0)
    return {
        "MAE": float(np.mean(np.abs(pred - label))),
        "Corr": pearson(pred, label),
        "Acc-7": _pct(acc7),
        "Acc-5": _pct(acc5),
        "Acc-2_has0": acc2_has0,
        "Acc-2_non0": acc2_non0,
        "F1_has0": f1_has0,
        "F1_non0": f1_non0,
    }


def sims_bins(x: np.ndarray, cuts: Sequence[float]) -> np.ndarray:
    """Class index of each value for right-closed bins; cuts compared in x's own dtype, as MMSA does."""
    return np.digitize(x, np.asarray(cuts, dtype=x.dtype), right=True)


def sims_metrics(pred: np.ndarray, label: np.ndarray) -> Metrics:
    pred, label = np.clip(pred, -1.0, 1.0), np.clip(label, -1.0, 1.0)
    out: Metrics = {"MAE": float(np.mean(np.abs(pred - label))), "Corr": pearson(pred, label)}
    for name, cuts in SIMS_CUTS.items():
        out[name] = _pct(np.mean(sims_bins(pred, cuts) == sims_bins(label, cuts)))
    cuts2 = SIMS_CUTS["Acc-2"]
    out["F1"] = _pct(f1_score(sims_bins(label, cuts2), sims_bins(pred, cuts2), average="weighted"))
    return out


METRIC_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], Metrics]] = {
    "mosi": mosi_metrics,
    "mosei": mosi_metrics,
    "sims": sims_metrics,
}


def metric_keys(dataset: str = "mosi") -> tuple[str, ...]:
    return SIMS_KEYS if dataset.lower() == "sims" else MOSI_KEYS


def compute_metrics(pred: Any, label: Any, dataset: str = "mosi") -> Metrics:
    """All metrics of ``dataset`` for regression predictions against labels (any array-like)."""
    fn = METRIC_FUNCTIONS.get(dataset.lower())
    if fn is None:
        raise ValueError(f"unknown dataset {dataset!r} for metrics; known: {sorted(METRIC_FUNCTIONS)}")
    p, y = _as_vector(pred, "pred"), _as_vector(label, "label")
    if p.shape != y.shape:
        raise ValueError(f"pred has {p.size} values but label has {y.size}")
    if p.size == 0:
        raise ValueError("no predictions to score")
    dtype = np.result_type(p.dtype, y.dtype)
    return fn(p.astype(dtype, copy=False), y.astype(dtype, copy=False))


def auilc(rates: Sequence[float], values: Sequence[float | None]) -> float | None:
    """Area under the indicator-vs-missing-rate curve: trapezoid rule over the rate grid.

    Not divided by the grid's range (the paper's convention: on 0.0 ... 1.0 with step 0.1
    it equals 0.1 * (v0/2 + v1 + ... + v9 + v10/2)). None if any value is undefined.
    """
    if len(rates) != len(values):
        raise ValueError(f"{len(rates)} rates but {len(values)} values")
    if len(rates) < 2:
        raise ValueError("AUILC needs at least two rates")
    if any(v is None for v in values):
        return None
    x = np.asarray(rates, dtype=np.float64)
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"rates must be strictly increasing, got {list(rates)}")
    y = np.asarray(values, dtype=np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def auilc_table(per_rate: Mapping[str, Mapping[str, float | None]]) -> Metrics:
    """AUILC of every metric from ``{"0.0": metrics, "0.1": metrics, ...}`` (keys sorted as numbers)."""
    ordered = sorted(per_rate.items(), key=lambda kv: float(kv[0]))
    rates = [float(r) for r, _ in ordered]
    keys = list(ordered[0][1].keys())
    return {k: auilc(rates, [m.get(k) for _, m in ordered]) for k in keys}


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    defined = [float(v) for v in values if v is not None]
    if not defined:
        return None, None
    return float(np.mean(defined)), float(np.std(defined))


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and std over runs (seeds) of metric dicts, nested dicts included.

    Returns ``{"mean": like_a_run, "std": like_a_run, "n": len(runs)}``. The std is the
    population std (``np.std``, ddof 0) as MMSA reports it; undefined (None) values are left
    out of both, and a metric undefined in every run stays None.
    """
    if not runs:
        raise ValueError("nothing to aggregate")

    def walk(items: list[Any]) -> tuple[Any, Any]:
        first = items[0]
        if isinstance(first, Mapping):
            mean, std = {}, {}
            for key in first:
                mean[key], std[key] = walk([it.get(key) if isinstance(it, Mapping) else None for it in items])
            return mean, std
        if first is None or isinstance(first, (int, float, np.floating, np.integer)):
            return _mean_std(items)
        return first, None  # non-numeric leaves (names, notes) pass through

    mean, std = walk(list(runs))
    return {"mean": mean, "std": std, "n": len(runs)}
