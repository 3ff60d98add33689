"""Audio: 16 kHz mono waveform of a segment (torchcodec) and its log-mel fbank.

The fbank grid has one step per 10 ms: step i is centered at (i + 0.5) * 10 ms from the
segment start, with a 25 ms window (Kaldi `snip_edges=False` framing, edges reflected),
so a clip of d seconds has exactly round(d * 100) steps. It is computed in blocks of
steps; each step only sees its own window, so blocks give the same numbers as one pass
while memory stays bounded for long clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msaflow.extractors.video import DecodeError, _first_line

SAMPLE_RATE = 16_000
HOP = 160  # 10 ms
WINDOW = 400  # 25 ms
STEPS_PER_SECOND = SAMPLE_RATE // HOP


@dataclass(frozen=True)
class AudioSegment:
    """A segment's samples: int16 mono 16 kHz, on the segment's clock. `lead` leading samples are
    zeros put there because the audio stream starts after the segment does (not audio)."""

    wav: np.ndarray
    lead: int = 0

    @property
    def n_real(self) -> int:
        """Samples that hold audio (not lead padding)."""
        return max(0, len(self.wav) - self.lead)


def decode_audio_segment(path: str | Path, origin_s: float | None, start_s: float,
                         end_s: float | None) -> AudioSegment | None:
    """The samples of [start_s, end_s) on the msaflow clock, whose zero is at container time
    `origin_s` (the first video frame; None: the audio stream's start). `end_s` None means to
    the end of the stream. None without an audio stream; no samples when the stream has none
    inside the segment. A stream that cannot be opened or decoded (damaged packets) raises
    DecodeError with stream "audio"."""
    from torchcodec.decoders import AudioDecoder

    try:
        decoder = AudioDecoder(str(path), sample_rate=SAMPLE_RATE, num_channels=1)
    except ValueError as exc:  # torchcodec: "The best audio stream is unknown ..."
        if "audio stream" in str(exc):
            return None
        raise DecodeError("decode_audio", f"the audio stream cannot be opened: {_first_line(exc)}",
                          stream="audio") from exc
    except RuntimeError as exc:
        raise DecodeError("decode_audio", f"the audio stream cannot be opened: {_first_line(exc)}",
                          stream="audio") from exc
    meta = decoder.metadata
    stream_begin = float(meta.begin_stream_seconds_from_header or 0.0)
    origin = stream_begin if origin_s is None else origin_s
    lo = origin + start_s
    hi = None if end_s is None else origin + end_s
    stream_end = stream_begin + float(meta.duration_seconds_from_header or float("inf"))
    if (hi is not None and hi <= stream_begin) or lo >= stream_end:
        return AudioSegment(np.zeros(0, np.int16))
    try:
        samples = decoder.get_samples_played_in_range(max(lo, stream_begin), hi)
    except RuntimeError as exc:
        if "No audio frames were decoded" in str(exc):  # segment after the stream's last sample
            return AudioSegment(np.zeros(0, np.int16))
        raise DecodeError("decode_audio", f"the audio stream is damaged: {_first_line(exc)}",
                          stream="audio") from exc
    mono = samples.data.numpy().reshape(-1)
    wav = np.round(np.clip(mono, -1.0, 1.0) * 32767.0).astype(np.int16)
    lead = int(round((stream_begin - lo) * SAMPLE_RATE))
    if lead > 0:  # audio starts after the segment does: leading silence keeps the clock
        wav = np.concatenate([np.zeros(lead, np.int16), wav])
    if end_s is not None:
        wav = wav[: int(round((end_s - start_s) * SAMPLE_RATE))]
    return AudioSegment(wav, min(max(lead, 0), len(wav)))


def decode_audio(path: str | Path, origin_s: float | None, start_s: float,
                 end_s: float | None) -> np.ndarray | None:
    """int16 mono 16 kHz samples of [start_s, end_s) (see decode_audio_segment); None without
    an audio stream, an empty array when the stream has no samples inside the segment."""
    segment = decode_audio_segment(path, origin_s, start_s, end_s)
    return None if segment is None else segment.wav


def fbank_steps(duration_s: float) -> int:
    return int(round(duration_s * STEPS_PER_SECOND))


def log_mel_fbank(wav: np.ndarray | None, n_steps: int, n_mels: int = 80,
                  block_steps: int = 6000, first_sample: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fbank float32 (n_steps, n_mels), mask bool (n_steps,)). A step is present when its
    center lies inside the waveform's audio: at or after `first_sample` (the samples before it
    are padding, e.g. audio that starts late) and before its end; absent steps (and a clip
    without audio) are zeros."""
    import torch
    from torchaudio.compliance.kaldi import fbank

    out = np.zeros((n_steps, n_mels), np.float32)
    mask = np.zeros(n_steps, bool)
    if wav is None or len(wav) == 0 or n_steps == 0:
        return out, mask
    n_present = min(n_steps, (len(wav) - HOP // 2 + HOP - 1) // HOP)  # centers < len(wav)
    if n_present <= 0:
        return out, mask
    signal = wav.astype(np.float32)  # Kaldi convention: int16 scale
    left = WINDOW // 2 - HOP // 2  # 120: step 0 is centered at sample 80
    need = (n_present - 1) * HOP + WINDOW  # padded samples the present steps read
    right = max(0, need - left - len(signal))
    mode = "reflect" if len(signal) > max(left, right) else "edge"
    padded = np.pad(signal, (left, right), mode=mode)
    for lo in range(0, n_present, block_steps):
        hi = min(n_present, lo + block_steps)
        piece = torch.from_numpy(padded[lo * HOP:(hi - 1) * HOP + WINDOW].copy()).unsqueeze(0)
        feats = fbank(piece, sample_frequency=SAMPLE_RATE, num_mel_bins=n_mels, frame_length=25.0,
                      frame_shift=10.0, dither=0.0, snip_edges=True, window_type="povey")
        out[lo:hi] = feats.numpy()[: hi - lo]
    mask[:n_present] = True
    if first_sample > 0:  # centers before the first real sample: padding, not audio
        n_lead = min(n_present, max(0, (first_sample - HOP // 2 + HOP - 1) // HOP))  # centers < first_sample
        out[:n_lead] = 0.0
        mask[:n_lead] = False
    return out, mask
