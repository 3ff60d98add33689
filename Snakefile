# msaflow workflow: manifest -> extract (N parallel chunk jobs) -> shards -> train (seeds x rates)
# -> evaluate -> report.
#
#   snakemake --cores 2 --configfile config/demo.yaml
#
# Every rule calls one `msaflow` command; the steps' knobs live in the config file (validated
# against workflow/schemas/config.schema.json) and results in results/<run_name>/.
# A killed run resumes with the same command plus --rerun-incomplete (docs/workflow.md).

import hashlib
import os
import sys
from pathlib import Path

import yaml
from snakemake.utils import validate

from msaflow.pipeline.config import WorkflowConfig, canonical_json, extract_config_hash

# The rules call the `msaflow` console script installed beside the Python running Snakemake,
# so the workflow works from a virtual environment that is not activated.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

validate(config, "workflow/schemas/config.schema.json", set_default=False)  # pydantic fills the defaults
CFG = WorkflowConfig.model_validate(config)
RUN = f"results/{CFG.run_name}"
N_CHUNKS = CFG.workflow.extract_chunks
# Clip tars are reused across runs (resume), so each extract config gets its own folder:
# changing a knob re-extracts instead of mixing clips made with different settings.
EXTRACT_DIR = f"{RUN}/extract-{extract_config_hash(CFG.extract.model_dump(mode='json'))[:12]}"
# Each command reads its own section from this copy of the validated config (defaults filled in).
CONFIG_FILE = f"{RUN}/config.yaml"


def _write_resolved_config():
    text = yaml.safe_dump(CFG.model_dump(mode="json"), sort_keys=True, allow_unicode=True)
    path = Path(CONFIG_FILE)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def dataset_csv():
    """The dataset's CSV (labels, splits, transcripts), so that editing it re-runs the manifest."""
    from msaflow.datasets.adapters import select_adapter

    if CFG.dataset is None:
        return []
    root = Path(CFG.dataset.root)
    try:
        path = select_adapter(root, CFG.dataset).csv_path(root, CFG.dataset) if root.is_dir() else None
    except StopIteration:  # no layout recognised: `msaflow manifest` explains
        path = None
    # local(): read in place, never through a storage provider (profiles/kubernetes); `msaflow manifest`
    # reads the dataset from the config, this input only makes an edited CSV re-run the manifest
    return [local(str(path))] if path is not None and path.is_file() else []


def section_hash(*names):
    """A rule re-runs when the config sections it depends on change (rerun trigger `params`)."""
    dumped = CFG.model_dump(mode="json")
    return hashlib.sha256(canonical_json({n: dumped[n] for n in names}).encode()).hexdigest()[:16]


onstart:
    _write_resolved_config()  # not on a dry run


def training_runs():
    """Run folder name -> the `msaflow train` arguments of that run (seeds x rates per protocol)."""
    t = CFG.train
    rates = t.rates if t.protocol == "per-rate" else [None]
    runs = {}
    for rate in rates:
        for seed in t.seeds:
            name = f"{t.model}-{t.protocol}" + ("" if rate is None else f"-r{rate:g}") + f"-s{seed}"
            args = f"--model {t.model} --dataset {t.preset} --protocol {t.protocol} --seed {seed}"
            args += "" if rate is None else f" --missing-rate {rate}"
            for flag, value in (("--epochs", t.epochs), ("--patience", t.patience),
                                ("--batch-size", t.batch_size), ("--grad-accum", t.grad_accum)):
                args += "" if value is None else f" {flag} {value}"
            args += " --freeze-text" if t.freeze_text else ""
            args += f" --valid-rates {t.valid_rates}" if t.valid_rates else ""
            runs[name] = args
    return runs


# A run folder name carries the hash of the train section: changed settings train afresh in a
# new folder, while a stopped run with unchanged settings resumes from its checkpoint.
TRAIN_RUNS = {f"{name}-{section_hash('train')[:8]}": args for name, args in training_runs().items()}
# Training reads the workflow's own shards, or an MMSA feature pickle given instead of raw media.
TRAIN_DATA = CFG.pickle or f"{RUN}/shards"
EVAL_NAME = f"{CFG.train.model}-{CFG.train.protocol}"
# More than one GPU per training job: the job runs under torchrun, one process per GPU.
TRAIN_LAUNCH = (f"torchrun --standalone --nproc_per_node {CFG.train.gpus} -m msaflow.pipeline.cli"
                if CFG.train.gpus > 1 else "msaflow")


rule all:
    input:
        f"{RUN}/report/report.md",


rule manifest:
    input:
        dataset_csv(),
    output:
        f"{RUN}/manifest.csv",
    params:
        config=CONFIG_FILE,
        sections=section_hash("dataset"),
    log:
        f"{RUN}/logs/manifest.log",
    benchmark:
        f"{RUN}/benchmarks/manifest.tsv"
    resources:
        mem_mb=2000,
        runtime=30,
    threads: 1
    shell:
        "msaflow manifest -o {output:q} --config {params.config:q} > {log:q} 2>&1"


rule extract:
    input:
        manifest=rules.manifest.output[0],
    output:
        # temporary: deleted once the shards are built (the shards step also removes the clip tars it
        # packed), so a run with nothing changed does nothing, and one that must rebuild the shards
        # (new manifest, other settings) re-extracts the clips first instead of missing them
        temp(f"{EXTRACT_DIR}/chunks/{{k}}-of-{N_CHUNKS}.json"),
    params:
        out=EXTRACT_DIR,
        n=N_CHUNKS,
        config=CONFIG_FILE,
        sections=section_hash("extract"),
    log:
        f"{RUN}/logs/extract-{{k}}-of-{N_CHUNKS}.log",
    benchmark:
        f"{RUN}/benchmarks/extract-{{k}}-of-{N_CHUNKS}.tsv"
    wildcard_constraints:
        k=r"\d+",
    resources:
        mem_mb=CFG.workflow.extract_mem_mb,
        runtime=24 * 60,
        gpu=CFG.workflow.extract_gpus,
    threads: max(1, CFG.extract.threads)
    shell:
        "msaflow extract {input.manifest:q} -o {params.out:q} --config {params.config:q}"
        " --chunk {wildcards.k}/{params.n} > {log:q} 2>&1"


rule shards:
    input:
        manifest=rules.manifest.output[0],
        # chunks are 1-based; the pattern is spelled out (not rules.extract.output) so that a storage
        # provider's flags on it (profiles/kubernetes) do not reach expand()
        chunks=expand(f"{EXTRACT_DIR}/chunks/{{k}}-of-{N_CHUNKS}.json", k=range(1, N_CHUNKS + 1)),
    output:
        f"{RUN}/shards/summary.json",
    params:
        extract=EXTRACT_DIR,
        out=f"{RUN}/shards",
        config=CONFIG_FILE,
        sections=section_hash("extract", "shards"),
    log:
        f"{RUN}/logs/shards.log",
    benchmark:
        f"{RUN}/benchmarks/shards.tsv"
    resources:
        mem_mb=4000,
        runtime=60,
    threads: 1
    shell:
        # --remove-packed: the clip tars are deleted once every shard output is written, so the raw
        # data is kept once; a rerun after a kill during the removal keeps the finished shards
        "msaflow shards {params.extract:q} --manifest {input.manifest:q} -o {params.out:q}"
        " --config {params.config:q} --remove-packed > {log:q} 2>&1"


rule train:
    input:
        data=TRAIN_DATA if CFG.pickle else rules.shards.output[0],
    output:
        f"{RUN}/runs/{{run}}/metrics.json",
    params:
        args=lambda wc: TRAIN_RUNS[wc.run],
        data=TRAIN_DATA,
        out=lambda wc: f"{RUN}/runs/{wc.run}",
        config=CONFIG_FILE,
        sections=section_hash("train"),
    log:
        f"{RUN}/logs/train-{{run}}.log",
    benchmark:
        f"{RUN}/benchmarks/train-{{run}}.tsv"
    wildcard_constraints:
        run="|".join(TRAIN_RUNS),
    resources:
        mem_mb=CFG.train.mem_mb,
        runtime=24 * 60,
        gpu=CFG.train.gpus,
    threads: CFG.train.threads
    shell:
        "{TRAIN_LAUNCH} train --data {params.data:q} -o {params.out:q} --config {params.config:q}"
        " --threads {threads} {params.args} > {log:q} 2>&1"


rule evaluate:
    input:
        runs=[f"{RUN}/runs/{name}/metrics.json" for name in TRAIN_RUNS],  # spelled out: see rule shards
    output:
        f"{RUN}/evaluate/{EVAL_NAME}.json",
    params:
        data=TRAIN_DATA,
        runs=[f"{RUN}/runs/{name}" for name in TRAIN_RUNS],
        # per-rate runs are each scored at their own rate; one model is scored on the whole grid
        rates=f"--rates {CFG.evaluate.rates}" if CFG.train.protocol == "single-model" else "",
        corruption=CFG.evaluate.corruption,
        sections=section_hash("train", "evaluate"),
    log:
        f"{RUN}/logs/evaluate.log",
    benchmark:
        f"{RUN}/benchmarks/evaluate.tsv"
    resources:
        mem_mb=CFG.train.mem_mb,
        runtime=60,
        gpu=min(CFG.train.gpus, 1),  # scoring runs in one process
    threads: CFG.train.threads
    shell:
        "msaflow evaluate {params.runs:q} --data {params.data:q} {params.rates}"
        " --corruption {params.corruption} --threads {threads} -o {output:q} > {log:q} 2>&1"


rule report:
    input:
        shards=[] if CFG.pickle else rules.shards.output[0],
        metrics=rules.evaluate.output[0],
    output:
        f"{RUN}/report/report.md",
    params:
        shards="" if CFG.pickle else f"--shards {RUN}/shards",
        out=f"{RUN}/report",
        config=CONFIG_FILE,
        timings=f"{RUN}/benchmarks",
        title=f"msaflow run report: {CFG.run_name}",
        label=EVAL_NAME,  # the curve's name in the report
    log:
        f"{RUN}/logs/report.log",
    benchmark:
        f"{RUN}/benchmarks/report.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    threads: 1
    shell:
        "msaflow report -o {params.out:q} {params.shards} --metrics {params.label}={input.metrics:q}"
        " --config {params.config:q} --timings {params.timings:q} --title {params.title:q} > {log:q} 2>&1"
