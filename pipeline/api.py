"""The Python API behind `msaflow.train`, `msaflow.evaluate`, `msaflow.extract_clip`,
`msaflow.load_run` and `msaflow.results` (documented in msaflow/__init__.py), and the
many-clip mode of `msaflow predict` (a folder of videos or a CSV of clips -> a CSV of scores).

The functions take the options of the matching command as keyword arguments (the flag's
name with `_` for `-`: `batch_size=4` for `--batch-size 4`) and run the same code; a user
error raises `ValueError` (`msaflow.pipeline.data.sources.DataError`) with the one-line message the
command prints.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger("msaflow.predict")
VIDEO_SUFFIXES = (".mp4", ".mpg", ".mpeg", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".wmv", ".ts")
PREDICTION_COLUMNS = ("id", "path", "score", "n_frames", "n_face_frames", "has_audio", "has_text", "text_source",
                      "text", "error")


# ---------------------------------------------------------------- options as a command's Namespace


def command_namespace(command: str, positional: list[str], options: dict[str, Any]) -> argparse.Namespace:
    """The parsed arguments of `msaflow COMMAND` with `options` set (keyword names = flag names with `_`).
    An unknown option raises TypeError naming the known ones."""
    from msaflow.pipeline.cli import COMMANDS, quiet_third_party

    quiet_third_party()
    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"msaflow {command}")
    module.add_arguments(parser)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    unknown = sorted(set(options) - set(actions))
    if unknown:
        raise TypeError(f"msaflow.{command}(): unknown option(s) {unknown}; known: {sorted(actions)}")
    try:
        args = parser.parse_args(positional)
    except SystemExit as exc:  # pragma: no cover - the placeholders always parse
        raise ValueError(f"msaflow {command}: bad arguments {positional}") from exc
    for name, value in options.items():
        action = actions[name]
        if value is not None and action.type is Path:
            value = [Path(v) for v in value] if isinstance(value, (list, tuple)) else Path(value)
        setattr(args, name, value)
    return args


def _config_file(config: Any, folder: Path) -> Path | None:
    """A --config value: a path as it is, a dict written to a YAML file in `folder`."""
    if config is None or isinstance(config, (str, Path)):
        return None if config is None else Path(config)
    import yaml

    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    return path


def train(data: str | Path, out: str | Path, *, model: str = "emt-dlfr", config: Any = None, **options) -> "Run":
    """Train a model (`msaflow train`); the run, loaded."""
    from msaflow.pipeline.training.train import run_training

    with tempfile.TemporaryDirectory(prefix="msaflow-api-") as tmp:
        args = command_namespace("train", [], {"data": data, "out": out, "model": model,
                                               "config": _config_file(config, Path(tmp)), **options})
        try:
            run_dir = run_training(args)
        except SystemExit as exc:  # the folder holds another run
            if isinstance(exc.code, str):
                raise ValueError(exc.code) from None
            raise
    return load_run(run_dir)


def evaluate(runs: str | Path | Iterable[str | Path], data: str | Path, *, out: str | Path | None = None,
             **options) -> dict:
    """Score runs (`msaflow evaluate`: seeds of one configuration, pooled); the metrics dict. Without
    `out` the metrics.json and CSV go to a temporary folder and only the dict is returned."""
    from msaflow.pipeline.training.evaluate import evaluate_runs

    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    with tempfile.TemporaryDirectory(prefix="msaflow-api-") as tmp:
        target = Path(out) if out is not None else Path(tmp) / "metrics.json"
        args = command_namespace("evaluate", ["run", "--data", "data", "-o", "out"],
                                 {"runs": runs, "data": data, "out": target, **options})
        return evaluate_runs(args)


def extract_clip(path: str | Path, text: str = "", *, config: Any = None, start: float | None = None,
                 end: float | None = None, device: str = "cpu") -> dict:
    """One clip through `msaflow extract`'s per-clip extraction; its arrays by member name
    ("face", "vision_mask", "fbank", "wav", "audio_mask", "text_ids" in raw mode; "vision",
    "audio", "text", ... in features mode) and "meta" (the clip's json: frames, fps, presence).
    `config`: an ExtractConfig, a dict of its keys, or a YAML file (an `extract:` section or the
    section itself); default: `msaflow extract`'s defaults (raw mode)."""
    from msaflow.pipeline.cli import quiet_third_party
    from msaflow.pipeline.extraction.extract import ExtractConfig, load_config
    from msaflow.pipeline.training.predict import check_video, extract_members

    quiet_third_party()
    if config is None or isinstance(config, dict):
        cfg = ExtractConfig.model_validate(config or {})
    elif isinstance(config, (str, Path)):
        cfg = load_config(config)
    else:
        cfg = config
    path = Path(path)
    check_video(path)
    members = extract_members(path, text, start, end, cfg, device)
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


# ---------------------------------------------------------------- a loaded run


class Run:
    """A finished training run with its model loaded once; `predict` scores clips with it.

    Clips go through the same extraction as the run's training shards (the settings its
    config.json records) and the same normalisation, exactly as `msaflow predict` does; the
    model (and in features mode the front-ends) stay loaded across calls."""

    def __init__(self, run_dir: str | Path, device: str = "cpu", extract_config: str | Path | None = None):
        from msaflow.pipeline.training import predict as p

        self.config_path, self.weights_path = p.resolve_checkpoint(Path(run_dir))
        self.dir = self.config_path.parent
        self.device = device
        self.config, self.model = p.load_model(self.config_path, self.weights_path, device)
        self._extract_override = Path(extract_config) if extract_config is not None else None
        self._extract = None
        self._frontends = None

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r}: {self.name}, seed {self.config.get('seed')})"

    @property
    def name(self) -> str:
        return self.config["model"]

    @property
    def metrics(self) -> dict | None:
        """The run's test metrics (metrics.json), when training finished."""
        path = self.dir / "metrics.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def extract_settings(self):
        """The ExtractConfig of the run's training shards (checked against their config hash when reachable)."""
        from msaflow.pipeline.training import predict as p

        if self._extract is None:
            if str(self.config.get("data", "")).endswith((".pkl", ".pickle")):
                raise p.UnusableInput(f"{self.config_path}: the run trained on an MMSA feature pickle "
                                      f"({self.config['data']}); its features cannot be computed from a video. "
                                      f"Train on shards to predict from video.")
            self._extract = p.extract_config(self.config, self._extract_override, self.name)
        return self._extract

    def _frontends_for(self, cfg):
        if cfg.mode != "features":
            return None
        if self._frontends is None:
            from msaflow.extractors import frontends as fe

            self._frontends = fe.build(fe.parse_spec(cfg.frontends), self.device)
        return self._frontends

    def predict(self, video: str | Path, text: str = "", *, start: float | None = None, end: float | None = None,
                use_asr: bool = True):
        """The Prediction of one clip (score, face frames, audio and text presence)."""
        import torch

        from msaflow.pipeline.training import predict as p

        video = Path(video)
        p.check_video(video)
        cfg = self.extract_settings()
        if hasattr(p, "with_transcript_settings"):  # speech recognition when no text is given
            cfg = p.with_transcript_settings(cfg, text, use_asr)
        members = p.extract_members(video, text, start, end, cfg, self.device, frontends=self._frontends_for(cfg))
        batch = p.normalise_like_training(p.members_to_batch(members, cfg.mode, self.config), self.config, cfg.mode,
                                          self.dir)
        batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.no_grad():
            score = float(self.model(batch)["pred"][0])
        meta = members["json"]
        values = dict(video=str(video), score=score, n_frames=int(meta["n_frames"]),
                      n_face_frames=int(meta["n_face_frames"]), has_audio=bool(meta["has_audio"]),
                      has_text=bool(meta["has_text"]), text=meta.get("text", text), model=self.name, mode=cfg.mode,
                      text_source=meta.get("text_source", "given" if text.strip() else "none"), asr=meta.get("asr"))
        known = {f.name for f in fields(p.Prediction)}
        return p.Prediction(**{k: v for k, v in values.items() if k in known})

    def predict_many(self, clips: Iterable, *, use_asr: bool = True) -> list[dict]:
        """Score many clips: paths, or dicts with `path` (and optional `id`, `text`, `start`, `end`).
        One row per clip (PREDICTION_COLUMNS); a clip that cannot be used gets its `error`, the others go on."""
        from msaflow.pipeline.training.predict import UnusableInput

        rows = []
        for clip in clips:
            item = {"path": str(clip)} if isinstance(clip, (str, Path)) else dict(clip)
            row = {"id": item.get("id") or Path(item["path"]).stem, "path": item["path"]}
            try:
                result = self.predict(item["path"], item.get("text") or "", start=item.get("start"),
                                      end=item.get("end"), use_asr=use_asr)
            except UnusableInput as exc:
                row["error"] = " ".join(str(exc).split())
                log.warning(f"{row['id']}: {row['error']}")
            else:
                d = result.to_dict()
                row |= {k: d.get(k) for k in PREDICTION_COLUMNS if k in d and k not in ("path", "id")}
                row["error"] = ""
                log.info(f"{row['id']}: {result.score:+.3f}")
            rows.append(row)
        return rows


def load_run(run_dir: str | Path, device: str = "cpu", extract_config: str | Path | None = None) -> Run:
    """A finished training run (folder with config.json and best.pt), its model loaded."""
    from msaflow.pipeline.cli import quiet_third_party
    from msaflow.pipeline.training.predict import UnusableInput

    quiet_third_party()
    try:
        return Run(run_dir, device=device, extract_config=extract_config)
    except UnusableInput as exc:
        raise ValueError(str(exc)) from None


# ---------------------------------------------------------------- `msaflow predict FOLDER | --manifest CSV`


def _number(value) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    return float(value)


def clips_of_manifest(path: Path) -> list[dict]:
    """Clips of a CSV with `path` or `file` (relative paths: to the CSV's folder), optional `id`,
    `text`, `start`, `end` (an msaflow manifest has them all)."""
    from msaflow.pipeline.data.sources import DataError

    if not path.is_file():
        raise DataError(f"{path}: no such file (--manifest: a CSV of clips)")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a UTF-8 CSV ({exc})") from exc
    column = "path" if rows and "path" in rows[0] else "file" if rows and "file" in rows[0] else None
    if column is None:
        raise DataError(f"{path}: needs a `path` (or `file`) column naming each clip's video")
    clips = []
    for i, row in enumerate(rows, start=2):
        video = Path(row[column])
        if not video.is_absolute():
            video = path.parent / video
        try:
            start, end = _number(row.get("start")), _number(row.get("end"))
        except ValueError as exc:
            raise DataError(f"{path}: row {i}: start/end must be seconds ({exc})") from exc
        clips.append({"id": row.get("id") or Path(row[column]).with_suffix("").as_posix(), "path": str(video),
                      "text": row.get("text") or "", "start": start, "end": end})
    return clips


def clips_of_folder(folder: Path) -> list[dict]:
    videos = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return [{"id": v.relative_to(folder).with_suffix("").as_posix(), "path": str(v)} for v in videos]


def write_predictions(path: Path, rows: list[dict]) -> None:
    from msaflow.tario import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=PREDICTION_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def predict_many_main(args: argparse.Namespace) -> int:
    """`msaflow predict FOLDER` / `msaflow predict --manifest CSV`: every clip scored, a CSV written."""
    from msaflow.pipeline.data.sources import DataError
    from msaflow.pipeline.training.predict import UnusableInput, _device

    try:
        if args.manifest is not None and args.video is not None:
            raise DataError("give a video, a folder of videos or --manifest CSV, not both")
        if args.manifest is None and args.video is None:
            raise DataError("give a video, a folder of videos, or --manifest CSV (see `msaflow predict --help`)")
        clips = clips_of_manifest(args.manifest) if args.manifest is not None else clips_of_folder(args.video)
        if not clips:
            raise DataError(f"{args.manifest or args.video}: no clips to score")
        out = args.out or Path("predictions.csv")
        run = Run(args.checkpoint, device=_device(args.device), extract_config=args.extract_config)
        run.extract_settings()  # a run that cannot predict from video says so before the first clip
        rows = run.predict_many(clips, use_asr=not getattr(args, "no_asr", False))
    except (DataError, UnusableInput) as exc:
        print(f"msaflow predict: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    write_predictions(out, rows)
    failed = sum(1 for r in rows if r.get("error"))
    print(f"scored {len(rows) - failed} of {len(rows)} clip(s) with {run.dir} ({run.name}); "
          f"{failed} could not be used; wrote {out}")
    return 2 if failed == len(rows) else 0
