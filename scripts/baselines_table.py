"""Markdown tables of `msaflow evaluate` results, per protocol: one row per model, mean ± std over seeds.

Usage: python scripts/baselines_table.py RESULTS_DIR [--wall WALL_TSV] [--models a,b,c] [--write RESULTS.md]
RESULTS_DIR holds `<protocol>/<model>.json` files written by `msaflow evaluate` (scripts/mosi_baselines.sh);
a flat `<model>.json` layout is read as one protocol. Every row states its text encoder (frozen /
fine-tuned), protocol and deviations from the paper, from the `settings` msaflow evaluate records.
`--write FILE` replaces, for each protocol in RESULTS_DIR, that protocol's block between its
BEGIN/END GENERATED markers in FILE (a protocol without a block gets one after the last block),
so protocols swept at different times keep their own tables; the tables are printed too.
Without it they go to stdout only.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import defaultdict
from pathlib import Path

CURVE_METRICS = ("MAE", "Corr", "Acc-7", "Acc-2_non0", "F1_non0")
COMPLETE_METRICS = ("MAE", "Corr", "Acc-7", "Acc-5", "Acc-2_has0", "Acc-2_non0", "F1_has0", "F1_non0")
BLOCK_END = re.compile(r"<!-- END GENERATED \S+ -->")


def markers(protocol: str) -> tuple[str, str]:
    """The BEGIN / END lines around one protocol's generated tables in a Markdown file."""
    return (f"<!-- BEGIN GENERATED {protocol} by scripts/mosi_baselines.sh (scripts/baselines_table.py): "
            f"do not edit by hand -->", f"<!-- END GENERATED {protocol} -->")


def write_blocks(doc: str, sections: dict[str, str], name: str = "the file") -> str:
    """`doc` with each protocol's block replaced by its section (new blocks after the last one)."""
    for protocol, text in sections.items():
        begin, end = markers(protocol)
        block = f"{begin}\n\n{text}\n{end}"
        if begin in doc and end in doc:
            pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
            doc = pattern.sub(lambda _: block, doc, count=1)
            continue
        ends = list(BLOCK_END.finditer(doc))
        if not ends:
            raise SystemExit(f"{name}: no generated block (<!-- BEGIN GENERATED <protocol> ... --> ... "
                             f"<!-- END GENERATED <protocol> -->) to replace or to add {protocol!r} after")
        at = ends[-1].end()
        doc = f"{doc[:at]}\n\n{block}{doc[at:]}"
    return doc
PROTOCOL_TITLES = {
    "single-model": "`single-model` protocol (one model per seed, one rate per batch r ~ U[0, 1], tested at "
                    "r = 0.0 ... 1.0, AUILC)",
    "lnln": "`lnln` protocol (one model per seed, rates per sample and modality: 0 with probability 0.5, else "
            "U(0, 1); tested at r = 0.0 ... 0.9, reported as the average over rates; validation-only selection)",
    "per-rate": "`per-rate` protocol (the paper's: one model per rate)",
}
# what a model row is besides the run settings (architecture departures from the published model)
MODEL_NOTES = {
    "text-only": "regression head on the mean-pooled text vector",
    "late-fusion": "per-modality LayerNorm + Linear + ReLU, concatenated, head",
    "tfn-style": "TFN's [1; h] outer product on the shared encoders and head, not MMSA's TFN (subnets, output range)",
    "lmf-style": "LMF's rank-4 factors on the shared encoders and head, not MMSA's LMF (subnets, output range)",
    "gated": "per-dimension softmax gates over modalities",
    "dynmm": "DynMM as released, soft gate, lambda 0.01; experts = the text-only and late-fusion runs of the same "
             "seed, frozen; gate = MLP over pooled inputs (released: a Transformer over aligned inputs)",
    "dynmm-hard": "as dynmm, straight-through hard gate (released --hard-gate)",
    "emt-dlfr": "EMT-DLFR as released (the fusion core matches the released EMT to about 1e-6 on copied weights)",
    "emt": "EMT-DLFR without the restoration losses (DLFR off), the same fusion core",
}


def fmt(mean, std, digits: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def digits_of(metric: str) -> int:
    return 3 if metric in ("MAE", "Corr") else 1


def load(results_dir: Path, models: list[str]) -> dict[str, dict[str, dict]]:
    """protocol -> model -> evaluate result (the -noise results under `<model>-noise`)."""
    out: dict[str, dict[str, dict]] = {}
    folders = [d for d in sorted(results_dir.iterdir()) if d.is_dir()] or [results_dir]
    for folder in folders:
        found = {}
        for m in models:
            for name in (m, f"{m}-noise"):
                if (folder / f"{name}.json").is_file():
                    found[name] = json.loads((folder / f"{name}.json").read_text())
        if found:
            first = next(iter(v for k, v in found.items() if not k.endswith("-noise")), None)
            protocol = folder.name if folder != results_dir else ((first or {}).get("protocols") or ["?"])[0]
            out[protocol] = found
    return out


def settings_rows(results: dict[str, dict]) -> list[str]:
    lines = ["| model | text encoder | protocol | train masks | audio z-scored | selection | validation rates | "
             "model notes | deviations from the paper's setting |", "|---" * 9 + "|"]
    for m, r in results.items():
        if m.endswith("-noise"):
            continue
        s = r.get("settings") or {}
        deviations = [d for d in s.get("deviations_from_paper", [])
                      if not d.startswith(("protocol ", "text encoder "))]  # said in their own columns
        valid = s.get("valid_rates") or []
        valid_text = f"{valid[0]:g} ... {valid[-1]:g} ({len(valid)})" if len(valid) > 1 else ", ".join(map(str, valid))
        lines.append(f"| {m} | {s.get('text_encoder', '?')} | {s.get('protocol', '?')}"
                     f"{' (complete share ' + str(s['complete_share']) + ')' if 'complete_share' in s else ''} | "
                     f"{'fixed per sample' if s.get('fixed_train_masks') else 'redrawn per batch'} | "
                     f"{'yes' if s.get('zscore') else 'no'} | {s.get('select_on', '?')} | {valid_text} | "
                     f"{MODEL_NOTES.get(m, '')} | {'; '.join(deviations)} |")
    return lines


def curve_table(results: dict[str, dict], metric: str, rates: list[str], summary: str) -> list[str]:
    d = digits_of(metric)
    head = "| model | " + " | ".join(rates) + (" | mean 0.0-0.9 | AUILC |" if summary == "avg" else " | AUILC |")
    lines = [head, "|---" * (len(rates) + (3 if summary == "avg" else 2)) + "|"]
    for m, r in results.items():
        if m.endswith("-noise"):
            continue
        cells = [fmt(r["rates"][x].get(metric), r["rates_std"][x].get(metric), d) for x in rates]
        auilc = fmt(r.get("AUILC", {}).get(metric), r.get("AUILC_std", {}).get(metric), d + 1)
        if summary == "avg":
            avg = fmt(r.get("AVG", {}).get(metric), r.get("AVG_std", {}).get(metric), d + 1)
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} | {auilc} |")
        else:
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {auilc} |")
    return lines


def protocol_section(protocol: str, results: dict[str, dict], walls: dict) -> list[str]:
    main = {m: r for m, r in results.items() if not m.endswith("-noise")}
    rates = list(next(iter(main.values()))["rates"])
    summary = "avg" if protocol == "lnln" else "auilc"
    out = [f"### {PROTOCOL_TITLES.get(protocol, protocol)}", ""]
    out += ["What each row is (from the `settings` that `msaflow evaluate` records in its metrics.json):", ""]
    out += settings_rows(main) + [""]
    if summary == "avg":
        out += ["**The protocol's summary**: mean over r = 0.0 ... 0.9 of the seed-mean metrics (± std over seeds "
                "of the per-seed means):", ""]
        keys = ("MAE", "Corr", "Acc-7", "Acc-5", "Acc-2_has0", "F1_has0", "Acc-2_non0", "F1_non0")
        out += ["| model | seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for m, r in main.items():
            out.append(f"| {m} | {r['n_runs_per_rate'][rates[0]]} | " + " | ".join(
                fmt(r.get("AVG", {}).get(k), r.get("AVG_std", {}).get(k), digits_of(k) + (1 if k in ("MAE", "Corr") else 1))
                for k in keys) + " |")
        out.append("")
    out += ["Complete test set (rate 0.0), mean ± std over seeds:", ""]
    out += ["| model | seeds | " + " | ".join(COMPLETE_METRICS) + " |", "|---" * (len(COMPLETE_METRICS) + 2) + "|"]
    for m, r in main.items():
        mean, std = r["rates"][rates[0]], r["rates_std"][rates[0]]
        out.append(f"| {m} | {r['n_runs_per_rate'][rates[0]]} | " + " | ".join(
            fmt(mean.get(k), std.get(k), digits_of(k)) for k in COMPLETE_METRICS) + " |")
    for metric in CURVE_METRICS:
        out += ["", f"{metric} at missing rate r (seed mean ± std); AUILC of the seed-mean curve"
                f"{' over 0.0 ... 0.9' if summary == 'avg' else ''} (± std over seeds):", ""]
        out += curve_table(main, metric, rates, summary)
    routed = {m: r for m, r in main.items() if "expensive_share" in r["rates"][rates[0]]}
    if routed:
        out += ["", "DynMM: share of test samples routed to the expensive (late-fusion) expert (its weight above the "
                "cheap one's), mean weight of that expert (DynMM's \"ratio\"), and MFLOPs per sample, at r = 0.0 / "
                "0.5 / mean over the tested rates (seed mean ± std). *Executed*: the gate, the text expert on every "
                "sample, the late-fusion expert where it runs (every sample with the soft gate; where its weight is 1 "
                "with the hard gate), the shared frozen MiniLM counted once; *late fusion alone* is the cost of the "
                "expensive expert run on every sample; *saved* = late fusion alone - executed; *DynMM count* = "
                "DynMM's own count_flop (mean weight x each expert's FLOPs, each with its own text encoder).", ""]
        cols = ("expensive_share", "expensive_weight", "mflops_per_sample", "mflops_expensive_alone", "mflops_saved",
                "mflops_dynmm_count")
        names = ("share routed", "mean weight", "MFLOPs executed", "MFLOPs late fusion alone", "MFLOPs saved",
                 "MFLOPs DynMM count")
        out += ["| model | r | " + " | ".join(names) + " |", "|---" * (len(cols) + 2) + "|"]
        mid = "0.5" if "0.5" in rates else rates[len(rates) // 2]
        for m, r in routed.items():
            for label, x in ((rates[0], rates[0]), (mid, mid)):
                out.append(f"| {m} | {label} | " + " | ".join(
                    fmt(r["rates"][x].get(c), r["rates_std"][x].get(c), 3) for c in cols) + " |")
            means = {c: sum(r["rates"][x][c] for x in rates) / len(rates) for c in cols}
            out.append(f"| {m} | mean | " + " | ".join(f"{means[c]:.3f}" for c in cols) + " |")
    noisy = {m[: -len("-noise")]: r for m, r in results.items() if m.endswith("-noise")}
    if noisy:
        levels = list(next(iter(noisy.values()))["rates"])
        out += ["", "MAE with Gaussian noise of level s added to the (z-scored) audio, text intact (seed mean ± std; "
                "does the model use the audio at all?):", ""]
        out += ["| model | " + " | ".join(levels) + " | AUILC |", "|---" * (len(levels) + 2) + "|"]
        for m, r in noisy.items():
            cells = [fmt(r["rates"][x]["MAE"], r["rates_std"][x]["MAE"], 3) for x in levels]
            out.append(f"| {m} | " + " | ".join(cells) + f" | {fmt(r['AUILC']['MAE'], r.get('AUILC_std', {}).get('MAE'), 4)} |")
    if walls.get(protocol):
        out += ["", "Wall time of each training run (train + validation + test scoring; runs side by side on the shared "
                "2-core machine at nice 15, so these are not benchmarks):", ""]
        for m in main:
            out.append(f"- {m}: " + wall_line(walls[protocol].get(m, [])))
    return out + [""]


def wall_line(runs: list[tuple[str, int]]) -> str:
    """Each run's seconds, or for many runs (per-rate: seeds x rates) their range and sum."""
    if not runs:
        return "not recorded"
    if len(runs) <= 6:
        return ", ".join(f"seed {seed}: {seconds} s" for seed, seconds in runs)
    seconds = [s for _, s in runs]
    return f"{len(runs)} runs, {min(seconds)}-{max(seconds)} s each, {sum(seconds)} s in all"


def read_walls(path: Path | None) -> dict:
    """protocol -> model -> [(seed, or "seed rRATE" for per-rate runs, seconds)]."""
    walls: dict[str, dict[str, list[tuple[str, int]]]] = defaultdict(lambda: defaultdict(list))
    if path and path.is_file():
        with path.open() as f:
            for row in csv.reader(f, delimiter="\t"):
                if len(row) == 4:
                    protocol, model, seed, seconds = row
                else:  # an older two-column layout: model, seed, seconds
                    (model, seed, seconds), protocol = row, "single-model"
                walls[protocol][model].append((seed, int(seconds)))
    return walls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    p.add_argument("--wall", type=Path, help="protocol<TAB>model<TAB>seed<TAB>seconds per training run")
    p.add_argument("--models", default="text-only,late-fusion,dynmm,dynmm-hard,tfn-style,lmf-style,gated,emt-dlfr,emt")
    p.add_argument("--write", type=Path, help="a Markdown file whose generated blocks (one per protocol) are replaced by the tables")
    args = p.parse_args()
    results = load(args.results, args.models.split(","))
    if not results:
        raise SystemExit(f"no <model>.json in {args.results} or its protocol folders")
    walls = read_walls(args.wall)
    order = [p for p in ("single-model", "lnln", "per-rate") if p in results] + \
        [p for p in results if p not in ("single-model", "lnln", "per-rate")]
    sections = {protocol: "\n".join(protocol_section(protocol, results[protocol], walls)) for protocol in order}
    print("\n".join(sections.values()))
    if args.write:
        doc = args.write.read_text(encoding="utf-8")
        args.write.write_text(write_blocks(doc, sections, str(args.write)), encoding="utf-8")

if __name__ == "__main__":
    main()
