"""`msaflow evaluate RUN_DIR [RUN_DIR ...] --data PKL`: test metrics at every missing rate (or noise level).

One run: its best checkpoint is scored on the test split at each rate of the grid, every
rate with fixed masks (seeded per sample id, the same for every model). Several runs
(seeds, or a per-rate protocol's runs): they are scored and aggregated as mean ± std per
rate; AUILC is taken over the seed-mean curve (the paper's convention) and, for its std,
per seed. Which rates a run is scored at:
- `single-model` runs: every rate of `--rates` (default 0.0:1.0:0.1);
- `per-rate` runs: only the rate the run was trained at (the paper's protocol), unless
  `--rates` is given explicitly.
Writes metrics.json (shape in docs/model.md) and the same table as CSV beside it.

What it scored is said and recorded: the data (path and `data_hash`, the sha256 of the
shards' index.json files or of the pickle), the runs, the model. A run's own test metrics
(`metrics.json` in its folder, written by `msaflow train`) are reused only when the data
has the hash the run recorded at training time; any other data is scored afresh. Runs of
different models or settings (anything but the seed and, for per-rate runs, the rate) are
not pooled: the command stops and names what differs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from msaflow.contract import SPLITS, UNK_ID
from msaflow.model.metrics import MOSI_KEYS, SIMS_KEYS, aggregate, auilc_table, compute_metrics
from msaflow.model.missing import corrupt
from msaflow.pipeline.data.lengths import LengthConfig
from msaflow.pipeline.data.shard_index import ShardError
from msaflow.pipeline.data.sources import (DataError, Normaliser, PickleSource, data_exists, is_url, keep_real,
                                           open_source, read_index)
from msaflow.pipeline.training import protocols
from msaflow.pipeline.training.distributed import to_device
from msaflow.pipeline.training.rates import CORRUPTIONS, LNLN_GRID, TEST_GRID, parse_rates, rate_key
from msaflow.pipeline.training.run_dir import RunDir
from msaflow.tario import atomic_path, write_json_atomic

log = logging.getLogger("msaflow.evaluate")
# RunConfig keys that may differ between runs pooled into one result (seeds; the per-rate
# protocol's rates), and the ones that say nothing about the model (paths, machine settings)
POOLED_KEYS = ("seed", "missing_rate", "data", "data_hash", "threads", "workers", "extract", "modalities",
               "text_cache")


def data_fingerprint(path: str | Path) -> str:
    """sha256 of a shard folder's split index files (they hold every shard's sha256) or of a pickle's
    bytes: the identity of the data a run trained or was scored on."""
    digest = hashlib.sha256()
    if is_url(path):  # a remote shard folder: its split index files, read through the loader
        for split in SPLITS:
            try:
                digest.update(split.encode() + b"\0" + json.dumps(read_index(path, split), sort_keys=True).encode() + b"\0")
            except ShardError:
                continue
        return digest.hexdigest()
    path = Path(path)
    if path.is_dir():
        for index in sorted(path.glob("*/index.json")):
            digest.update(index.parent.name.encode() + b"\0" + index.read_bytes() + b"\0")
        return digest.hexdigest()
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FINGERPRINTS:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]


_FINGERPRINTS: dict[tuple, str] = {}


@torch.no_grad()
def predict(model, batches: Iterable[dict], *, split_name: str = "test", corruption: str = "missing",
            level: float = 0.0, mask_seed: int = 0, unk_id: int = UNK_ID, text_cache=None
            ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Predictions of `model` (eval mode) on a split's batches corrupted at `level` with fixed
    per-sample masks (keyed by sample id, so batch order and size do not matter).

    `text_cache` (frozen-encoder mode): text states come from the cache at the same masks.
    """
    model.eval()
    preds, labels, extras = [], [], defaultdict(float)
    n = 0
    for batch in map(keep_real, batches):
        if not batch["id"]:
            continue
        n += len(batch["id"])
        if corruption == "missing" and hasattr(model, "simulate_missing"):  # end-to-end: drops front-end outputs
            view = model.simulate_missing(batch, level, unk_id=unk_id, seed=mask_seed)
        else:
            view = corrupt(batch, corruption, level, unk_id=unk_id, seed=mask_seed)
        if text_cache is not None:
            view = text_cache.attach(view, split_name, level if corruption == "missing" else 0.0)
        device = next(model.parameters()).device
        out = model(to_device(view, device))
        preds.append(out["pred"].float().cpu().numpy())
        labels.append(batch["label"].numpy())
        for key, value in (out.get("report") or {}).items():  # per-batch means a model reports (DynMM: routing, FLOPs)
            extras[key] += float(value) * len(batch["id"])
    if not n:
        raise ValueError(f"split {split_name!r} is empty: nothing to score")
    extras = {k: v / n for k, v in extras.items()}
    labels = np.concatenate(labels)
    if np.isnan(labels).any():
        raise ValueError(f"split {split_name!r}: unlabeled samples cannot be scored")
    return np.concatenate(preds), labels, extras


def score(model, make_batches: Callable[[], Iterable[dict]], rates: list[float], *, corruption: str, mask_seed: int,
          dataset: str, unk_id: int, text_cache=None, label_summary: dict | None = None, phase: str = "test") -> dict:
    """Metrics at every rate; `make_batches()` gives a fresh pass over the test split each time.
    A progress line per rate; `label_summary` (a dict) is filled with the labels' count, range and
    number of distinct values (constant labels leave Corr and the Acc-2 family undefined)."""
    per_rate = {}
    t0 = time.monotonic()
    for i, r in enumerate(rates):
        t = time.monotonic()
        pred, label, extras = predict(model, make_batches(), corruption=corruption, level=r, mask_seed=mask_seed,
                                      unk_id=unk_id, text_cache=text_cache)
        per_rate[rate_key(r)] = {**compute_metrics(pred, label, dataset=dataset), **extras}
        if label_summary is not None and not label_summary:
            label_summary.update(summarise_labels(label))
        m = per_rate[rate_key(r)]
        log.info(f"scored {phase} at {corruption} {r:g} ({i + 1}/{len(rates)}): MAE {m['MAE']:.4f}  "
                 f"({time.monotonic() - t:.0f} s, {time.monotonic() - t0:.0f} s in all)")
    return per_rate


def summarise_labels(label: np.ndarray) -> dict:
    values = np.unique(np.asarray(label, dtype=np.float64))
    return {"n": int(len(label)), "distinct": int(len(values)), "min": float(values[0]), "max": float(values[-1])}


def same_data(a: str | Path, b: str | Path) -> bool:
    if is_url(a) or is_url(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def run_source(run: dict, data: str | Path, run_dir: RunDir):
    """(data source, normaliser) for scoring a run on `data`: the run's own length caps and statistics."""
    source = open_source(data, LengthConfig.model_validate(run.get("lengths") or {}), limit=run.get("limit", 0),
                         bucket=run.get("bucket", 8))
    if not run.get("zscore") or source.mode != "features":
        return source, Normaliser()
    if isinstance(source, PickleSource):  # small, read whole: the statistics come with it
        return source, source.fit_normaliser()
    return source, run_dir.normaliser()


def run_metrics(run_dir: RunDir, run: dict, data: str | Path, rates: list[float], corruption: str,
                rescore: bool = False, data_hash: str | None = None, info: dict | None = None,
                batch_size: int | None = None) -> tuple[dict, int]:
    """({rate: metrics}, n_test) of one run (`run`: its config.json) scored on `data`. The run's own
    test metrics are reused when `data` has the hash recorded for the run (the test set stays touched
    once); `info` (a dict) gets "reused" (bool) and "labels" (the test labels' summary, when known)."""
    info = {} if info is None else info
    data_hash = data_hash or data_fingerprint(data)
    saved = run_dir.metrics() if corruption == "missing" and not rescore and run.get("data_hash") == data_hash \
        else None
    info["reused"] = False
    if saved is not None and all(rate_key(r) in saved["rates"] for r in rates):
        info.update(reused=True, labels=saved.get("labels") or {})
        return {rate_key(r): saved["rates"][rate_key(r)] for r in rates}, saved["n_test"]
    model = run_dir.build_model(run)
    source, normalise = run_source(run, data, run_dir)
    splits = source.splits if isinstance(source, PickleSource) else None
    cache = run_text_cache(run, splits, [("test", r) for r in rates] if corruption == "missing" else [("test", 0.0)])
    labels: dict = {}
    batch_size = batch_size or source.eval_batch_size
    per_rate = score(model, lambda: (normalise(b) for b in source.batches("test", batch_size)), rates,
                     corruption=corruption, mask_seed=run["mask_seed"], dataset=run["dataset"],
                     unk_id=run["model_config"]["unk_id"], text_cache=cache, label_summary=labels,
                     phase=f"{run_dir.path} on test ({source.size('test')} samples)")
    info["labels"] = labels
    return per_rate, source.size("test")


def run_text_cache(run: dict, splits: dict | None, needed: list[tuple[str, float]]):
    """The run's frozen text-state cache with the `needed` (split, rate) files built, or None."""
    if not run.get("text_cache"):
        return None
    from msaflow.pipeline.training.text_cache import TextStateCache

    cache = TextStateCache(run["text_cache"], splits, run["model_config"]["text_model"], run["mask_seed"],
                           run["model_config"]["unk_id"])
    cache.build(needed)
    return cache


def combine(results: list[tuple[dict, dict]]) -> dict:
    """results: (run config, {rate: metrics}) per run → mean/std per rate, AUILC over the seed means."""
    by_rate: dict[str, list[dict]] = defaultdict(list)
    by_seed: dict[int, dict[str, dict]] = defaultdict(dict)
    for run, per_rate in results:
        for r, m in per_rate.items():
            by_rate[r].append(m)
            by_seed[run["seed"]][r] = m
    rates = sorted(by_rate, key=float)
    agg = {r: aggregate(by_rate[r]) for r in rates}
    out = {
        "rates": {r: agg[r]["mean"] for r in rates},
        "rates_std": {r: agg[r]["std"] for r in rates},
        "n_runs_per_rate": {r: agg[r]["n"] for r in rates},
    }
    if len(rates) >= 2:
        out["AUILC"] = auilc_table(out["rates"])
        complete_seeds = [s for s, pr in by_seed.items() if sorted(pr, key=float) == rates]
        if complete_seeds:
            out["AUILC_std"] = aggregate([auilc_table(by_seed[s]) for s in complete_seeds])["std"]
    average = protocols.rate_average(out["rates"])  # the lnln summary: mean over r = 0.0 ... 0.9
    if average is not None:
        out["AVG"] = average
        out["AVG_rates"] = LNLN_GRID
        per_seed = [a for a in (protocols.rate_average(pr) for pr in by_seed.values()) if a is not None]
        if per_seed:
            out["AVG_std"] = aggregate(per_seed)["std"]
    if results:  # what a results row must say: protocol, encoder, paper switch, deviations from the paper
        out["settings"] = protocols.run_settings(results[0][0])
        out["paper"] = all(bool(run.get("paper")) for run, _ in results)
    return out


def write_csv(path: Path, metrics: dict) -> None:
    present = list(next(iter(metrics["rates"].values())).keys())
    known = [k for k in (*MOSI_KEYS, *SIMS_KEYS) if k in present]
    keys = list(dict.fromkeys(known + sorted(present)))  # the papers' column order, then any extras
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rate"] + [c for k in keys for c in (k, f"{k}_std")])
        rows = [(r, metrics["rates"][r], metrics["rates_std"].get(r, {})) for r in metrics["rates"]]
        if "AUILC" in metrics:
            rows.append(("AUILC", metrics["AUILC"], metrics.get("AUILC_std", {})))
        if "AVG" in metrics:  # the lnln protocol's number: mean over r = 0.0 ... 0.9
            rows.append(("AVG_0.0-0.9", metrics["AVG"], metrics.get("AVG_std", {})))
        for r, mean, std in rows:
            w.writerow([r] + [c for k in keys for c in (_fmt(mean.get(k)), _fmt((std or {}).get(k)))])


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, help="training run directories (seeds / per-rate runs are aggregated)")
    p.add_argument("--data", required=True,
                   help="shard folder or MMSA feature pickle (trusted file; it is unpickled): the runs' data")
    p.add_argument("--rates", default=None, help=f"grid 'start:stop:step' or 'a,b,c' (default {TEST_GRID} for "
                   "single-model runs, the training rate for per-rate runs)")
    p.add_argument("--corruption", choices=CORRUPTIONS, default="missing",
                   help="missing: drop features at rate r; noise: add level*N(0,1) to audio/vision")
    p.add_argument("-o", "--out", type=Path, required=True, help="metrics.json to write (CSV beside it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, help="samples per scoring batch (default 64 in features mode, "
                   "16 in raw mode); metrics do not depend on it")
    p.add_argument("--rescore", action="store_true",
                   help="score the test split again even where the run's own metrics.json has the rates")


def pooling_problem(run_dirs: list[Path], runs: list[dict]) -> str | None:
    """Why these runs cannot be pooled as seeds of one configuration, or None."""
    def key(run: dict) -> dict:
        cfg = {k: v for k, v in run.items() if k not in POOLED_KEYS}
        if run.get("protocol") == "per-rate":  # each run validates at its own rate by default
            cfg.pop("valid_rates", None)
        cfg["optim_config"] = {k: v for k, v in (run.get("optim_config") or {}).items()}
        from msaflow.model.dynmm import pooling_view

        cfg["model_config"] = pooling_view(run.get("model_config") or {})  # DynMM: experts of each seed
        return cfg

    first = key(runs[0])
    for run_dir, run in zip(run_dirs[1:], runs[1:]):
        other = key(run)
        differ = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if differ:
            detail = differ[0]
            a, b = first.get(detail), other.get(detail)
            if isinstance(a, dict) and isinstance(b, dict):
                inner = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                detail, a, b = f"{detail}.{inner[0]}", a.get(inner[0]), b.get(inner[0])
            return (f"runs {run_dirs[0]} and {run_dir} differ in {', '.join(differ)} ({detail}: {a!r} vs {b!r}): "
                    f"they are not seeds of one configuration; evaluate each configuration separately "
                    f"(one -o per model)")
    return None


def main(args: argparse.Namespace) -> int:
    evaluate_runs(args)  # a DataError is one line and exit status 2 (msaflow.pipeline.cli)
    return 0


def evaluate_runs(args: argparse.Namespace) -> dict:
    """`msaflow evaluate` with parsed arguments; the metrics written. DataError on a user error."""
    torch.set_num_threads(args.threads)
    run_dirs, runs, explicit = checked_runs(args)
    data_hash = data_fingerprint(args.data)
    log.info(f"scoring {len(runs)} run(s) of {runs[0]['model']} ({runs[0]['protocol']}) on {args.data} "
             f"(data {data_hash[:12]}) at {args.corruption}")
    results, n_test, reused, labels = [], set(), [], {}
    for run_dir, run in zip(run_dirs, runs):
        rates = explicit if explicit is not None else (
            protocols.scored_rates(run) if args.corruption == "missing" else parse_rates(TEST_GRID))
        same = run.get("data_hash") == data_hash
        log.info(f"{run_dir.path}: {run['model']} seed {run['seed']} at {args.corruption} {rates} "
                 f"({'the data it trained on' if same else 'other data than it trained on: scored afresh'})")
        info: dict = {}
        per_rate, n = run_metrics(run_dir, run, args.data, rates, args.corruption, args.rescore,
                                  data_hash=data_hash, info=info, batch_size=args.batch_size)
        if info.get("reused"):
            reused.append(str(run_dir.path))
        labels = labels or info.get("labels") or {}
        results.append((run, per_rate))
        n_test.add(n)
    metrics = combine(results) | {
        "n_test": n_test.pop() if len(n_test) == 1 else sorted(n_test), "corruption": args.corruption,
        "model": runs[0]["model"], "models": sorted({r["model"] for r in runs}),
        "protocols": sorted({r["protocol"] for r in runs}), "seeds": sorted({r["seed"] for r in runs}),
        "runs": [str(d) for d in args.runs], "data": str(args.data), "data_hash": data_hash,
        "reused_run_metrics": reused, "labels": labels,
    }
    write_json_atomic(args.out, metrics)
    write_csv(args.out.with_suffix(".csv"), metrics)
    log_summary(metrics, args, len(runs))
    return metrics


def checked_runs(args: argparse.Namespace) -> tuple[list[RunDir], list[dict], list[float] | None]:
    """(run folders, their configs, the --rates given or None): the runs are finished training runs
    of one configuration and the data exists (DataError naming what is wrong)."""
    not_runs = [str(d) for d in args.runs if not RunDir(d).config_path.is_file()]
    if not_runs:
        raise DataError(f"not training run folders (no config.json): {', '.join(not_runs)}; give the -o folders "
                        f"of `msaflow train`")
    if not data_exists(args.data):
        raise DataError(f"{args.data}: no such file or folder (--data: the shard folder or pickle to score on)")
    try:
        explicit = parse_rates(args.rates) if args.rates else None
    except ValueError as exc:
        raise DataError(f"--rates {args.rates!r}: {exc} (give START:STOP:STEP or a comma list)") from exc
    run_dirs = [RunDir(d) for d in args.runs]
    runs = [d.config() for d in run_dirs]
    problem = pooling_problem([Path(d) for d in args.runs], runs)
    if problem:
        raise DataError(problem)
    unfinished = [str(d.path) for d in run_dirs if not d.best.is_file()]
    if unfinished:
        raise DataError(f"no best.pt in {', '.join(unfinished)}: training has not finished an epoch there; "
                        f"run its `msaflow train` command again (it resumes)")
    return run_dirs, runs, explicit


def log_summary(metrics: dict, args: argparse.Namespace, n_runs: int) -> None:
    for r, m in metrics["rates"].items():
        log.info(f"{args.corruption} {r:>5}: MAE {m['MAE']:.3f}  Corr {m['Corr'] or float('nan'):.3f}  "
                 f"Acc-2 {m.get('Acc-2_non0') or float('nan'):.1f}")
    for key, what in (("AUILC", "AUILC"), ("AVG", f"mean over rates {metrics.get('AVG_rates')}")):
        if key in metrics:
            log.info(f"{what}: {({k: None if v is None else round(v, 3) for k, v in metrics[key].items()})}")
    log.info(f"wrote {args.out} and {args.out.with_suffix('.csv').name}: {metrics['model']} "
             f"({', '.join(metrics['protocols'])}), {n_runs} run(s), on {args.data} (data {metrics['data_hash'][:12]})")
