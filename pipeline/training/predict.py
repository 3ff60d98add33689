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

Where the settings come from: the checkpoint is a training run directory (`config.json`
+ `best.pt`), or a `.pt` state dict with that `config.json` beside it. `config.json`
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
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

EXIT_UNUSABLE = 2


class UnusableInput(Exception):
    """The video (or the checkpoint) cannot be used; the message names the file and why."""


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
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")


# ---------------------------------------------------------------- checkpoint


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """(config.json, weights .pt) of a run directory or a weights file."""
    if path.is_dir():
        config, weights = path / "config.json", path / "best.pt"
    else:
        config, weights = path.parent / "config.json", path
    for f in (config, weights):
        if not f.is_file():
            raise UnusableInput(f"{path}: not a usable checkpoint ({f.name} not found; expected a training run "
                                f"directory with config.json and best.pt)")
    return config, weights


def load_model(config_path: Path, weights_path: Path, device: str):
    """(run config dict, model in eval mode on `device`)."""
    import torch

    from msaflow.model.config import ModelConfig
    from msaflow.model.registry import build_model

    try:
        run = json.loads(config_path.read_text())
        name, model_cfg = run["model"], ModelConfig.from_dict(run["model_config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UnusableInput(f"{config_path}: not a training run config ({exc})") from exc
    if name == "end-to-end":
        import msaflow.model.end_to_end  # noqa: F401  (registers "end-to-end")
    model = build_model(name, model_cfg)
    import pickle

    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # a pickled object (e.g. a whole model), not a state dict
        raise UnusableInput(f"{weights_path}: holds pickled Python objects, not a state dict of weights; msaflow "
                            f"loads weights only (a pickle runs code when loaded). Use the best.pt that "
                            f"`msaflow train` wrote, or save model.state_dict()") from exc
    try:
        if isinstance(state, dict) and "model" in state and "optimizer" in state:  # last.pt: a full checkpoint
            state = state["model"]
        model.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise UnusableInput(f"{weights_path}: weights do not fit the model of {config_path.name} "
                            f"({str(exc).splitlines()[0]})") from exc
    return run, model.to(device).eval()


def training_shards(run: dict) -> Path | None:
    """The shard folder the run trained on, when it is one and is reachable from here."""
    from msaflow.pipeline.data.sources import is_shard_dir

    data = run.get("data")
    return Path(data) if data and Path(data).is_dir() and is_shard_dir(data) else None


def shards_extract_settings(run: dict) -> dict | None:
    """The extraction settings the training shards' index records, when they are reachable."""
    shards = training_shards(run)
    if shards is None:
        return None
    try:
        return json.loads((shards / "train" / "index.json").read_text(encoding="utf-8")).get("extract") or None
    except (OSError, ValueError):
        return None


def extract_config(run: dict, override: Path | None, model_name: str):
    """The extraction settings of the training data; checked against the shards' config hash."""
    from msaflow.pipeline.config import extract_config_hash
    from msaflow.pipeline.extraction.extract import ExtractConfig, load_config

    if override is not None:
        try:
            cfg = load_config(override)
        except (OSError, ValueError) as exc:
            raise UnusableInput(str(exc)) from exc
    elif run.get("extract"):
        cfg = ExtractConfig.model_validate(run["extract"])
    elif (recorded := shards_extract_settings(run)) is not None:  # a run from before runs recorded them
        cfg = ExtractConfig.model_validate(recorded)
    else:
        mode = "raw" if model_name == "end-to-end" else "features"
        print(f"warning: the run records no extraction settings; using the defaults ({mode} mode). "
              f"Pass --extract-config with the settings the training shards were made with.", file=sys.stderr)
        cfg = ExtractConfig(mode=mode)
    shards = training_shards(run)
    if shards is not None:
        index = json.loads((shards / "train" / "index.json").read_text(encoding="utf-8"))
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
    from msaflow.pipeline.data.lengths import LengthConfig, control_sample
    from msaflow.pipeline.data.loader import MODE_LAYOUTS, Sample, collate

    names = tuple(m for m in MODE_LAYOUTS[mode].members if m in members)
    arrays = {k: members[k] for k in names}
    if run is not None:
        meta = members["json"]
        rates = {"vision.npy": meta.get("fps"), "vision_mask.npy": meta.get("fps"), "audio.npy": 100.0,
                 "fbank.npy": 100.0}
        arrays = control_sample(arrays, mode, LengthConfig.model_validate(run.get("lengths") or {}), rates)
    return collate([Sample("clip", members["json"], arrays, 1.0)], names)


def normalise_like_training(batch: dict, run: dict, mode: str, run_dir: Path) -> dict:
    """Features-mode audio/vision z-scored with the statistics the run stored (fit on its train
    split while training): the train split itself is never opened here."""
    if mode != "features" or not run.get("zscore", False):
        return batch
    from msaflow.pipeline.data.sources import DataError, Normaliser

    try:
        return Normaliser.load(run_dir)(batch)
    except DataError as exc:
        raise UnusableInput(str(exc)) from exc


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
        print(f"warning: no --text and no speech recognition, so the text is missing: {exc}", file=sys.stderr)
        return cfg.model_copy(update={"asr": None})
    return cfg.model_copy(update={"asr": asr})


def predict(video: Path, checkpoint: Path, text: str = "", *, start: float | None = None, end: float | None = None,
            extract_override: Path | None = None, device: str = "cpu", use_asr: bool = True) -> Prediction:
    import torch

    check_video(video)
    config_path, weights_path = resolve_checkpoint(checkpoint)
    run, model = load_model(config_path, weights_path, device)
    if str(run.get("data", "")).endswith((".pkl", ".pickle")):
        raise UnusableInput(f"{config_path}: the run trained on an MMSA feature pickle ({run['data']}); its "
                            f"features cannot be computed from a video. Train on shards to predict from video.")
    cfg = with_transcript_settings(extract_config(run, extract_override, run["model"]), text, use_asr)
    members = extract_members(video, text, start, end, cfg, device)
    batch = normalise_like_training(members_to_batch(members, cfg.mode, run), run, cfg.mode, config_path.parent)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    with torch.no_grad():
        score = float(model(batch)["pred"][0])
    meta = members["json"]
    return Prediction(video=str(video), score=score, n_frames=int(meta["n_frames"]),
                      n_face_frames=int(meta["n_face_frames"]), has_audio=bool(meta["has_audio"]),
                      has_text=bool(meta["has_text"]), text=meta.get("text", text), model=run["model"], mode=cfg.mode,
                      text_source=meta.get("text_source", "given" if text.strip() else "none"), asr=meta.get("asr"))


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def main(args: argparse.Namespace) -> int:
    if args.manifest is not None or args.video is None or args.video.is_dir():  # many clips: a CSV of scores
        from msaflow.pipeline.api import predict_many_main

        return predict_many_main(args)
    try:
        result = predict(args.video, args.checkpoint, args.text, start=args.start, end=args.end,
                         extract_override=args.extract_config, device=_device(args.device), use_asr=not args.no_asr)
    except UnusableInput as exc:
        print(f"msaflow predict: error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(json.dumps(result.to_dict()) if args.json else "\n".join(result.lines()))
    return 0
