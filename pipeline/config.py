"""The workflow config: one pydantic model composed of each step's own config model.

A workflow YAML has one section per step (`dataset`, `extract`, `shards`; later `train`,
`evaluate`, `report`) plus `run_name`. Each `msaflow` command reads its own section with
`--config YAML`; the Snakefile validates the whole file against
`workflow/schemas/config.schema.json`, which is generated from these models:

    python -m msaflow.pipeline.config --write-schema     # after changing any step's model
    python -m msaflow.pipeline.config --check CONFIG.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from msaflow.configfile import load_yaml
from msaflow.pipeline.extraction.settings import ExtractConfig
from msaflow.datasets.manifest import ManifestConfig
from msaflow.pipeline.data.shard_plan import ShardsConfig
from msaflow.pipeline.training.options import EvaluateSection, TrainSection  # the train/evaluate commands' own models

# The workflow's schema file, in the source tree (an installed msaflow has none: use workflow_schema())
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.json"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class DatasetSection(ManifestConfig):
    """The manifest step's config, with the dataset root required (the workflow has no CLI argument)."""

    root: str = Field(description="dataset folder; a relative path is relative to the folder snakemake runs in")


class WorkflowSection(BaseModel):
    """How the Snakefile runs the steps (not what they compute)."""

    model_config = ConfigDict(extra="forbid")

    extract_chunks: PositiveInt = Field(2, description="parallel `msaflow extract --chunk K/N` jobs")
    extract_mem_mb: PositiveInt = Field(4000, description="memory per extraction job (MB)")
    extract_gpus: int = Field(0, ge=0, description="GPUs per extraction job (Snakemake resource `gpu`; "
                                                   "bound them with snakemake --resources gpu=N)")


class WorkflowConfig(BaseModel):
    """The whole workflow YAML. Results land in `results/<run_name>/`."""

    model_config = ConfigDict(extra="forbid", title="msaflow workflow config")

    run_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="results/<run_name>/")
    dataset: DatasetSection | None = Field(None, description="raw media to run the whole workflow on")
    pickle: str | None = Field(None, description="an MMSA feature pickle (e.g. unaligned_50.pkl) to train on "
                                                 "instead of raw media: the workflow then starts at `train`")
    workflow: WorkflowSection = Field(default_factory=WorkflowSection)
    extract: ExtractConfig = Field(default_factory=ExtractConfig, description="options of `msaflow extract`")
    shards: ShardsConfig = Field(default_factory=ShardsConfig, description="options of `msaflow shards`")
    train: TrainSection = Field(default_factory=TrainSection, description="`msaflow train` runs")
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection, description="options of `msaflow evaluate`")


    @model_validator(mode="after")
    def one_data_source(self) -> "WorkflowConfig":
        if (self.dataset is None) == (self.pickle is None):
            raise ValueError("give exactly one of `dataset` (raw media) and `pickle` (MMSA features)")
        return self


def workflow_schema() -> dict:
    schema = WorkflowConfig.model_json_schema()
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def schema_text() -> str:
    return json.dumps(workflow_schema(), indent=2, sort_keys=True) + "\n"


def load_workflow_config(path: str | Path) -> WorkflowConfig:
    return WorkflowConfig.model_validate(load_yaml(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="workflow config: JSON schema and validation")
    parser.add_argument("--write-schema", action="store_true",
                        help="regenerate workflow/schemas/config.schema.json (in a source checkout)")
    parser.add_argument("--check", type=Path, metavar="CONFIG", help="validate a workflow YAML")
    args = parser.parse_args(argv)
    if not (args.write_schema or args.check):
        parser.error("nothing to do: give --write-schema and/or --check CONFIG")
    if args.write_schema:
        if not (SCHEMA_PATH.parents[2] / "Snakefile").is_file():  # installed, not a source checkout
            parser.error(f"--write-schema writes into a source checkout; {SCHEMA_PATH.parents[2]} is not one")
        SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
        SCHEMA_PATH.write_text(schema_text(), encoding="utf-8")
        print(f"wrote {SCHEMA_PATH}")
    if args.check:
        try:
            load_workflow_config(args.check)
        except (ValueError, ValidationError) as exc:
            print(f"{args.check}: invalid workflow config:\n{exc}", file=sys.stderr)
            return 2
        print(f"{args.check}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
