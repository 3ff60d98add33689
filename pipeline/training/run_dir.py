"""A training run folder: what `msaflow train` writes there, and the one reader of it.

    RUN/config.json       the run's settings (RunConfig: model, model_config, data hash, extraction, ...)
    RUN/last.pt           the checkpoint of the last epoch: weights, optimiser, RNG states, progress
    RUN/best.pt           the weights chosen on validation (a state dict)
    RUN/normaliser.json   audio/vision statistics fit on train (features mode with z-scoring)
    RUN/metrics.json      the test metrics, scored once at the end of training
    RUN/history.json|csv  the losses of every epoch

Every `.pt` file holds tensors and plain containers only and is read with
`torch.load(weights_only=True)`: a file holding pickled objects is refused, never unpickled.
A frozen text encoder's pretrained weights are not stored, only their fingerprint: they are
rebuilt from the local text model at load (`msaflow.model.weights`).
`msaflow train` writes through this class, and `evaluate`, `predict`, `export-text` and
`msaflow.load_run` read through it.
"""

from __future__ import annotations

import csv
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from msaflow.model.weights import load_stored_state, stored_state_dict
from msaflow.pipeline.data.sources import DataError, Normaliser
from msaflow.tario import atomic_path, write_json_atomic


class RunDirError(DataError):
    """A run folder (or a weights file) that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class RunDir:
    path: Path
    weights_file: Path | None = None  # the weights to load: best.pt unless a .pt file was named

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> "RunDir":
        """A run folder, or a `.pt` weights file with the run's config.json beside it."""
        checkpoint = Path(checkpoint)
        if checkpoint.is_dir():
            return cls(checkpoint)
        return cls(checkpoint.parent, checkpoint)

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def weights_path(self) -> Path:
        return self.weights_file or self.best

    # ------------------------------------------------------------ reading

    def require_finished(self) -> "RunDir":
        """Self, when config.json and the weights are there (an epoch has finished)."""
        for f in (self.config_path, self.weights_path):
            if not f.is_file():
                raise RunDirError(f"{self.weights_file or self.path}: not a finished training run ({f.name} not "
                                  f"found; a run folder of `msaflow train` holds config.json and best.pt)")
        return self

    def config(self) -> dict:
        """config.json as written by `msaflow train`."""
        try:
            run = json.loads(self.config_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise RunDirError(f"{self.path}: not a training run folder (no config.json)") from exc
        except ValueError as exc:
            raise RunDirError(f"{self.config_path}: not a training run config ({exc})") from exc
        if not isinstance(run, dict) or "model" not in run or "model_config" not in run:
            raise RunDirError(f"{self.config_path}: not a training run config (no model / model_config)")
        return run

    def weights(self) -> dict:
        """The state dict of the weights file (last.pt: its model's)."""
        try:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # a pickled object (e.g. a whole model), not a state dict
            raise RunDirError(f"{self.weights_path}: holds pickled Python objects, not a state dict of weights; "
                              f"msaflow loads weights only (a pickle runs code when loaded). Use the best.pt that "
                              f"`msaflow train` wrote, or save model.state_dict()") from exc
        if isinstance(state, dict) and "model" in state and "optimizer" in state:  # a full checkpoint
            state = state["model"]
        return state

    def build_model(self, run: dict | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The run's model with its weights, in eval mode on `device` (`run`: its config, when read already)."""
        from msaflow.model.config import ModelConfig
        from msaflow.model.registry import build_model

        run = self.config() if run is None else run
        try:
            model = build_model(run["model"], ModelConfig.from_dict(run["model_config"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise RunDirError(f"{self.config_path}: not a training run config ({exc})") from exc
        try:
            load_stored_state(model, self.weights())
        except (RuntimeError, ValueError, KeyError) as exc:
            raise RunDirError(f"{self.weights_path}: weights do not fit the model of {self.config_path.name} "
                              f"({str(exc).splitlines()[0]})") from exc
        return model.to(device).eval()

    def checkpoint(self) -> dict | None:
        """last.pt (everything to continue training), or None before the first epoch ends."""
        if not self.last.is_file():
            return None
        return torch.load(self.last, map_location="cpu", weights_only=True)

    def normaliser(self) -> Normaliser:
        return Normaliser.load(self.path)

    def metrics(self) -> dict | None:
        """metrics.json, when training has finished."""
        return json.loads(self.metrics_path.read_text(encoding="utf-8")) if self.metrics_path.is_file() else None

    # ------------------------------------------------------------ writing (`msaflow train`)

    def write_config(self, run: dict) -> None:
        write_json_atomic(self.config_path, run)

    def save_best(self, model: torch.nn.Module) -> None:
        _save(self.best, stored_state_dict(model))

    def save_checkpoint(self, state: dict) -> None:
        _save(self.last, state)

    def save_normaliser(self, normaliser: Normaliser) -> None:
        normaliser.save(self.path)

    def has_normaliser(self) -> bool:
        return (self.path / "normaliser.json").is_file()

    def write_metrics(self, metrics: dict) -> None:
        write_json_atomic(self.metrics_path, metrics)

    def write_history(self, history: list[dict]) -> None:
        """history.json and history.csv (rewritten whole each epoch, so a resumed run has one row per epoch)."""
        write_json_atomic(self.path / "history.json", history)
        columns, rows = history_rows(history)
        with atomic_path(self.path / "history.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


def _save(path: Path, state) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def history_rows(history: list[dict]) -> tuple[list[str], list[dict]]:
    """(columns, rows) of the per-epoch CSV: timings, then train_* and valid_* losses."""
    rows = []
    for h in history:
        row = {k: h.get(k) for k in ("epoch", "seconds", "train_seconds", "train_samples")}
        row |= {f"train_{k}": v for k, v in (h.get("train") or {}).items()}
        row |= {f"valid_{k}": v for k, v in (h.get("valid") or {}).items()}
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return columns, rows
