"""One clip → its raw-mode members → `clips/<key>.tar` (docs/data-contracts.md §2-3).

Two passes over the video, each streamed in chunks of `chunk_frames` output frames:
detection on the detection frames (keyframes, then halfway where they disagree), then
(once the clip's face track is known) cropping of the frames that have a face. A long
clip's crops are written to an on-disk .npy as they are cut and the tar writer streams it,
so a long clip never holds its frames or crops in memory. When the whole clip fits in one
chunk it is decoded once and its crops stay in memory. The truncation check (ffprobe on
the file's end) runs in a child process meanwhile.

One module: the stages of `ClipExtractor` (decode, detect, crop, fbank, text, write) share one
clip's reader, scratch folder, `StageTimer` and `_Checks`, and the helpers above it serve only
those stages; split, each piece would take them all as arguments.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msaflow.extractors import audio, face, video, video_checks
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


# audio that goes on this much longer than the video (a still picture over speech) sets the end
# of a whole-file clip and the media end that segment ends are clamped to
AUDIO_BEYOND_VIDEO_S = 1.0
# a segment end past the media end by at most this much is always clamped (CSVs rounded up to
# the second), whatever max_duration_ratio says
CLAMP_SLACK_S = 1.0


def media_end(info: video.VideoInfo | None, audio_end: float | None) -> float:
    """Where the media ends on the msaflow clock: the video's last picture, or the audio's end
    when there is no video or the audio goes on more than AUDIO_BEYOND_VIDEO_S longer."""
    if info is not None and (audio_end is None or audio_end - info.duration_s <= AUDIO_BEYOND_VIDEO_S):
        return info.duration_s
    return audio_end or 0.0


def _segment(job: ClipJob, info: video.VideoInfo | None, audio_end: float | None,
             max_ratio: float | None = None) -> tuple[float, float, dict | None]:
    """([start, end) in seconds, a note when the end was clamped): the manifest's segment, else
    the whole media (see media_end). An end past the media end is clamped to it; a segment that
    declares more than `max_ratio` times what the media holds from its start is an error."""
    last = media_end(info, audio_end)
    start = job.start if job.start is not None else 0.0
    end = job.end if job.end is not None else last
    if start < 0 or end <= start:
        raise DecodeError("segment", f"invalid segment [{start}, {end}) s")
    if start >= last:
        raise DecodeError("segment", f"segment [{start}, {end}) s starts after the media ends ({last:.3f} s)")
    note = None
    if end > last + 1e-3:
        declared, held = end - start, last - start
        if max_ratio is not None and declared > max_ratio * held and end - last > CLAMP_SLACK_S:
            raise DecodeError("segment", f"segment [{start:g}, {end:g}) s declares {declared:.3f} s, but the media "
                                         f"holds {held:.3f} s from its start (it ends at {last:.3f} s): more than "
                                         f"max_duration_ratio {max_ratio:g} times; check the segment's times and file")
        note = {"kind": "segment_clamped",
                "reason": f"segment end {end:g} s is past the end of the media ({last:.3f} s): clamped to it"}
        end = last
    return start, end, note


@dataclass
class _Checks:
    """The ffprobe checks that run in child processes beside a clip's extraction (extractors/video.py)."""

    tail: video_checks.TailCheck | None = None  # the file's end: cut short or damaged?
    segment: video_checks.SegmentCheck | None = None  # the clip's segment of the video stream

    def damage(self, timer: StageTimer) -> str | None:
        """Waits for both: DecodeError for a file cut short (a failure); why the clip's video is
        damaged, or None."""
        if self.tail is not None:
            with timer("verify"):
                self.tail.result()
        if self.segment is None:
            return None
        with timer("verify"):
            return self.segment.reason()

    def raise_if_cut_short(self) -> None:
        if self.tail is not None:
            self.tail.result()

    def cancel(self) -> None:
        for check in (self.tail, self.segment):
            if check is not None:
                check.cancel()


def _open_video(path: str, cfg) -> tuple:
    """(reader, VideoInfo, None), (None, None, None) without a video stream, or (None, None, the
    DecodeError) when the video alone is unusable (the audio, if any, is kept)."""
    try:
        reader, info = video.open_video(path, cfg.max_decode_side, cfg.max_duration_ratio)
    except DecodeError as exc:
        if exc.stream != "video":
            raise
        return None, None, exc
    return reader, info, None


def _decode_audio(job: ClipJob, info: video.VideoInfo | None) -> tuple:
    """(audio track or None, None), or (None, the DecodeError) when the audio alone is unusable."""
    try:
        return audio.decode_audio_segment(job.path, info.begin_s if info is not None else None,
                                          job.start or 0.0, job.end), None
    except DecodeError as exc:
        if exc.stream != "audio":
            raise
        return None, exc


def _check_usable(info: video.VideoInfo | None, track, video_error: DecodeError | None,
                  audio_error: DecodeError | None) -> None:
    """DecodeError when neither stream is left to keep."""
    if info is None and video_error is not None and track is not None and track.n_real == 0:
        raise video_error  # the video is unusable and the audio holds nothing in the segment
    if info is None and track is None:
        if video_error is not None and audio_error is not None:
            raise DecodeError(video_error.stage, f"{video_error.reason}; and {audio_error.reason}")
        if video_error is not None or audio_error is not None:
            raise video_error or audio_error
        raise DecodeError("open", "the file has neither a video nor an audio stream")


def _clip_audio(track, duration: float) -> tuple[np.ndarray | None, int]:
    """(the segment's int16 samples, or None without audio; samples of silence before the audio starts)."""
    if track is None:
        return None, 0
    wav = track.wav[: int(round(duration * audio.SAMPLE_RATE))]
    return wav, min(track.lead, len(wav))


def _hold_still_picture(info: video.VideoInfo, end: float) -> video.VideoInfo:
    """A still picture over audio stays on screen to the end of the clip, as a player shows it."""
    if info.n_source_frames == 1 and end > info.duration_s:
        return dataclasses.replace(info, frame_ends=np.array([end], np.float64))
    return info


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
        self.asr = None  # speech recognition for clips without a transcript (extractors/asr.py)
        if getattr(cfg, "asr", None) is not None:
            from msaflow.extractors import asr

            self.asr = asr.build(cfg.asr, device, cfg.threads)

    def extract(self, job: ClipJob, out_dir: Path) -> dict:
        """Write `out_dir/clips/<key>.tar`; return the clip's counts and seconds per stage.
        Raises DecodeError (with its stage) when the clip cannot be extracted."""
        timer, checks = StageTimer(), _Checks()
        scratch = out_dir / "tmp" / job.key
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            members = self._raw_members(job, scratch, timer, checks)
            meta = members["json"]
            if self.frontends is not None:
                with timer("features"):
                    from msaflow.extractors.frontends import raw_to_features

                    members = raw_to_features(members, self.frontends)
            with timer("write"):
                from msaflow.tario import write_sample_tar

                write_sample_tar(out_dir / "clips" / f"{job.key}.tar", job.key, members)
        except DecodeError:
            checks.raise_if_cut_short()  # a file cut short: report that cause, whatever decord tripped on
            raise
        finally:
            checks.cancel()  # a no-op once a check's result was read
            shutil.rmtree(scratch, ignore_errors=True)
        return {"key": job.key, "n_frames": meta["n_frames"], "n_face_frames": meta["n_face_frames"],
                "has_audio": meta["has_audio"], "has_text": meta["has_text"], "text_source": meta["text_source"],
                "notes": meta["notes"],
                "seconds": dict(timer.seconds)}

    def _raw_members(self, job: ClipJob, scratch: Path, timer: StageTimer, checks: _Checks) -> dict:
        """The clip's raw-mode members (docs/data-contracts.md §3), its json under "json"."""
        cfg = self.cfg
        reader, info, track, notes = self._decode_streams(job, timer, checks)
        audio_end = (job.start or 0.0) + len(track.wav) / audio.SAMPLE_RATE if track is not None else None
        start, end, clamped = _segment(job, info, audio_end, cfg.max_duration_ratio)
        if clamped is not None:
            notes.append(clamped)
        duration = end - start
        n_frames = video.n_output_frames(duration, cfg.fps)
        wav, lead = _clip_audio(track, duration)
        if info is not None:
            checks.segment = video_checks.SegmentCheck(job.path, info, start, end)  # runs meanwhile
            info = _hold_still_picture(info, end)
        faces, vision_mask = self._checked_faces(reader, info, start, n_frames, wav, lead, scratch, timer, checks,
                                                 notes)
        with timer("fbank"):
            fbank, audio_mask = audio.log_mel_fbank(wav, audio.fbank_steps(duration), cfg.n_mels, first_sample=lead)
        text, source, recognised = self._transcript(job, wav, lead, timer)
        with timer("text"):
            from msaflow.extractors.text import tokenize

            text_ids = np.asarray(tokenize(text, cfg.text_max_len, cfg.text_model), np.int64)
        meta = {
            "id": job.id, "video_id": job.video_id, "clip_id": job.clip_id, "text": text,
            "label": job.label, "label_T": job.label_T, "label_A": job.label_A, "label_V": job.label_V,
            "split": job.split, "start": start, "end": end, "duration": duration, "fps": cfg.fps,
            "sample_rate": audio.SAMPLE_RATE, "n_frames": n_frames,
            "n_face_frames": int(vision_mask.sum()), "has_audio": wav is not None and len(wav) > lead,
            "has_text": bool(text.strip()), "text_source": source, "mode": "raw", "notes": notes,
        }
        if recognised is not None:
            meta["asr"] = recognised
            if source == "recognised" and job.text != text:
                meta["given_text"] = job.text  # the manifest's (shards compare it with the manifest)
        return {
            "json": meta, "face.npy": faces, "vision_mask.npy": vision_mask,
            "wav.npy": wav if wav is not None else np.zeros(0, np.int16),
            "fbank.npy": fbank, "audio_mask.npy": audio_mask, "text_ids.npy": text_ids,
        }

    def _decode_streams(self, job: ClipJob, timer: StageTimer, checks: _Checks):
        """(video reader, VideoInfo, audio track, notes): either stream None when the file has none or
        it alone is unusable (a note says why); DecodeError when nothing usable is left. Starts the
        truncation check."""
        with timer("decode"):
            reader, info, video_error = _open_video(job.path, self.cfg)
            checks.tail = video_checks.TailCheck(job.path, info) if info is not None else None  # runs meanwhile
            track, audio_error = _decode_audio(job, info)
        _check_usable(info, track, video_error, audio_error)
        notes = [{"kind": kind, "reason": error.reason}  # what was dropped (counted in the chunk summary)
                 for kind, error in (("video_unusable", video_error), ("audio_unusable", audio_error))
                 if error is not None]
        return reader, info, track, notes

    def _checked_faces(self, reader, info, start: float, n_frames: int, wav, lead: int, scratch: Path,
                       timer: StageTimer, checks: _Checks, notes: list[dict]):
        """`_faces`, unless decord failed on the frames or ffprobe found the clip's video damaged: then
        no faces and a `video_unusable` note, or DecodeError when the clip has no audio either."""
        damaged = None
        try:
            faces, vision_mask = self._faces(reader, info, start, n_frames, scratch, timer)
        except DecodeError as exc:  # decord failed on the frames: the video alone is unusable
            if exc.stream != "video":
                raise
            damaged, faces = exc.reason, scratch / "face.npy"
        damaged = checks.damage(timer) or damaged
        if damaged is not None:
            if wav is None or len(wav) <= lead:
                raise DecodeError("decode_video", damaged)
            notes.append({"kind": "video_unusable", "reason": damaged})
            faces, vision_mask = self._no_faces(n_frames, faces), np.zeros(n_frames, bool)
        return faces, vision_mask

    def _transcript(self, job: ClipJob, wav, lead: int, timer: StageTimer) -> tuple[str, str, dict | None]:
        """(text, its source: given / recognised / none, the recogniser's json entry or None).

        The recogniser runs on the clip's own 16 kHz waveform when the manifest gives no text, or
        on every clip with `asr.when: always`; recognised speech replaces the given text then, and
        where it finds none the given text stays."""
        given = job.text
        source = "given" if given.strip() else "none"
        if self.asr is None or (given.strip() and self.cfg.asr.when != "always"):
            return given, source, None
        from msaflow.extractors.asr import Transcript

        with timer("asr"):
            if wav is None or len(wav) <= lead:
                transcript = Transcript("", language=self.cfg.asr.language)  # no audio: nothing to hear
            else:
                transcript = self.asr.transcribe(wav, lead)
        info = self.asr.describe()
        entry = transcript.to_meta({k: info[k] for k in ("recogniser", "weights", "sha256")})
        if transcript.text.strip():
            return transcript.text, "recognised", entry
        return given, source, entry

    def _no_faces(self, n_frames: int, faces):
        """All-zero crops in the form `faces` has (an array, or the path of a long clip's .npy)."""
        size = self.cfg.face_size
        if isinstance(faces, Path):
            _NpyFrameWriter(faces, n_frames, (size, size, 3)).close()
            return faces
        return np.zeros((n_frames, size, size, 3), np.uint8)

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

        boxes, marks, present = self.track(reader, indices, whole, timer, info.downscale)
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

    def track(self, reader, indices: np.ndarray, whole, timer: StageTimer, downscale: float = 1.0):
        """The main face per output frame: (boxes (n, 4), landmarks (n, 5, 2), present (n,)),
        by the rule of extractors/face.py. `indices`: source frame per output frame (-1: no
        picture); `whole`: (positions, frames) when the clip was decoded in one chunk, else None;
        `downscale`: decoded / stored frame size."""
        cfg, n_frames = self.cfg, len(indices)
        pictured = np.flatnonzero(indices >= 0)

        # MTCNN sees frames at `detect_scale` of the stream's own size; frames decoded already
        # downscaled (extractors/video.py) are shrunk only what remains of that, never enlarged
        scale = min(1.0, cfg.detect_scale / downscale)
        extra = () if scale == self.detector.scale else (scale,)

        def detect(positions: np.ndarray) -> list[face.FrameFaces]:
            if whole is not None:
                with timer("detect"):
                    return self.detector.detect(whole[1][np.searchsorted(whole[0], positions)], positions, *extra)
            sparse = np.full(n_frames, -1, np.int64)
            sparse[positions] = indices[positions]
            chunks, found = video.iter_frame_chunks(reader, sparse, cfg.chunk_frames), []
            while True:
                with timer("decode"):
                    item = next(chunks, None)
                if item is None:
                    return found
                with timer("detect"):
                    found += self.detector.detect(item[1], item[0], *extra)

        found = detect(face.keyframes(pictured, n_frames, cfg.detect_every))
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
