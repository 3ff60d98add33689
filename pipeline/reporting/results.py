"""`msaflow results RUN_DIR... -o results.csv`: one results table across runs.

One row per training run: where it is, what it is (model, protocol, training missing rate,
seed, dataset preset, text encoder, modalities used, data path and hash), its training
(epochs, best epoch, seconds) and every test metric at every rate it was scored at
(`MAE@0.0`, `Corr@0.5`, ...), plus the AUILC of each metric when the run was scored at two
rates or more (single-model runs). Given a metrics.json written by `msaflow evaluate`
instead of a run folder, the row is that pooled result (mean over its seeds, `seed` lists
them), which is how per-rate runs get their AUILC.

The CSV accumulates, as MMSA's results files do: rows already in `-o` are kept, a row for
the same run (same folder, or the same evaluate output) is replaced by the new one, and
new columns are added (empty in older rows). Rows are sorted by model, protocol, seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

from msaflow.model.metrics import MOSI_KEYS, SIMS_KEYS
from msaflow.tario import atomic_path

log = logging.getLogger("msaflow.results")
ID_COLUMNS = ["run", "model", "protocol", "missing_rate", "seed", "dataset", "encoder", "modalities", "n_test",
              "epochs", "best_epoch", "train_seconds", "data", "data_hash"]
KEY_COLUMN = "run"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, help="training run folders (or metrics.json files of `msaflow "
                   "evaluate`, for pooled seeds / per-rate runs)")
    p.add_argument("-o", "--out", type=Path, default=Path("results.csv"),
                   help="CSV to add the rows to (created if absent; a run already in it is replaced)")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _metric_columns(per_rate: dict, auilc: dict | None) -> dict:
    row = {}
    for rate in sorted(per_rate, key=float):
        for k, v in per_rate[rate].items():
            row[f"{k}@{rate}"] = v
    for k, v in (auilc or {}).items():
        row[f"AUILC_{k}"] = v
    return row


def run_row(run_dir: Path) -> dict:
    """The row of one training run folder (config.json + metrics.json)."""
    from msaflow.model.metrics import auilc_table
    from msaflow.pipeline.data.sources import DataError

    config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.json"
    if not config_path.is_file():
        raise DataError(f"{run_dir}: not a training run folder (no config.json)")
    if not metrics_path.is_file():
        raise DataError(f"{run_dir}: no metrics.json: training has not finished; run its `msaflow train` "
                        f"command again (it resumes), then add it")
    run = json.loads(config_path.read_text(encoding="utf-8"))
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    per_rate = metrics.get("rates") or {}
    row = {
        "run": str(run_dir.resolve()), "model": run.get("model"), "protocol": run.get("protocol"),
        "missing_rate": run.get("missing_rate") if run.get("protocol") == "per-rate" else "",
        "seed": run.get("seed"), "dataset": run.get("dataset"),
        "encoder": (run.get("model_config") or {}).get("text_model"),
        "modalities": "+".join((run.get("modalities") or {}).get("used") or
                               (run.get("model_config") or {}).get("modalities") or []),
        "n_test": metrics.get("n_test"), "epochs": metrics.get("epochs"), "best_epoch": metrics.get("best_epoch"),
        "train_seconds": metrics.get("train_seconds"), "data": run.get("data"), "data_hash": run.get("data_hash"),
    }
    return row | _metric_columns(per_rate, auilc_table(per_rate) if len(per_rate) >= 2 else None)


def evaluate_row(path: Path) -> dict:
    """The row of a pooled `msaflow evaluate` output (mean over its runs)."""
    from msaflow.pipeline.data.sources import DataError

    metrics = json.loads(path.read_text(encoding="utf-8"))
    if "rates" not in metrics or "runs" not in metrics:
        raise DataError(f"{path}: not a metrics.json of `msaflow evaluate` (no rates / runs)")
    configs = [Path(r) / "config.json" for r in metrics["runs"]]
    first = json.loads(configs[0].read_text(encoding="utf-8")) if configs and configs[0].is_file() else {}
    row = {
        "run": str(path.resolve()), "model": metrics.get("model") or "+".join(metrics.get("models", [])),
        "protocol": "+".join(metrics.get("protocols", [])), "missing_rate": "",
        "seed": " ".join(str(s) for s in metrics.get("seeds", [])), "dataset": first.get("dataset"),
        "encoder": (first.get("model_config") or {}).get("text_model"),
        "modalities": "+".join((first.get("modalities") or {}).get("used") or []),
        "n_test": metrics.get("n_test"), "epochs": "", "best_epoch": "", "train_seconds": "",
        "data": metrics.get("data"), "data_hash": metrics.get("data_hash"),
    }
    return row | _metric_columns(metrics["rates"], metrics.get("AUILC"))


def collect_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        rows.append(evaluate_row(path) if path.is_file() and path.suffix == ".json" else run_row(path))
    return rows


def _order(columns: list[str]) -> list[str]:
    """Identity columns, then metrics in the papers' order, rate by rate, then AUILC."""
    ids = [c for c in ID_COLUMNS if c in columns]
    rest = [c for c in columns if c not in ids]
    keys = list(dict.fromkeys([*MOSI_KEYS, *SIMS_KEYS]))

    def rank(c: str):
        auilc = c.startswith("AUILC_")
        name, _, rate = (c.removeprefix("AUILC_"), "", "") if auilc else c.partition("@")
        return (auilc, float(rate) if rate else 0.0, keys.index(name) if name in keys else len(keys), name)

    return ids + sorted(rest, key=rank)


def read_table(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def update_table(path: Path, rows: list[dict]) -> tuple[int, int]:
    """Add `rows` to the CSV at `path` (a row with the same `run` replaced); (added, replaced)."""
    from msaflow.pipeline.data.sources import DataError

    old = read_table(path)
    if old and KEY_COLUMN not in old[0]:
        raise DataError(f"{path}: not a results table of `msaflow results` (no {KEY_COLUMN!r} column): "
                        f"give another -o")
    new = {r[KEY_COLUMN]: {k: _fmt(v) for k, v in r.items()} for r in rows}
    replaced = sum(1 for r in old if r[KEY_COLUMN] in new)
    kept = [r for r in old if r[KEY_COLUMN] not in new]
    table = kept + list(new.values())
    table.sort(key=lambda r: (r.get("model") or "", r.get("protocol") or "", r.get("missing_rate") or "",
                              r.get("seed") or "", r.get("run") or ""))
    columns = _order(list(dict.fromkeys(c for r in [*old, *new.values()] for c in r)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    return len(new) - replaced, replaced


def main(args: argparse.Namespace) -> int:
    from msaflow.pipeline.data.sources import DataError

    missing = [str(p) for p in args.runs if not p.exists()]
    if missing:
        raise DataError(f"no such run folder or file: {', '.join(missing)}")
    rows = collect_rows(args.runs)
    added, replaced = update_table(args.out, rows)
    log.info(f"{args.out}: {added} row(s) added, {replaced} replaced ({len(read_table(args.out))} in all)")
    return 0
