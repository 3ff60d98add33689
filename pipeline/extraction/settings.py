"""The extraction step's settings: the `extract:` section, what of it determines the clips, and its hash.

One module that the extraction (`extract`, its worker `pool`), the shards step, the workflow config
and training read the settings from; it imports neither of them, and no torch (the workflow config
and the Snakefile import it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from msaflow.configfile import canonical_json, load_yaml, read_section
from msaflow.device import DEVICES
from msaflow.extractors.asr import AsrConfig
from msaflow.extractors.asr import output_settings as asr_output_settings


class ExtractConfig(BaseModel):
    """Knobs of the extraction step (defaults: config/extract.yaml says the same, with why)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["raw", "features"] = "raw"
    frontends: str = Field("face=fer,audio=crepe-tiny,text=minilm",
                           description="features mode: modality=front-end pairs")
    device: Literal[DEVICES] = "auto"
    threads: int = Field(1, ge=0, description="torch threads in the worker (0 = torch's default); scale out "
                         "with parallel jobs instead: MTCNN's small convolutions gain little from threads")
    fps: float = Field(25.0, gt=0, description="output frame rate")
    n_mels: int = Field(80, ge=1)
    face_size: int = Field(112, ge=16, description="side of the square face crop, pixels")
    face_margin: float = Field(0.25, ge=0, description="crop side = max(box w, h) x (1 + margin)")
    align_faces: bool = Field(True, description="rotate crops so the eyes are level")
    detect_scale: float = Field(0.5, gt=0, le=1, description="frames are downscaled by this for MTCNN")
    detect_every: int = Field(50, ge=1, description="keyframes: run MTCNN on every n-th output frame (+ the last)")
    refine_iou: float = Field(0.6, ge=0, le=1, description="between keyframes whose faces differ (count, or IoU "
                              "below this) also detect halfway, recursively; 0 = never")
    detect_batch: int = Field(32, ge=1, description="frames per MTCNN call")
    min_face_size: int = Field(40, ge=1, description="smallest face side kept, full-resolution pixels")
    min_face_prob: float = Field(0.9, ge=0, le=1)
    mtcnn_thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    track_iou: float = Field(0.3, gt=0, le=1, description="min IoU to link a box to a track")
    fill_gap_s: float = Field(0.5, ge=0, description="interpolate the track over gaps up to this long")
    chunk_frames: int = Field(128, ge=1, description="frames decoded at a time (bounds memory)")
    max_decode_side: int | None = Field(720, ge=64, description="frames whose longest side is larger are "
                                        "downscaled to it while decoding (bounds memory by pixels); null = never")
    max_duration_ratio: float | None = Field(2.0, gt=1, description="a segment declaring more than this times what "
                                             "the media holds from its start is a failure; video timestamps spanning "
                                             "more than this times what its frames last make the video unusable (the "
                                             "audio is kept); null = never")
    text_model: str = Field("minilm", description="tokenizer: 'minilm' or a local HF model folder")
    text_max_len: int = Field(50, ge=2)
    clip_timeout_s: float | None = Field(1800.0, gt=0, description="kill a worker stuck on one clip")
    asr: AsrConfig | None = Field(None, description="speech recognition for clips without a transcript "
                                  "(extractors/asr.py); null = off")


# How an extraction runs, not what it writes: left out when settings are compared or hashed,
# so chunks run on GPU and CPU machines (or with other thread counts) make one dataset.
RUNTIME_SETTINGS = ("device", "threads", "chunk_frames", "clip_timeout_s")


def output_settings(section: dict) -> dict:
    """The validated extract settings (defaults filled in) that determine the clips' contents."""
    validated = ExtractConfig.model_validate(section).model_dump(mode="json")
    validated["asr"] = asr_output_settings(validated["asr"])
    if validated["asr"] is None:  # off: the hash of a config without ASR is what it was before ASR existed
        del validated["asr"]
    return {k: v for k, v in validated.items() if k not in RUNTIME_SETTINGS}


def load_config(path: str | Path | None) -> ExtractConfig:
    """ExtractConfig from a YAML that is the extract section or has an `extract:` key
    (ValueError naming the file when it is not YAML, not a mapping, or not valid settings)."""
    if path is None:
        return ExtractConfig()
    data = load_yaml(path)
    section = read_section(path, "extract") if "extract" in data else data
    try:
        return ExtractConfig.model_validate(section)
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid extract config:\n{exc}") from exc


def extract_config_hash(section: dict) -> str:
    """sha256 of the canonical JSON of the extract settings that determine the output
    (validated, defaults filled in; runtime settings such as the device left out)."""
    return hashlib.sha256(canonical_json(output_settings(section)).encode("utf-8")).hexdigest()
