"""Starting or resuming a run folder: the run `msaflow train` trains there (pipeline/training/train.py).

A new folder gets the asked run's config.json; a folder with a checkpoint goes on with its own
run, which must be the asked one except for the stopping rule (--epochs, --patience).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace

from msaflow.pipeline.training.run_config import ADDED_FIELDS, RunConfig
from msaflow.pipeline.training.run_dir import RunDir

log = logging.getLogger("msaflow.train")

STOPPING_RULE = ("max_epochs", "patience")  # may change on resume: no schedule depends on them


def start_or_resume(run_dir: RunDir, asked: RunConfig, main_process: bool) -> RunConfig:
    """The run to train: `asked` in a new folder, else the folder's own run, which must be the one
    `asked` describes (SystemExit naming what differs) except for the stopping rule."""
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if not run_dir.last.is_file():
        if main_process:
            run_dir.write_config(asdict(asked))
        return asked
    on_disk = run_dir.config()
    run = RunConfig(**on_disk)
    changed = changed_settings(asdict(run), asdict(asked), on_disk)
    if changed:
        raise SystemExit(f"{run_dir.path} holds a run with other settings ({', '.join(changed)} differ): "
                         f"resume it with its own command, or train into a new -o folder")
    new_rule = {k: asked.optim_config[k] for k in STOPPING_RULE if asked.optim_config[k] != run.optim_config[k]}
    if new_rule:  # no schedule depends on it: a larger --epochs goes on exactly as a longer run would have
        log.info(f"{run_dir.path}: stopping rule changed on resume: " + ", ".join(
            f"{k} {run.optim_config[k]} -> {v}" for k, v in new_rule.items()))
        run = replace(run, optim_config=run.optim_config | new_rule)
    filled = {k: getattr(asked, k) for k in ADDED_FIELDS if not on_disk.get(k) and getattr(asked, k)}
    if filled:  # a run folder from before these were recorded
        run = replace(run, **filled)
    if (new_rule or filled) and main_process:
        run_dir.write_config(asdict(run))
    log.info(f"resuming {run_dir.path} from {run_dir.last.name}")
    return run


def changed_settings(recorded: dict, asked: dict, on_disk: dict) -> list[str]:
    """The settings `asked` changes on a run folder, besides the stopping rule and machine settings."""
    def comparable(cfg: dict) -> dict:
        from msaflow.pipeline.extraction.settings import extract_config_hash

        cfg = dict(cfg)
        for key in ADDED_FIELDS:  # a run folder written before they were recorded: taken as recorded
            if not on_disk.get(key):
                cfg[key] = on_disk.get(key)
        if cfg.get("extract"):  # the extraction settings by their hash
            try:
                cfg["extract"] = extract_config_hash(cfg["extract"])
            except ValueError:
                pass
        return cfg | {"optim_config": {k: v for k, v in cfg["optim_config"].items() if k not in STOPPING_RULE}}

    recorded, wanted = comparable(recorded), comparable(asked)
    return sorted(k for k, v in recorded.items() if k not in ("threads", "workers") and wanted.get(k) != v)

