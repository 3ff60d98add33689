"""`msaflow predict VIDEO --checkpoint RUN`: the sentiment score of one clip.

The clip goes through the same per-clip extraction as `msaflow extract` (decode, face
track and crops, fbank, tokens, and in features mode the same frozen front-ends), with
the extraction settings recorded for the training run, then through the trained model.
It prints the score and which modalities were present (face in x/y frames, audio yes/no,
text yes/no); `--json` prints one JSON object instead. A file that cannot be used (zero
bytes, not a video, truncated beyond decoding) exits with status 2 and a message naming
the file and the reason.

The transcript: `--text` when given; otherwise the clip's speech is recognised (extractors/asr.py:
the training run's `extract.asr` settings, or the default recogniser when the run had none),
and the output says which it used (`text_source`: given, recognised, or none). `--no-asr`, or a
recogniser that is not installed (a warning says how to install it), leaves the text missing.

Many clips: `msaflow predict FOLDER` (every video under it) or `--manifest CSV` scores each clip
with the model and front-ends loaded once (`Run`, also `msaflow.load_run`) and writes one CSV
row per clip (pipeline/training/clip_lists.py); a clip that cannot be used gets its reason in
`error` and the others go on.

Where the settings come from: the checkpoint is a training run directory (`config.json`
+ `best.pt`), or a `.pt` state dict with that `config.json` beside it (read by `RunDir`). `config.json`
holds the model name and `model_config` (as `msaflow train` writes it) and, for runs
trained from shards, `extract`: the extraction section the shards were made with (mode,
front-ends, fps, face size, ...). `--extract-config` (the workflow YAML or an extract
section) overrides it. With neither, extraction defaults are used and a warning says so.
When the run's `data` is a shard folder reachable from here, the settings must hash to the
shards' `config_hash` (else exit 2), and features-mode runs trained with `zscore` get their
audio/vision normalised with the training split's statistics, by the training code's own
function.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from msaflow.pipeline.data.sources import DataError
from msaflow.pipeline.training.clip_lists import (PREDICTION_COLUMNS, clips_of_folder, clips_of_manifest,
                                                  write_predictions)
from msaflow.device import DEVICES
from msaflow.pipeline.training.run_dir import RunDir

log = logging.getLogger("msaflow.predict")


class UnusableInput(DataError):
    """The video (or the checkpoint) cannot be used; the message names the file and why (a user
    error: one line and exit status 2)."""


@dataclass
class Prediction:
    video: str
    score: float
    n_frames: int
    n_face_frames: int
    has_audio: bool
    has_text: bool
    text: str
    model: str
    mode: str
    text_source: str = "none"  # given (--text) / recognised (speech recognition) / none
    asr: dict | None = None  # recogniser, language, confidence, words with their times (recognised text)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        return [
            f"{self.video}",
            f"  sentiment score: {self.score:+.3f}",
            f"  face:  {self.n_face_frames}/{self.n_frames} frames",
            f"  audio: {'yes' if self.has_audio else 'no'}",
            f"  text:  {'yes' if self.has_text else 'no'}" + (f" ({self._source()}: {self.text!r})"
                                                               if self.has_text else f" ({self._source()})"),
        ]

    def _source(self) -> str:
        if self.text_source == "recognised" and self.asr:
            confidence = self.asr.get("confidence")
            return (f"recognised by {self.asr.get('recogniser')}"
                    + (f", confidence {confidence:.2f}" if confidence is not None else ""))
        if self.text_source == "given":
            return "given with --text"
        return "no speech recognised" if self.asr else "no transcript"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", type=Path, nargs="?", help="video file (any format ffmpeg reads), or a folder of "
                   "videos (every clip scored, a CSV written: -o)")
    p.add_argument("--manifest", type=Path, help="CSV of clips to score (`path` or `file`, optional `id`, `text`, "
                   "`start`, `end`; an msaflow manifest works): a CSV of scores is written (-o)")
    p.add_argument("-o", "--out", type=Path, help="folder / --manifest mode: the CSV of scores to write "
                   "(default predictions.csv)")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="training run directory (config.json + best.pt) or a .pt state dict beside config.json")
    p.add_argument("--text", default="", help="transcript of the clip (default: its speech is recognised)")
    p.add_argument("--no-asr", action="store_true", help="without --text, leave the text missing instead of "
                                                          "recognising the speech")
    p.add_argument("--start", type=float, help="segment start, seconds (default: file start)")
    p.add_argument("--end", type=float, help="segment end, seconds (default: file end)")
    p.add_argument("--extract-config", type=Path,
                   help="YAML with the extraction settings (an `extract:` section or the section itself); "
                        "default: the ones recorded in the run's config.json")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: the GPU when there is one")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# ---------------------------------------------------------------- the run's extraction settings


def training_shards(run: dict) -> Path | None:
    """The shard folder the run trained on, when it is one and is reachable from here."""
    from msaflow.pipeline.data.sources import is_shard_dir

    data = run.get("data")
    return Path(data) if data and Path(data).is_dir() and is_shard_dir(data) else None


def training_index(run: dict) -> tuple[Path | None, dict]:
    """(the training shards, their train/index.json) when they are reachable, else (None, {})."""
    shards = training_shards(run)
    if shards is None:
        return None, {}
    try:
        return shards, json.loads((shards / "train" / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, {}


def extract_config(run: dict, override: Path | None, model_name: str):
    """The extraction settings of the training data; checked against the shards' config hash."""
    from msaflow.pipeline.extraction.settings import ExtractConfig, extract_config_hash, load_config

    shards, index = training_index(run)  # read once: the settings of old runs, and the hash check
    if override is not None:
        try:
            cfg = load_config(override)
        except (OSError, ValueError) as exc:
            raise UnusableInput(str(exc)) from exc
    elif run.get("extract"):
        cfg = ExtractConfig.model_validate(run["extract"])
    elif (recorded := index.get("extract")):  # a run from before runs recorded them
        cfg = ExtractConfig.model_validate(recorded)
    else:
        mode = "raw" if model_name == "end-to-end" else "features"
        log.warning(f"warning: the run records no extraction settings; using the defaults ({mode} mode). "
                    f"Pass --extract-config with the settings the training shards were made with.")
        cfg = ExtractConfig(mode=mode)
    if shards is not None:
        recorded = index.get("config_hash")
        if recorded and recorded != extract_config_hash(cfg.model_dump(mode="json")):
            raise UnusableInput(f"{shards}: the training shards were extracted with other settings than "
                                f"{override or 'the run config'} gives (config hash differs); pass the "
                                f"workflow config they were made with as --extract-config")
    return cfg


# ---------------------------------------------------------------- one clip


def check_video(path: Path) -> None:
    if not path.is_file():
        raise UnusableInput(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UnusableInput(f"{path}: empty file (0 bytes)")


def extract_members(video: Path, text: str, start: float | None, end: float | None, cfg, device: str,
                    frontends=None) -> dict:
    """The clip's members (raw or features mode, as `cfg.mode` says), via the extractor of `msaflow extract`
    (`frontends`: the features-mode front-ends already built, kept across clips)."""
    import torch

    from msaflow.extractors.clip import ClipExtractor, ClipJob
    from msaflow.extractors.video import DecodeError
    from msaflow.tario import read_sample_tar

    if cfg.mode == "features" and frontends is None:
        from msaflow.extractors import frontends as fe

        frontends = fe.build(fe.parse_spec(cfg.frontends), device)
    job = ClipJob(row=1, id=video.stem, key="clip", video_id=video.stem, clip_id=video.stem, path=str(video),
                  start=start, end=end, text=text, label=None, split="test")
    # the torch threads of the training extraction: float sums depend on how work is split,
    # and a box a hair off moves a crop by a grey level
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="msaflow-predict-") as tmp:
        try:
            ClipExtractor(cfg, device=device, frontends=frontends).extract(job, Path(tmp))
        except DecodeError as exc:
            raise UnusableInput(f"{video}: cannot be used ({exc.stage}): {exc.reason}") from exc
        finally:
            torch.set_num_threads(threads)
        return read_sample_tar(Path(tmp) / "clips" / "clip.tar")[1]


def members_to_batch(members: dict, mode: str, run: dict | None = None) -> dict:
    """A batch of one, collated exactly as the shard loader collates training batches (with the
    run's length caps, when a run is given)."""
    from msaflow.extractors.audio import STEPS_PER_SECOND
    from msaflow.pipeline.data.lengths import LengthConfig, control_sample
    from msaflow.pipeline.data.loader import collate
    from msaflow.pipeline.data.shard_index import MODE_LAYOUTS
    from msaflow.pipeline.data.shard_reader import Sample

    names = tuple(m for m in MODE_LAYOUTS[mode].members if m in members)
    arrays = {k: members[k] for k in names}
    if run is not None:
        meta = members["json"]
        audio_rate = float(STEPS_PER_SECOND)  # the fbank / audio feature grid the extractor wrote
        rates = {"vision.npy": meta.get("fps"), "vision_mask.npy": meta.get("fps"), "audio.npy": audio_rate,
                 "fbank.npy": audio_rate}
        arrays = control_sample(arrays, mode, LengthConfig.model_validate(run.get("lengths") or {}), rates)
    return collate([Sample("clip", members["json"], arrays, 1.0)], names)


def normalise_like_training(batch: dict, run: dict, mode: str, run_dir: Path) -> dict:
    """Features-mode audio/vision z-scored with the statistics the run stored (fit on its train
    split while training): the train split itself is never opened here."""
    if mode != "features" or not run.get("zscore", False):
        return batch
    return RunDir(run_dir).normaliser()(batch)


def with_transcript_settings(cfg, text: str, use_asr: bool = True):
    """The extraction settings for one clip: a given text is used as it is; without one the speech
    is recognised (the run's recogniser settings, else the default recogniser), unless `use_asr`
    is false or no recogniser is installed (a warning then says how to install one)."""
    from msaflow.extractors.asr import AsrConfig, AsrUnavailable, check_available

    if text.strip() or not use_asr:
        return cfg.model_copy(update={"asr": None})
    asr = cfg.asr if cfg.asr is not None else AsrConfig()
    try:
        check_available(asr)
    except AsrUnavailable as exc:
        log.warning(f"warning: no --text and no speech recognition, so the text is missing: {exc}")
        return cfg.model_copy(update={"asr": None})
    return cfg.model_copy(update={"asr": asr})


# ---------------------------------------------------------------- a loaded run


class Run:
    """A finished training run with its model loaded once; `predict` scores clips with it.

    Clips go through the same extraction as the run's training shards (the settings its
    config.json records) and the same normalisation; the model (and in features mode the
    front-ends) stay loaded across calls. `device`: auto, cpu, cuda (msaflow.device)."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu", extract_config: str | Path | None = None):
        self.run_dir = RunDir.of_checkpoint(checkpoint).require_finished()
        self.dir, self.config_path, self.weights_path = self.run_dir.path, self.run_dir.config_path, \
            self.run_dir.weights_path
        self.device = resolved_device(device)
        self.config = self.run_dir.config()
        self.model = self.run_dir.build_model(self.config, self.device)
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
        return self.run_dir.metrics()

    def extract_settings(self):
        """The ExtractConfig of the run's training shards (checked against their config hash when reachable)."""
        if self._extract is None:
            if str(self.config.get("data", "")).endswith((".pkl", ".pickle")):
                raise UnusableInput(f"{self.config_path}: the run trained on an MMSA feature pickle "
                                    f"({self.config['data']}); its features cannot be computed from a video. "
                                    f"Train on shards to predict from video.")
            self._extract = extract_config(self.config, self._extract_override, self.name)
        return self._extract

    def _frontends_for(self, cfg):
        if cfg.mode != "features":
            return None
        if self._frontends is None:
            from msaflow.extractors import frontends as fe

            self._frontends = fe.build(fe.parse_spec(cfg.frontends), self.device)
        return self._frontends

    def predict(self, video: str | Path, text: str = "", *, start: float | None = None, end: float | None = None,
                use_asr: bool = True) -> Prediction:
        """The Prediction of one clip (score, face frames, audio and text presence)."""
        import torch

        video = Path(video)
        check_video(video)
        cfg = with_transcript_settings(self.extract_settings(), text, use_asr)
        members = extract_members(video, text, start, end, cfg, self.device, frontends=self._frontends_for(cfg))
        batch = normalise_like_training(members_to_batch(members, cfg.mode, self.config), self.config, cfg.mode,
                                        self.dir)
        batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.no_grad():
            score = float(self.model(batch)["pred"][0])
        meta = members["json"]
        return Prediction(video=str(video), score=score, n_frames=int(meta["n_frames"]),
                          n_face_frames=int(meta["n_face_frames"]), has_audio=bool(meta["has_audio"]),
                          has_text=bool(meta["has_text"]), text=meta.get("text", text), model=self.name,
                          mode=cfg.mode, text_source=meta.get("text_source", "given" if text.strip() else "none"),
                          asr=meta.get("asr"))

    def predict_many(self, clips: Iterable, *, use_asr: bool = True) -> list[dict]:
        """Score many clips: paths, or dicts with `path` (and optional `id`, `text`, `start`, `end`).
        One row per clip (PREDICTION_COLUMNS); a clip that cannot be used gets its `error`, the others go on."""
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


def resolved_device(name: str) -> str:
    """"cpu" or "cuda:<index>" by the one device rule (msaflow.device); an impossible choice is a user error."""
    from msaflow.device import resolve_device

    try:
        return str(resolve_device(name))
    except (RuntimeError, ValueError) as exc:
        raise UnusableInput(f"--device {name}: {exc}") from exc


def predict(video: Path, checkpoint: Path, text: str = "", *, start: float | None = None, end: float | None = None,
            extract_override: Path | None = None, device: str = "cpu", use_asr: bool = True) -> Prediction:
    """One clip scored with the run at `checkpoint` (a run folder or a weights file beside config.json)."""
    check_video(video)
    run = Run(checkpoint, device=device, extract_config=extract_override)
    return run.predict(video, text, start=start, end=end, use_asr=use_asr)


def main(args: argparse.Namespace) -> int:
    """UnusableInput (a DataError) is one line and exit status 2 (msaflow.pipeline.cli)."""
    if args.manifest is not None or args.video is None or args.video.is_dir():  # many clips: a CSV of scores
        return predict_many_main(args)
    result = predict(args.video, args.checkpoint, args.text, start=args.start, end=args.end,
                     extract_override=args.extract_config, device=args.device, use_asr=not args.no_asr)
    # the score is the command's product on stdout (piped, parsed as JSON): printed, not logged, so -q keeps it
    print(json.dumps(result.to_dict()) if args.json else "\n".join(result.lines()))
    return 0


def predict_many_main(args: argparse.Namespace) -> int:
    """`msaflow predict FOLDER` / `msaflow predict --manifest CSV`: every clip scored, a CSV written;
    exit status 2 when no clip could be used."""
    if args.manifest is not None and args.video is not None:
        raise DataError("give a video, a folder of videos or --manifest CSV, not both")
    if args.manifest is None and args.video is None:
        raise DataError("give a video, a folder of videos, or --manifest CSV (see `msaflow predict --help`)")
    clips = clips_of_manifest(args.manifest) if args.manifest is not None else clips_of_folder(args.video)
    if not clips:
        raise DataError(f"{args.manifest or args.video}: no clips to score")
    out = args.out or Path("predictions.csv")
    run = Run(args.checkpoint, device=args.device, extract_config=args.extract_config)
    run.extract_settings()  # a run that cannot predict from video says so before the first clip
    rows = run.predict_many(clips, use_asr=not args.no_asr)
    write_predictions(out, rows)
    failed = sum(1 for r in rows if r.get("error"))
    log.info(f"scored {len(rows) - failed} of {len(rows)} clip(s) with {run.dir} ({run.name}); "
          f"{failed} could not be used; wrote {out}")
    return 2 if failed == len(rows) else 0
