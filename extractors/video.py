"""Video: frames at a fixed rate over a segment, decoded with decord, streamed in chunks.

Time origin: every time in msaflow (manifest `start`/`end`, frame and fbank steps) is in
seconds from the first frame of the video stream, which is how decord reports frame
timestamps. Audio is cut on the same clock (`VideoInfo.begin_s` maps it to container time),
so the two stay in sync even when a container's video starts later than its audio.

Output frame i stands for the interval [start + i/fps, start + (i+1)/fps); it shows the
source frame on screen at the middle of that interval (the frame whose [pts, next pts)
contains it). That works the same for constant and variable frame rates, and repeats or
skips source frames when the rates differ. Output frames that fall outside the decoded
video (before its first or after its last frame) have no picture.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DecodeError(RuntimeError):
    """The file (or one of its streams) cannot be decoded; `stage` says where it failed."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    n_source_frames: int
    begin_s: float  # container time of the first video frame (the msaflow time origin)
    frame_starts: np.ndarray  # (n,) seconds from the first frame, presentation order
    frame_ends: np.ndarray  # (n,)

    @property
    def duration_s(self) -> float:
        return float(self.frame_ends[-1]) if self.n_source_frames else 0.0


def _stream_begin(path: Path) -> float | None:
    """Container time of the video stream's first frame; None when there is no video stream.

    Unreadable files raise DecodeError. torchcodec reads only the header here.
    """
    from torchcodec.decoders import VideoDecoder

    try:
        meta = VideoDecoder(str(path), seek_mode="approximate").metadata
    except ValueError as exc:  # torchcodec: "The best video stream is unknown ..."
        if "video stream" in str(exc):
            return None
        raise DecodeError("open", f"cannot read the container: {_first_line(exc)}") from exc
    except RuntimeError as exc:
        raise DecodeError("open", f"cannot read the container: {_first_line(exc)}") from exc
    return float(meta.begin_stream_seconds_from_header or 0.0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


TAIL_CHECK_S = 2.0  # decode this much of the stream's end to catch a file cut short


class TailCheck:
    """Is the file cut short or its end damaged? ffprobe's verdict, computed in a child process
    while the caller goes on decoding; `result()` waits for it and raises DecodeError.

    decord alone cannot decide this reproducibly: at a damaged end its threaded decoder
    sometimes substitutes neighbouring frames and sometimes fails, depending on timing. So
    ffprobe decodes the last TAIL_CHECK_S seconds of the video stream that decord indexed
    (MPEG-PS/TS carry no length to compare with; an MP4 or MKV cut short fails the same way,
    as its last packets are incomplete); any demuxer or decoder error rejects the file.
    ffprobe has no muxer, so only input errors count.
    """

    _verdicts: OrderedDict[tuple, str | None] = OrderedDict()  # clips cut from one file share it

    def __init__(self, path: str | Path, info: VideoInfo):
        stat = Path(path).stat()
        self.key = (str(path), stat.st_size, stat.st_mtime_ns, info.begin_s, info.duration_s)
        self.process = None
        if self.key in self._verdicts:
            return
        ffprobe = shutil.which("ffprobe")
        if ffprobe is None:
            raise DecodeError("open", "ffprobe not found on PATH (msaflow needs ffmpeg's tools to check "
                                      "files; scripts/setup.sh installs them)")
        tail_from = info.begin_s + max(0.0, info.duration_s - TAIL_CHECK_S)
        cmd = [ffprobe, "-v", "error", "-select_streams", "v:0", "-read_intervals", f"{tail_from:.3f}%",
               "-show_entries", "frame=pts", "-of", "csv=p=0", str(path)]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, errors="replace")

    def result(self) -> None:
        if self.process is not None:
            _, stderr = self.process.communicate()
            # ffmpeg tags lines with the decoder's memory address ("[mpeg4 @ 0x55d6...]"): drop
            # it so that the reason recorded for a file is the same on every run
            errors = [re.sub(r" @ 0x[0-9a-f]+\]", "]", line.strip()) for line in stderr.splitlines() if line.strip()]
            verdict = None
            if self.process.returncode != 0 or errors:
                first = errors[0][:300] if errors else f"ffprobe exit code {self.process.returncode}"
                verdict = f"truncated or damaged file (ffprobe at the end: {first})"
            self._verdicts[self.key] = verdict
            while len(self._verdicts) > 64:
                self._verdicts.popitem(last=False)
            self.process = None
        if self._verdicts[self.key] is not None:
            raise DecodeError("decode_video", self._verdicts[self.key])

    def cancel(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.communicate()
            self.process = None


def check_intact(path: str | Path, info: VideoInfo) -> None:
    """Raise DecodeError when the file is cut short or its end is damaged (see TailCheck)."""
    TailCheck(path, info).result()


def open_video(path: str | Path):
    """(decord VideoReader, VideoInfo), or (None, None) for a file without a video stream.

    decord applies the display rotation stored in the container, and converts any pixel
    format (grayscale included) to RGB.
    """
    import torch  # noqa: F401  (must load before decord: decord first breaks torch's BLAS)
    import decord

    path = Path(path)
    if not path.is_file():
        raise DecodeError("open", "file not found")
    if path.stat().st_size == 0:
        raise DecodeError("open", "empty file (0 bytes)")
    begin = _stream_begin(path)
    if begin is None:
        return None, None
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        n = len(reader)
        stamps = reader.get_frame_timestamp(np.arange(n)) if n else np.zeros((0, 2))
        height, width = reader[0].shape[:2] if n else (0, 0)
        reader.seek(0)
    except Exception as exc:  # decord raises DECORDError / RuntimeError with the reason
        raise DecodeError("decode_video", f"decord cannot open the video: {_first_line(exc)}") from exc
    if n == 0:
        raise DecodeError("decode_video", "video stream has no frames")
    stamps = np.asarray(stamps, dtype=np.float64)
    info = VideoInfo(width=int(width), height=int(height), n_source_frames=n, begin_s=begin,
                     frame_starts=stamps[:, 0], frame_ends=stamps[:, 1])
    return reader, info


def n_output_frames(duration_s: float, fps: float) -> int:
    return int(round(duration_s * fps))


def source_indices(info: VideoInfo, start_s: float, n_frames: int, fps: float) -> np.ndarray:
    """Source frame index shown by each output frame; -1 where the video has no picture."""
    mids = start_s + (np.arange(n_frames) + 0.5) / fps
    # A middle that falls on a frame boundary (start half a frame off the source grid) goes
    # to the later frame; the tolerance absorbs float noise in the container's timestamps,
    # which would otherwise pick frames irregularly.
    idx = np.searchsorted(info.frame_starts, mids + 1e-6, side="right") - 1
    outside = (idx < 0) | (mids >= info.frame_ends[-1])
    return np.where(outside, -1, idx).astype(np.int64)


def iter_frame_chunks(reader, indices: np.ndarray, chunk_frames: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (output positions, RGB uint8 frames (k, H, W, 3)) for the output frames that have
    a picture, `chunk_frames` at a time, so memory stays bounded however long the clip."""
    valid = np.flatnonzero(indices >= 0)
    for lo in range(0, len(valid), chunk_frames):
        positions = valid[lo:lo + chunk_frames]
        wanted = indices[positions]
        unique, inverse = np.unique(wanted, return_inverse=True)  # VFR / rate-up repeats frames
        try:
            frames = reader.get_batch(unique.tolist()).asnumpy()
            # decord's decoder thread goes on decoding the packets it was handed ahead of the last
            # frame asked for and buffers the pictures: up to ~1 GB on a long video. A seek drops them.
            reader.seek(0)
        except Exception as exc:
            raise DecodeError(
                "decode_video", f"cannot decode source frames {int(unique[0])}-{int(unique[-1])}: "
                f"{_first_line(exc)}") from exc
        yield positions, frames[inverse]
