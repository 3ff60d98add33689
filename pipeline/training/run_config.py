"""What a run is: `RunConfig` (config.json) and how `msaflow train` builds it from its options and the data.

The preset of `--dataset`, then the `--config` overrides (`model:` / `optim:`, or a workflow
config's `train.model_settings` / `train.optim`), then the widths the data has and the flags
that set model or optimiser fields. Beside the settings a run records what it knows of its
data: the data's fingerprint (`data_hash`), the shards' extraction settings (`extract`, for
`msaflow predict`) and the modalities the model reads (`modalities`). Every check that needs
the data raises DataError before the run folder exists.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from msaflow.contract import MODALITIES
from msaflow.model.config import ModelConfig, OptimConfig, for_dataset
from msaflow.pipeline.data.lengths import LengthConfig
from msaflow.pipeline.data.shard_index import ShardError
from msaflow.pipeline.data.sources import DataError, PickleSource, is_url, read_index
from msaflow.pipeline.training import protocols
from msaflow.pipeline.training.evaluate import data_fingerprint
from msaflow.pipeline.training.options import ConfigFile, TrainOptions
from msaflow.pipeline.training.rates import parse_rates

log = logging.getLogger("msaflow.train")
TEXT_ONLY_MODELS = ("text-only",)  # read text by design: never refused for leaving audio/vision unused
DEFAULT = TrainOptions()  # the defaults RunConfig shares with the command


@dataclass
class RunConfig:
    """What a run folder's config.json records: the settings a run was trained with."""

    data: str
    model: str = DEFAULT.model
    dataset: str = DEFAULT.preset
    protocol: str = DEFAULT.protocol
    missing_rate: float = DEFAULT.missing_rate
    seed: int = DEFAULT.seed
    mask_seed: int = DEFAULT.mask_seed  # fixed valid/test masks: the same for every model and training seed
    fixed_train_masks: bool = False  # the released code's one-time draw of the train masks
    valid_rates: list[float] = field(default_factory=list)
    zscore: bool = True
    threads: int = DEFAULT.threads
    limit: int = DEFAULT.limit  # use only the first N samples of each split (smoke tests); 0 = all
    text_cache: str = ""  # frozen-encoder mode: folder of cached text states ("" = run the encoder)
    lengths: dict = field(default_factory=lambda: LengthConfig().model_dump())  # per-modality caps
    workers: int = DEFAULT.workers  # loader worker processes per rank (shards); the shuffle buffer is per worker
    bucket: int = DEFAULT.bucket  # shards: batches per length-bucketing window (1 = off)
    epoch_steps: int = DEFAULT.epoch_steps  # batches per epoch (0 = the whole train split)
    shuffle_buffer: int | None = None  # shards: samples per worker's shuffle buffer (None = the mode's default)
    model_config: dict = field(default_factory=dict)
    extract: dict = field(default_factory=dict)  # the shards' extraction settings (for `msaflow predict`)
    optim_config: dict = field(default_factory=dict)
    data_hash: str = ""  # sha256 of the shards' index.json files or of the pickle (`evaluate` compares it)
    modalities: dict = field(default_factory=dict)  # {"data": [...], "used": [...], "unused": [...]}
    complete_share: float = DEFAULT.complete_share  # lnln protocol: share of training samples complete, per modality
    paper: bool = False  # --paper: the released masks, normalisation and selection (pipeline/training/protocols.py)


# Recorded since a later version: a run folder written before lacks them and resumes without them
# counting as changed settings (they are filled in).
ADDED_FIELDS = ("data_hash", "modalities", "extract")


# ---------------------------------------------------------------- what the run records about its data


def data_modalities(source) -> list[str]:
    """The modalities present in the data (raw shards: face crops = vision, fbank/waveform = audio)."""
    if isinstance(source, PickleSource):
        return list(source.modalities)
    members = source.index["train"].members
    kinds = {"text": ("text_ids.npy", "text.npy"), "audio": ("audio.npy", "fbank.npy", "wav.npy"),
             "vision": ("vision.npy", "face.npy")}
    return [m for m in MODALITIES if any(k in members for k in kinds[m])]


def model_modalities(model: str, model_cfg: ModelConfig) -> list[str]:
    """The modalities `model` built with `model_cfg` reads."""
    if model in TEXT_ONLY_MODELS:
        return [m for m in model_cfg.modalities if m == "text"]
    if model == "end-to-end":
        from msaflow.model.end_to_end import EndToEndConfig

        frontends = EndToEndConfig.from_dict(dict(model_cfg.extra.get("end_to_end", {}))).frontends
        return [m for m in MODALITIES if (m == "text" and "text" in model_cfg.modalities) or m in frontends]
    return list(model_cfg.modalities)


def modality_use(options: TrainOptions, source, model_cfg: ModelConfig) -> dict:
    """{"data", "used", "unused"}; said on stderr when the model leaves some unused; a model that
    reads nothing but text from raw shards (their crops and audio need end-to-end front-ends) is refused."""
    present = data_modalities(source)
    used = [m for m in model_modalities(options.model, model_cfg) if m in present]
    unused = [m for m in present if m not in used]
    raw, model = getattr(source, "mode", "features") == "raw", options.model
    if raw and model != "end-to-end" and model not in TEXT_ONLY_MODELS and not set(used) - {"text"} \
            and set(present) - {"text"}:
        raise DataError(f"{options.data}: raw shards hold {' and '.join(_raw_names(set(present) - {'text'}))}, "
                        f"which only `--model end-to-end` reads (its front-ends turn them into features); "
                        f"{model} would train on the text alone: use --model end-to-end, or extract in "
                        f"features mode (`extract: {{mode: features}}`)")
    if unused:
        why = " (raw shards: only --model end-to-end reads face crops and audio)" if raw and model != "end-to-end" \
            else ""
        log.warning(f"note: model {model} uses {', '.join(used) or 'nothing'}; {', '.join(unused)} in the data "
                    f"{'is' if len(unused) == 1 else 'are'} not used{why} (recorded in the run's config.json)")
    if not used:
        raise DataError(f"{options.data}: model {model} reads none of the data's modalities ({', '.join(present)})")
    return {"data": present, "used": used, "unused": unused}


def _raw_names(modalities: set[str]) -> list[str]:
    return [{"vision": "face crops", "audio": "audio"}[m] for m in ("vision", "audio") if m in modalities]


def shards_extract_settings(shard_dir: str | Path, given: dict | None) -> dict:
    """The extraction settings the shards were made with: the --config `extract:` section when it
    hashes to the shards' `config_hash`, else the shards' index (`extract`), else a chunk summary
    of an extraction folder beside the shards (the workflow's `extract-<hash>/chunks/`); {} when
    none is known (said on stderr: `msaflow predict` then needs --extract-config)."""
    from msaflow.pipeline.extraction.settings import extract_config_hash

    try:
        recorded = read_index(shard_dir, "train").get("config_hash")
    except ShardError:
        return {}
    candidates = _extract_candidates(shard_dir, given)
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


def _extract_candidates(shard_dir: str | Path, given: dict | None) -> list[tuple[str, dict]]:
    """(where, valid extraction settings) in the order they are tried: --config, index.json, chunk summaries."""
    from msaflow.pipeline.extraction.settings import ExtractConfig

    def valid(section) -> dict | None:
        try:
            return ExtractConfig.model_validate(section or {}).model_dump(mode="json")
        except ValueError:
            return None

    index = read_index(shard_dir, "train")
    candidates = [("--config", valid(given))] if given is not None else []
    if index.get("extract"):
        candidates.append(("index.json", valid(index["extract"])))
    beside = [] if is_url(shard_dir) else sorted(Path(shard_dir).resolve().parent.glob("extract-*/chunks/*.json"))
    for summary in beside:
        try:
            candidates.append((str(summary), valid(json.loads(summary.read_text(encoding="utf-8")).get("config"))))
        except (OSError, ValueError):
            continue
    return [(where, c) for where, c in candidates if c is not None]


# ---------------------------------------------------------------- the run's configuration


def batches_per_epoch(n_train: int, batch_size: int, epoch_steps: int) -> int:
    """Full batches an epoch trains on (the last incomplete one is dropped), at most `epoch_steps` (0: no cap)."""
    n = n_train // batch_size
    return min(n, epoch_steps) if epoch_steps else n


def model_and_optim(options: TrainOptions, source, config: ConfigFile) -> tuple[ModelConfig, OptimConfig]:
    """The preset with the --config overrides, the data's widths and the flags that set model/optimiser fields."""
    model_cfg, optim_cfg = for_dataset(options.preset)
    try:
        model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), **config.model})
        optim_cfg = OptimConfig.from_dict({**optim_cfg.to_dict(), **config.optim})
    except (TypeError, ValueError) as exc:
        raise DataError(f"{config.where}: {' '.join(str(exc).split())}") from exc
    dims = source.feature_dims()
    model_cfg = replace(model_cfg, modalities=tuple(source.modalities),
                        d_audio=dims.get("audio", model_cfg.d_audio), d_vision=dims.get("vision", model_cfg.d_vision))
    if options.freeze_text or options.text_cache:
        model_cfg.freeze_text = True
    if options.text_model:
        model_cfg.text_model = options.text_model
    for name, value in (("max_epochs", options.epochs), ("patience", options.patience),
                        ("batch_size", options.batch_size), ("grad_accum", options.grad_accum)):
        if value is not None:
            setattr(optim_cfg, name, value)
    return model_cfg, optim_cfg


def fit_to_data(optim_cfg: OptimConfig, n_train: int, epoch_steps: int, data: str) -> None:
    """A batch no larger than the train split and an accumulation no longer than an epoch, said out loud."""
    if n_train < 2:
        raise DataError(f"{data}: the train split has {n_train} sample(s); training needs at least 2")
    if optim_cfg.batch_size > n_train:  # a small corpus of one's own: one batch of everything
        log.warning(f"note: batch size {optim_cfg.batch_size} > {n_train} train samples: batch size {n_train} "
                    f"(recorded in the run's config.json)")
        optim_cfg.batch_size = n_train
    steps = batches_per_epoch(n_train, optim_cfg.batch_size, epoch_steps)
    if optim_cfg.grad_accum > steps:  # else an epoch's only, partial accumulation group would never step
        log.warning(f"note: {steps} batch(es) per epoch < gradient accumulation {optim_cfg.grad_accum}: accumulation "
                    f"{steps} (recorded in the run's config.json)")
        optim_cfg.grad_accum = steps


def valid_rates(options: TrainOptions) -> list[float]:
    if not options.valid_rates:
        return protocols.default_valid_rates(options.protocol, options.preset, options.missing_rate)
    try:
        return parse_rates(options.valid_rates)
    except ValueError as exc:
        raise DataError(f"--valid-rates {options.valid_rates!r}: {exc} (give START:STOP:STEP or a comma list)") from exc


def build_run_config(options: TrainOptions, source, config: ConfigFile) -> RunConfig:
    """The RunConfig `options` describe on this data; every check that needs the data (DataError)."""
    if options.text_cache and not isinstance(source, PickleSource):
        raise DataError(f"{options.data}: --text-cache caches text states of an MMSA pickle; features-mode shards "
                        f"already hold frozen text states")
    model_cfg, optim_cfg = model_and_optim(options, source, config)
    try:
        modalities = modality_use(options, source, model_cfg)
    except (TypeError, ValueError) as exc:  # an end-to-end section that does not parse
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{config.where}: model extra.end_to_end: {' '.join(str(exc).split())}") from exc
    model_cfg = model_cfg.with_text_width()  # the text encoder's width, stored with the run
    fit_to_data(optim_cfg, len(source), options.epoch_steps, options.data)
    rates = valid_rates(options)
    extract = {} if isinstance(source, PickleSource) else shards_extract_settings(options.data, config.extract)
    run = RunConfig(
        data=str(options.data), model=options.model, dataset=options.preset, protocol=options.protocol,
        missing_rate=options.missing_rate, seed=options.seed, mask_seed=options.mask_seed,
        fixed_train_masks=options.fixed_train_masks or bool(options.text_cache), valid_rates=rates,
        zscore=not options.no_zscore, threads=options.threads, limit=options.limit,
        text_cache=str(options.text_cache or ""), model_config=model_cfg.to_dict(), optim_config=optim_cfg.to_dict(),
        extract=extract, lengths=source.lengths.model_dump(), workers=options.workers, bucket=options.bucket,
        shuffle_buffer=options.shuffle_buffer, epoch_steps=options.epoch_steps,
        data_hash=data_fingerprint(options.data), modalities=modalities, complete_share=options.complete_share,
    )
    return protocols.apply_paper(run, DataError) if options.paper else run
