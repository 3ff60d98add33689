"""Small shard sets written exactly as docs/data-contracts.md §3 lays them out (loader tests).

Arrays have realistic shapes (25 fps frames, 10 ms audio steps, WordPiece-length texts) and
carry their sample number in known places, so a test can check that every row of a batch
belongs to the sample its id names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msaflow.tario import TarWriter, atomic_path, write_json_atomic

FPS, AUDIO_RATE, SAMPLE_RATE = 25, 100, 16000
DIMS = {"text": 384, "audio": 32, "vision": 64, "n_mels": 80, "face": 48}
CLS, SEP = 101, 102


@dataclass(frozen=True)
class Clip:
    number: int
    duration: float
    n_tokens: int
    has_audio: bool
    face_frames: np.ndarray  # bool per frame

    @property
    def id(self) -> str:
        return f"vid{self.number // 3:02d}/{self.number % 3}"

    @property
    def key(self) -> str:
        return self.id.replace("/", "_")

    @property
    def t_v(self) -> int:
        return round(self.duration * FPS)

    @property
    def t_a(self) -> int:
        return round(self.duration * AUDIO_RATE)


def make_clip(number: int, rng: np.random.Generator) -> Clip:
    duration = float(rng.uniform(1.2, 4.0))
    t_v = round(duration * FPS)
    face = rng.random(t_v) > 0.2
    if number % 5 == 4:  # now and then a clip without any face
        face[:] = False
    return Clip(number, duration, int(rng.integers(3, 30)), has_audio=number % 4 != 3, face_frames=face)


def text_ids(clip: Clip) -> np.ndarray:
    body = 1000 + clip.number * 37 + np.arange(clip.n_tokens - 2)
    return np.concatenate([[CLS], body, [SEP]]).astype(np.int64)


def members(clip: Clip, mode: str, rng: np.random.Generator, modalities=("text", "audio", "vision")) -> dict:
    n = float(clip.number)
    out: dict = {"json": {
        "id": clip.id, "video_id": clip.id.split("/")[0], "clip_id": clip.id.split("/")[1],
        "text": " ".join(["word"] * (clip.n_tokens - 2)), "label": round(n / 10 - 1.5, 3),
        "label_T": None, "label_A": None, "label_V": None, "split": "train", "start": None, "end": None,
        "duration": clip.duration, "fps": FPS, "sample_rate": SAMPLE_RATE, "n_frames": clip.t_v,
        "n_face_frames": int(clip.face_frames.sum()), "has_audio": clip.has_audio,
        "has_text": True, "mode": mode,
    }}
    audio_mask = np.full(clip.t_a, clip.has_audio)
    if "text" in modalities:
        out["text_ids.npy"] = text_ids(clip)
    if "vision" in modalities:
        out["vision_mask.npy"] = clip.face_frames
    if "audio" in modalities:
        out["audio_mask.npy"] = audio_mask
    if mode == "features":
        if "text" in modalities:
            text = rng.standard_normal((clip.n_tokens, DIMS["text"])).astype(np.float32)
            text[:, 0] = n
            out["text.npy"] = text
        if "audio" in modalities:
            audio = rng.standard_normal((clip.t_a, DIMS["audio"])).astype(np.float32) * audio_mask[:, None]
            audio[audio_mask, 0] = n
            out["audio.npy"] = audio
        if "vision" in modalities:
            vision = rng.standard_normal((clip.t_v, DIMS["vision"])).astype(np.float32) * clip.face_frames[:, None]
            vision[clip.face_frames, 0] = n
            out["vision.npy"] = vision
    else:
        if "audio" in modalities:
            n_wav = round(clip.duration * SAMPLE_RATE) if clip.has_audio else 0
            wav = (rng.standard_normal(n_wav) * 3000).clip(-32768, 32767).astype(np.int16)
            if n_wav:
                wav[0] = clip.number
            out["wav.npy"] = wav
            fbank = rng.standard_normal((clip.t_a, DIMS["n_mels"])).astype(np.float32) * audio_mask[:, None]
            fbank[audio_mask, 0] = n
            out["fbank.npy"] = fbank
        if "vision" in modalities:
            s = DIMS["face"]
            face = rng.integers(0, 256, (clip.t_v, s, s, 3), dtype=np.uint8) * clip.face_frames[:, None, None, None]
            face[clip.face_frames, 0, 0, 0] = clip.number
            out["face.npy"] = face
    return out


def index_modalities(mode: str, modalities=("text", "audio", "vision")) -> dict:
    rate = {"text": None, "audio": AUDIO_RATE, "vision": FPS}
    specs = {
        "features": {"text": {"text_ids.npy": ([None], "int64"), "text.npy": ([None, DIMS["text"]], "float32")},
                     "audio": {"audio.npy": ([None, DIMS["audio"]], "float32"), "audio_mask.npy": ([None], "bool")},
                     "vision": {"vision.npy": ([None, DIMS["vision"]], "float32"), "vision_mask.npy": ([None], "bool")}},
        "raw": {"text": {"text_ids.npy": ([None], "int64")},
                "audio": {"wav.npy": ([None], "int16"), "fbank.npy": ([None, DIMS["n_mels"]], "float32"),
                          "audio_mask.npy": ([None], "bool")},
                "vision": {"face.npy": ([None, DIMS["face"], DIMS["face"], 3], "uint8"),
                           "vision_mask.npy": ([None], "bool")}},
    }[mode]
    out = {}
    for modality in modalities:
        for member, (shape, dtype) in specs[modality].items():
            out[member] = {"shape": shape, "dtype": dtype,
                           "rate": SAMPLE_RATE if member == "wav.npy" else rate[modality]}
    return out


def write_split(shard_dir: Path, split: str, mode: str, shard_sizes: list[int], *, seed: int = 0,
                first_number: int = 0, modalities=("text", "audio", "vision"), unlabeled=()) -> list[Clip]:
    """Write SHARD_DIR/<split>/<split>-%06d.tar + index.json; the clips in sequence order."""
    rng = np.random.default_rng(seed)
    split_dir = shard_dir / split
    clips, entries, number = [], [], first_number
    for shard_no, size in enumerate(shard_sizes):
        name = f"{split}-{shard_no:06d}.tar"
        with atomic_path(split_dir / name) as tmp, TarWriter(tmp) as writer:
            for _ in range(size):
                clip = make_clip(number, rng)
                sample = members(clip, mode, rng, modalities)
                if clip.number in unlabeled:  # an empty label in the manifest
                    sample["json"]["label"] = None
                writer.add_sample(clip.key, sample)
                clips.append(clip)
                number += 1
        digest = hashlib.sha256((split_dir / name).read_bytes()).hexdigest()
        entries.append({"name": name, "n_samples": size, "sha256": digest})
    write_json_atomic(split_dir / "index.json", {
        "split": split, "mode": mode, "n_samples": sum(shard_sizes), "shards": entries,
        "modalities": index_modalities(mode, modalities), "frontends": {},
        "config_hash": "test", "manifest_hash": "test", "msaflow_version": "0.1.0",
    })
    return clips
