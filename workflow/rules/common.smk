# Shared by the step files: the validated config, the run's paths and the helper functions.

import copy
import hashlib
import os
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

from msaflow.configfile import canonical_json
from msaflow.pipeline.config import WorkflowConfig
from msaflow.pipeline.extraction.settings import extract_config_hash

# Every shipped config is complete: one given with --configfile replaces config/config.yaml (the demo)
# instead of being merged into it, so no demo setting leaks into another corpus's run.
if workflow.overwrite_configfiles:
    config.clear()
    config.update(copy.deepcopy(workflow.config_settings.overwrite_config))
    workflow.configfiles[:] = workflow.overwrite_configfiles

validate(config, "../schemas/config.schema.json", set_default=False)  # pydantic fills the defaults
CFG = WorkflowConfig.model_validate(config)

if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    # workflow/envs/msaflow.yaml installs msaflow from this source tree, named by this variable
    os.environ.setdefault("MSAFLOW_SOURCE", str(Path(workflow.basedir).resolve()))
else:
    # The rules call the `msaflow` console script installed beside the Python running Snakemake,
    # so the workflow works from a virtual environment that is not activated.
    shell.prefix(f'set -euo pipefail; export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"; ')

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


onstart:
    _write_resolved_config()  # not on a dry run


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


def parent(path, levels=1):
    """The folder `levels` above a job's input or output file: folder arguments follow the files."""
    return str(Path(path).parents[levels - 1])


def training_runs():
    """Run folder name -> what sets that run apart: `--seed` (and `--missing-rate` for per-rate).
    Every other option `msaflow train` reads from the config file's `train:` section."""
    t = CFG.train
    rates = t.rates if t.protocol == "per-rate" else [None]
    runs = {}
    for rate in rates:
        for seed in t.seeds:
            name = f"{t.model}-{t.protocol}" + ("" if rate is None else f"-r{rate:g}") + f"-s{seed}"
            runs[name] = f"--seed {seed}" + ("" if rate is None else f" --missing-rate {rate}")
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


def train_data(wildcards, input):
    """`msaflow train --data`: the pickle itself, or the folder of the shards' summary.json."""
    return input.data if CFG.pickle else parent(input.data)


def report_shards(wildcards, input):
    """`msaflow report --shards FOLDER`; a pickle run has no shards."""
    return "" if CFG.pickle else f"--shards {shlex.quote(parent(input.shards))}"


def shard_report_items():
    """The report's outputs read from the shards (a pickle run has none): the data and failures
    tables, and a folder with one face-crop contact sheet per split that has faces."""
    if CFG.pickle:
        return {}
    return {
        "data": report(f"{RUN}/report/tables/data.csv", caption="../report/data.rst", category="Data"),
        "failures": report(f"{RUN}/report/tables/failures.csv", caption="../report/failures.rst",
                           category="Data"),
        "faces": report(directory(f"{RUN}/report/faces"), patterns=["faces_{split}.png"],
                        caption="../report/faces.rst", category="Face crops", labels={"split": "{split}"}),
    }
