"""The options of `msaflow train` and the workflow's `train:` section: one owner for every default.

`RunSettings` holds the knobs a single run and the workflow share (model, preset, protocol, epochs,
...); `TrainOptions` adds what one `msaflow train` run takes besides (data, seed, rate, caches,
loader); `TrainSection` adds what the workflow sweeps and reserves (seeds, rates, GPUs, memory, the
`model_settings` / `optim` / `lengths` overrides). argparse flags default to "not given", so a
run's options come from, in this order of precedence:

    flags  >  the `train:` section of `--config FILE` (a workflow config)  >  the defaults here

A flag that overrides a different value of the section says so in one note naming both. The
section's sweep lists pick a single run's point when its flag is not given: `seeds: [S]` gives
`--seed S`, and for the `per-rate` protocol `rates: [R]` gives `--missing-rate R`; a list of several
values needs the flag (one run cannot be all of them). So the workflow's train job is

    msaflow train --data D -o OUT --config CFG --seed S [--missing-rate R] --threads N

`read_config` reads `--config` (a plain overrides file with `model:`, `optim:`, `lengths:`,
`extract:`, or a workflow config) with `msaflow.configfile`; every mistake in it is one line
naming the file and the key. This module imports neither torch nor the data layer at module
level: the workflow's config model imports it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

from msaflow.device import DEVICES
from msaflow.model.config import ModelConfig, OptimConfig
from msaflow.pipeline.data.lengths import LengthConfig
from msaflow.pipeline.training.rates import CORRUPTIONS, PROTOCOLS, TEST_GRID

PRESETS = ("mosi", "mosei", "sims")
FLAG_NAMES = {"preset": "--dataset"}  # option -> its flag, where the flag is not the name with - for _
PLAIN_SECTIONS = ("model", "optim", "lengths", "extract")


class RunSettings(BaseModel):
    """What a single `msaflow train` run and the workflow's `train:` section share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("emt-dlfr", description="registered model (`msaflow train --list-models`); `end-to-end` "
                                               "trains front-ends over raw shards (its settings in model.extra)")
    preset: Literal[PRESETS] = Field("mosi", description="hyperparameter preset and metric family "
                                                         "(`msaflow train --dataset`)")
    protocol: Literal[PROTOCOLS] = Field(
        "single-model", description="single-model: one model, rate drawn per batch, scored at every rate; "
                                    "per-rate: a model per rate; lnln: rates per sample and modality")
    epochs: PositiveInt | None = Field(None, description="maximum epochs (preset: 30)")
    patience: PositiveInt | None = Field(None, description="early-stopping patience in epochs (preset: 8)")
    batch_size: PositiveInt | None = Field(None, description="samples per batch (preset: 32)")
    grad_accum: PositiveInt | None = Field(None, description="batches per optimiser step (preset: 4)")
    freeze_text: bool = Field(False, description="keep the text encoder frozen (fast CPU mode)")
    valid_rates: str | None = Field(None, description="missing rates of the validation loss, e.g. '0.0,0.5' "
                                                      "(null: the training rate for per-rate, 0.0:1.0:0.2 for "
                                                      "single-model, 0.0:0.9:0.1 for lnln)")
    threads: PositiveInt = Field(2, description="torch CPU threads (also the job's Snakemake threads)")


class TrainOptions(RunSettings):
    """Every option of one `msaflow train` run (flag = the name with - for _, `--dataset` for preset)."""

    data: str | Path | None = Field(None, description="shard folder (<split>/index.json, features or raw mode) or MMSA "
                                               "feature pickle (trusted file; it is unpickled)")
    out: Path | None = Field(None, description="run directory")
    config: Path | dict[str, Any] | None = Field(
        None, description="YAML with `model:`, `optim:`, `lengths:`, `extract:` overrides, or a workflow config "
                          "(its `train:` and `extract:` sections; flags override the train section)")
    missing_rate: float = Field(0.0, ge=0.0, le=1.0, description="per-rate protocol: train/valid missing rate")
    seed: int = Field(0, description="training seed (weights, batch order, train masks)")
    mask_seed: int = Field(0, description="seed of the fixed valid/test masks")
    text_model: str | None = Field(None, description="'minilm' (default) or a local Hugging Face model folder")
    complete_share: float = Field(0.5, ge=0.0, le=1.0, description="lnln protocol: probability that a training "
                                                                   "sample keeps a modality complete (rate 0)")
    paper: bool = Field(False, description="per-rate protocol as released: train masks drawn once, the released "
                                           "normalisation (MOSI/MOSEI none, SIMS z-scored) and selection (total loss)")
    fixed_train_masks: bool = Field(False, description="draw the train masks once per sample (released code) "
                                                       "instead of per batch")
    text_cache: Path | None = Field(None, description="frozen-encoder mode: cache text states per split and rate in "
                                                     "this folder (implies --freeze-text and fixed train masks; "
                                                     "single-model rates from the 0.2 grid)")
    no_zscore: bool = Field(False, description="feed audio/vision unnormalised")
    device: Literal[DEVICES] = Field("auto", description="auto: the GPU when there is one (under torchrun: the "
                                                         "process's LOCAL_RANK GPU)")
    limit: NonNegativeInt = Field(0, description="first N samples per split only (smoke tests); 0 = all")
    max_steps: str | None = Field(None, description="per-modality caps, e.g. 'audio=2000,vision=0' (0 = none; "
                                                    "defaults: text=128,audio=1000,vision=500; YAML `lengths:` for "
                                                    "pooling and how)")
    workers: NonNegativeInt = Field(0, description="loader worker processes per rank (shard folders)")
    epoch_steps: NonNegativeInt = Field(0, description="stop each epoch after this many batches (0 = the whole "
                                                       "train split; validation always runs whole)")
    bucket: PositiveInt = Field(8, description="shard folders: batches per length-bucketing window (1 = off)")
    shuffle_buffer: PositiveInt | None = Field(None, description="shard folders: samples per loader worker's "
                                                                 "shuffle buffer (default 1000 features, 128 raw; "
                                                                 "1 = shard order and rotation only)")


class TrainSection(RunSettings):
    """Training runs of the workflow: one `msaflow train` per seed (x rate for `per-rate`)."""

    rates: list[float] = Field([0.0], description="per-rate protocol: training missing rates")
    seeds: list[int] = Field([0], min_length=1, description="one run per seed; metrics are mean +- std")
    gpus: int = Field(0, ge=0, description="GPUs per training job (Snakemake resource `gpu`)")
    mem_mb: PositiveInt = 8000
    model_settings: dict[str, Any] = Field(default_factory=dict,
                                           description="ModelConfig keys over the preset (model/config.py)")
    optim: dict[str, Any] = Field(default_factory=dict,
                                  description="OptimConfig keys over the preset (model/config.py)")
    lengths: LengthConfig = Field(default_factory=LengthConfig,
                                  description="per-modality caps on time steps and pooling (pipeline/data/lengths.py)")


class EvaluateSection(BaseModel):
    """The workflow's `msaflow evaluate` settings."""

    model_config = ConfigDict(extra="forbid")

    rates: str = Field(TEST_GRID, description="missing rates (or noise levels) START:STOP:STEP or a comma list")
    corruption: Literal[CORRUPTIONS] = "missing"


def flag(name: str) -> str:
    """The command-line flag of option `name`."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


# ---------------------------------------------------------------- the --config file


@dataclass(frozen=True)
class ConfigFile:
    """What `--config` gives a run: ModelConfig / OptimConfig overrides, the length caps, the
    extraction section (None when absent) and, for a workflow config, its validated `train:` section."""

    where: str = ""
    model: dict = field(default_factory=dict)
    optim: dict = field(default_factory=dict)
    lengths: dict = field(default_factory=dict)
    extract: dict | None = None
    section: TrainSection | None = None


def read_config(config: Path | dict | None, error=ValueError) -> ConfigFile:
    """The --config file (a path, or its content as a dict); `error` (the caller's user-error
    class) names the file and the key for unreadable YAML, an unknown section or key."""
    if config is None:
        return ConfigFile()
    where = str(config) if not isinstance(config, dict) else "config"
    data = config if isinstance(config, dict) else _load(Path(config), error)
    if "train" in data or "run_name" in data:  # a workflow config
        section = _validated_section(data.get("train") or {}, where, error)
        out = ConfigFile(where, section.model_settings, section.optim, section.lengths.model_dump(),
                         data.get("extract"), section)
        names = {"model": "train.model_settings", "optim": "train.optim"}
    else:
        unknown = sorted(set(data) - set(PLAIN_SECTIONS))
        if unknown:
            raise error(f"{where}: unknown section(s) {unknown}{did_you_mean(unknown[0], PLAIN_SECTIONS)}; "
                        f"a --config file has {', '.join(PLAIN_SECTIONS)} (or is a workflow config)")
        out = ConfigFile(where, *(data.get(k) or {} for k in ("model", "optim", "lengths")), data.get("extract"))
        names = {"model": "model", "optim": "optim"}
    for key, cls in (("model", ModelConfig), ("optim", OptimConfig)):
        _check_keys(getattr(out, key), cls, f"{where}: {names[key]}", error)
    return out


def _load(path: Path, error) -> dict:
    from msaflow.configfile import load_yaml

    if not path.is_file():
        raise error(f"{path}: no such file (--config)")
    try:
        return load_yaml(path)
    except ValueError as exc:
        mark = getattr(exc.__cause__, "problem_mark", None)
        if mark is None:
            raise error(f"{exc}; a --config file is a mapping of sections ({', '.join(PLAIN_SECTIONS)})") from exc
        problem = getattr(exc.__cause__, "problem", None) or exc.__cause__
        raise error(f"{path}: not valid YAML at line {mark.line + 1}, column {mark.column + 1} ({problem}): fix "
                    f"the file (`python -m msaflow.pipeline.config --check` checks a workflow config)") from exc


def _validated_section(section, where: str, error) -> TrainSection:
    if not isinstance(section, dict):
        raise error(f"{where}: section 'train' must be a mapping")
    try:
        return TrainSection.model_validate(section)
    except ValidationError as exc:
        raise error(f"{where}: train{_first_error(exc, TrainSection.model_fields)}") from exc


def _check_keys(values, cls, what: str, error) -> None:
    if not isinstance(values, dict):
        raise error(f"{what} must be a mapping of {cls.__name__} keys")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise error(f"{what}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], known)} "
                    f"(the keys are the fields of {cls.__name__} in model/config.py)")


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _first_error(exc: ValidationError, known) -> str:
    """'.key: message' of a pydantic error (with the nearest field name for an unknown key)."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    hint = did_you_mean(str(first["loc"][0]), known) if first["type"] == "extra_forbidden" else ""
    return f"{'.' + loc if loc else ''}: {first['msg']}{hint}"


# ---------------------------------------------------------------- flags over the section over defaults


def merge_options(given: dict[str, Any], section: TrainSection | None, where: str = "",
                  error=ValueError) -> tuple[TrainOptions, list[str]]:
    """(the run's options, the notes to print): `given` (the flags that were given) over the keys
    the `train:` section sets over the defaults; the section's one-value sweep lists give the seed
    and (per-rate) the rate when their flags are not given."""
    from_section = {} if section is None else section.model_dump(
        include=set(RunSettings.model_fields) & section.model_fields_set)
    notes = [f"note: {flag(k)} {given[k]} overrides train.{k}: {v} of {where}"
             for k, v in from_section.items() if k in given and given[k] != v]
    options = _validated({**from_section, **given}, error)
    if section is None:
        return options, notes
    picked = {}
    sweeps = [("seed", "seeds")] + ([("missing_rate", "rates")] if options.protocol == "per-rate" else [])
    for name, sweep in sweeps:
        values = getattr(section, sweep)
        if sweep not in section.model_fields_set:
            continue
        if name in given:
            if given[name] not in values:
                notes.append(f"note: {flag(name)} {given[name]} is not one of train.{sweep} {values} of {where}")
        elif len(values) == 1:
            picked[name] = values[0]
        else:
            raise error(f"{where}: train.{sweep} lists {len(values)} values {values}: a single run needs "
                        f"{flag(name)} (one of them)")
    return (_validated({**options.model_dump(exclude_unset=True), **picked}, error) if picked else options), notes


def _validated(values: dict, error) -> TrainOptions:
    try:
        return TrainOptions.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        raise error(f"{flag(name) if name in TrainOptions.model_fields else name}: {first['msg']}"
                    f" (got {first.get('input')!r})") from exc
