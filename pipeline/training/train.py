"""`msaflow train`'s loop: train EMT-DLFR (or any registered model) on shards or on an MMSA feature pickle.

The command line (flags, their checks, the run folder's lock) is pipeline/training/train_cli.py;
starting or resuming a run folder is pipeline/training/resume.py. Data come through one path
(`msaflow.pipeline.data.sources`): shards are streamed batch by batch, each DDP rank reading its
own share, and a pickle is read whole; audio/vision are z-scored with train statistics fit in one
pass and stored in the run folder (`normaliser.json`); every sample is capped per modality
(`lengths`, `msaflow.pipeline.data.lengths`).

The loop (`train`), in order: for every batch draw the incomplete view (missing rate r fixed for
`per-rate`, r ~ U[0, 1] per batch for `single-model`, per sample and modality for `lnln`), loss =
model.compute_loss(complete, incomplete), backward, an Adam step every `grad_accum` batches (loss
not divided, an epoch's last partial group takes no step, as the released code). After each
epoch: validation loss on the masked validation split (fixed masks), best weights kept, and a
checkpoint with everything needed to continue bit-for-bit (model, optimiser, RNG states, epoch,
best, history). Early stop after `patience` epochs without improvement. At the end the best
weights are scored once on the test split (`metrics.json`). The run folder is read and written
through `RunDir` (pipeline/training/run_dir.py).

A run folder that already holds a checkpoint resumes from it: a killed run restarted with the
same command ends with the same metrics as an uninterrupted one (CPU, same seed, same thread
count). Only the stopping rule (--epochs, --patience) may change on resume.

Every epoch adds a row to `history.csv` (and to a TensorBoard log in `tensorboard/` when
`tensorboard` is installed).

What the run records (`RunConfig`, config.json) and how it is built from the options and the data:
pipeline/training/run_config.py.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from msaflow.model.config import ModelConfig, OptimConfig
from msaflow.model.missing import simulate_missing
from msaflow.model.registry import build_model
from msaflow.model.weights import load_stored_state, stored_state_dict
from msaflow.pipeline.data.sources import DataError, Normaliser, PickleSource, keep_real
from msaflow.pipeline.training import protocols
from msaflow.pipeline.training.distributed import (DistContext, all_reduce_sum, barrier, gather_objects,
                                                   views_to_device, wrap_model)
from msaflow.pipeline.training.evaluate import run_text_cache, score
from msaflow.pipeline.training.resume import start_or_resume
from msaflow.pipeline.training.run_config import RunConfig, batches_per_epoch
from msaflow.pipeline.training.run_dir import RunDir
from msaflow.pipeline.training.text_cache import COARSE_GRID, split_mask_seed

log = logging.getLogger("msaflow.train")
PROGRESS_EVERY_S = 60.0  # an in-epoch progress line at most this often when no progress bar is shown


# ---------------------------------------------------------------- views of a batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def require_labels(batch: dict, split_name: str) -> None:
    """Training and model selection need a label on every clip: an unlabeled one (empty label in
    the manifest, e.g. a folder of videos without labels.csv) would make the loss NaN."""
    missing = torch.isnan(batch["label"])
    if bool(missing.any()):
        ids = [batch["id"][i] for i in torch.nonzero(missing).flatten().tolist()]
        raise DataError(f"{split_name} split: {len(ids)} clip(s) of a batch of {len(batch['id'])} have no label "
                        f"({', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}): training needs a label on every "
                        f"train and valid clip; give them in the dataset's labels CSV (docs/datasets.md), or put "
                        f"unlabeled clips in the test split and score them with `msaflow predict`")


class LossStep(torch.nn.Module):
    """`model.compute_loss` as a forward pass, so DistributedDataParallel can wrap it: DDP
    averages gradients over processes only for work done inside its wrapper's forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, complete: dict, incomplete: dict):
        return self.model.compute_loss(complete, incomplete)


def mask_generator(run: RunConfig, rank: int) -> torch.Generator:
    """Train-mask draws: rank 0 as a one-process run; every other rank its own stream."""
    return torch.Generator().manual_seed(run.seed + 1 if rank == 0 else (run.seed + 1) * 1_000_003 + rank)


def test_batches(source, normalise: Normaliser, split: str = "test"):
    """A fresh pass over a split's batches per call (one per scored rate), one process, no top-up rows."""
    return lambda: (normalise(b) for b in source.batches(split, source.eval_batch_size))


# ---------------------------------------------------------------- the trainer: everything one process holds


@dataclass
class Trainer:
    run: RunConfig
    run_dir: RunDir
    source: object
    ctx: DistContext
    normalise: Normaliser
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    shuffle_gen: torch.Generator
    mask_gen: torch.Generator
    state: dict  # epoch, best, best_epoch, bad_epochs, history, seconds, world_size
    loss_step: torch.nn.Module = None
    cache: object = None  # frozen text states (pipeline/training/text_cache.py), or None
    tensorboard: "TensorBoardLog" = None

    @property
    def optim(self) -> OptimConfig:
        return OptimConfig.from_dict(self.run.optim_config)

    @property
    def select(self) -> str:
        """What model selection and early stopping read of the validation losses."""
        return "l1" if self.optim.select_on == "l1" else "loss"

    def finished(self) -> bool:
        return self.state["epoch"] >= self.optim.max_epochs or self.state["bad_epochs"] >= self.optim.patience


def normaliser_for(run: RunConfig, source, run_dir: RunDir, ctx: DistContext) -> Normaliser:
    """The run's z-scoring statistics: read from the run folder, else fit once (main process) and stored."""
    if not run.zscore or source.mode != "features":
        return Normaliser()
    if ctx.is_main and not run_dir.has_normaliser():
        run_dir.save_normaliser(source.fit_normaliser())
    barrier()
    return run_dir.normaliser()


def build_trainer(run: RunConfig, run_dir: RunDir, source, ctx: DistContext) -> Trainer:
    """Model, optimiser and RNG streams seeded from the run, restored from last.pt when there is one."""
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
    t = Trainer(run, run_dir, source, ctx, normalise, model,
                optimizer=torch.optim.Adam(model.param_groups(OptimConfig.from_dict(run.optim_config))),  # coupled L2
                shuffle_gen=torch.Generator().manual_seed(run.seed), mask_gen=mask_generator(run, ctx.rank),
                state={"epoch": 0, "best": float("inf"), "best_epoch": -1, "bad_epochs": 0, "history": [],
                       "seconds": 0.0, "world_size": ctx.world_size})
    restore(t, run_dir.checkpoint())
    t.loss_step = wrap_model(LossStep(model), ctx, find_unused_parameters=True)
    t.cache = run_text_cache(asdict(run), source.splits if isinstance(source, PickleSource) else None,
                             cached_views(run))
    t.tensorboard = TensorBoardLog(run_dir.path if ctx.is_main else None)
    return t


def cached_views(run: RunConfig) -> list[tuple[str, float]]:
    """The (split, rate) text states a run with a text cache reads: complete views, train, valid, test."""
    return ([("train", 0.0), ("valid", 0.0)] + [("train", r) for r in protocols.cached_train_rates(run, COARSE_GRID)]
            + [("valid", r) for r in run.valid_rates] + [("test", r) for r in protocols.scored_rates(run)])


def restore(t: Trainer, ckpt: dict | None) -> None:
    """Weights, optimiser, RNG streams and progress from a checkpoint (None: a fresh run)."""
    if ckpt is None:
        return
    load_stored_state(t.model, ckpt["model"])
    t.optimizer.load_state_dict(ckpt["optimizer"])
    t.shuffle_gen.set_state(ckpt["rng"]["shuffle"])
    mask_states = ckpt["rng"].get("mask_by_rank") or [ckpt["rng"]["mask"]]
    if len(mask_states) == t.ctx.world_size:  # same process count: every rank goes on with its own draws
        t.mask_gen.set_state(mask_states[t.ctx.rank])
    torch.set_rng_state(ckpt["rng"]["torch"])
    t.state = ckpt["state"]


def save_checkpoint(t: Trainer, record: dict) -> None:
    """last.pt, the history and the TensorBoard scalars (main process); every rank waits for them."""
    mask_states = gather_objects(t.mask_gen.get_state())
    if t.ctx.is_main:
        t.run_dir.save_checkpoint({
            "model": stored_state_dict(t.model), "optimizer": t.optimizer.state_dict(), "state": t.state,
            "rng": {"shuffle": t.shuffle_gen.get_state(), "mask": mask_states[0], "mask_by_rank": mask_states,
                    "torch": torch.get_rng_state()},
            "lengths": t.run.lengths,
        })
        t.run_dir.write_history(t.state["history"])
        t.tensorboard.add(record)
    barrier()  # no process starts the next epoch before the checkpoint is on disk


# ---------------------------------------------------------------- the loop


def train(run_dir: RunDir, ctx: DistContext, source, asked: RunConfig) -> None:
    run = start_or_resume(run_dir, asked, ctx.is_main)
    log.info(f"training {run.model} ({run.protocol}, seed {run.seed}) on {run.data} [{source.mode}: "
             f"{', '.join(run.modalities.get('used', []))}; {len(source)} train / {source.size('valid')} valid / "
             f"{source.size('test')} test] into {run_dir.path}")
    t = build_trainer(run, run_dir, source, ctx)
    trained = False  # an epoch ran in this call: test metrics from an earlier end are stale
    while not t.finished():
        epoch, t0, trained = t.state["epoch"], time.time(), True
        train_losses, train_samples = train_one_epoch(t, epoch)
        train_seconds = time.time() - t0
        valid = validation_loss(t.model, source, t.normalise, run, t.optim.batch_size, ctx, cache=t.cache)
        improved = keep_if_best(t, valid, epoch)
        seconds = time.time() - t0
        t.state["seconds"] += seconds
        record = {"epoch": epoch, "seconds": round(seconds, 1), "train_seconds": round(train_seconds, 1),
                  "train_samples": train_samples, "train": train_losses, "valid": valid}
        t.state["history"].append(record)
        t.state["epoch"] = epoch + 1
        save_checkpoint(t, record)
        if ctx.is_main:
            log.info(f"epoch {epoch + 1}/{t.optim.max_epochs}: train loss "
                     f"{record['train'].get('loss', float('nan')):.4f}  valid {t.select} "
                     f"{valid[t.select]:.4f}{'  *best*' if improved else ''}  ({seconds:.0f} s)")
    t.tensorboard.close()
    if ctx.is_main:
        score_test(t, rescore=trained)


def train_one_epoch(t: Trainer, epoch: int) -> tuple[dict[str, float], int]:
    """One pass over the train split: (mean loss logs per batch, samples trained on)."""
    model, optim = t.model, t.optim
    model.train()
    if hasattr(model, "on_epoch_start"):  # end to end: front-ends frozen until their epoch comes
        for modality in model.on_epoch_start(epoch) or []:
            log.info(f"epoch {epoch}: {modality} front-end now {'trained' if model.trainable(modality) else 'frozen'}")
    t.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    steps_done = 0
    batches = t.source.batches("train", optim.batch_size, shuffle=True, epoch=epoch, seed=t.run.seed,
                               generator=t.shuffle_gen, drop_last=True,  # drop_last: BatchNorm in DLFR needs > 1 sample
                               rank=t.ctx.rank, world_size=t.ctx.world_size)
    n_batches = batches_per_epoch(len(t.source), optim.batch_size, t.run.epoch_steps)
    bar = tqdm(batches, total=n_batches, desc=f"epoch {epoch}", disable=None, leave=False)
    progress = EpochProgress(epoch, n_batches, enabled=t.ctx.is_main and bar.disable)
    for step, batch in enumerate(bar):
        if step == n_batches:  # every rank stops at the same step
            break
        progress(step)
        require_labels(batch, "train")
        rate = train_rate(t.run, t.mask_gen)
        complete, incomplete = views(t.normalise(batch), rate, t.run, "train", generator=t.mask_gen, cache=t.cache,
                                     drop=missing_simulation(model))
        loss, logs = t.loss_step(*views_to_device((complete, incomplete), t.ctx.device))
        loss.backward()
        if (step + 1) % optim.grad_accum == 0:
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
        steps_done += 1
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v
    t.optimizer.zero_grad(set_to_none=True)  # the last partial accumulation group takes no step
    return {k: v / max(n_batches, 1) for k, v in sums.items()}, steps_done * optim.batch_size


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
            require_labels(batch, "valid")
            batch = normalise(batch)
            complete, incomplete = views(batch, rate, run, "valid", cache=cache, drop=missing_simulation(model))
            _, logs = model.compute_loss(*views_to_device((complete, incomplete), device))
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v * len(batch["id"])
    n = source.size("valid") * len(run.valid_rates)
    return {k: all_reduce_sum(sums.get(k, 0.0)) / n for k in sorted(sums)}


def keep_if_best(t: Trainer, valid: dict[str, float], epoch: int) -> bool:
    """Whether the epoch improved on the best validation value; its weights kept as best.pt if so."""
    improved = valid[t.select] < t.state["best"] - t.optim.min_delta
    if improved:
        t.state.update(best=valid[t.select], best_epoch=epoch, bad_epochs=0)
        if t.ctx.is_main:
            t.run_dir.save_best(t.model)
    else:
        t.state["bad_epochs"] += 1
    return improved


def score_test(t: Trainer, rescore: bool) -> None:
    """The best weights scored once on the test split (metrics.json); kept when no epoch ran in this call."""
    run, source, state = t.run, t.source, t.state
    if rescore or t.run_dir.metrics() is None:  # the test split is touched here only, with weights chosen on valid
        load_stored_state(t.model, t.run_dir.weights())
        labels: dict = {}
        per_rate = score(t.model, test_batches(source, t.normalise), protocols.scored_rates(run),
                         corruption="missing", mask_seed=run.mask_seed, dataset=run.dataset,
                         unk_id=run.model_config["unk_id"], text_cache=t.cache, label_summary=labels,
                         phase=f"test ({source.size('test')} samples)")
        t.run_dir.write_metrics({"rates": per_rate, "n_test": source.size("test"), "best_epoch": state["best_epoch"],
                                 "epochs": state["epoch"], "train_seconds": round(state["seconds"], 1),
                                 "labels": labels, "data_hash": run.data_hash})
    first_rate, first = next(iter(t.run_dir.metrics()["rates"].items()))
    log.info(f"done: best epoch {state['best_epoch']}, test at rate {first_rate}: MAE {first['MAE']:.4f} "
             f"Corr {first['Corr'] if first['Corr'] is None else round(first['Corr'], 4)}")


# ---------------------------------------------------------------- progress


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
