"""`msaflow train`: train EMT-DLFR (or any registered model) on shards or an MMSA feature pickle.

Data come through one path (`msaflow.pipeline.data.sources`): shards are streamed batch by batch,
each DDP rank reading its own share; audio/vision are z-scored with train statistics fit in
one streaming pass and stored in the run folder (`normaliser.json`); every sample is capped
per modality (`lengths`, `msaflow.pipeline.data.lengths`).

The loop, in order: for every batch draw the incomplete view (missing rate r fixed for the
`per-rate` protocol, r ~ U[0, 1] per batch for `single-model`), loss = model.compute_loss
(complete, incomplete), backward, an Adam step every `grad_accum` batches (loss not divided,
an epoch's last partial group takes no step, as the released code). After each epoch:
validation loss on the masked validation split (fixed masks), best weights kept, and a
checkpoint with everything needed to continue bit-for-bit (model, optimiser, RNG states,
epoch, best, history). Early stop after `patience` epochs without improvement. At the end
the best weights are scored once on the test split (`metrics.json` in the run directory).

A run directory that already holds a checkpoint resumes from it: a killed run restarted
with the same command ends with the same metrics as an uninterrupted one (CPU, same seed,
same thread count).

What the run records beside its weights (`config.json`): the data's fingerprint
(`data_hash`: sha256 of the shards' index files or of the pickle; `msaflow evaluate` reuses
the run's test metrics only on data with the same hash), the extraction settings of the
shards (`extract`, from the shards' index or the extraction's chunk summaries, so that
`msaflow predict` extracts a new clip the same way), and which modalities of the data the
model reads (`modalities`: data / used / unused; a model that can read none of a raw
shard's face crops and audio is refused). Every epoch adds a row to `history.csv` (and to
a TensorBoard log in `tensorboard/` when `tensorboard` is installed).

Every check of the arguments, the data and the `--config` YAML runs before the run folder
is created: a mistake ends with one line and exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import logging
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from msaflow.model.config import ModelConfig, OptimConfig, for_dataset
from msaflow.model.missing import simulate_missing
from msaflow.model.registry import available_models, build_model
from msaflow.pipeline.data.sources import (DataError, Normaliser, PickleSource, data_exists, is_url, keep_real, open_source,
                                   read_index)
from msaflow.pipeline.data.loader import ShardError
from msaflow.pipeline.training.distributed import (DistContext, all_reduce_sum, barrier, cleanup, gather_objects,
                                          init_distributed, to_device, wrap_model)
from msaflow.pipeline.training.evaluate import data_fingerprint, run_text_cache, score
from msaflow.pipeline.training.rates import TEST_GRID, parse_rates
from msaflow.pipeline.data.lengths import LengthConfig
from msaflow.lock import output_lock
from msaflow.tario import atomic_path, write_json_atomic
from msaflow.pipeline.training.text_cache import COARSE_GRID, split_mask_seed
from msaflow.pipeline.training import protocols
from msaflow.pipeline.training.protocols import PROTOCOLS  # per-rate, single-model, lnln (pipeline/training/protocols.py)
log = logging.getLogger("msaflow.train")
PROGRESS_EVERY_S = 60.0  # an in-epoch progress line at most this often when no progress bar is shown
TEXT_ONLY_MODELS = ("text-only",)  # read text by design: never refused for leaving audio/vision unused


@dataclass
class RunConfig:
    data: str
    model: str = "emt-dlfr"
    dataset: str = "mosi"
    protocol: str = "per-rate"
    missing_rate: float = 0.0
    seed: int = 0
    mask_seed: int = 0  # fixed valid/test masks: the same for every model and training seed
    fixed_train_masks: bool = False  # the released code's one-time draw of the train masks
    valid_rates: list[float] = field(default_factory=list)
    zscore: bool = True
    threads: int = 2
    limit: int = 0  # use only the first N samples of each split (smoke tests); 0 = all
    text_cache: str = ""  # frozen-encoder mode: folder of cached text states ("" = run the encoder)
    lengths: dict = field(default_factory=lambda: LengthConfig().model_dump())  # per-modality caps
    workers: int = 0  # loader worker processes per rank (shards); the shuffle buffer is per worker
    bucket: int = 8  # shards: batches per length-bucketing window (1 = off)
    epoch_steps: int = 0  # batches per epoch (0 = the whole train split): epochs of a huge corpus, benchmarks
    shuffle_buffer: int | None = None  # shards: samples per worker's shuffle buffer (None = the mode's default)
    model_config: dict = field(default_factory=dict)
    extract: dict = field(default_factory=dict)  # the shards' extraction settings (for `msaflow predict`)
    optim_config: dict = field(default_factory=dict)
    data_hash: str = ""  # sha256 of the shards' index.json files or of the pickle (`evaluate` compares it)
    modalities: dict = field(default_factory=dict)  # {"data": [...], "used": [...], "unused": [...]}
    complete_share: float = 0.5  # lnln protocol: share of training samples complete, per modality
    paper: bool = False  # --paper: the released masks, normalisation and selection (pipeline/training/protocols.py)


# Recorded since a later version: a run folder written before lacks them and resumes without them
# counting as changed settings (they are filled in).
ADDED_FIELDS = ("data_hash", "modalities", "extract")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data",
                   help="shard folder (<split>/index.json, features or raw mode) or MMSA feature pickle "
                        "(trusted file; it is unpickled)")
    p.add_argument("--model", default="emt-dlfr", help="registered model name (see --list-models)")
    p.add_argument("--list-models", action="store_true", help="print the registered models and exit")
    p.add_argument("--dataset", default="mosi", choices=["mosi", "mosei", "sims"], help="preset and metric family")
    p.add_argument("--protocol", default="per-rate", choices=PROTOCOLS)
    p.add_argument("--missing-rate", type=float, default=0.0, help="per-rate protocol: train/valid missing rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask-seed", type=int, default=0, help="seed of the fixed valid/test masks")
    p.add_argument("-o", "--out", type=Path, help="run directory (required unless --list-models)")
    p.add_argument("--config", type=Path, help="YAML with `model:`, `optim:`, `lengths:` overrides, or a workflow "
                   "config (its `train:` and `extract:` sections)")
    p.add_argument("--epochs", type=int, help="maximum epochs (preset: 30)")
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs (preset: 8)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--freeze-text", action="store_true", help="keep the text encoder frozen (fast CPU mode)")
    p.add_argument("--text-model", help="'minilm' (default) or a local Hugging Face model folder")
    p.add_argument("--complete-share", type=float, default=0.5,
                   help="lnln protocol: probability that a training sample keeps a modality complete (rate 0)")
    p.add_argument("--paper", action="store_true", help="per-rate protocol as released: train masks drawn once, "
                   "the released normalisation (MOSI/MOSEI none, SIMS z-scored) and selection (total loss)")
    p.add_argument("--fixed-train-masks", action="store_true",
                   help="draw the train masks once per sample (released code) instead of per batch")
    p.add_argument("--valid-rates", help="rates of the validation loss (default: the training rate for per-rate, "
                   "0.0:1.0:0.2 for single-model)")
    p.add_argument("--text-cache", type=Path, help="frozen-encoder mode: cache text states per split and rate in "
                   "this folder (implies --freeze-text and fixed train masks; single-model rates from the 0.1 grid)")
    p.add_argument("--no-zscore", action="store_true", help="feed audio/vision unnormalised")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the GPU when there is one (under torchrun: the process's LOCAL_RANK GPU)")
    p.add_argument("--limit", type=int, default=0, help="first N samples per split only (smoke tests)")
    p.add_argument("--max-steps", help="per-modality caps, e.g. 'audio=2000,vision=0' (0 = none; defaults: "
                   "text=128,audio=1000,vision=500; YAML `lengths:` for pooling and how)")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes per rank (shard folders)")
    p.add_argument("--epoch-steps", type=int, default=0, help="stop each epoch after this many batches (0 = the "
                   "whole train split; validation always runs whole)")
    p.add_argument("--bucket", type=int, default=8, help="shard folders: batches per length-bucketing window (1 = off)")
    p.add_argument("--shuffle-buffer", type=int, help="shard folders: samples per loader worker's shuffle buffer "
                   "(default 1000 features, 128 raw; 1 = shard order and rotation only)")


def parse_max_steps(spec: str | None, lengths: LengthConfig) -> LengthConfig:
    if not spec:
        return lengths
    updates = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in ("text", "audio", "vision") or not value.strip().isdigit():
            raise DataError(f"--max-steps: {item!r} is not MODALITY=STEPS (text, audio, vision)")
        updates[name.strip()] = getattr(lengths, name.strip()).model_copy(update={"max_steps": int(value)})
    return LengthConfig.model_validate({**lengths.model_dump(), **{k: v.model_dump() for k, v in updates.items()}})


# ---------------------------------------------------------------- the --config YAML

PLAIN_SECTIONS = ("model", "optim", "lengths", "extract")


def read_overrides(path: Path | None) -> dict:
    """{"model": {...}, "optim": {...}, "lengths": {...}, "extract": {...} or None} from a --config YAML:
    a plain overrides file (those four sections) or a workflow config (its `train:` and `extract:`).
    Unreadable YAML, an unknown section or a key that is not a ModelConfig / OptimConfig field is a
    DataError naming the file and the key."""
    if path is None:
        return {"model": {}, "optim": {}, "lengths": {}, "extract": None}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file (--config)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the --config file ({exc})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise DataError(f"{path}: not valid YAML{where} ({getattr(exc, 'problem', None) or exc}): fix the "
                        f"file (`python -m msaflow.pipeline.config --check` checks a workflow config)") from exc
    data = data or {}
    if not isinstance(data, dict):
        raise DataError(f"{path}: a --config file is a mapping of sections ({', '.join(PLAIN_SECTIONS)}), "
                        f"not a {type(data).__name__}")
    if "train" in data or "run_name" in data:  # a workflow config
        section = data.get("train") or {}
        if not isinstance(section, dict):
            raise DataError(f"{path}: section 'train' must be a mapping")
        out = {"model": section.get("model_settings") or {}, "optim": section.get("optim") or {},
               "lengths": section.get("lengths") or {}, "extract": data.get("extract")}
        names = {"model": "train.model_settings", "optim": "train.optim"}
    else:
        unknown = sorted(set(data) - set(PLAIN_SECTIONS))
        if unknown:
            raise DataError(f"{path}: unknown section(s) {unknown}{_did_you_mean(unknown[0], PLAIN_SECTIONS)}; "
                            f"a --config file has {', '.join(PLAIN_SECTIONS)} (or is a workflow config)")
        out = {k: data.get(k) or {} for k in ("model", "optim", "lengths")} | {"extract": data.get("extract")}
        names = {"model": "model", "optim": "optim"}
    for key, cls in (("model", ModelConfig), ("optim", OptimConfig)):
        if not isinstance(out[key], dict):
            raise DataError(f"{path}: {names[key]} must be a mapping of {cls.__name__} keys")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(out[key]) - set(known))
        if unknown:
            raise DataError(f"{path}: {names[key]}: unknown key {unknown[0]!r}{_did_you_mean(unknown[0], known)} "
                            f"(the keys are the fields of {cls.__name__} in model/config.py)")
    return out


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_lengths(args: argparse.Namespace, overrides: dict | None = None) -> LengthConfig:
    """The length caps: defaults, then the --config YAML's `lengths:` (or its train section's), then --max-steps."""
    section = (overrides if overrides is not None else read_overrides(args.config))["lengths"]
    try:
        return parse_max_steps(args.max_steps, LengthConfig.model_validate(section))
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{args.config or '--max-steps'}: lengths: {' '.join(str(exc).split())}") from exc


def check_arguments(args: argparse.Namespace) -> dict:
    """Everything that can be checked before the data is read or the run folder made; the overrides."""
    missing = [flag for flag, value in (("--data", args.data), ("-o/--out", args.out)) if value is None]
    if missing:
        raise DataError(f"the following arguments are required: {', '.join(missing)} (see `msaflow train --help`)")
    models = available_models()
    if args.model not in models:
        raise DataError(f"unknown model {args.model!r}{_did_you_mean(args.model, models)}: "
                        f"`msaflow train --list-models` lists them ({', '.join(models)})")
    if args.out.exists() and not args.out.is_dir():
        raise DataError(f"{args.out}: exists and is not a folder: give -o a run folder")
    if not data_exists(args.data):
        raise DataError(f"{args.data}: no such file or folder (--data: a shard folder or an MMSA feature pickle)")
    overrides = read_overrides(args.config)
    read_lengths(args, overrides)
    return overrides


# ---------------------------------------------------------------- what the run records about its data


def data_modalities(source) -> list[str]:
    """The modalities present in the data (raw shards: face crops = vision, fbank/waveform = audio)."""
    if isinstance(source, PickleSource):
        return list(source.modalities)
    members = source.index["train"].members
    kinds = {"text": ("text_ids.npy", "text.npy"), "audio": ("audio.npy", "fbank.npy", "wav.npy"),
             "vision": ("vision.npy", "face.npy")}
    return [m for m in ("text", "audio", "vision") if any(k in members for k in kinds[m])]


def model_modalities(model: str, model_cfg: ModelConfig) -> list[str]:
    """The modalities `model` built with `model_cfg` reads."""
    if model in TEXT_ONLY_MODELS:
        return [m for m in model_cfg.modalities if m == "text"]
    if model == "end-to-end":
        from msaflow.model.end_to_end import EndToEndConfig

        frontends = EndToEndConfig.from_dict(dict(model_cfg.extra.get("end_to_end", {}))).frontends
        return [m for m in ("text", "audio", "vision")
                if (m == "text" and "text" in model_cfg.modalities) or m in frontends]
    return list(model_cfg.modalities)


def modality_use(args: argparse.Namespace, source, model_cfg: ModelConfig) -> dict:
    """{"data", "used", "unused"}; said on stderr when the model leaves some unused; a model that
    reads nothing but text from raw shards (their crops and audio need end-to-end front-ends) is refused."""
    present = data_modalities(source)
    used = [m for m in model_modalities(args.model, model_cfg) if m in present]
    unused = [m for m in present if m not in used]
    raw = getattr(source, "mode", "features") == "raw"
    if raw and args.model != "end-to-end" and args.model not in TEXT_ONLY_MODELS and not set(used) - {"text"} \
            and set(present) - {"text"}:
        raise DataError(f"{args.data}: raw shards hold {' and '.join(_raw_names(set(present) - {'text'}))}, which "
                        f"only `--model end-to-end` reads (its front-ends turn them into features); "
                        f"{args.model} would train on the text alone: use --model end-to-end, or extract in "
                        f"features mode (`extract: {{mode: features}}`)")
    if unused:
        why = " (raw shards: only --model end-to-end reads face crops and audio)" if raw and args.model != "end-to-end" \
            else ""
        log.warning(f"note: model {args.model} uses {', '.join(used) or 'nothing'}; {', '.join(unused)} in the data "
                    f"{'is' if len(unused) == 1 else 'are'} not used{why} (recorded in the run's config.json)")
    if not used:
        raise DataError(f"{args.data}: model {args.model} reads none of the data's modalities ({', '.join(present)})")
    return {"data": present, "used": used, "unused": unused}


def _raw_names(modalities: set[str]) -> list[str]:
    return [{"vision": "face crops", "audio": "audio"}[m] for m in ("vision", "audio") if m in modalities]


def shards_extract_settings(shard_dir: str | Path, given: dict | None) -> dict:
    """The extraction settings the shards were made with: the --config `extract:` section when it
    hashes to the shards' `config_hash`, else the shards' index (`extract`), else a chunk summary
    of an extraction folder beside the shards (the workflow's `extract-<hash>/chunks/`); {} when
    none is known (said on stderr: `msaflow predict` then needs --extract-config)."""
    from msaflow.pipeline.config import extract_config_hash
    from msaflow.pipeline.extraction.extract import ExtractConfig

    try:
        index = read_index(shard_dir, "train")
    except ShardError:
        return {}
    recorded = index.get("config_hash")

    def valid(section) -> dict | None:
        try:
            return ExtractConfig.model_validate(section or {}).model_dump(mode="json")
        except ValueError:
            return None

    candidates = []
    if given is not None:
        candidates.append(("--config", valid(given)))
    if index.get("extract"):
        candidates.append(("index.json", valid(index["extract"])))
    beside = [] if is_url(shard_dir) else sorted(Path(shard_dir).resolve().parent.glob("extract-*/chunks/*.json"))
    for summary in beside:
        try:
            candidates.append((str(summary), valid(json.loads(summary.read_text(encoding="utf-8")).get("config"))))
        except (OSError, ValueError):
            continue
    candidates = [(where, c) for where, c in candidates if c is not None]
    if not recorded:  # shards written without a config hash: what --config says, if anything
        return next((c for where, c in candidates if where == "--config"), {})
    for where, settings in candidates:
        if extract_config_hash(settings) == recorded:
            return settings
    if given is not None:
        log.warning(f"note: the `extract:` section of the --config file does not hash to the shards' config_hash "
                    f"({shard_dir}/train/index.json): not recorded")
    log.warning(f"note: the extraction settings of {shard_dir} are not known (their index.json predates recording "
                f"them); `msaflow predict` with this run needs --extract-config")
    return {}


def build_run_config(args: argparse.Namespace, source, overrides: dict | None = None) -> RunConfig:

    overrides = overrides if overrides is not None else read_overrides(args.config)
    model_cfg, optim_cfg = for_dataset(args.dataset)
    try:
        model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), **overrides["model"]})
        optim_cfg = OptimConfig.from_dict({**optim_cfg.to_dict(), **overrides["optim"]})
    except (TypeError, ValueError) as exc:
        raise DataError(f"{args.config}: {' '.join(str(exc).split())}") from exc
    if args.text_cache and not isinstance(source, PickleSource):
        raise DataError(f"{args.data}: --text-cache caches text states of an MMSA pickle; features-mode shards "
                        f"already hold frozen text states")
    dims = source.feature_dims()
    model_cfg = replace(model_cfg, modalities=tuple(source.modalities),
                        d_audio=dims.get("audio", model_cfg.d_audio), d_vision=dims.get("vision", model_cfg.d_vision))
    if args.freeze_text or args.text_cache:
        model_cfg.freeze_text = True
    if args.text_model:
        model_cfg.text_model = args.text_model
    try:
        modalities = modality_use(args, source, model_cfg)
    except (TypeError, ValueError) as exc:  # an end-to-end section that does not parse
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{args.config}: model extra.end_to_end: {' '.join(str(exc).split())}") from exc
    if "text" in model_cfg.modalities:
        model_cfg.input_dim("text")  # resolves d_text from the encoder's config, stored with the run
    for name, value in (("max_epochs", args.epochs), ("patience", args.patience), ("batch_size", args.batch_size),
                        ("grad_accum", args.grad_accum)):
        if value is not None:
            setattr(optim_cfg, name, value)
    n_train = len(source)
    if n_train < 2:
        raise DataError(f"{args.data}: the train split has {n_train} sample(s); training needs at least 2")
    if optim_cfg.batch_size > n_train:  # a small corpus of one's own: one batch of everything, said out loud
        log.warning(f"note: batch size {optim_cfg.batch_size} > {n_train} train samples: batch size {n_train} "
                    f"(recorded in the run's config.json)")
        optim_cfg.batch_size = n_train
    steps = n_train // optim_cfg.batch_size if not args.epoch_steps else min(args.epoch_steps, n_train // optim_cfg.batch_size)
    if optim_cfg.grad_accum > steps:  # else an epoch's only, partial accumulation group would never step
        log.warning(f"note: {steps} batch(es) per epoch < gradient accumulation {optim_cfg.grad_accum}: accumulation "
                    f"{steps} (recorded in the run's config.json)")
        optim_cfg.grad_accum = steps
    try:
        if args.protocol == "per-rate":
            valid_rates = parse_rates(args.valid_rates) if args.valid_rates else [args.missing_rate]
        else:
            valid_rates = (parse_rates(args.valid_rates) if args.valid_rates
                           else protocols.default_valid_rates(args.protocol, args.dataset, args.missing_rate))
    except ValueError as exc:
        raise DataError(f"--valid-rates {args.valid_rates!r}: {exc} (give START:STOP:STEP or a comma list)") from exc
    if isinstance(source, PickleSource):
        extract_section = {}
    else:
        extract_section = shards_extract_settings(args.data, overrides["extract"])
    run = RunConfig(
        data=str(args.data), model=args.model, dataset=args.dataset, protocol=args.protocol,
        missing_rate=args.missing_rate, seed=args.seed, mask_seed=args.mask_seed,
        fixed_train_masks=args.fixed_train_masks or bool(args.text_cache), valid_rates=valid_rates, zscore=not args.no_zscore,
        threads=args.threads, limit=args.limit,
        text_cache=str(args.text_cache or ""), model_config=model_cfg.to_dict(), optim_config=optim_cfg.to_dict(),
        extract=extract_section, lengths=source.lengths.model_dump(), workers=args.workers, bucket=args.bucket,
        shuffle_buffer=args.shuffle_buffer, epoch_steps=args.epoch_steps,
        data_hash=data_fingerprint(args.data), modalities=modalities,
        complete_share=getattr(args, "complete_share", 0.5),
    )
    if not 0.0 <= run.complete_share <= 1.0:
        raise DataError(f"--complete-share {run.complete_share}: a probability in [0, 1]")
    return protocols.apply_paper(run, DataError) if getattr(args, "paper", False) else run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def validation_loss(model, source, normalise: Normaliser, run: RunConfig, batch_size: int, ctx: DistContext,
                    cache=None) -> dict[str, float]:
    """Mean of the model's loss logs over the masked validation split, averaged over `valid_rates`.
    Each rank scores its share; the sums are added over ranks."""
    model.eval()
    sums: dict[str, float] = {}
    device = next(model.parameters()).device
    for rate in run.valid_rates:
        for batch in source.batches("valid", batch_size, rank=ctx.rank, world_size=ctx.world_size):
            batch = keep_real(batch)
            if not batch["id"]:  # this rank's share of the last step was only top-up rows
                continue
            batch = normalise(batch)
            complete, incomplete = views(batch, rate, run, "valid", cache=cache, drop=missing_simulation(model))
            _, logs = model.compute_loss(to_device(complete, device), to_device(incomplete, device))
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v * len(batch["id"])
    n = source.size("valid") * len(run.valid_rates)
    return {k: all_reduce_sum(sums.get(k, 0.0)) / n for k in sorted(sums)}


def train_rate(run: RunConfig, generator: torch.Generator):
    """A float rate for the batch (per-rate, single-model: U[0, the dataset's top rate], the coarse
    grid with cached text states), or the lnln per-sample draw's spec (pipeline/training/protocols.py)."""
    return protocols.train_rate(run, generator, COARSE_GRID)


def missing_simulation(model):
    """The model's own missing-feature simulation where it has one (end-to-end models drop
    steps of the front-end outputs, not raw frames), else the features-mode one."""
    return getattr(model, "simulate_missing", simulate_missing)


def views(batch: dict, rate: float, run: RunConfig, split_name: str, generator: torch.Generator | None = None,
          cache=None, drop=simulate_missing) -> tuple[dict, dict]:
    """(complete, incomplete) views of a batch. Fixed per-sample masks unless a generator redraws them.
    `rate` a protocols.SampleRates (lnln): rates drawn per sample and modality with the generator."""
    if isinstance(rate, protocols.SampleRates):
        return protocols.sample_rate_views(batch, rate, run, split_name, generator, cache, drop,
                                           mask_seed=split_mask_seed(split_name, run.mask_seed))
    unk = run.model_config["unk_id"]
    if generator is not None and not run.fixed_train_masks:
        incomplete = drop(batch, rate, unk_id=unk, generator=generator)
    else:
        incomplete = drop(batch, rate, unk_id=unk, seed=split_mask_seed(split_name, run.mask_seed))
    if cache is None:
        return batch, incomplete
    return cache.attach(batch, split_name, 0.0), cache.attach(incomplete, split_name, rate)


class LossStep(torch.nn.Module):
    """`model.compute_loss` as a forward pass, so DistributedDataParallel can wrap it: DDP
    averages gradients over processes only for work done inside its wrapper's forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, complete: dict, incomplete: dict):
        return self.model.compute_loss(complete, incomplete)


def normaliser_for(run: RunConfig, source, run_dir: Path, ctx: DistContext) -> Normaliser:
    """The run's z-scoring statistics: read from the run folder, else fit once (main process) and stored."""
    if not run.zscore or source.mode != "features":
        return Normaliser()
    if ctx.is_main and not (run_dir / "normaliser.json").is_file():
        source.fit_normaliser().save(run_dir)
    barrier()
    return Normaliser.load(run_dir)


def mask_generator(run: RunConfig, rank: int) -> torch.Generator:
    """Train-mask draws: rank 0 as a one-process run; every other rank its own stream."""
    return torch.Generator().manual_seed(run.seed + 1 if rank == 0 else (run.seed + 1) * 1_000_003 + rank)


def test_batches(source, normalise: Normaliser, split: str = "test"):
    """A fresh pass over a split's batches per call (one per scored rate), one process, no top-up rows."""
    return lambda: (normalise(b) for b in source.batches(split, source.eval_batch_size))


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def main(args: argparse.Namespace) -> int:
    if args.list_models:
        print("\n".join(available_models()))
        return 0
    try:
        run_training(args)
    except DataError as exc:
        log.error(f"msaflow train: error: {' '.join(str(exc).split())}")
        return 2
    return 0


def run_training(args: argparse.Namespace) -> Path:
    """`msaflow train` with parsed arguments; the run folder. Raises DataError on a user error
    (before anything is written) and SystemExit when the folder holds another run."""
    overrides = check_arguments(args)
    torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)  # under torchrun: one process per GPU (gloo on CPU)
    try:
        source = open_source(args.data, read_lengths(args, overrides), limit=args.limit, workers=args.workers,
                             bucket=args.bucket, shuffle_buffer=args.shuffle_buffer)
        asked = build_run_config(args, source, overrides)  # every check before the run folder is made
        # one writer per run folder (DDP: rank 0 holds it for all ranks)
        with output_lock(args.out, "msaflow train") if ctx.is_main else nullcontext():
            train(args, ctx, source, asked)
    finally:
        cleanup()
    return Path(args.out)


def _comparable(cfg: dict, recorded: dict) -> dict:
    """A config for the resume comparison: the extraction settings by their hash; the fields a
    run folder written before they were recorded lacks taken as recorded."""
    from msaflow.pipeline.config import extract_config_hash

    cfg = dict(cfg)
    for key in ADDED_FIELDS:
        if not recorded.get(key):
            cfg[key] = recorded.get(key)
    if cfg.get("extract"):
        try:
            cfg["extract"] = extract_config_hash(cfg["extract"])
        except ValueError:
            pass
    return cfg


def train(args: argparse.Namespace, ctx: DistContext, source, asked_run: RunConfig) -> int:
    main_process = ctx.is_main
    run_dir: Path = args.out
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, best_path, config_path = run_dir / "last.pt", run_dir / "best.pt", run_dir / "config.json"

    if checkpoint_path.is_file():  # resume, but only the run this command describes
        on_disk = json.loads(config_path.read_text())
        run = RunConfig(**on_disk)
        asked = asdict(asked_run)
        filled = {k: asked[k] for k in ADDED_FIELDS if not on_disk.get(k) and asked.get(k)}
        # the stopping rule may change: no schedule depends on it, so raising --epochs goes on
        # exactly as a longer run would have
        stopping = ("max_epochs", "patience")

        def without_stopping(cfg: dict) -> dict:
            return cfg | {"optim_config": {k: v for k, v in cfg["optim_config"].items() if k not in stopping}}

        recorded = without_stopping(_comparable(asdict(run), on_disk))
        wanted = without_stopping(_comparable(asked, on_disk))
        changed = sorted(k for k, v in recorded.items() if k not in ("threads", "workers") and wanted.get(k) != v)
        if changed:
            raise SystemExit(f"{run_dir} holds a run with other settings ({', '.join(changed)} differ): "
                             f"resume it with its own command, or train into a new -o folder")
        new_rule = {k: asked["optim_config"][k] for k in stopping if asked["optim_config"][k] != run.optim_config[k]}
        if new_rule:
            log.info(f"{run_dir}: stopping rule changed on resume: " + ", ".join(
                f"{k} {run.optim_config[k]} -> {v}" for k, v in new_rule.items()))
            run = replace(run, optim_config=run.optim_config | new_rule)
        if filled:  # a run folder from before these were recorded
            run = replace(run, **filled)
        if (new_rule or filled) and main_process:
            write_json_atomic(config_path, asdict(run))
        log.info(f"resuming {run_dir} from {checkpoint_path.name}")
    else:
        run = asked_run
        if main_process:
            write_json_atomic(config_path, asdict(run))
    log.info(f"training {run.model} ({run.protocol}, seed {run.seed}) on {run.data} [{source.mode}: "
             f"{', '.join(run.modalities.get('used', []))}; {len(source)} train / {source.size('valid')} valid / "
             f"{source.size('test')} test] into {run_dir}")
    optim_cfg = OptimConfig.from_dict(run.optim_config)
    normalise = normaliser_for(run, source, run_dir, ctx)

    seed_everything(run.seed)
    model = build_model(run.model, ModelConfig.from_dict(run.model_config)).to(ctx.device)
    if getattr(getattr(model, "cfg", None), "bf16", False) and ctx.device.type == "cpu":
        from msaflow.model.end_to_end import Bf16Unsupported, require_cpu_bf16

        try:  # refuse before the first step, not inside it
            require_cpu_bf16()
        except Bf16Unsupported as exc:
            raise DataError(str(exc)) from exc
    if ctx.is_distributed and ctx.device.type == "cuda":  # BatchNorm statistics over the global batch
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.Adam(model.param_groups(optim_cfg))  # coupled L2 via weight_decay, as released
    shuffle_gen = torch.Generator().manual_seed(run.seed)
    mask_gen = mask_generator(run, ctx.rank)
    state = {"epoch": 0, "best": float("inf"), "best_epoch": -1, "bad_epochs": 0, "history": [], "seconds": 0.0,
             "world_size": ctx.world_size}

    if checkpoint_path.is_file():
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        shuffle_gen.set_state(ckpt["rng"]["shuffle"])
        mask_states = ckpt["rng"].get("mask_by_rank") or [ckpt["rng"]["mask"]]
        if len(mask_states) == ctx.world_size:  # same process count: every rank goes on with its own draws
            mask_gen.set_state(mask_states[ctx.rank])
        torch.set_rng_state(ckpt["rng"]["torch"])
        state = ckpt["state"]
    loss_step = wrap_model(LossStep(model), ctx, find_unused_parameters=True)

    unk = run.model_config["unk_id"]
    test_rates = protocols.scored_rates(run)  # single-model: the dataset's grid; lnln: 0.0 ... 0.9
    train_rates = protocols.cached_train_rates(run, COARSE_GRID)
    splits = source.splits if isinstance(source, PickleSource) else None
    cache = run_text_cache(asdict(run), splits, [("train", 0.0), ("valid", 0.0)]  # complete views
                           + [("train", r) for r in train_rates] + [("valid", r) for r in run.valid_rates]
                           + [("test", r) for r in test_rates])
    select = "l1" if optim_cfg.select_on == "l1" else "loss"
    tensorboard = TensorBoardLog(run_dir if main_process else None)
    trained = False  # an epoch ran in this call: test metrics from an earlier end are stale
    while state["epoch"] < optim_cfg.max_epochs and state["bad_epochs"] < optim_cfg.patience:
        epoch, t0, trained = state["epoch"], time.time(), True
        model.train()
        if hasattr(model, "on_epoch_start"):  # end to end: front-ends frozen until their epoch comes
            for modality in model.on_epoch_start(epoch) or []:
                log.info(f"epoch {epoch}: {modality} front-end now "
                         f"{'trained' if model.trainable(modality) else 'frozen'}")
        optimizer.zero_grad(set_to_none=True)
        train_sums: dict[str, float] = {}
        steps_done = 0
        batches = source.batches("train", optim_cfg.batch_size, shuffle=True, epoch=epoch, seed=run.seed,
                                 generator=shuffle_gen, drop_last=True,  # drop_last: BatchNorm in DLFR needs > 1 sample
                                 rank=ctx.rank, world_size=ctx.world_size)
        n_batches = len(source) // optim_cfg.batch_size
        if run.epoch_steps:
            n_batches = min(n_batches, run.epoch_steps)
        bar = tqdm(batches, total=n_batches, desc=f"epoch {epoch}", disable=None, leave=False)
        progress = EpochProgress(epoch, n_batches, enabled=main_process and bar.disable)
        for step, batch in enumerate(bar):
            if step == n_batches:  # every rank stops at the same step
                break
            progress(step)
            rate = train_rate(run, mask_gen)
            complete, incomplete = views(normalise(batch), rate, run, "train", generator=mask_gen, cache=cache,
                                         drop=missing_simulation(model))
            complete, incomplete = (to_device(v, ctx.device) for v in (complete, incomplete))
            loss, logs = loss_step(complete, incomplete)
            loss.backward()
            if (step + 1) % optim_cfg.grad_accum == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            steps_done += 1
            for k, v in logs.items():
                train_sums[k] = train_sums.get(k, 0.0) + v
        optimizer.zero_grad(set_to_none=True)  # the last partial accumulation group takes no step
        train_seconds = time.time() - t0

        valid = validation_loss(model, source, normalise, run, optim_cfg.batch_size, ctx, cache=cache)
        improved = valid[select] < state["best"] - optim_cfg.min_delta
        if improved:
            state.update(best=valid[select], best_epoch=epoch, bad_epochs=0)
            if main_process:
                with atomic_path(best_path) as tmp:
                    torch.save(model.state_dict(), tmp)
        else:
            state["bad_epochs"] += 1
        seconds = time.time() - t0
        state["seconds"] += seconds
        record = {"epoch": epoch, "seconds": round(seconds, 1), "train_seconds": round(train_seconds, 1),
                  "train_samples": steps_done * optim_cfg.batch_size,
                  "train": {k: v / max(n_batches, 1) for k, v in train_sums.items()}, "valid": valid}
        state["history"].append(record)
        state["epoch"] = epoch + 1
        mask_states = gather_objects(mask_gen.get_state())
        if main_process:
            save_checkpoint(checkpoint_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                "rng": {"shuffle": shuffle_gen.get_state(), "mask": mask_states[0], "mask_by_rank": mask_states,
                        "torch": torch.get_rng_state()},
                "lengths": run.lengths,
            })
            write_json_atomic(run_dir / "history.json", state["history"])
            write_history_csv(run_dir / "history.csv", state["history"])
            tensorboard.add(record)
        barrier()  # no process starts the next epoch before the checkpoint is on disk
        if main_process:
            log.info(f"epoch {epoch + 1}/{optim_cfg.max_epochs}: train loss "
                     f"{record['train'].get('loss', float('nan')):.4f}  valid {select} "
                     f"{valid[select]:.4f}{'  *best*' if improved else ''}  ({seconds:.0f} s)")

    tensorboard.close()
    metrics_path = run_dir / "metrics.json"
    if not main_process:
        return 0
    if trained or not metrics_path.is_file():
        # the test split is touched once, here, with the weights chosen on validation
        model.load_state_dict(torch.load(best_path, map_location=ctx.device, weights_only=True))
        labels: dict = {}
        per_rate = score(model, test_batches(source, normalise), test_rates, corruption="missing",
                         mask_seed=run.mask_seed, dataset=run.dataset, unk_id=unk, text_cache=cache,
                         label_summary=labels, phase=f"test ({source.size('test')} samples)")
        write_json_atomic(metrics_path, {"rates": per_rate, "n_test": source.size("test"), "best_epoch":
                                         state["best_epoch"], "epochs": state["epoch"],
                                         "train_seconds": round(state["seconds"], 1), "labels": labels,
                                         "data_hash": run.data_hash})
    metrics = json.loads(metrics_path.read_text())
    first_rate, first = next(iter(metrics["rates"].items()))
    log.info(f"done: best epoch {state['best_epoch']}, test at rate {first_rate}: MAE {first['MAE']:.4f} "
             f"Corr {first['Corr'] if first['Corr'] is None else round(first['Corr'], 4)}")
    return 0


class EpochProgress:
    """In-epoch progress lines for log files (a terminal gets tqdm's bar instead): at most one a minute."""

    def __init__(self, epoch: int, n_batches: int, enabled: bool, every_s: float = PROGRESS_EVERY_S):
        self.epoch, self.n, self.enabled, self.every_s = epoch, n_batches, enabled, every_s
        self.t0 = self.last = time.monotonic()

    def __call__(self, step: int) -> None:
        now = time.monotonic()
        if self.enabled and step and now - self.last >= self.every_s:
            self.last = now
            log.info(f"epoch {self.epoch + 1}: {step}/{self.n} batches ({now - self.t0:.0f} s)")


def history_rows(history: list[dict]) -> tuple[list[str], list[dict]]:
    rows = []
    for h in history:
        row = {k: h.get(k) for k in ("epoch", "seconds", "train_seconds", "train_samples")}
        row |= {f"train_{k}": v for k, v in (h.get("train") or {}).items()}
        row |= {f"valid_{k}": v for k, v in (h.get("valid") or {}).items()}
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return columns, rows


def write_history_csv(path: Path, history: list[dict]) -> None:
    """The metrics of every epoch as CSV (rewritten whole each epoch, so a resumed run has one row per epoch)."""
    columns, rows = history_rows(history)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


class TensorBoardLog:
    """Scalars per epoch in RUN/tensorboard/ when the `tensorboard` package is installed (not a dependency)."""

    def __init__(self, run_dir: Path | None):
        import importlib.util

        self.writer = None
        if run_dir is not None and importlib.util.find_spec("tensorboard") is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception as exc:  # a broken install must not stop training
                log.warning(f"note: TensorBoard log off ({exc})")

    def add(self, record: dict) -> None:
        if self.writer is None:
            return
        for part in ("train", "valid"):
            for k, v in (record.get(part) or {}).items():
                self.writer.add_scalar(f"{part}/{k}", v, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
