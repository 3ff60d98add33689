"""Odd and damaged media keep what is usable, and every fault is reported in plain words.

The media are made at test time with ffmpeg (or by overwriting packets) from the real clips of
../shared/data: cover-art audio files, a video whose audio packets (or video packets) are
damaged in the middle, a still picture over 3 s of speech, audio that starts 1 s late, segment
ends past the end of the media, a 240-character file name, 40-px and 48-px videos, a file whose
video timestamps jump by 600 s, and a 4K clip. The fast tests call the decoders directly; the
slow ones run `msaflow extract` over all of them at once and check each clip and the summary.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from msaflow.extractors import audio, face, video, video_checks
from msaflow.datasets.manifest import MANIFEST_COLUMNS, MAX_KEY_LENGTH, build_manifest, sanitize_key
from msaflow.tario import read_sample_tar

sys.path.insert(0, str(Path(__file__).parent))
import media  # noqa: E402

GRID = "raw/grid/bbaf2n.mpg"  # 3.0 s, 360x288, MPEG-1 video + MP2 audio in MPEG-PS
FACE = "faces/fr_obama.jpg"
INTERNALS = re.compile(r"\.(cc|cpp|h|hpp)\b|/project/|/__w/|Check failed|0x[0-9a-f]{6,}")


def _ffmpeg(*args: str) -> None:
    media._ffmpeg(*args)


def make_cover_art(src: Path, picture: Path, dst: Path) -> Path:
    """An audio file whose only video stream is its cover picture (attached_pic): mp3 or m4a."""
    codec = ["-c:a", "libmp3lame", "-c:v", "mjpeg", "-id3v2_version", "3"] if dst.suffix == ".mp3" \
        else ["-c:a", "aac", "-c:v", "png"]
    _ffmpeg("-i", str(src), "-i", str(picture), "-map", "0:a", "-map", "1:v", *codec,
            "-disposition:v:0", "attached_pic", str(dst))
    return dst


def make_still_with_audio(picture: Path, src: Path, dst: Path) -> Path:
    """One picture (a single 0.04-s frame) with the 3 s of audio of `src` (.mp4)."""
    _ffmpeg("-i", str(picture), "-i", str(src), "-map", "0:v", "-map", "1:a", "-vf", "scale=320:-2",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(dst))
    return dst


def make_late_audio(src: Path, dst: Path, offset: float = 1.0) -> Path:
    """The video of `src` with its audio starting `offset` seconds later (.mp4)."""
    _ffmpeg("-i", str(src), "-itsoffset", str(offset), "-i", str(src), "-map", "0:v", "-map", "1:a",
            "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(dst))
    return dst


def make_timestamp_jump(src: Path, dst: Path, after_frame: int = 40, jump_s: float = 600.0) -> Path:
    """The same 75 frames, but from frame `after_frame` on stamped `jump_s` later (.mp4): a 3-s
    file whose video timestamps span 603 s."""
    _ffmpeg("-i", str(src), "-vf", f"setpts='if(gte(N,{after_frame}),PTS+{jump_s}/TB,PTS)'",
            "-fps_mode", "passthrough", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(dst))
    return dst


def make_scaled(src: Path, dst: Path, width: int, height: int, audio: bool = True, seconds: float | None = None) -> Path:
    args = ["-i", str(src), *(["-t", str(seconds)] if seconds else []), "-vf", f"scale={width}:{height}",
            "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    _ffmpeg(*args, *(["-c:a", "aac"] if audio else ["-an"]), str(dst))
    return dst


def damage_packets(src: Path, dst: Path, stream_id: int, t_from: float, t_to: float, duration: float) -> Path:
    """Overwrite the payload of the MPEG-PS packets of one stream (0xC0 audio, 0xE0 video) that lie
    between t_from and t_to (by position in the file) with random bytes; the rest is untouched."""
    data = bytearray(src.read_bytes())
    code = bytes([0, 0, 1, stream_id])
    starts, at = [], data.find(code)
    while at >= 0:
        starts.append(at)
        at = data.find(code, at + 4)
    rng = np.random.default_rng(0)
    hit = 0
    for k, pos in enumerate(starts):
        if t_from <= k / len(starts) * duration < t_to:
            length = int.from_bytes(data[pos + 4:pos + 6], "big")
            lo, hi = pos + 6 + 16, pos + 6 + length  # keep the packet header (and its timestamps)
            if hi - lo > 16:
                data[lo:hi] = rng.integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
                hit += 1
    assert hit > 0, "no packet damaged"
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def made(shared_data, tmp_path_factory) -> dict[str, Path]:
    src, picture = shared_data / GRID, shared_data / FACE
    d = tmp_path_factory.mktemp("faults_media")
    return {
        "cover_mp3": make_cover_art(src, picture, d / "cover.mp3"),
        "cover_m4a": make_cover_art(src, picture, d / "cover.m4a"),
        "bad_audio": damage_packets(src, d / "bad_audio.mpg", 0xC0, 1.0, 1.6, 3.0),
        "bad_video": damage_packets(src, d / "bad_video.mpg", 0xE0, 0.3, 0.8, 3.0),
        "still": make_still_with_audio(picture, src, d / "still.mp4"),
        "late": make_late_audio(src, d / "late.mp4"),
        "jump": make_timestamp_jump(src, d / "jump.mp4"),
        "tiny": make_scaled(src, d / "tiny.mp4", 40, 32),
        "tiny_silent": make_scaled(src, d / "tiny_silent.mp4", 40, 32, audio=False),
        "px48": make_scaled(src, d / "px48.mp4", 48, 48, audio=False),
        "px96": make_scaled(src, d / "px96.mp4", 96, 96, audio=False, seconds=1),
        "uhd": make_scaled(src, d / "uhd.mp4", 3840, 2160, seconds=1),
    }


# ---- fast: the decoders on the made media ---------------------------------------------------

def test_cover_picture_is_no_video_stream(made):
    for name in ("cover_mp3", "cover_m4a"):
        assert video.probe_streams(made[name]).cover_only
        assert video.open_video(made[name]) == (None, None), name
        wav = audio.decode_audio(made[name], None, 0.0, None)
        assert abs(len(wav) / audio.SAMPLE_RATE - 3.0) < 0.1, name


def test_damaged_audio_packets_raise_an_audio_only_error_in_plain_words(made):
    with pytest.raises(video.DecodeError) as err:
        audio.decode_audio_segment(made["bad_audio"], 0.0, 0.0, 3.0)
    assert err.value.stream == "audio" and "damaged" in err.value.reason
    assert not INTERNALS.search(err.value.reason), err.value.reason
    reader, info = video.open_video(made["bad_audio"])  # the video stream is intact
    assert info.n_source_frames == 75
    assert video_checks.SegmentCheck(made["bad_audio"], info, 0.0, 3.0).reason() is None


def test_damaged_video_packets_in_the_middle_are_found(made, shared_data):
    _, info = video.open_video(made["bad_video"])  # decord hides the damage
    reason = video_checks.SegmentCheck(made["bad_video"], info, 0.0, 3.0).reason()
    assert reason is not None and "damaged" in reason and not INTERNALS.search(reason)
    video_checks.check_intact(made["bad_video"], info)  # its end is fine: not a file cut short
    _, good = video.open_video(shared_data / GRID)
    assert video_checks.SegmentCheck(shared_data / GRID, good, 0.0, 3.0).reason() is None
    assert video_checks.SegmentCheck(shared_data / GRID, good, 1.1, 2.4).reason() is None  # a seek is no damage


def test_late_audio_is_not_marked_present_over_its_padding(made):
    track = audio.decode_audio_segment(made["late"], 0.0, 0.0, 3.0)
    assert abs(track.lead / audio.SAMPLE_RATE - 1.0) < 0.05 and not track.wav[:track.lead].any()
    fbank, mask = audio.log_mel_fbank(track.wav, 300, 80, first_sample=track.lead)
    first = int(np.argmax(mask))
    assert abs(first - 100) <= 3, first
    assert not mask[:first].any() and mask[first:].mean() > 0.95
    assert not fbank[:first].any() and fbank[first:].std() > 1


def test_timestamp_jump_is_refused_not_stretched(made):
    with pytest.raises(video.DecodeError) as err:
        video.open_video(made["jump"], max_duration_ratio=2.0)
    assert err.value.stream == "video" and "timestamps jump by 600.0 s" in err.value.reason
    _, info = video.open_video(made["jump"])  # without the check: 75 frames over 603 s
    assert info.n_source_frames == 75 and info.duration_s > 600


def test_large_frames_are_downscaled_while_decoding(made):
    reader, info = video.open_video(made["uhd"], max_side=720)
    assert (info.width, info.height, info.source_width, info.source_height) == (720, 404, 3840, 2160)
    frames = reader.get_batch([0, 10]).asnumpy()
    assert frames.shape == (2, 404, 720, 3) and frames.std() > 20
    full, big = video.open_video(made["uhd"])
    assert (big.width, big.height, big.downscale) == (3840, 2160, 1.0)
    # the small picture is the big one, smaller: same face where the big one has it
    small = frames[0].astype(float)
    ref = full.get_batch([0]).asnumpy()[0].astype(np.float32)
    import torch
    shrunk = torch.nn.functional.interpolate(torch.from_numpy(ref).permute(2, 0, 1)[None], size=(404, 720),
                                             mode="area")[0].permute(1, 2, 0).numpy()
    assert np.abs(small - shrunk).mean() < 6
    assert video.decode_size(640, 360, 720) is None and video.decode_size(1080, 1920, 720) == (404, 720)


def test_frame_sizes_decord_mishapes_still_decode_to_rgb(made):
    reader, info = video.open_video(made["px96"])  # decord alone returns 4-channel garbage at 96x96
    frame = reader.get_batch([3]).asnumpy()[0]
    assert frame.shape[2] == 3 and info.width >= 96
    cmd = ["ffmpeg", "-v", "error", "-i", str(made["px96"]), "-vf", f"select=eq(n\\,3),scale={info.width}:{info.height}",
           "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    ref = np.frombuffer(subprocess.run(cmd, capture_output=True, check=True).stdout, np.uint8)
    assert np.abs(frame.astype(int) - ref.reshape(frame.shape)).mean() < 2


@pytest.mark.parametrize("name, size", [("tiny", "40x32"), ("px48", "48x48")])
def test_tiny_video_is_named_in_plain_words(made, name, size):
    with pytest.raises(video.DecodeError) as err:
        video.open_video(made[name])
    assert err.value.stream == "video" and f"{size} pixels: too small" in err.value.reason
    assert not INTERNALS.search(err.value.reason)


def test_decoder_messages_lose_their_internals():
    cases = {
        "[02:43:22] /project/src/runtime/ndarray.cc:171: Check failed: from_size == to_size (9216 vs. 6912)":
            "wrong size",
        "decode_av_frame, /__w/torchcodec/torchcodec/src/torchcodec/_core/SingleStreamDecoder.cpp:1493, Could not "
        "push packet to decoder: Invalid data found when processing input": "damaged packets",
        "[02:43:08] /project/src/video/video_reader.cc:285: [x.mp3] Failed to measure duration/frame-count due to "
        "broken metadata.": "broken or missing metadata",
        "[02:43:38] /project/src/video/video_reader.cc:86: ERROR opening: a.mp4, Invalid data found when "
        "processing input": "Invalid data found when processing input",
    }
    for raw, words in cases.items():
        plain = video.plain_message(raw)
        assert words in plain and not INTERNALS.search(plain), plain


def test_keyframes_always_cover_the_last_picture():
    pictured = np.arange(75)  # a 3-s video in a segment of 90 frames (3.6 s at 25 fps)
    keys = face.keyframes(pictured, 90, 50)
    assert keys.tolist() == [0, 50, 74]  # before: 0, 50 and 89, which has no picture
    assert face.keyframes(np.arange(10, 40), 40, 50).tolist() == [10, 39]
    assert face.keyframes(np.zeros(0, np.int64), 40, 50).tolist() == []


def test_long_ids_give_bounded_distinct_keys():
    short = "video_0001/0001"
    assert sanitize_key(short) == "video_0001_0001"
    a, b = "x" * 236 + "/whole", "x" * 236 + "/other"
    ka, kb = sanitize_key(a), sanitize_key(b)
    assert len(ka) == len(kb) == MAX_KEY_LENGTH and ka != kb
    assert ka.startswith("x" * 50) and re.fullmatch(r"x+-[0-9a-f]{8}", ka)
    assert sanitize_key(a) == ka  # stable
    assert len(sanitize_key("é" * 300)) == MAX_KEY_LENGTH


# ---- slow: `msaflow extract` over all of them -----------------------------------------------

def _write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "") for c in MANIFEST_COLUMNS})
    return path


def _row(id_: str, path: Path, start="", end="") -> dict:
    video_id, _, clip_id = id_.partition("/")
    return {"id": id_, "video_id": video_id, "clip_id": clip_id, "path": str(path), "start": start, "end": end,
            "text": "bin blue at f two now", "label": "0.0", "split": "test"}


@pytest.fixture(scope="module")
def extracted(shared_data, made, tmp_path_factory):
    """One `msaflow extract` run (the CLI, default settings) over every made file,
    plus segments of the real clip: one ending 0.6 s past its end, one typed as 300 s."""
    d = tmp_path_factory.mktemp("faults_extract")
    rows = [_row(f"m/{name}", path) for name, path in made.items() if name not in ("px96", "uhd")]
    rows += [_row("seg/past_end", shared_data / GRID, "0.0", "3.6"),
             _row("seg/typo_300", shared_data / GRID, "0.0", "300")]
    out = d / "out"
    cli = subprocess.run([sys.executable, "-m", "msaflow.pipeline.cli", "extract", str(_write_manifest(d / "m.csv", rows)),
                          "-o", str(out), "--device", "cpu"],
                         capture_output=True, text=True, timeout=900)
    assert cli.returncode == 0, cli.stderr[-3000:]
    summary = json.loads((out / "chunks" / "1-of-1.json").read_text(encoding="utf-8"))
    return {"out": out, "summary": summary, "stdout": cli.stdout}


def _clip(extracted, id_: str) -> dict:
    return read_sample_tar(extracted["out"] / "clips" / f"{sanitize_key(id_)}.tar")[1]


def _failure(extracted, id_: str) -> dict:
    return json.loads((extracted["out"] / "failures" / f"{sanitize_key(id_)}.json").read_text(encoding="utf-8"))


def _warnings(extracted, id_: str) -> list[dict]:
    return [w for w in extracted["summary"]["warnings"] if w["id"] == id_]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cover_mp3", "cover_m4a"])
def test_cover_art_file_keeps_its_audio(extracted, name):
    m = _clip(extracted, f"m/{name}")
    assert abs(m["json"]["duration"] - 3.0) < 0.1 and m["json"]["has_audio"]
    assert m["audio_mask.npy"].mean() > 0.95 and m["json"]["n_face_frames"] == 0


@pytest.mark.slow
def test_damaged_audio_keeps_the_video(extracted):
    m = _clip(extracted, "m/bad_audio")
    assert m["vision_mask.npy"].mean() >= 0.95 and m["json"]["n_frames"] == 75
    assert not m["json"]["has_audio"] and not m["audio_mask.npy"].any() and len(m["wav.npy"]) == 0
    [w] = _warnings(extracted, "m/bad_audio")
    assert w["kind"] == "audio_unusable" and "damaged" in w["reason"] and not INTERNALS.search(w["reason"])
    assert m["json"]["notes"] == [{"kind": w["kind"], "reason": w["reason"]}]


@pytest.mark.slow
def test_damaged_video_keeps_the_audio_and_says_so(extracted):
    m = _clip(extracted, "m/bad_video")
    assert m["json"]["n_face_frames"] == 0 and not m["face.npy"].any()
    assert m["json"]["has_audio"] and m["audio_mask.npy"].mean() > 0.95
    [w] = _warnings(extracted, "m/bad_video")
    assert w["kind"] == "video_unusable" and "damaged inside the clip" in w["reason"]


@pytest.mark.slow
def test_still_picture_keeps_its_three_seconds_of_audio(extracted):
    m = _clip(extracted, "m/still")
    assert abs(m["json"]["duration"] - 3.0) < 0.05, m["json"]["duration"]
    assert abs(len(m["wav.npy"]) / 16000 - 3.0) < 0.05 and m["audio_mask.npy"].mean() > 0.95
    assert m["vision_mask.npy"].mean() > 0.9, "the still face stays on screen, as a player shows it"


@pytest.mark.slow
def test_late_audio_mask_starts_with_the_audio(extracted):
    m = _clip(extracted, "m/late")
    mask = m["audio_mask.npy"]
    assert abs(int(np.argmax(mask)) - 100) <= 3 and not mask[:95].any() and mask[105:].all()
    assert m["json"]["has_audio"] and m["vision_mask.npy"].mean() >= 0.95


@pytest.mark.slow
def test_segment_end_past_the_media_end_is_clamped_and_keeps_the_face(extracted):
    m = _clip(extracted, "seg/past_end")
    assert m["json"]["end"] == 3.0 and m["json"]["n_frames"] == 75
    assert m["vision_mask.npy"].all(), "the tail keeps its face: the last picture is a keyframe"
    [w] = _warnings(extracted, "seg/past_end")
    assert w["kind"] == "segment_clamped" and "3.6 s" in w["reason"]
    assert extracted["summary"]["counts"]["segment_clamped"] == 1


@pytest.mark.slow
def test_segment_far_past_the_media_end_is_a_failure(extracted):
    record = _failure(extracted, "seg/typo_300")
    assert record["stage"] == "segment" and "max_duration_ratio" in record["reason"] and "3.000 s" in record["reason"]


@pytest.mark.slow
def test_timestamp_jump_does_not_become_a_huge_clip(extracted):
    m = _clip(extracted, "m/jump")
    assert m["json"]["duration"] < 3.1 and m["json"]["n_frames"] <= 78 and m["face.npy"].nbytes < 4e6
    [w] = _warnings(extracted, "m/jump")
    assert w["kind"] == "video_unusable" and "timestamps jump" in w["reason"]
    assert m["json"]["has_audio"]


@pytest.mark.slow
def test_tiny_video_failure_or_audio_kept_with_a_plain_reason(extracted):
    kept = _clip(extracted, "m/tiny")  # 40 px with audio: the audio is kept
    assert kept["json"]["has_audio"] and kept["json"]["n_face_frames"] == 0
    [w] = _warnings(extracted, "m/tiny")
    assert "40x32 pixels" in w["reason"] and not INTERNALS.search(w["reason"])
    for name, size in (("tiny_silent", "40x32"), ("px48", "48x48")):  # no audio: nothing usable
        record = _failure(extracted, f"m/{name}")
        assert f"{size} pixels: too small" in record["reason"] and not INTERNALS.search(record["reason"])
    for record in extracted["summary"]["failures"]:
        assert not INTERNALS.search(record["reason"]), record


@pytest.mark.slow
def test_summary_counts_every_note(extracted):
    c = extracted["summary"]["counts"]
    assert c["video_unusable"] == 3  # tiny, jump, bad_video
    assert c["audio_unusable"] == 1 and c["segment_clamped"] == 1
    assert len(extracted["summary"]["warnings"]) == 5
    assert extracted["stdout"].count("WARNING ") == 5


@pytest.mark.slow
def test_240_character_file_name_extracts_and_reruns(shared_data, tmp_path):
    from msaflow.pipeline.extraction.extract import run
    from msaflow.pipeline.extraction.settings import ExtractConfig
    from msaflow.datasets.manifest import write_manifest

    root = tmp_path / "corpus"
    root.mkdir()
    name = "a_very_long_name_" * 14
    name = name[:236] + ".mpg"
    assert len(name) == 240
    (root / name).write_bytes((shared_data / GRID).read_bytes())
    df = build_manifest(root)
    write_manifest(df, tmp_path / "manifest.csv")
    key = sanitize_key(df.loc[0, "id"])
    assert len(key) == MAX_KEY_LENGTH
    cfg = ExtractConfig(fps=5.0, detect_every=2, device="cpu")
    for attempt in (1, 2):  # the second run resumes it
        summary = run(tmp_path / "manifest.csv", tmp_path / "out", cfg, progress=False)
        assert summary["counts"]["ok"] == 1 and summary["counts"]["failed"] == 0, summary["failures"]
        assert summary["counts"]["resumed"] == attempt - 1
    key_read, members = read_sample_tar(tmp_path / "out" / "clips" / f"{key}.tar")
    assert key_read == key and members["json"]["id"] == df.loc[0, "id"]


def _peak_rss_mb(manifest: Path, out: Path) -> float:
    """Peak RSS (MB) of the largest process of one `msaflow extract` job (the CLI or its worker)."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    res = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "msaflow.pipeline.cli", "extract",
                          str(manifest), "-o", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.strip().splitlines()[-1]) / 1024


@pytest.mark.slow
def test_4k_clip_costs_the_memory_of_a_small_one(shared_data, made, tmp_path):
    small = make_scaled(shared_data / GRID, tmp_path / "small.mp4", 640, 360, seconds=1)
    peaks = {}
    for name, path in (("small", small), ("uhd", made["uhd"])):  # 1 s each, 25 frames
        manifest = _write_manifest(tmp_path / f"{name}.csv", [_row(f"m/{name}", path)])
        peaks[name] = _peak_rss_mb(manifest, tmp_path / f"out-{name}")
    # decoded at 3840x2160 the 25 frames alone would be 622 MB, twice over (batch and copy)
    assert peaks["uhd"] < peaks["small"] + 300, peaks
    m = read_sample_tar(tmp_path / "out-uhd" / "clips" / "m_uhd.tar")[1]
    assert m["vision_mask.npy"].mean() >= 0.9 and m["face.npy"][m["vision_mask.npy"]].std() > 20
