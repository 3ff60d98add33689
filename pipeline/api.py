"""The Python API behind `msaflow.train`, `msaflow.evaluate`, `msaflow.extract_clip`,
`msaflow.load_run` and `msaflow.results` (documented in msaflow/__init__.py). A loaded run
(`Run`: the model and front-ends loaded once, `.predict`, `.predict_many`) is the one
`msaflow predict` uses (pipeline/training/predict.py).

The functions take the options of the matching command as keyword arguments (the flag's
name with `_` for `-`: `batch_size=4` for `--batch-size 4`) and run the same code; a user
error raises `ValueError` (`msaflow.pipeline.data.sources.DataError`) with the one-line message the
command prints.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from msaflow.pipeline.training.predict import Run


# ---------------------------------------------------------------- options as a command's Namespace


def quiet_third_party() -> None:
    """No progress bars or advisory chatter from Hugging Face libraries (the "Loading weights" bar),
    for the API's functions and every `msaflow` command."""
    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:  # already imported: set it there too
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except Exception:  # pragma: no cover - an old or odd transformers
            pass


def command_namespace(module: ModuleType, positional: list[str], options: dict[str, Any]) -> argparse.Namespace:
    """The parsed arguments of the command `module` defines (its `add_arguments`) with `options` set
    (keyword names = flag names with `_`, e.g. `dataset=` for `--dataset`). An unknown option raises
    TypeError naming the known ones."""
    quiet_third_party()
    command = module.__name__.rpartition(".")[2]
    parser = argparse.ArgumentParser(prog=f"msaflow {command}")
    module.add_arguments(parser)
    actions = {name: a for a in parser._actions if a.dest != "help" for name in _names(a)}
    unknown = sorted(set(options) - set(actions))
    if unknown:
        raise TypeError(f"msaflow.{command}(): unknown option(s) {unknown}; known: {sorted(actions)}")
    try:
        args = parser.parse_args(positional)
    except SystemExit as exc:  # pragma: no cover - the placeholders always parse
        raise ValueError(f"msaflow {command}: bad arguments {positional}") from exc
    for name, value in options.items():
        action = actions[name]
        if value is not None and action.type is Path and not isinstance(value, dict):  # a dict: --config's content
            value = [Path(v) for v in value] if isinstance(value, (list, tuple)) else Path(value)
        setattr(args, action.dest, value)
    return args


def _names(action: argparse.Action) -> set[str]:
    """An option's keyword names: its dest and its long flags with `_` for `-`."""
    return {action.dest} | {s[2:].replace("-", "_") for s in action.option_strings if s.startswith("--")}


def train(data: str | Path, out: str | Path, *, model: str = "emt-dlfr", config: Any = None, **options) -> "Run":
    """Train a model (`msaflow train`); the run, loaded. `config`: a YAML path or its content as a dict."""
    from msaflow.pipeline.training import train_cli as command

    args = command_namespace(command, [], {"data": data, "out": out, "model": model, "config": config, **options})
    try:
        run_dir = command.run_training(args)
    except SystemExit as exc:  # the folder holds another run
        if isinstance(exc.code, str):
            raise ValueError(exc.code) from None
        raise
    return load_run(run_dir)


def evaluate(runs: str | Path | Iterable[str | Path], data: str | Path, *, out: str | Path | None = None,
             **options) -> dict:
    """Score runs (`msaflow evaluate`: seeds of one configuration, pooled); the metrics dict. Without
    `out` the metrics.json and CSV go to a temporary folder and only the dict is returned."""
    from msaflow.pipeline.training import evaluate as command

    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    with tempfile.TemporaryDirectory(prefix="msaflow-api-") as tmp:
        target = Path(out) if out is not None else Path(tmp) / "metrics.json"
        args = command_namespace(command, ["run", "--data", "data", "-o", "out"],
                                 {"runs": runs, "data": data, "out": target, **options})
        return command.evaluate_runs(args)


def extract_clip(path: str | Path, text: str = "", *, config: Any = None, start: float | None = None,
                 end: float | None = None, device: str = "cpu") -> dict:
    """One clip through `msaflow extract`'s per-clip extraction; its arrays by member name
    ("face", "vision_mask", "fbank", "wav", "audio_mask", "text_ids" in raw mode; "vision",
    "audio", "text", ... in features mode) and "meta" (the clip's json: frames, fps, presence).
    `config`: an ExtractConfig, a dict of its keys, or a YAML file (an `extract:` section or the
    section itself); default: `msaflow extract`'s defaults (raw mode)."""
    from msaflow.pipeline.extraction.settings import ExtractConfig, load_config
    from msaflow.pipeline.training.predict import check_video, extract_members, resolved_device

    quiet_third_party()
    if config is None or isinstance(config, dict):
        cfg = ExtractConfig.model_validate(config or {})
    elif isinstance(config, (str, Path)):
        cfg = load_config(config)
    else:
        cfg = config
    path = Path(path)
    check_video(path)
    members = extract_members(path, text, start, end, cfg, resolved_device(device))
    out = {name.removesuffix(".npy"): value for name, value in members.items() if name != "json"}
    out["meta"] = members["json"]
    return out


def results(runs: Iterable[str | Path], out: str | Path | None = None) -> list[dict]:
    """One row per run (`msaflow results`); appended to and deduplicated in `out` when given."""
    from msaflow.pipeline.reporting.results import collect_rows, update_table

    rows = collect_rows([Path(r) for r in ([runs] if isinstance(runs, (str, Path)) else runs)])
    if out is not None:
        update_table(Path(out), rows)
    return rows


def load_run(run_dir: str | Path, device: str = "cpu", extract_config: str | Path | None = None) -> "Run":
    """A finished training run (folder with config.json and best.pt), its model loaded on `device`
    (auto, cpu, cuda); ValueError when it cannot be used."""
    from msaflow.pipeline.training.predict import Run

    quiet_third_party()
    return Run(run_dir, device=device, extract_config=extract_config)


def __getattr__(name: str):
    if name == "Run":  # imported on first use: `import msaflow.pipeline.api` stays light
        from msaflow.pipeline.training.predict import Run

        return Run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
