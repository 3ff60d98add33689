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

Frames larger than `max_side` pixels on their longest side are downscaled while decoding
(decord's scaler), so the memory of a batch of frames is bounded by pixels, not only by
frames: a 4K clip decodes at the size of a 720-px one. Faces, crops and `min_face_size`
are then in the pixels of the decoded frames.

What is wrong with a stream (too small, a cover picture, timestamps that jump, damaged
packets) is said in plain words; `DecodeError.stream` tells when only one stream is
unusable, so that the clip can keep the other.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DecodeError(RuntimeError):
    """The file (or one of its streams) cannot be decoded; `stage` says where it failed.

    `stream` is "video" or "audio" when only that stream is unusable (the file's other stream
    may still be kept), None when the whole file is."""

    def __init__(self, stage: str, reason: str, stream: str | None = None):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason
        self.stream = stream


MIN_VIDEO_SIDE = 49  # a picture of 48 px or less a side holds no face worth cropping (crops are 112 px)
JUMP_SLACK_S = 1.0  # timestamps may overrun the frame count's duration by this much before they count as a jump


@dataclass(frozen=True)
class VideoInfo:
    width: int  # of the decoded frames (after rotation and any downscaling)
    height: int
    n_source_frames: int
    begin_s: float  # container time of the first video frame (the msaflow time origin)
    frame_starts: np.ndarray  # (n,) seconds from the first frame, presentation order
    frame_ends: np.ndarray  # (n,)
    source_width: int = 0  # of the stream as stored (after rotation); 0: as decoded
    source_height: int = 0

    @property
    def duration_s(self) -> float:
        return float(self.frame_ends[-1]) if self.n_source_frames else 0.0

    @property
    def downscale(self) -> float:
        """Decoded size / stored size (1.0 when frames are decoded at their own size)."""
        return self.width / self.source_width if self.source_width else 1.0


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
    """What went wrong, in plain words: the decoder's first message line without its internals
    (C++ source paths and line numbers, function names, clock stamps, memory addresses)."""
    return plain_message(str(exc)) or type(exc).__name__


# decoder messages that say nothing to a user, and what they mean for the file
_KNOWN_MESSAGES = (
    (re.compile(r"Failed to measure duration/frame-count due to broken metadata", re.I),
     "the video stream has no usable frame count or duration (broken or missing metadata)"),
    (re.compile(r"Check failed: from_size == to_size", re.I),
     "the decoder returned frames of the wrong size for this picture format"),
    (re.compile(r"Could not push packet to decoder", re.I), "invalid data in the stream (damaged packets)"),
    (re.compile(r"No (?:audio|video) frames were decoded", re.I), "no frames could be decoded"),
)
_INTERNALS = (
    re.compile(r"\[\d\d:\d\d:\d\d\]\s*"),  # decord's clock stamp
    re.compile(r"(?:\w+,\s*)?(?:/[^\s,:]+)+\.(?:cc|cpp|cxx|c|h|hpp)[:,]\s*\d+[:,]?\s*"),  # [func, ]/src/x.cc:12:
    re.compile(r"\s*@ 0x[0-9a-f]+"),  # ffmpeg's "[h264 @ 0x55d6...]"
    re.compile(r"^ERROR opening: .*?, "),  # decord: "ERROR opening: <path>, <ffmpeg's reason>"
)


def plain_message(text: str) -> str:
    """The first line of a decoder's message, in plain words (see _first_line)."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    for pattern, meaning in _KNOWN_MESSAGES:
        if pattern.search(lines[0]):
            return meaning
    line = lines[0]
    for pattern in _INTERNALS:
        line = pattern.sub("", line)
    return line.strip(" :,")[:300]


@dataclass(frozen=True)
class StreamProbe:
    """What ffprobe says about a file's streams (read once per file, cached)."""

    video: dict | None  # the first video stream that is not an attached picture: width, height, rotation
    cover_only: bool  # the file's only video streams are attached pictures (cover art)
    has_audio: bool


_probes: OrderedDict[tuple, StreamProbe | None] = OrderedDict()


def probe_streams(path: str | Path) -> StreamProbe | None:
    """The file's streams according to ffprobe; None when ffprobe cannot read the file (the
    decoders then say why) or is not installed."""
    stat = Path(path).stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _probes:
        return _probes[key]
    ffprobe = shutil.which("ffprobe")
    result = None
    if ffprobe is not None:
        cmd = [ffprobe, "-v", "quiet", "-show_entries",
               "stream=index,codec_type,width,height:stream_disposition=attached_pic:stream_side_data=rotation",
               "-of", "json", str(path)]
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        try:
            streams = json.loads(done.stdout or "{}").get("streams", []) if done.returncode == 0 else None
        except json.JSONDecodeError:
            streams = None
        if streams is not None:
            videos = [st for st in streams if st.get("codec_type") == "video"]
            real = [st for st in videos if not (st.get("disposition") or {}).get("attached_pic")]
            video = None
            if real:
                st = real[0]
                rotation = next((int(sd.get("rotation", 0)) for sd in st.get("side_data_list") or []
                                 if "rotation" in sd), 0)
                video = {"width": int(st.get("width") or 0), "height": int(st.get("height") or 0),
                         "rotation": rotation}
            result = StreamProbe(video=video, cover_only=bool(videos) and not real,
                                 has_audio=any(st.get("codec_type") == "audio" for st in streams))
    _probes[key] = result
    while len(_probes) > 64:
        _probes.popitem(last=False)
    return result


def decode_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """(width, height) to decode frames of `width` x `height` at, when the longest side exceeds
    `max_side` (even numbers, aspect kept); None: decode at the stream's own size."""
    if not max_side or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return (max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2))


def _reader(decord, path: Path, size: tuple[int, int] | None):
    """A decord VideoReader and its first frame, decoded at `size` (None: the stream's own)."""
    kwargs = {} if size is None else {"width": size[0], "height": size[1]}
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1, **kwargs)
    first = reader[0].asnumpy() if len(reader) else None
    return reader, first


def open_video(path: str | Path, max_side: int | None = None, max_duration_ratio: float | None = None):
    """(decord VideoReader, VideoInfo), or (None, None) for a file without a video stream (an
    audio file whose only picture is its cover art counts as one).

    decord applies the display rotation stored in the container, and converts any pixel
    format (grayscale included) to RGB. Frames whose longest side exceeds `max_side` are
    downscaled while decoding. A stream that cannot give usable pictures (48 px or less,
    frames the decoder cannot return, timestamps that jump far beyond what the frame count
    spans: more than `max_duration_ratio` times) raises DecodeError with stream "video".
    """
    import torch  # noqa: F401  (must load before decord: decord first breaks torch's BLAS)
    import decord

    path = Path(path)
    _check_file(path)
    probe = probe_streams(path)
    if probe is not None and probe.video is None:
        return None, None  # no video stream, or only a cover picture: an audio file
    begin = _stream_begin(path)
    if begin is None:
        return None, None
    stored = _stored_size(probe)
    size = decode_size(*stored, max_side) if stored is not None else None
    reader, size, n, stamps, (width, height) = _decoded_stream(decord, path, size)
    if max_duration_ratio is not None:
        _check_timestamps(stamps, max_duration_ratio)
    source = stored if stored is not None and size is not None else (0, 0)
    info = VideoInfo(width=int(width), height=int(height), n_source_frames=n, begin_s=begin,
                     frame_starts=stamps[:, 0], frame_ends=stamps[:, 1],
                     source_width=source[0], source_height=source[1])
    return reader, info


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DecodeError("open", "file not found")
    if path.stat().st_size == 0:
        raise DecodeError("open", "empty file (0 bytes)")


def _stored_size(probe: StreamProbe | None) -> tuple[int, int] | None:
    """(width, height) of the video stream as displayed (rotation applied), None when ffprobe does not
    say; DecodeError when it is too small to find a face in."""
    if probe is None or not (probe.video["width"] and probe.video["height"]):
        return None
    w, h = probe.video["width"], probe.video["height"]
    stored = (h, w) if abs(probe.video["rotation"]) % 180 == 90 else (w, h)
    if min(stored) < MIN_VIDEO_SIDE:
        raise DecodeError("decode_video", f"the video is {stored[0]}x{stored[1]} pixels: too small to find a "
                                          f"face in (at least {MIN_VIDEO_SIDE} pixels a side needed)",
                          stream="video")
    return stored


def _decoded_stream(decord, path: Path, size: tuple[int, int] | None):
    """(reader, the size it decodes at (None: the stream's own), frame count, timestamps (n, 2) in
    seconds, (width, height) of its frames); DecodeError with stream "video" when decord cannot
    decode the stream or it has no frames."""
    try:
        reader, first = _reader(decord, path, size)
        n = len(reader)
        if first is not None and first.shape[2] != 3:
            reader, first, size = _reader_through_scaler(decord, path, size, first)
        stamps = reader.get_frame_timestamp(np.arange(n)) if n else np.zeros((0, 2))
        height, width = first.shape[:2] if n else (0, 0)
        reader.seek(0)
    except DecodeError:
        raise
    except Exception as exc:  # decord raises DECORDError / RuntimeError with the reason
        raise DecodeError("decode_video", f"the video stream cannot be decoded: {_first_line(exc)}",
                          stream="video") from exc
    if n == 0:
        raise DecodeError("decode_video", "the video stream has no frames", stream="video")
    return reader, size, n, np.asarray(stamps, dtype=np.float64), (width, height)


def _reader_through_scaler(decord, path: Path, size: tuple[int, int] | None, first: np.ndarray):
    """decord returns mis-shaped pictures at some frame sizes (96x96, 144x144, ...): decoding
    through its scaler at a size 2 px larger gives proper RGB. (reader, first frame, that size)."""
    height, width = first.shape[:2]
    size = size or (width, height)
    size = (size[0] + 2, int(round(size[1] * (size[0] + 2) / size[0] / 2)) * 2)
    reader, first = _reader(decord, path, size)
    if first.shape[2] != 3:
        raise DecodeError("decode_video", f"frames of {width}x{height} pixels cannot be decoded to RGB; "
                                          f"re-encode the video at another size", stream="video")
    return reader, first, size


def _check_timestamps(stamps: np.ndarray, max_ratio: float) -> None:
    """A stream whose timestamps span far more than its frames do at their frame rate (a jump:
    75 frames of a 3-s file stamped over 603 s) would become a huge clip of held pictures."""
    n = len(stamps)
    if n < 2:
        return
    steps = np.diff(stamps[:, 0])
    typical = float(np.median(steps))
    if typical <= 0:
        return
    counted = n * typical  # what the frames last at the stream's usual frame interval
    span = float(stamps[-1, 1] - stamps[0, 0])
    if span > max_ratio * counted and span - counted > JUMP_SLACK_S:
        at = int(np.argmax(steps))
        raise DecodeError("decode_video", f"the video's timestamps jump by {steps[at]:.1f} s after {stamps[at, 0]:.2f} s: "
                                          f"{n} frames span {span:.1f} s, but {counted:.1f} s at their frame rate "
                                          f"(more than max_duration_ratio {max_ratio:g} times); remux or re-encode "
                                          f"the file with corrected timestamps", stream="video")


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
                "decode_video", f"the video stream cannot be decoded (source frames {int(unique[0])}-"
                f"{int(unique[-1])}): {_first_line(exc)}", stream="video") from exc
        yield positions, frames[inverse]
