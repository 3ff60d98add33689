"""`msaflow train`'s command line: the flags, their checks, and the call of the loop (pipeline/training/train.py).

The options and their defaults are pipeline/training/options.py's (flags > the `train:` section of
a workflow `--config` > defaults). Every check of the arguments, the data and the `--config` YAML
runs before the run folder is created: a mistake raises DataError (one line, exit status 2) and
nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from msaflow.contract import MODALITIES
from msaflow.device import DEVICES, oversubscription
from msaflow.lock import output_lock
from msaflow.model.registry import available_models
from msaflow.pipeline.data.lengths import LengthConfig
from msaflow.pipeline.data.sources import DataError, data_exists, open_source
from msaflow.pipeline.training.distributed import cleanup, init_distributed
from msaflow.pipeline.training.options import (PRESETS, ConfigFile, TrainOptions, did_you_mean,
                                               flag, merge_options, read_config)
from msaflow.pipeline.training.rates import PROTOCOLS
from msaflow.pipeline.training.run_config import build_run_config
from msaflow.pipeline.training.run_dir import RunDir
from msaflow.pipeline.training.train import require_labels, train

log = logging.getLogger("msaflow.train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags; each defaults to "not given" (its default is TrainOptions')."""
    def option(name: str, *names: str, **kw) -> None:
        described = TrainOptions.model_fields[name]
        text, default = described.description or "", described.default
        shown = default is not None and default is not False and "default" not in text
        p.add_argument(*(names or [flag(name)]), dest=name, default=argparse.SUPPRESS,
                       help=text + (f" (default: {default})" if shown else ""), **kw)

    option("data")
    option("model")
    p.add_argument("--list-models", action="store_true", help="print the registered models and exit")
    option("preset", "--dataset", "--preset", choices=PRESETS)
    option("protocol", choices=PROTOCOLS)
    option("missing_rate", type=float)
    option("seed", type=int)
    option("mask_seed", type=int)
    option("out", "-o", "--out", type=Path)
    option("config", type=Path)
    for name in ("epochs", "patience", "batch_size", "grad_accum", "complete_share", "threads", "limit", "workers",
                 "epoch_steps", "bucket", "shuffle_buffer"):
        option(name, type=float if name == "complete_share" else int)
    for name in ("freeze_text", "paper", "fixed_train_masks", "no_zscore"):
        option(name, action="store_true")
    for name in ("text_model", "valid_rates", "max_steps"):
        option(name)
    option("text_cache", type=Path)
    option("device", choices=DEVICES)


def options_from_args(args: argparse.Namespace) -> tuple[TrainOptions, ConfigFile]:
    """The run's options (flags > the --config file's `train:` section > defaults) and that file;
    a note on stderr for every flag that overrides another value of the section."""
    given = {k: v for k, v in vars(args).items() if k in TrainOptions.model_fields and v is not None}
    config = read_config(given.get("config"), DataError)
    options, notes = merge_options(given, config.section, config.where, DataError)
    for note in notes:
        log.warning(note)
    return options, config


def parse_max_steps(spec: str | None, lengths: LengthConfig) -> LengthConfig:
    if not spec:
        return lengths
    updates = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in MODALITIES or not value.strip().isdigit():
            raise DataError(f"--max-steps: {item!r} is not MODALITY=STEPS ({', '.join(MODALITIES)})")
        updates[name.strip()] = getattr(lengths, name.strip()).model_copy(update={"max_steps": int(value)})
    return LengthConfig.model_validate({**lengths.model_dump(), **{k: v.model_dump() for k, v in updates.items()}})


def read_lengths(options: TrainOptions, config: ConfigFile) -> LengthConfig:
    """The length caps: defaults, then the --config YAML's `lengths:` (or its train section's), then --max-steps."""
    try:
        return parse_max_steps(options.max_steps, LengthConfig.model_validate(config.lengths))
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{config.where or '--max-steps'}: lengths: {' '.join(str(exc).split())}") from exc


def check_arguments(options: TrainOptions, config: ConfigFile) -> LengthConfig:
    """Everything that can be checked before the data is read or the run folder made; the length caps."""
    missing = [flag for flag, value in (("--data", options.data), ("-o/--out", options.out)) if value is None]
    if missing:
        raise DataError(f"the following arguments are required: {', '.join(missing)} (see `msaflow train --help`)")
    models = available_models()
    if options.model not in models:
        raise DataError(f"unknown model {options.model!r}{did_you_mean(options.model, models)}: "
                        f"`msaflow train --list-models` lists them ({', '.join(models)})")
    if options.out.exists() and not options.out.is_dir():
        raise DataError(f"{options.out}: exists and is not a folder: give -o a run folder")
    if not data_exists(options.data):
        raise DataError(f"{options.data}: no such file or folder (--data: a shard folder or an MMSA feature pickle)")
    return read_lengths(options, config)


def main(args: argparse.Namespace) -> int:
    if getattr(args, "list_models", False):
        print("\n".join(available_models()))
        return 0
    run_training(args)  # a DataError is one line and exit status 2 (msaflow.pipeline.cli)
    return 0


def run_training(args: argparse.Namespace) -> Path:
    """`msaflow train` with parsed arguments; the run folder. Raises DataError on a user error
    (before anything is written) and SystemExit when the folder holds another run."""
    options, config = options_from_args(args)
    lengths = check_arguments(options, config)
    torch.set_num_threads(options.threads)
    ctx = init_distributed(options.device)  # under torchrun: one process per GPU (gloo on CPU)
    problem = oversubscription(options.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if problem and ctx.device.type == "cpu" and ctx.is_main:
        log.warning(f"msaflow train: {problem}")
    try:
        source = open_source(options.data, lengths, limit=options.limit, workers=options.workers,
                             bucket=options.bucket, shuffle_buffer=options.shuffle_buffer,
                             pin_memory=ctx.device.type == "cuda")
        asked = build_run_config(options, source, config)  # every check before the run folder is made
        for split in ("train", "valid"):  # a corpus without labels is refused before the run folder is made
            first = source.first_batch(split, 8)
            if first is not None:
                require_labels(first, split)
        # one writer per run folder (DDP: rank 0 holds it for all ranks)
        with output_lock(options.out, "msaflow train") if ctx.is_main else nullcontext():
            train(RunDir(options.out), ctx, source, asked)
    finally:
        cleanup()
    return Path(options.out)

