"""Bad and unusual media for tests, made with ffmpeg from real clips.

Plain functions `make_<kind>(src, dst) -> dst` (src: a real clip with video and audio,
dst: the file to write; its suffix picks the container). Other test modules reuse them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def _ffmpeg(*args: str) -> None:
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("ffmpeg is not installed (apt-get install -y ffmpeg)")
    cmd = ["ffmpeg", "-v", "error", "-nostdin", "-y", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")


def _prepare(dst: str | Path) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return dst


def make_truncated(src: str | Path, dst: str | Path, fraction: float = 0.2) -> Path:
    """The first `fraction` of the file's bytes: a download cut short."""
    dst = _prepare(dst)
    data = Path(src).read_bytes()
    dst.write_bytes(data[: max(1, int(len(data) * fraction))])
    return dst


def make_faststart(src: str | Path, dst: str | Path) -> Path:
    """The same streams in an MP4 with its index (moov) before the data, as for web streaming."""
    dst = _prepare(dst)
    _ffmpeg("-i", str(src), "-c", "copy", "-movflags", "+faststart", str(dst))
    return dst


def make_remuxed(src: str | Path, dst: str | Path) -> Path:
    """The same streams, copied into the container that dst's suffix names."""
    dst = _prepare(dst)
    _ffmpeg("-i", str(src), "-c", "copy", str(dst))
    return dst


def make_zero_bytes(dst: str | Path) -> Path:
    dst = _prepare(dst)
    dst.write_bytes(b"")
    return dst


def make_text_as_video(dst: str | Path) -> Path:
    """A text file with a video suffix."""
    dst = _prepare(dst)
    dst.write_text("this is not a video, just a text file with a video file name\n", encoding="utf-8")
    return dst


def make_scaled(src: str | Path, dst: str | Path, width: int, height: int, audio: bool = True) -> Path:
    """The clip rescaled to width x height (H.264; audio kept as AAC or dropped)."""
    _ffmpeg("-i", str(src), "-vf", f"scale={width}:{height}", "-c:v", "libx264", "-preset", "ultrafast",
            "-pix_fmt", "yuv420p", *(["-c:a", "aac"] if audio else ["-an"]), str(dst))
    return Path(dst)


def make_video_without_audio(src: str | Path, dst: str | Path) -> Path:
    dst = _prepare(dst)
    _ffmpeg("-i", str(src), "-an", "-c:v", "copy", str(dst))
    return dst


def make_audio_only(src: str | Path, dst: str | Path) -> Path:
    """The audio stream alone (AAC), e.g. dst = 'x.m4a' or 'x.mp4'."""
    dst = _prepare(dst)
    _ffmpeg("-i", str(src), "-vn", "-c:a", "aac", "-b:a", "96k", str(dst))
    return dst


def make_no_face(src: str | Path, dst: str | Path) -> Path:
    """ffmpeg's test pattern (no face anywhere) with the real audio of `src`, same duration."""
    dst = _prepare(dst)
    _ffmpeg("-i", str(src), "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
            "-map", "1:v", "-map", "0:a", "-shortest", "-c:v", "libx264", "-preset", "ultrafast",
            "-pix_fmt", "yuv420p", "-c:a", "aac", str(dst))
    return dst


def make_vfr(src: str | Path, dst: str | Path, sparse_until: int = 30, keep_every: int = 3) -> Path:
    """Variable frame rate: of the first `sparse_until` frames only every `keep_every`-th is
    kept (with its original timestamp), the rest of the clip is untouched (.mp4)."""
    dst = _prepare(dst)
    select = f"select='lt(n\\,{sparse_until})*not(mod(n\\,{keep_every}))+gte(n\\,{sparse_until})'"
    _ffmpeg("-i", str(src), "-vf", select, "-fps_mode", "vfr", "-c:v", "libx264", "-preset",
            "ultrafast", "-c:a", "aac", str(dst))
    return dst


def make_rotated(src: str | Path, dst: str | Path) -> Path:
    """How phones store portrait video: pixels turned 90 degrees, plus display-rotation
    metadata that turns them upright again (.mp4). A decoder that ignores the metadata
    sees a sideways face."""
    dst = _prepare(dst)
    sideways = dst.with_name(dst.stem + ".sideways.mp4")
    _ffmpeg("-i", str(src), "-vf", "transpose=2", "-c:v", "libx264", "-preset", "ultrafast",
            "-c:a", "aac", str(sideways))
    _ffmpeg("-i", str(sideways), "-c", "copy", "-metadata:s:v:0", "rotate=270", str(dst))
    sideways.unlink()
    return dst


def make_transposed(src: str | Path, dst: str | Path) -> Path:
    """Pixels turned 90 degrees with no metadata: the face really is sideways (.mp4)."""
    dst = _prepare(dst)
    _ffmpeg("-i", str(src), "-vf", "transpose=2", "-c:v", "libx264", "-preset", "ultrafast",
            "-c:a", "aac", str(dst))
    return dst


def make_grayscale(src: str | Path, dst: str | Path) -> Path:
    """A true single-channel (gray) pixel format: FFV1 in Matroska (dst = 'x.mkv')."""
    dst = _prepare(dst)
    _ffmpeg("-i", str(src), "-c:v", "ffv1", "-pix_fmt", "gray", "-c:a", "copy", str(dst))
    return dst


def make_8khz_mono(src: str | Path, dst: str | Path) -> Path:
    """Video copied, audio resampled to 8 kHz mono 16-bit PCM (dst = 'x.mkv')."""
    dst = _prepare(dst)
    _ffmpeg("-i", str(src), "-c:v", "copy", "-ac", "1", "-ar", "8000", "-c:a", "pcm_s16le", str(dst))
    return dst


def make_concatenated(srcs: list[str | Path], dst: str | Path, repeat: int = 1) -> Path:
    """The clips one after another, `repeat` times (one long talking-head video, .mp4)."""
    dst = _prepare(dst)
    listing = dst.with_suffix(".txt")
    lines = [f"file '{Path(s).resolve()}'" for _ in range(repeat) for s in srcs]
    listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _ffmpeg("-f", "concat", "-safe", "0", "-i", str(listing), "-c:v", "libx264", "-preset", "ultrafast",
            "-c:a", "aac", str(dst))
    listing.unlink()
    return dst
