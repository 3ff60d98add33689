"""`msaflow extract` end to end on real clips and on bad inputs made from them with ffmpeg.

One run holds the good clips and every bad input (plus a file on which the worker process
is made to abort, as a crashing decoder would); a second run, split into two chunks, holds
the good clips only. Each bad input gets its documented outcome, and the good clips come
out byte-identical in both runs. Low frame rate and short segments keep it fast.
"""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from msaflow.extractors.text import tokenize
from msaflow.pipeline.extraction.extract import parse_chunk, run
from msaflow.pipeline.extraction.settings import ExtractConfig, load_config
from msaflow.datasets.manifest import MANIFEST_COLUMNS, sanitize_key
from msaflow.tario import read_sample_tar

sys.path.insert(0, str(Path(__file__).parent))
import media  # noqa: E402

FAST = {"fps": 5.0, "detect_every": 2, "threads": 1}
REPO = Path(__file__).resolve().parents[1]
NON_ASCII = "C'est très bien, vraiment — ça me plaît ☺"

# the good clips: (id, file under shared data, start, end, text)
GOOD = [
    ("grid/bbaf2n", "raw/grid/bbaf2n.mpg", "", "", "bin blue at f two now"),
    ("hdtf/aoc", "raw/hdtf/hdtf_aoc.mp4", "2.0", "5.0", ""),
    ("grid/lwbsza", "raw/grid/lwbsza.mpg", "", "", NON_ASCII),
]


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "") for c in MANIFEST_COLUMNS})
    return path


def _row(id_: str, path: Path | str, start="", end="", text="", split="train") -> dict:
    video_id, _, clip_id = id_.partition("/")
    return {"id": id_, "video_id": video_id, "clip_id": clip_id, "path": str(path), "start": start,
            "end": end, "text": text, "label": "0.5", "split": split}


@pytest.fixture(scope="module")
def bad_media(shared_data, tmp_path_factory) -> dict[str, Path]:
    src = shared_data / "raw/grid/sbia1a.mpg"
    d = tmp_path_factory.mktemp("bad_media")
    crash = d / "crash_me.mpg"
    crash.write_bytes(src.read_bytes())
    return {
        "truncated": media.make_truncated(src, d / "truncated.mpg"),
        "zero": media.make_zero_bytes(d / "zero.mp4"),
        "text": media.make_text_as_video(d / "notes.mp4"),
        "no_audio": media.make_video_without_audio(src, d / "no_audio.mpg"),
        "audio_only": media.make_audio_only(src, d / "audio_only.m4a"),
        "no_face": media.make_no_face(src, d / "no_face.mp4"),
        "vfr": media.make_vfr(src, d / "vfr.mp4"),
        "rotated": media.make_rotated(src, d / "rotated.mp4"),
        "gray": media.make_grayscale(src, d / "gray.mkv"),
        "8khz": media.make_8khz_mono(src, d / "8khz.mkv"),
        "crash": crash,
    }


@pytest.fixture(scope="module")
def runs(shared_data, bad_media, tmp_path_factory):
    """(out dir of the run with bad inputs, out dir of the good-only run, manifest rows)."""
    d = tmp_path_factory.mktemp("extract")
    good = [_row(i, shared_data / p, s, e, t) for i, p, s, e, t in GOOD]
    bad = [_row(f"bad/{name}", path, text="some words") for name, path in bad_media.items()]
    bad.append(_row("bad/../../escape", shared_data / "raw/grid/bbaf2n.mpg", "0.0", "1.0", "up"))
    bad.append(_row("bad/start_nan", shared_data / "raw/grid/bbaf2n.mpg", "soon", "", ""))
    mixed = [bad[0], good[0], *bad[1:6], good[1], *bad[6:], good[2]]  # good clips between bad ones
    config = d / "workflow.yaml"
    config.write_text(yaml.safe_dump({"extract": FAST}), encoding="utf-8")

    # the run with bad inputs: through the CLI, as a user runs it
    out_mixed = d / "mixed"
    env = {**os.environ, "MSAFLOW_FAULT_ABORT_ON": "crash_me.mpg"}
    cli = subprocess.run([sys.executable, "-m", "msaflow.pipeline.cli", "extract",
                          str(_write_manifest(d / "mixed.csv", mixed)), "-o", str(out_mixed),
                          "--mode", "raw", "--config", str(config), "--device", "cpu"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert cli.returncode == 0, cli.stderr[-3000:]

    # the good clips alone, in two chunks, through the Python entry point
    out_good = d / "good"
    manifest_good = _write_manifest(d / "good.csv", good)
    cfg = ExtractConfig(**FAST, device="cpu")
    summaries = [run(manifest_good, out_good, cfg, (k, 2), progress=False) for k in (1, 2)]
    return {"mixed": out_mixed, "good": out_good, "stdout": cli.stdout, "rows": mixed,
            "summaries": summaries, "manifest_mixed": d / "mixed.csv", "cfg": cfg}


def _clip(out: Path, id_: str) -> dict:
    key, members = read_sample_tar(out / "clips" / f"{sanitize_key(id_)}.tar")
    assert key == sanitize_key(id_)
    return members


def _failure(out: Path, id_: str) -> dict:
    import json

    return json.loads((out / "failures" / f"{sanitize_key(id_)}.json").read_text(encoding="utf-8"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("id_, duration", [("grid/bbaf2n", 3.0), ("hdtf/aoc", 3.0), ("grid/lwbsza", 3.0)])
def test_real_clips_meet_the_contract(runs, id_, duration):
    m = _clip(runs["mixed"], id_)
    meta = m["json"]
    fps = FAST["fps"]
    assert abs(meta["n_frames"] - duration * fps) <= 1
    assert m["face.npy"].shape == (meta["n_frames"], 112, 112, 3) and m["face.npy"].dtype == np.uint8
    assert m["vision_mask.npy"].dtype == bool and m["vision_mask.npy"].shape == (meta["n_frames"],)
    assert m["vision_mask.npy"].mean() >= 0.95, "a face in at least 95% of sampled frames"
    assert meta["n_face_frames"] == m["vision_mask.npy"].sum()
    assert m["face.npy"][m["vision_mask.npy"]].std() > 20, "crops hold image content"
    fbank = m["fbank.npy"]
    assert fbank.dtype == np.float32 and fbank.shape[1] == 80 and abs(fbank.shape[0] - duration * 100) <= 2
    assert m["audio_mask.npy"].shape == (fbank.shape[0],) and m["audio_mask.npy"].mean() > 0.95
    assert m["wav.npy"].dtype == np.int16 and abs(len(m["wav.npy"]) - duration * 16000) <= 1600
    assert meta["has_audio"] and meta["sample_rate"] == 16000 and meta["mode"] == "raw"
    text = next(r["text"] for r in runs["rows"] if r["id"] == id_)
    assert m["text_ids.npy"].dtype == np.int64
    assert m["text_ids.npy"].tolist() == tokenize(text)
    assert meta["text"] == text and meta["has_text"] == bool(text)
    assert set(m) == {"json", "face.npy", "vision_mask.npy", "wav.npy", "fbank.npy", "audio_mask.npy", "text_ids.npy"}


def test_empty_text_is_kept_as_cls_sep(runs):
    m = _clip(runs["mixed"], "hdtf/aoc")
    assert m["text_ids.npy"].tolist() == tokenize("") and len(m["text_ids.npy"]) == 2
    assert m["json"]["has_text"] is False


def test_segment_is_cut_while_decoding(runs):
    meta = _clip(runs["mixed"], "hdtf/aoc")["json"]
    assert (meta["start"], meta["end"], meta["duration"]) == (2.0, 5.0, 3.0)


def test_good_clips_identical_with_or_without_bad_inputs_and_chunks(runs):
    for id_, *_ in GOOD:
        name = f"{sanitize_key(id_)}.tar"
        assert _sha(runs["mixed"] / "clips" / name) == _sha(runs["good"] / "clips" / name), id_


@pytest.mark.parametrize("name, stage, words", [
    ("truncated", {"open", "decode_video"}, ""),
    ("zero", {"open"}, "0 bytes"),
    ("text", {"open"}, "cannot read the container"),
    ("crash", {"worker"}, "SIGABRT"),
])
def test_undecodable_files_become_failures(runs, name, stage, words):
    record = _failure(runs["mixed"], f"bad/{name}")
    assert record["stage"] in stage and words in record["reason"]
    assert record["id"] == f"bad/{name}" and record["path"].endswith(Path(record["path"]).name)
    assert not (runs["mixed"] / "clips" / f"bad_{name}.tar").exists()
    assert f"FAILED bad/{name}" in runs["stdout"]


def test_unparsable_row_is_a_failure_naming_the_row(runs):
    record = _failure(runs["mixed"], "bad/start_nan")
    assert record["stage"] == "manifest" and "row" in record["reason"] and "'soon'" in record["reason"]


def test_video_without_audio_is_kept_with_audio_missing(runs):
    m = _clip(runs["mixed"], "bad/no_audio")
    assert m["json"]["has_audio"] is False and len(m["wav.npy"]) == 0
    assert not m["audio_mask.npy"].any() and not m["fbank.npy"].any()
    assert m["fbank.npy"].shape == (300, 80)
    assert m["vision_mask.npy"].mean() >= 0.95


def test_audio_only_file_is_kept_with_vision_missing(runs):
    m = _clip(runs["mixed"], "bad/audio_only")
    assert abs(m["json"]["n_frames"] - 3 * FAST["fps"]) <= 1
    assert m["json"]["n_face_frames"] == 0 and not m["vision_mask.npy"].any() and not m["face.npy"].any()
    assert m["json"]["has_audio"] and m["audio_mask.npy"].mean() > 0.95


def test_video_without_a_face_is_kept_with_vision_missing(runs):
    m = _clip(runs["mixed"], "bad/no_face")
    assert m["json"]["n_face_frames"] == 0 and not m["face.npy"].any()
    assert m["json"]["has_audio"]


@pytest.mark.parametrize("name", ["vfr", "rotated", "gray", "8khz"])
def test_unusual_but_valid_media_extract_normally(runs, name, shared_data):
    m = _clip(runs["mixed"], f"bad/{name}")
    assert abs(m["json"]["n_frames"] - 3 * FAST["fps"]) <= 1
    assert m["vision_mask.npy"].mean() >= 0.95, "rotation metadata applied, gray converted to RGB"
    assert abs(m["fbank.npy"].shape[0] - 300) <= 2 and m["audio_mask.npy"].mean() > 0.95
    if name == "gray":
        faces = m["face.npy"][m["vision_mask.npy"]].astype(int)
        assert np.abs(faces[..., 0] - faces[..., 1]).max() <= 1
    if name == "8khz":  # resampled to 16 kHz: the same speech as the source's 44.1 kHz track
        from msaflow.extractors.audio import decode_audio

        wav = m["wav.npy"].astype(float)
        src = decode_audio(shared_data / "raw/grid/sbia1a.mpg", 0.0, 0.0, 3.0).astype(float)
        n = min(len(wav), len(src))
        assert abs(len(wav) - len(src)) <= 160
        assert np.corrcoef(wav[:n], src[:n])[0, 1] > 0.9


def test_dotdot_id_stays_inside_the_output(runs):
    m = _clip(runs["mixed"], "bad/../../escape")
    assert m["json"]["id"] == "bad/../../escape"
    files = {p.name for p in runs["mixed"].parent.iterdir()}
    assert "escape.tar" not in files and not (runs["mixed"].parent.parent / "escape.tar").exists()


def test_chunk_summary_counts_everything(runs):
    import json

    summary = json.loads((runs["mixed"] / "chunks" / "1-of-1.json").read_text(encoding="utf-8"))
    c = summary["counts"]
    n_rows = len(runs["rows"])
    assert c["clips"] == n_rows and c["ok"] + c["failed"] == n_rows
    assert c["failed"] == len(list((runs["mixed"] / "failures").glob("*.json"))) == 5
    assert c["ok"] == len(list((runs["mixed"] / "clips").glob("*.tar")))
    assert c["no_face"] == 2 and c["no_audio"] == 1 and c["empty_text"] == 1  # start_nan (empty text) failed
    assert c["worker_restarts"] == 1
    assert all(summary["seconds"][s] >= 0 for s in ("decode", "detect", "crop", "fbank", "write"))
    assert summary["seconds"]["detect"] > 0
    assert not list((runs["mixed"] / "tmp").glob("*/*")), "scratch files removed"
    good = runs["summaries"]
    assert [s["chunk"] for s in good] == ["1/2", "2/2"]
    assert [s["counts"]["ok"] for s in good] == [2, 1]  # rows 1, 3 and row 2


def test_rerun_resumes_without_rewriting(runs):
    out = runs["good"]
    before = {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in (out / "clips").glob("*.tar")}
    summary = run(runs["manifest_mixed"].with_name("good.csv"), out, runs["cfg"], (1, 2), progress=False)
    assert summary["counts"]["resumed"] == summary["counts"]["clips"] == 2
    assert summary["counts"]["worker_restarts"] == 0
    after = {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in (out / "clips").glob("*.tar")}
    assert after == before


def test_config_yaml_forms(tmp_path):
    section = tmp_path / "extract.yaml"
    section.write_text("fps: 10\n", encoding="utf-8")
    workflow = tmp_path / "workflow.yaml"
    workflow.write_text("dataset: {}\nextract:\n  fps: 12\n", encoding="utf-8")
    assert load_config(section).fps == 10 and load_config(workflow).fps == 12
    assert load_config(REPO / "config" / "extract.yaml") == ExtractConfig()
    typo = tmp_path / "typo.yaml"
    typo.write_text("fsp: 10\n", encoding="utf-8")
    with pytest.raises(ValueError, match="fsp"):
        load_config(typo)


def test_parse_chunk():
    import argparse

    assert parse_chunk("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "x", "1-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_chunk(bad)


@pytest.mark.slow
def test_full_clips_at_default_settings(shared_data, tmp_path):
    """Every GRID clip, both HDTF clips and the stage clip, whole, at the default config."""
    clips = sorted((shared_data / "raw/grid").glob("*.mpg")) + sorted((shared_data / "raw/hdtf").glob("*.mp4"))
    rows = [_row(f"{p.parent.name}/{p.stem}", p, text=p.stem) for p in clips]
    stage = shared_data / "raw/hamilton/short_hamilton_clip.mp4"
    rows.append(_row("hamilton/stage", stage, text="stage"))
    out = tmp_path / "out"
    summary = run(_write_manifest(tmp_path / "m.csv", rows), out, ExtractConfig(device="cpu"), progress=False)
    assert summary["counts"]["ok"] == len(rows) and summary["counts"]["failed"] == 0
    for row in rows:
        m = _clip(out, row["id"])
        meta = m["json"]
        _, info = __import__("msaflow.extractors.video", fromlist=["open_video"]).open_video(row["path"])
        assert abs(meta["n_frames"] - info.duration_s * 25) <= 1
        assert abs(m["fbank.npy"].shape[0] - info.duration_s * 100) <= 2
        assert m["face.npy"].shape[1:] == (112, 112, 3)
        assert m["text_ids.npy"].tolist() == tokenize(row["text"])
        if row["id"] != "hamilton/stage":
            assert m["vision_mask.npy"].mean() >= 0.95, row["id"]
    stage_mask = _clip(out, "hamilton/stage")["vision_mask.npy"]
    assert 0 < stage_mask.sum() < len(stage_mask)  # the main performer, present part of the time


def test_long_clip_path_gives_the_same_sample_as_one_chunk(shared_data, tmp_path):
    """A clip longer than `chunk_frames` takes the bounded-memory path (sparse detection
    decoding, crops written to disk chunk by chunk): same crops, mask and fbank as the
    one-chunk path. The clip has frames without the kept face, so the zero filling is exercised."""
    from msaflow.extractors.clip import ClipExtractor, ClipJob
    from msaflow.tario import read_sample_tar

    src = tmp_path / "long.mp4"  # a GRID clip twice, the picture blacked out from 2.0 to 3.5 s
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-i", str(media.make_concatenated(
        [shared_data / "raw/grid/bbaf2n.mpg"], tmp_path / "two.mp4", repeat=2)),
        "-vf", "drawbox=enable='between(t,2,3.5)':color=black:t=fill", "-c:v", "libx264", "-preset", "ultrafast",
        "-c:a", "copy", str(src)], check=True)
    job = ClipJob(row=1, id="long/x", key="long_x", video_id="long", clip_id="x", path=str(src), start=None,
                  end=None, text="", label=0.0, split="train")
    samples = {}
    for chunk in (500, 16):
        out = tmp_path / f"chunk{chunk}"
        (out / "clips").mkdir(parents=True)
        cfg = ExtractConfig(fps=10.0, detect_every=10, chunk_frames=chunk, threads=1)
        ClipExtractor(cfg, device="cpu").extract(job, out)
        samples[chunk] = read_sample_tar(out / "clips" / "long_x.tar")[1]
    whole, chunked = samples[500], samples[16]
    mask = whole["vision_mask.npy"]
    # 1.5 s without a face is longer than max_gap: the two appearances are two tracks, one is kept
    assert 0.25 < mask.mean() < 0.5 and not mask[20:35].any()
    for name in ("face.npy", "vision_mask.npy", "fbank.npy", "audio_mask.npy"):
        np.testing.assert_array_equal(chunked[name], whole[name], err_msg=name)
    assert not whole["face.npy"][~mask].any()
