"""`msaflow report`: one page that says what a run did and how robust its model is.

Sections: data summary (samples per split, clips left out, missing modalities), the
failures table, robustness curves (every metric against the missing rate, one line per
model), a contact sheet of face crops per split for visual QC, the run configuration and
the time each workflow step took. Written as Markdown and as a self-contained HTML page, with
each figure and table also a file of its own (the workflow's `snakemake --report` shows them):

    report.md, report.html     the page
    robustness.png             the robustness curves
    faces/faces_<split>.png    a contact sheet per split with faces (the folder is there with --shards)
    tables/<name>.csv          the page's tables: data, failures, auilc, rates, timings
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msaflow.pipeline.data.shard_plan import FAILURE_COLUMNS
from msaflow.tario import atomic_path, decode_member, iter_tar_members

log = logging.getLogger("msaflow.report")

CURVE_METRICS = ["MAE", "Corr", "Acc-2_non0", "F1_non0", "Acc-7", "Acc-5"]


@dataclass
class Table:
    name: str  # written as tables/<name>.csv
    header: list[str]
    rows: list[list]

    def markdown(self) -> str:
        return md_table(self.header, self.rows)


@dataclass
class Section:
    title: str
    markdown: str  # body, Markdown
    images: list[Path] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)  # also in the body


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", required=True, type=Path, help="report folder (report.md, report.html, PNGs)")
    p.add_argument("--shards", type=Path, help="shard folder (index.json per split, failures.csv, summary.json)")
    p.add_argument("--metrics", type=Path, nargs="*", default=[],
                   help="metrics.json files; the parent folder name labels each curve unless NAME=PATH is given")
    p.add_argument("--config", type=Path, help="the run's config file, copied into the report")
    p.add_argument("--timings", type=Path, help="folder of Snakemake benchmark .tsv files")
    p.add_argument("--faces-per-split", type=int, default=16, help="clips per split in the contact sheet")
    p.add_argument("--title", default="msaflow run report")


# ---------------------------------------------------------------- tables and values
def md_table(header: list[str], rows: list[list]) -> str:
    cell = lambda v: "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def metric_value(v) -> float | None:
    """A metric as a float: plain numbers, or the mean of a {"mean", "std"} aggregate."""
    if isinstance(v, dict):
        v = v.get("mean")
    return None if v is None else float(v)


def fmt(v) -> str:
    if isinstance(v, dict) and "mean" in v:
        m, s = metric_value(v), v.get("std")
        return "n/a" if m is None else (f"{m:.3f} ± {s:.3f}" if s is not None else f"{m:.3f}")
    return "n/a" if v is None else f"{float(v):.3f}"


def load_metrics(spec: str | Path) -> tuple[str, dict]:
    spec = str(spec)
    name, _, path = spec.partition("=") if "=" in spec else (None, "", spec)
    path = Path(path)
    return name or path.parent.name, json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- sections
def data_section(shards: Path) -> Section:
    """Samples per split and what was missing, from the shard step's summary.json and index files."""
    summary_path = shards / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        splits = dict(sorted(summary.get("splits", {}).items()))
        if "total" in summary:
            splits["total"] = summary["total"]
        columns = ["manifest_rows", "samples", "failures", "no_face", "no_audio", "empty_text", "text_given",
                   "text_recognised", "shards"]
        table = Table("data", ["split"] + columns, [[name] + [counts.get(c) for c in columns]
                                                     for name, counts in splits.items()])
        body = table.markdown()
        body += f"\n\nMode `{summary.get('mode')}`; extract config hash `{str(summary.get('config_hash'))[:12]}`, " \
                f"manifest hash `{str(summary.get('manifest_hash'))[:12]}`."
        body += "\n\n" + transcripts_line(shards, summary.get("total", {}))
        return Section("Data", body, tables=[table])
    table = Table("data", ["split", "mode", "samples", "shards"], [])
    for index_path in sorted(shards.glob("*/index.json")):
        index = json.loads(index_path.read_text(encoding="utf-8"))
        table.rows.append([index["split"], index.get("mode"), index["n_samples"], len(index.get("shards", []))])
    return Section("Data", table.markdown() if table.rows else "_no shards found_", tables=[table])


def transcripts_line(shards: Path, total: dict) -> str:
    """Where the samples' transcripts came from: given in the dataset, recognised from speech, none."""
    if "text_recognised" not in total:
        return f"Transcripts: {total.get('samples', 0) - total.get('empty_text', 0)} given, none recognised " \
               f"(shards made before transcript sources were recorded)."
    recognisers = set()
    for index_path in sorted(shards.glob("*/index.json")):
        asr = json.loads(index_path.read_text(encoding="utf-8")).get("asr")
        if asr:
            recognisers.add(f"`{asr.get('recogniser')}`, weights sha256 `{str(asr.get('sha256'))[:12]}`")
    by = f" by speech recognition ({'; '.join(sorted(recognisers))})" if recognisers else ""
    return (f"Transcripts: {total['text_given']} given, {total['text_recognised']} recognised{by}, "
            f"{total.get('empty_text', 0)} samples without text.")


def failures_section(shards: Path) -> Section:
    path = shards / "failures.csv"
    if not path.is_file():
        return Section("Clips left out", "_no failures.csv_", tables=[Table("failures", FAILURE_COLUMNS, [])])
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or FAILURE_COLUMNS)
    table = Table("failures", header, [[r[h] for h in header] for r in rows])
    if not rows:
        return Section("Clips left out", "None: every clip of the manifest is in the shards.", tables=[table])
    return Section("Clips left out", f"{len(rows)} clip(s) could not be used:\n\n" + table.markdown(),
                   tables=[table])


def defined_metrics(metrics: list[tuple[str, dict]]) -> list[str]:
    """CURVE_METRICS with a value at some rate of some model (an undefined one, e.g. Corr on constant
    labels, is left out rather than drawn as an empty plot)."""
    return [k for k in CURVE_METRICS
            if any(metric_value(m["rates"][r].get(k)) is not None for _, m in metrics for r in m["rates"])]


def rate_step_text(metrics: list[tuple[str, dict]]) -> str:
    """How the AUILC was integrated: the step of the rate grid (or the rates, when uneven)."""
    grids = {tuple(sorted(float(r) for r in m["rates"])) for _, m in metrics}
    parts = []
    for grid in sorted(grids):
        steps = {round(b - a, 6) for a, b in zip(grid, grid[1:])}
        parts.append(f"step {steps.pop():g} over {grid[0]:g} to {grid[-1]:g}" if len(steps) == 1
                     else "over the rates " + ", ".join(f"{r:g}" for r in grid))
    return "; ".join(parts)


def labels_note(metrics: list[tuple[str, dict]]) -> str:
    """A sentence when the test labels are constant (the metrics that need two classes are undefined)."""
    for _, m in metrics:
        labels = m.get("labels") or {}
        if labels.get("distinct") == 1:
            return (f"**Every one of the {labels.get('n')} test labels is {labels.get('min'):g}**: the labels are "
                    f"constant, so correlation and the two-class accuracies and F1 are undefined; only the "
                    f"metrics defined on these labels are shown. These numbers say the workflow ran, not how good "
                    f"the model is.\n\n")
    return ""


def robustness_section(metrics: list[tuple[str, dict]], out: Path) -> Section:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = defined_metrics(metrics) or CURVE_METRICS[:1]
    undefined = [k for k in CURVE_METRICS if k not in shown]
    cols = min(3, len(shown))
    rows_n = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.4 * cols, 3.5 * rows_n), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, shown):
        for name, m in metrics:
            rates = sorted(m["rates"], key=float)
            ys = [metric_value(m["rates"][r].get(metric)) for r in rates]
            xs = [float(r) for r, y in zip(rates, ys) if y is not None]
            ax.plot(xs, [y for y in ys if y is not None], marker="o", label=name)
        ax.set(title=metric, xlabel="missing rate")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    png = out / "robustness.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)

    keys = shown
    auilc_table = Table("auilc", ["model", "n_test"] + keys,
                        [[name, m.get("n_test")] + [fmt(m.get("AUILC", {}).get(k)) for k in keys]
                         for name, m in metrics])
    rates_table = Table("rates", ["model", "rate"] + keys, [])  # the per-model tables below, in one file
    body = labels_note(metrics)
    if undefined:
        body += f"Left out, undefined on this test split at every rate: {', '.join(undefined)}.\n\n"
    body += (f"AUILC (area under the metric-vs-missing-rate curve, trapezoid rule, {rate_step_text(metrics)}; "
             f"not divided by the range):\n\n")
    body += auilc_table.markdown()
    for name, m in metrics:
        rows = [[r] + [fmt(m["rates"][r].get(k)) for k in keys] for r in sorted(m["rates"], key=float)]
        rates_table.rows += [[name] + row for row in rows]
        body += f"\n\n**{name}** per missing rate:\n\n" + md_table(["rate"] + keys, rows)
    return Section("Robustness to missing features", body, [png], [auilc_table, rates_table])


def first_faces(shard_files: list[Path], n: int) -> list[tuple[str, np.ndarray]]:
    """(key, middle face crop) of the first n samples that have a face, read straight from the tars."""
    found: list[tuple[str, np.ndarray]] = []
    for shard in shard_files:
        members: dict[str, dict] = {}
        for name, data in iter_tar_members(shard):
            key, _, suffix = name.partition(".")
            if suffix in ("face.npy", "vision_mask.npy"):
                members.setdefault(key, {})[suffix] = decode_member(suffix, data)
        for key, m in members.items():
            face, mask = m.get("face.npy"), m.get("vision_mask.npy")
            if face is None or mask is None or not mask.any():
                continue
            with_face = np.flatnonzero(mask)
            found.append((key, face[with_face[len(with_face) // 2]]))
            if len(found) == n:
                return found
    return found


def contact_sheet_section(shards: Path, out: Path, per_split: int) -> Section:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, notes = [], []
    for index_path in sorted(shards.glob("*/index.json")):
        index = json.loads(index_path.read_text(encoding="utf-8"))
        split = index["split"]
        if index.get("mode") != "raw":
            notes.append(f"{split}: {index.get('mode')} shards hold embeddings, not crops")
            continue
        faces = first_faces([index_path.parent / s["name"] for s in index["shards"]], per_split)
        if not faces:
            notes.append(f"{split}: no sample with a face")
            continue
        cols = min(8, len(faces))
        rows = -(-len(faces) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (key, crop) in zip(axes.flat, faces):
            ax.imshow(crop)
            ax.set_title(key[-14:], fontsize=6)
        fig.suptitle(f"{split}: middle face crop of {len(faces)} clips")
        fig.tight_layout()
        png = out / "faces" / f"faces_{split}.png"
        fig.savefig(png, dpi=90)
        plt.close(fig)
        images.append(png)
    body = "One crop per clip (the middle frame with a face), for a visual check of detection and alignment."
    if notes:
        body += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return Section("Face crops", body, images)


def timings_section(folder: Path) -> Section:
    table = Table("timings", ["step", "seconds", "max RSS (MB)"], [])
    for tsv in sorted(folder.rglob("*.tsv")) if folder.is_dir() else []:
        with tsv.open(encoding="utf-8", newline="") as f:
            for rec in csv.DictReader(f, delimiter="\t"):
                table.rows.append([str(tsv.relative_to(folder).with_suffix("")), f"{float(rec['s']):.1f}",
                                   rec.get("max_rss", "")])
    return Section("Timings", table.markdown() if table.rows else "_none recorded_", tables=[table])


def config_section(path: Path) -> Section:
    return Section("Configuration", f"`{path.name}`:\n\n```yaml\n{path.read_text(encoding='utf-8').strip()}\n```")


# ---------------------------------------------------------------- rendering
def render_markdown(title: str, sections: list[Section], out: Path) -> str:
    parts = [f"# {title}"]
    for s in sections:
        parts.append(f"## {s.title}\n\n{s.markdown}")
        parts += [f"![{img.stem}]({img.relative_to(out)})" for img in s.images]
    return "\n\n".join(parts) + "\n"


def render_html(title: str, sections: list[Section]) -> str:
    """A self-contained page: Markdown bodies shown verbatim in <pre>, images inlined."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2><pre>{html.escape(s.markdown)}</pre>")
        for img in s.images:
            data = base64.b64encode(img.read_bytes()).decode("ascii")
            body.append(f'<img alt="{html.escape(img.stem)}" src="data:image/png;base64,{data}">')
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}pre{white-space:pre-wrap;background:#f6f6f6;padding:8px}img{max-width:100%}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def build_report(args: argparse.Namespace) -> list[Section]:
    args.out.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []
    if args.shards:
        (args.out / "faces").mkdir(exist_ok=True)  # there even when no split has faces (features shards)
        sections += [data_section(args.shards), failures_section(args.shards),
                     contact_sheet_section(args.shards, args.out, args.faces_per_split)]
    if args.metrics:
        sections.append(robustness_section([load_metrics(m) for m in args.metrics], args.out))
    if args.timings:
        sections.append(timings_section(args.timings))
    if args.config:
        sections.append(config_section(args.config))
    return sections


def write_tables(sections: list[Section], out: Path) -> None:
    (out / "tables").mkdir(exist_ok=True)
    for table in (t for s in sections for t in s.tables):
        with atomic_path(out / "tables" / f"{table.name}.csv") as tmp:
            with tmp.open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(table.header)
                writer.writerows(["" if v is None else v for v in row] for row in table.rows)


def main(args: argparse.Namespace) -> int:
    sections = build_report(args)
    write_tables(sections, args.out)
    with atomic_path(args.out / "report.md") as tmp:
        tmp.write_text(render_markdown(args.title, sections, args.out), encoding="utf-8")
    with atomic_path(args.out / "report.html") as tmp:
        tmp.write_text(render_html(args.title, sections), encoding="utf-8")
    log.info(f"report: {args.out / 'report.md'} and report.html ({len(sections)} sections)")
    return 0
