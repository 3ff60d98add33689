"""One clip → its raw-mode members → `clips/<key>.tar` (docs/data-contracts.md §2-3).

Two passes over the video, each streamed in chunks of `chunk_frames` output frames:
detection on the detection frames (keyframes, then halfway where they disagree), then
(once the clip's face track is known) cropping of the frames that have a face. A long
clip's crops are written to an on-disk .npy as they are cut and the tar writer streams it,
so a long clip never holds its frames or crops in memory. When the whole clip fits in one
chunk it is decoded once and its crops stay in memory. The truncation check (ffprobe on
the file's end) runs in a child process meanwhile.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msaflow.extractors import audio, face, video
from msaflow.extractors.video import DecodeError

STAGES = ("decode", "detect", "crop", "fbank", "text", "write")


@dataclass(frozen=True)
class ClipJob:
    """One manifest row, parsed."""

    row: int  # 1-based data row in the manifest (for messages)
    id: str
    key: str
    video_id: str
    clip_id: str
    path: str
    start: float | None
    end: float | None
    text: str
    label: float | None
    split: str
    label_T: float | None = None
    label_A: float | None = None
    label_V: float | None = None


class StageTimer:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0


def _segment(job: ClipJob, info: video.VideoInfo | None, audio_s: float | None) -> tuple[float, float]:
    """[start, end) in seconds: the manifest's, else the video stream (else the audio stream)."""
    start = job.start if job.start is not None else 0.0
    end = job.end if job.end is not None else (info.duration_s if info is not None else audio_s or 0.0)
    if start < 0 or end <= start:
        raise DecodeError("segment", f"invalid segment [{start}, {end}) s")
    media_end = max(info.duration_s if info is not None else 0.0, audio_s or 0.0)
    if start >= media_end:
        raise DecodeError("segment", f"segment [{start}, {end}) s starts after the media ends "
                                     f"({media_end:.3f} s)")
    return start, end


class _NpyFrameWriter:
    """A uint8 .npy of `n` frames written front to back: `writer[positions] = frames` with
    ascending positions; frames never given are zeros. Plain writes, so the crops of a long
    clip sit in the page cache, not in the process's memory as a memmap's pages would."""

    def __init__(self, path: Path, n: int, frame_shape: tuple[int, ...]):
        self.file = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.file, {"descr": "|u1", "fortran_order": False,
                                                           "shape": (n, *frame_shape)})
        self.n, self.next, self.zero = n, 0, np.zeros(frame_shape, np.uint8)

    def _zeros_until(self, stop: int) -> None:
        for _ in range(self.next, stop):
            self.file.write(self.zero.tobytes())
        self.next = max(self.next, stop)

    def __setitem__(self, positions: np.ndarray, frames: np.ndarray) -> None:
        for pos, frame in zip(positions.tolist(), frames):
            if pos < self.next:
                raise ValueError(f"frame {pos} written after frame {self.next - 1}: positions must ascend")
            self._zeros_until(pos)
            self.file.write(np.ascontiguousarray(frame, np.uint8).tobytes())
            self.next = pos + 1

    def close(self) -> None:
        self._zeros_until(self.n)
        self.file.close()


class ClipExtractor:
    """Everything one extraction process reuses across clips: config, detector, tokenizer."""

    def __init__(self, cfg, device: str = "cpu", frontends: dict | None = None):
        self.cfg = cfg
        self.device = device
        self.detector = face.FaceDetector(device=device, scale=cfg.detect_scale, min_size=cfg.min_face_size,
                                          min_prob=cfg.min_face_prob, thresholds=tuple(cfg.mtcnn_thresholds),
                                          batch_size=cfg.detect_batch)
        self.frontends = frontends

    def extract(self, job: ClipJob, out_dir: Path) -> dict:
        """Write `out_dir/clips/<key>.tar`; return the clip's counts and seconds per stage.
        Raises DecodeError (with its stage) when the clip cannot be extracted."""
        cfg, timer = self.cfg, StageTimer()
        scratch = out_dir / "tmp" / job.key
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        tail_check = None
        try:
            with timer("decode"):
                reader, info = video.open_video(job.path)
                tail_check = video.TailCheck(job.path, info) if info is not None else None  # runs meanwhile
                start0 = job.start or 0.0
                end0 = job.end if job.end is not None else (info.duration_s if info is not None else None)
                wav = audio.decode_audio(job.path, info.begin_s if info is not None else None, start0, end0)
            if info is None and wav is None:
                raise DecodeError("open", "the file has neither a video nor an audio stream")
            audio_s = start0 + len(wav) / audio.SAMPLE_RATE if wav is not None else None
            start, end = _segment(job, info, audio_s)
            duration = end - start
            n_frames = video.n_output_frames(duration, cfg.fps)
            faces, vision_mask = self._faces(reader, info, start, n_frames, scratch, timer)
            with timer("fbank"):
                n_steps = audio.fbank_steps(duration)
                fbank, audio_mask = audio.log_mel_fbank(wav, n_steps, cfg.n_mels)
            with timer("text"):
                from msaflow.extractors.text import tokenize

                text_ids = np.asarray(tokenize(job.text, cfg.text_max_len, cfg.text_model), np.int64)
            meta = {
                "id": job.id, "video_id": job.video_id, "clip_id": job.clip_id, "text": job.text,
                "label": job.label, "label_T": job.label_T, "label_A": job.label_A, "label_V": job.label_V,
                "split": job.split, "start": start, "end": end, "duration": duration, "fps": cfg.fps,
                "sample_rate": audio.SAMPLE_RATE, "n_frames": n_frames,
                "n_face_frames": int(vision_mask.sum()), "has_audio": wav is not None and len(wav) > 0,
                "has_text": bool(job.text.strip()), "mode": "raw",
            }
            members = {
                "json": meta, "face.npy": faces, "vision_mask.npy": vision_mask,
                "wav.npy": wav if wav is not None else np.zeros(0, np.int16),
                "fbank.npy": fbank, "audio_mask.npy": audio_mask, "text_ids.npy": text_ids,
            }
            if self.frontends is not None:
                with timer("features"):
                    from msaflow.extractors.frontends import raw_to_features

                    members = raw_to_features(members, self.frontends)
            if tail_check is not None:
                with timer("verify"):
                    tail_check.result()
            with timer("write"):
                from msaflow.pipeline.tario import write_sample_tar

                write_sample_tar(out_dir / "clips" / f"{job.key}.tar", job.key, members)
        except DecodeError:
            if tail_check is not None:  # a file cut short: report that cause, whatever decord tripped on
                tail_check.result()
            raise
        finally:
            if tail_check is not None:
                tail_check.cancel()  # a no-op once its result was read
            shutil.rmtree(scratch, ignore_errors=True)
        return {"key": job.key, "n_frames": n_frames, "n_face_frames": meta["n_face_frames"],
                "has_audio": meta["has_audio"], "has_text": meta["has_text"],
                "seconds": dict(timer.seconds)}

    def _faces(self, reader, info, start: float, n_frames: int, scratch: Path, timer: StageTimer):
        """(face crops (n_frames, S, S, 3): an array, or for a clip longer than one chunk the path
        of a .npy written chunk by chunk, so memory stays bounded; vision mask (n_frames,))."""
        cfg = self.cfg
        size = cfg.face_size
        if info is None or n_frames == 0:
            return np.zeros((n_frames, size, size, 3), np.uint8), np.zeros(n_frames, bool)
        indices = video.source_indices(info, start, n_frames, cfg.fps)
        pictured = np.flatnonzero(indices >= 0)
        whole = None  # (positions, frames) when the clip fits in one chunk: decode once
        if len(pictured) <= cfg.chunk_frames:
            with timer("decode"):
                whole = next(video.iter_frame_chunks(reader, indices, cfg.chunk_frames), None)
        if whole is not None or len(pictured) == 0:
            face_out = crops = np.zeros((n_frames, size, size, 3), np.uint8)
        else:
            face_out = scratch / "face.npy"
            crops = _NpyFrameWriter(face_out, n_frames, (size, size, 3))

        boxes, marks, present = self.track(reader, indices, whole, timer)
        if whole is not None:
            chunks = iter([whole])
        else:
            wanted = np.where(present, indices, -1)
            chunks = video.iter_frame_chunks(reader, wanted, cfg.chunk_frames)
        while True:
            with timer("decode"):
                item = next(chunks, None)
            if item is None:
                break
            positions, frames = item
            keep = present[positions]
            positions, frames = positions[keep], frames[keep]
            with timer("crop"):
                crops[positions] = face.crop_faces(frames, boxes[positions], marks[positions], size,
                                                   cfg.face_margin, cfg.align_faces, self.device)
        if isinstance(crops, _NpyFrameWriter):
            crops.close()
        return face_out, present

    def track(self, reader, indices: np.ndarray, whole, timer: StageTimer):
        """The main face per output frame: (boxes (n, 4), landmarks (n, 5, 2), present (n,)),
        by the rule of extractors/face.py. `indices`: source frame per output frame (-1: no
        picture); `whole`: (positions, frames) when the clip was decoded in one chunk, else None."""
        cfg, n_frames = self.cfg, len(indices)
        pictured = np.flatnonzero(indices >= 0)

        def detect(positions: np.ndarray) -> list[face.FrameFaces]:
            if whole is not None:
                with timer("detect"):
                    return self.detector.detect(whole[1][np.searchsorted(whole[0], positions)], positions)
            sparse = np.full(n_frames, -1, np.int64)
            sparse[positions] = indices[positions]
            chunks, found = video.iter_frame_chunks(reader, sparse, cfg.chunk_frames), []
            while True:
                with timer("decode"):
                    item = next(chunks, None)
                if item is None:
                    return found
                with timer("detect"):
                    found += self.detector.detect(item[1], item[0])

        keyframes = face.detection_frames(n_frames, cfg.detect_every)
        found = detect(keyframes[indices[keyframes] >= 0])
        while cfg.refine_iou > 0:  # rule step 0 (extractors/face.py)
            halfway = face.frames_to_refine(found, pictured, cfg.refine_iou)
            if len(halfway) == 0:
                break
            found = sorted(found + detect(halfway), key=lambda faces: faces.frame)
        with timer("detect"):
            max_gap = max(cfg.detect_every, int(round(cfg.fill_gap_s * cfg.fps)))
            track = face.choose_track(face.link_tracks(found, cfg.track_iou, max_gap), len(found))
            boxes, marks, present = face.fill_track(track, n_frames, max_gap)
            present &= indices >= 0
        return boxes, marks, present
