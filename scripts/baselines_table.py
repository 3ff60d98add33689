"""Markdown tables of `msaflow evaluate` results: one row per model, mean ± std over seeds.

Usage: python scripts/baselines_table.py RESULTS_DIR [--wall WALL_TSV] [--models a,b,c]
RESULTS_DIR holds `<model>.json` files written by `msaflow evaluate`.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

CURVE_METRICS = ("MAE", "Corr", "Acc-7", "Acc-2_non0", "F1_non0")
COMPLETE_METRICS = ("MAE", "Corr", "Acc-7", "Acc-5", "Acc-2_has0", "Acc-2_non0", "F1_has0", "F1_non0")


def fmt(mean, std, digits: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def digits_of(metric: str) -> int:
    return 3 if metric in ("MAE", "Corr") else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    p.add_argument("--wall", type=Path, help="model<TAB>seed<TAB>seconds per training run")
    p.add_argument("--models", default="text-only,late-fusion,tfn,lmf,gated,dynmm")
    args = p.parse_args()
    results = {m: json.loads((args.results / f"{m}.json").read_text())
               for m in args.models.split(",") if (args.results / f"{m}.json").is_file()}
    if not results:
        raise SystemExit(f"no <model>.json in {args.results}")
    rates = list(next(iter(results.values()))["rates"])

    print("Complete test set (rate 0.0), mean ± std over seeds:\n")
    print("| model | seeds | " + " | ".join(COMPLETE_METRICS) + " |")
    print("|---" * (len(COMPLETE_METRICS) + 2) + "|")
    for m, r in results.items():
        mean, std = r["rates"][rates[0]], r["rates_std"][rates[0]]
        cells = [fmt(mean.get(k), std.get(k), digits_of(k)) for k in COMPLETE_METRICS]
        print(f"| {m} | {r['n_runs_per_rate'][rates[0]]} | " + " | ".join(cells) + " |")

    for metric in CURVE_METRICS:
        d = digits_of(metric)
        print(f"\n{metric} at missing rate r (seed mean ± std), AUILC over the seed-mean curve (± std over seeds):\n")
        print("| model | " + " | ".join(rates) + " | AUILC |")
        print("|---" * (len(rates) + 2) + "|")
        for m, r in results.items():
            cells = [fmt(r["rates"][x].get(metric), r["rates_std"][x].get(metric), d) for x in rates]
            auilc = fmt(r.get("AUILC", {}).get(metric), r.get("AUILC_std", {}).get(metric), d + 1)
            print(f"| {m} | " + " | ".join(cells) + f" | {auilc} |")

    routed = [m for m in results if m.startswith("dynmm")]
    if routed:
        print("\nDynMM: share of test samples routed to the expensive (multimodal) expert, seed mean ± std:\n")
        print("| model | " + " | ".join(rates) + " |")
        print("|---" * (len(rates) + 1) + "|")
        for m in routed:
            r = results[m]
            print(f"| {m} | " + " | ".join(fmt(r["rates"][x].get("expensive_share"),
                                                r["rates_std"][x].get("expensive_share"), 3) for x in rates) + " |")

    noisy = {m: json.loads((args.results / f"{m}-noise.json").read_text())
             for m in results if (args.results / f"{m}-noise.json").is_file()}
    if noisy:
        levels = list(next(iter(noisy.values()))["rates"])
        print("\nMAE with Gaussian noise of level s added to the (z-scored) audio, text intact (seed mean ± std):\n")
        print("| model | " + " | ".join(levels) + " | AUILC |")
        print("|---" * (len(levels) + 2) + "|")
        for m, r in noisy.items():
            cells = [fmt(r["rates"][x]["MAE"], r["rates_std"][x]["MAE"], 3) for x in levels]
            print(f"| {m} | " + " | ".join(cells) + f" | {fmt(r['AUILC']['MAE'], r.get('AUILC_std', {}).get('MAE'), 4)} |")

    if args.wall and args.wall.is_file():
        walls: dict[str, list[str]] = defaultdict(list)
        with args.wall.open() as f:
            for model, seed, seconds in sorted(csv.reader(f, delimiter="\t"), key=lambda row: (row[0], int(row[1]))):
                walls[model].append(f"seed {seed}: {int(seconds)} s")
        print("\nWall time of each training run (train + validation + test scoring at 11 rates):\n")
        for m in results:
            print(f"- {m}: " + ", ".join(walls.get(m, ["not recorded"])))


if __name__ == "__main__":
    main()
