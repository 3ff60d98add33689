"""Robustness protocols: which missing rates a run trains, validates and is tested at, and the
`paper` switch.

- `per-rate` (EMT-DLFR's paper): one model per rate r, trained, validated and tested at r; the
  dataset's grid (0.0 ... 1.0 for MOSI/MOSEI, 0.0 ... 0.5 for SIMS, `model.config.RATE_GRIDS`).
- `single-model` (msaflow's): one model, r ~ U[0, max rate] per batch (one rate for the whole
  batch and every modality), tested at every rate of the dataset's grid; AUILC over the grid.
- `lnln` (the protocol of LNLN, NeurIPS 2024, and of later robust-MSA papers): one model; every
  training sample gets its own rate per modality, 0 with probability `complete_share`
  (`--complete-share`, default 0.5), else r ~ U(0, 1), drawn afresh every batch; tested at
  r = 0.0, 0.1, ..., 0.9 and reported as the average over these rates (and seeds), beside the
  AUILC. Model selection on the validation split only (default: the mean loss over 0.0 ... 0.9).

How `lnln` differs from the public LNLN code (Haoyu-ha/LNLN, core/dataset.py, train.py,
robust_evaluation.py): there the best checkpoint of every metric is chosen on the *test* split
(one checkpoint per metric, `best_{key_eval}_{seed}.pth`); here one checkpoint per run, chosen
on validation. There, per modality exactly half of the training samples (`random.sample`) get
rate 0 and the others U(0, 1), redrawn once per epoch, and the drop uniforms are the same every
epoch (`np.random.seed(missing_seed)`); here each sample is complete with probability
`complete_share`, independently per modality and redrawn every batch, and the drop uniforms
are redrawn too (fixed per sample with `--fixed-train-masks`). With `--text-cache` the text
rate is rounded to the cached grid 0.0, 0.2, ..., 1.0. Validation there runs at one fixed rate
(0.5 in its configs); here at the mean over the test grid. Test masks here are the fixed
per-sample draw of `--mask-seed` (there: `np.random.seed` of the run's seed per split).

`--paper` (per-rate only) sets what a row compared with EMT-DLFR's paper needs: train masks
drawn once per sample (the released one-time draw), the released normalisation (MOSI/MOSEI:
none, so a dropped step is a raw zero; SIMS: z-scored before the drop, as the released
normalised SIMS pickle), the released selection rule (total validation loss at the run's rate).
What still differs from the released configuration is listed by `paper_deviations`, and
`msaflow evaluate` records both in metrics.json (`settings`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msaflow.model.config import OptimConfig, max_rate, rate_grid
from msaflow.model.missing import present_modalities
from msaflow.pipeline.training.rates import LNLN_GRID, parse_rates, rate_key


RELEASED = {"text_model": "bert-base-uncased (fine-tuned)", "grad_accum": 4, "patience": 8, "batch_size": None}


def _get(run, key, default=None):
    return run.get(key, default) if isinstance(run, dict) else getattr(run, key, default)


def scored_rates(run) -> list[float]:
    """The rates a run is scored at by default (`msaflow train` at its end, `msaflow evaluate`)."""
    protocol = _get(run, "protocol")
    if protocol == "per-rate":
        return [_get(run, "missing_rate")]
    if protocol == "lnln":
        return parse_rates(LNLN_GRID)
    return parse_rates(rate_grid(_get(run, "dataset", "mosi")))


def default_valid_rates(protocol: str, dataset: str, missing_rate: float) -> list[float]:
    if protocol == "per-rate":
        return [missing_rate]
    if protocol == "lnln":
        return parse_rates(LNLN_GRID)
    return parse_rates(f"0.0:{max_rate(dataset)}:0.2")  # MOSI/MOSEI: 0.0:1.0:0.2


def cached_train_rates(run, coarse_grid) -> list[float]:
    """Train-split rates the frozen text-state cache must hold for this run."""
    if _get(run, "protocol") == "per-rate":
        return [_get(run, "missing_rate")]
    top = max_rate(_get(run, "dataset", "mosi"))
    return [r for r in coarse_grid if r <= top + 1e-9]


@dataclass(frozen=True)
class SampleRates:
    """The `lnln` training draw: per sample and modality, 0 with probability `complete_share`,
    else U(0, top); text rates rounded to `text_grid` (cached text states) when given."""

    complete_share: float = 0.5
    top: float = 1.0
    text_grid: tuple[float, ...] | None = None


def train_rate(run, generator: torch.Generator, coarse_grid):
    """The training rate of the next batch: a float (per-rate, single-model) or a SampleRates
    (lnln; the rates themselves are drawn per sample in `views`)."""
    protocol = _get(run, "protocol")
    if protocol == "per-rate":
        return _get(run, "missing_rate")
    if protocol == "lnln":
        return SampleRates(float(_get(run, "complete_share", 0.5)), 1.0,
                           tuple(coarse_grid) if _get(run, "text_cache") else None)
    top = max_rate(_get(run, "dataset", "mosi"))
    grid = [r for r in coarse_grid if r <= top + 1e-9]
    if _get(run, "text_cache"):  # cached states exist for the coarse grid's rates only
        return grid[int(torch.randint(len(grid), (), generator=generator))]
    u = float(torch.rand((), generator=generator))
    return u if top == 1.0 else u * top


def draw_sample_rates(n: int, modalities, spec: SampleRates, generator: torch.Generator | None
                      ) -> dict[str, torch.Tensor]:
    """modality -> (n,) float32 rates of the `lnln` training draw."""
    if not 0.0 <= spec.complete_share <= 1.0:
        raise ValueError(f"complete share must lie in [0, 1], got {spec.complete_share}")
    rates = {}
    for m in modalities:
        r = torch.rand(n, generator=generator) * spec.top
        complete = torch.rand(n, generator=generator) < spec.complete_share
        if m == "text" and spec.text_grid:
            grid = torch.tensor(spec.text_grid, dtype=torch.float32)
            r = grid[(r[:, None] - grid[None, :]).abs().argmin(1)]
        rates[m] = torch.where(complete, torch.zeros(()), r).float()
    return rates


def attach_per_sample(cache, batch: dict, split_name: str, text_rates: torch.Tensor) -> dict:
    """`cache.attach` with every sample's text states at its own (cached) rate."""
    out = dict(batch)
    width = batch["text_ids"].shape[1]
    states = None
    for r in torch.unique(text_rates).tolist():
        rows = (text_rates == r).nonzero().squeeze(-1)
        part = cache.states(split_name, round(float(r), 6), batch["index"][rows], width)
        if states is None:
            states = torch.zeros(len(text_rates), *part.shape[1:], dtype=part.dtype)
        states[rows] = part
    out["text"] = states
    return out


def sample_rate_views(batch: dict, spec: SampleRates, run, split_name: str, generator, cache, drop, mask_seed: int
                      ) -> tuple[dict, dict]:
    """(complete, incomplete) views with per-sample, per-modality rates; the drawn rates travel in
    the incomplete view as `<modality>_missing_rate` (n,)."""
    unk = _get(run, "model_config")["unk_id"]
    rates = draw_sample_rates(len(batch["id"]), present_modalities(batch), spec, generator)
    if generator is not None and not _get(run, "fixed_train_masks"):
        incomplete = drop(batch, rates, unk_id=unk, generator=generator)
    else:
        incomplete = drop(batch, rates, unk_id=unk, seed=mask_seed)
    incomplete = {**incomplete, **{f"{m}_missing_rate": r for m, r in rates.items()}}
    if cache is None:
        return batch, incomplete
    return cache.attach(batch, split_name, 0.0), attach_per_sample(cache, incomplete, split_name, rates["text"])


# ---------------------------------------------------------------- the paper switch

def paper_settings(dataset: str) -> dict:
    """What `--paper` sets: the released code's train masks, normalisation and selection rule."""
    return {"fixed_train_masks": True, "zscore": dataset == "sims", "select_on": "loss"}


def apply_paper(run, error=ValueError):
    """The RunConfig `run` with the paper's settings (a new object); `error` when impossible."""
    from dataclasses import replace

    if _get(run, "protocol") != "per-rate":
        raise error(f"--paper is the paper's protocol: give --protocol per-rate (not {_get(run, 'protocol')}); "
                    f"the paper trains, validates and tests one model per missing rate")
    settings = paper_settings(_get(run, "dataset"))
    optim = {**_get(run, "optim_config"), "select_on": settings["select_on"]}
    return replace(run, paper=True, fixed_train_masks=True, zscore=settings["zscore"],
                   valid_rates=[_get(run, "missing_rate")], optim_config=optim)


def paper_deviations(run) -> list[str]:
    """How a run's configuration differs from the released EMT-DLFR configuration (empty = none found)."""
    out = []
    model_cfg = _get(run, "model_config") or {}
    optim = OptimConfig.from_dict(_get(run, "optim_config") or {})
    preset = OptimConfig.from_dict({})
    if _get(run, "protocol") != "per-rate":
        out.append(f"protocol {_get(run, 'protocol')} (paper: per-rate)")
    text_model = model_cfg.get("text_model", "minilm")
    if text_model != "bert-base-uncased" and "bert-base" not in str(text_model):
        out.append(f"text encoder {text_model} (paper: bert-base-uncased)")
    if model_cfg.get("freeze_text") or _get(run, "text_cache"):
        out.append("text encoder frozen (paper: fine-tuned)")
    if not _get(run, "fixed_train_masks"):
        out.append("train masks redrawn per batch (released: drawn once)")
    if _get(run, "zscore") != (_get(run, "dataset") == "sims"):
        out.append("audio/vision z-scored before the drop (released: raw, a dropped step is a raw zero)"
                   if _get(run, "zscore") else "audio/vision not z-scored (released SIMS: z-scored)")
    if optim.select_on != "loss":
        out.append(f"selection on validation {optim.select_on} (released: total loss)")
    if _get(run, "protocol") == "per-rate" and list(_get(run, "valid_rates") or []) != [_get(run, "missing_rate")]:
        out.append("validation at other rates than the training rate")
    if optim.grad_accum != preset.grad_accum:
        out.append(f"gradient accumulation {optim.grad_accum} (released: {preset.grad_accum})")
    if optim.patience != preset.patience:
        out.append(f"early-stopping patience {optim.patience} (released: {preset.patience})")
    out.append(f"at most {optim.max_epochs} epochs (released: until early stop)")
    modalities = model_cfg.get("modalities") or []
    if len(modalities) < 3:
        out.append(f"modalities {'+'.join(modalities)} (paper: text+audio+vision; G has one token per modality)")
    return out


def run_settings(run) -> dict:
    """The settings a results row must state: protocol, encoder, masks, normalisation, selection,
    the paper switch and the deviations from the released configuration."""
    model_cfg = _get(run, "model_config") or {}
    frozen = bool(model_cfg.get("freeze_text") or _get(run, "text_cache"))
    settings = {
        "protocol": _get(run, "protocol"),
        "paper": bool(_get(run, "paper", False)),
        "text_encoder": f"{model_cfg.get('text_model', 'minilm')} {'frozen' if frozen else 'fine-tuned'}",
        "text_cache": bool(_get(run, "text_cache")),
        "fixed_train_masks": bool(_get(run, "fixed_train_masks")),
        "zscore": bool(_get(run, "zscore", True)),
        "select_on": (_get(run, "optim_config") or {}).get("select_on", "loss"),
        "valid_rates": list(_get(run, "valid_rates") or []),
        "deviations_from_paper": paper_deviations(run),
    }
    if _get(run, "protocol") == "lnln":
        settings["complete_share"] = float(_get(run, "complete_share", 0.5))
    return settings


# ---------------------------------------------------------------- the lnln summary

def rate_average(per_rate: dict, grid: str = LNLN_GRID) -> dict | None:
    """Mean over the rates of `grid` (lnln: 0.0 ... 0.9) of every metric of `{rate: metrics}`, or
    None when a rate of the grid is missing; undefined values (None) are left out of the mean."""
    keys = [rate_key(r) for r in parse_rates(grid)]
    if not all(k in per_rate for k in keys):
        return None
    out = {}
    for metric in per_rate[keys[0]]:
        values = [per_rate[k].get(metric) for k in keys]
        defined = [float(v) for v in values if isinstance(v, (int, float))]
        out[metric] = sum(defined) / len(defined) if defined and len(defined) == len(values) else None
    return out
