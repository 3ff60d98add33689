"""Is a video file intact? ffprobe decodes the end of the file (`TailCheck`: cut short or
damaged) and the clip's segment (`SegmentCheck`: damaged packets that decord conceals), each
in a child process while the clip is extracted."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import OrderedDict
from pathlib import Path

from msaflow.extractors.video import DecodeError, VideoInfo


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
            errors = _ffprobe_errors(self.process)
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


def _ffprobe_errors(process: subprocess.Popen) -> list[str]:
    _, stderr = process.communicate()
    # ffmpeg tags lines with the decoder's memory address ("[mpeg4 @ 0x55d6...]"): drop
    # it so that the reason recorded for a file is the same on every run
    return [re.sub(r" @ 0x[0-9a-f]+\]", "]", line.strip()) for line in stderr.splitlines() if line.strip()]


class SegmentCheck:
    """Does the video stream decode without errors over the clip's segment? decord conceals
    damaged packets (it shows neighbouring or broken pictures, silently), so ffprobe decodes
    the segment's video in a child process while the clip is extracted; `reason()` waits for
    it: None, or what is wrong. The caller marks the clip's vision missing for that reason.
    (Audio needs no such check: torchcodec raises on damaged audio packets.)"""

    def __init__(self, path: str | Path, info: VideoInfo, start_s: float, end_s: float):
        ffprobe = shutil.which("ffprobe")
        self.process, self._reason = None, None
        if ffprobe is None:
            return
        lo, hi = info.begin_s + start_s, info.begin_s + end_s
        interval = f"{lo:.3f}%{hi:.3f}" if start_s > 0 else f"%{hi:.3f}"
        cmd = [ffprobe, "-v", "error", "-threads", "1", "-select_streams", "v:0", "-read_intervals", interval,
               "-show_entries", "frame=pts", "-of", "csv=p=0", str(path)]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, errors="replace")

    def reason(self) -> str | None:
        if self.process is not None:
            errors = _ffprobe_errors(self.process)
            if self.process.returncode != 0 or errors:
                first = errors[0][:300] if errors else f"ffprobe exit code {self.process.returncode}"
                self._reason = (f"the video stream is damaged inside the clip ({len(errors)} decoder error(s); "
                                f"first: {first})")
            self.process = None
        return self._reason

    def cancel(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.communicate()
            self.process = None


def check_intact(path: str | Path, info: VideoInfo) -> None:
    """Raise DecodeError when the file is cut short or its end is damaged (see TailCheck)."""
    TailCheck(path, info).result()
