# msaflow workflow: manifest -> extract (N parallel chunk jobs) -> shards.
#
#   snakemake --cores 2 --configfile config/demo.yaml
#
# Every rule calls one `msaflow` command; the steps' knobs live in the config file (validated
# against pipeline/schemas/workflow.schema.json) and results in results/<run_name>/.
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

validate(config, "pipeline/schemas/workflow.schema.json")
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

    root = Path(CFG.dataset.root)
    try:
        path = select_adapter(root, CFG.dataset).csv_path(root, CFG.dataset) if root.is_dir() else None
    except StopIteration:  # no layout recognised: `msaflow manifest` explains
        path = None
    return [str(path)] if path is not None and path.is_file() else []


def section_hash(*names):
    """A rule re-runs when the config sections it depends on change (rerun trigger `params`)."""
    dumped = CFG.model_dump(mode="json")
    return hashlib.sha256(canonical_json({n: dumped[n] for n in names}).encode()).hexdigest()[:16]


onstart:
    _write_resolved_config()  # not on a dry run


rule all:
    input:
        f"{RUN}/shards/summary.json",


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
        f"{EXTRACT_DIR}/chunks/{{k}}-of-{N_CHUNKS}.json",
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
        chunks=expand(rules.extract.output[0], k=range(1, N_CHUNKS + 1)),  # chunks are 1-based
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
        "msaflow shards {params.extract:q} --manifest {input.manifest:q} -o {params.out:q}"
        " --config {params.config:q} > {log:q} 2>&1"
