"""Front-end registry, specs, CREPE pitch on real speech, raw -> features on real clips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from msaflow.extractors import frontends as F
from msaflow.extractors.crepe import HOP, SAMPLE_RATE, median_f0, n_steps_for

VOICED = 0.21  # periodicity threshold for "voiced" (torchcrepe's recommended silence/unvoiced cut)


# ------------------------------------------------------------------ helpers on real media


def decode_wav(path) -> np.ndarray:
    """16 kHz mono int16, decoded with torchcodec."""
    from torchcodec.decoders import AudioDecoder

    samples = AudioDecoder(str(path), sample_rate=SAMPLE_RATE, num_channels=1).get_all_samples()
    return (samples.data[0].numpy() * 32767).round().clip(-32768, 32767).astype(np.int16)


def raw_members(path, text: str, face_size: int = 112, drop_faces: tuple[int, ...] = ()) -> dict:
    """Raw-mode members of a whole clip (data contract §3), made from the real file."""
    import decord
    from facenet_pytorch import MTCNN
    from PIL import Image

    from msaflow.extractors.text import tokenize

    reader = decord.VideoReader(str(path))
    fps = float(reader.get_avg_fps())
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    mtcnn = MTCNN(image_size=face_size, margin=16, post_process=False)
    crops = mtcnn([Image.fromarray(f) for f in frames])
    face = np.zeros((len(frames), face_size, face_size, 3), np.uint8)
    vision_mask = np.zeros(len(frames), bool)
    for i, crop in enumerate(crops):
        if crop is not None and i not in drop_faces:
            face[i] = crop.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
            vision_mask[i] = True
    wav = decode_wav(path)
    duration = len(frames) / fps
    n_steps = int(round(duration * 100))
    fbank = _fbank(wav, n_steps)
    ids = np.asarray(tokenize(text), np.int64)
    meta = {"id": f"test/{path.stem}", "duration": duration, "fps": fps, "n_frames": len(frames),
            "sample_rate": SAMPLE_RATE, "has_audio": True, "has_text": bool(text), "mode": "raw"}
    return {"json": meta, "face.npy": face, "vision_mask.npy": vision_mask, "wav.npy": wav,
            "fbank.npy": fbank, "audio_mask.npy": np.ones(n_steps, bool), "text_ids.npy": ids}


def _fbank(wav: np.ndarray, n_steps: int) -> np.ndarray:
    import torchaudio

    feats = torchaudio.compliance.kaldi.fbank(torch.from_numpy(wav.astype(np.float32))[None], num_mel_bins=80,
                                              sample_frequency=SAMPLE_RATE, snip_edges=False).numpy()
    out = np.zeros((n_steps, 80), np.float32)
    out[: min(n_steps, len(feats))] = feats[:n_steps]
    return out


@pytest.fixture(scope="module")
def default_frontends():
    return F.build(F.DEFAULT_SPEC, "cpu")


@pytest.fixture(scope="module")
def grid_clip(shared_data):
    return raw_members(shared_data / "raw" / "grid" / "bbaf2n.mpg", "bin blue at f two now", drop_faces=(3, 4, 40))


# ------------------------------------------------------------------ registry and specs


def test_registry_has_the_builtin_frontends():
    assert {"fer", "crepe-tiny", "crepe-full", "minilm", "hf-text", "facenet-vggface2", "egemaps"} <= set(F.REGISTRY)
    for name, cls in F.REGISTRY.items():
        assert cls.name == name and cls.modality in F.MODALITIES and cls.input in F.INPUT_MEMBERS


def test_parse_spec_aliases_defaults_and_errors():
    assert F.parse_spec(F.DEFAULT_SPEC) == {"vision": "fer", "audio": "crepe-tiny", "text": "minilm"}
    assert F.parse_spec("audio=crepe-full") == {"vision": "fer", "audio": "crepe-full", "text": "minilm"}
    assert F.parse_spec(" vision = fer , text=hf-text:/models/bert")["text"] == "hf-text:/models/bert"
    with pytest.raises(ValueError, match="unknown front-end 'resnet'.*registered: crepe-full, crepe-tiny"):
        F.parse_spec("face=resnet")
    with pytest.raises(ValueError, match="'minilm' is a text front-end, not audio"):
        F.parse_spec("audio=minilm")
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        F.parse_spec("smell=fer")
    with pytest.raises(ValueError, match="not MODALITY=NAME"):
        F.parse_spec("fer")
    with pytest.raises(ValueError, match="'fer' is a vision front-end, not audio"):
        F.build({"audio": "fer"})  # dict specs (end-to-end training) are checked the same way


def test_register_rejects_a_second_class_under_a_taken_name():
    class Impostor(F.FrontEnd):
        name, modality, input = "fer", "vision", "face"

    with pytest.raises(ValueError, match="registered twice"):
        F.register(Impostor)


def test_build_is_frozen_and_described(default_frontends):
    desc = F.describe(default_frontends)
    assert set(desc) == {"vision", "audio", "text"}
    assert desc["vision"]["name"] == "fer" and desc["vision"]["dim"] == 135
    assert desc["vision"]["weights"] == "msaflow/extractors/weights/fer2013_mini_xception.safetensors"  # shipped
    assert desc["audio"]["dim"] == 258 and desc["audio"]["rate"] == 100.0
    assert desc["text"]["dim"] == 384 and desc["text"]["rate"] is None
    for modality, fe in default_frontends.items():
        assert len(desc[modality]["sha256"]) == 64 and desc[modality]["sha256"] == fe.weights_sha256()
        assert not fe.training and not any(p.requires_grad for p in fe.parameters())
    json.dumps(desc)  # index.json-ready


def test_freeze_unfreeze_serve_training(default_frontends):
    fe = F.build("face=fer")["vision"]
    fe.train()  # a parent's .train() keeps a frozen front-end in eval mode (fixed BatchNorm statistics)
    assert not fe.training
    fe.unfreeze()
    assert fe.training and all(p.requires_grad for p in fe.parameters())
    faces = torch.randint(0, 256, (2, 3, 48, 48, 3), dtype=torch.uint8)
    fe(faces).sum().backward()
    assert fe.net.graph.blocks["conv2d_1"].conv.weight.grad.abs().sum() > 0
    fe.freeze()
    assert not fe.training and not any(p.requires_grad for p in fe.parameters())


def test_facenet_without_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "checkpoints" / "20180402-114759-vggface2.pt"
    with pytest.raises(FileNotFoundError, match=f"weights not found at {expected}"):
        F.build("face=facenet-vggface2,text=minilm")


def test_facenet_loads_a_checkpoint_from_torch_home(tmp_path, monkeypatch):
    """The loading path, with a checkpoint laid out as facenet-pytorch's VGGFace2 file
    (backbone + 8631-way identity classifier); the real weights cannot be fetched here."""
    from facenet_pytorch import InceptionResnetV1

    (tmp_path / "checkpoints").mkdir()
    torch.manual_seed(0)
    state = InceptionResnetV1(classify=True, num_classes=8631).state_dict()
    torch.save(state, tmp_path / "checkpoints" / "20180402-114759-vggface2.pt")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    fe = F.build({"vision": "facenet-vggface2"})["vision"]
    torch.testing.assert_close(fe.net.last_linear.weight, state["last_linear.weight"])
    with torch.no_grad():
        out = fe(torch.randint(0, 256, (1, 3, 112, 112, 3), dtype=torch.uint8), torch.tensor([[True, False, True]]))
    assert out.shape == (1, 3, 512) and not out[0, 1].any()
    torch.testing.assert_close(out[0, [0, 2]].norm(dim=-1), torch.ones(2))  # unit-length embeddings


def test_hf_text_needs_a_local_folder(tmp_path):
    with pytest.raises(ValueError, match="hf-text needs a local model folder"):
        F.build("text=hf-text")
    with pytest.raises(FileNotFoundError, match="config.json"):
        F.build(f"text=hf-text:{tmp_path}")


# ------------------------------------------------------------------ CREPE on real audio


def test_crepe_pitch_of_a_220_hz_tone(default_frontends):
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.5 * 32767 * np.sin(2 * np.pi * 220.0 * t)).astype(np.int16)
    feats = default_frontends["audio"].extract(tone, n_steps_for(len(tone)))
    f0, voiced = median_f0(feats, VOICED)
    assert feats.shape == (300, 258)
    assert abs(f0 - 220.0) <= 2.0, f0
    assert voiced > 0.95


@pytest.mark.parametrize("clip", ["hdtf_aoc.mp4", "hdtf_katiehill.mp4"])
def test_crepe_on_hdtf_speech(shared_data, default_frontends, clip):
    import torchcrepe

    wav = decode_wav(shared_data / "raw" / "hdtf" / clip)
    feats = default_frontends["audio"].extract(wav, n_steps_for(len(wav)))
    f0, voiced = median_f0(feats, VOICED)
    assert voiced >= 0.6, f"only {voiced:.0%} of frames voiced"  # measured 80% and 80%
    assert 80.0 <= f0 <= 400.0, f0  # measured 212 Hz and 157 Hz
    # per frame, the same pitch as torchcrepe's own pipeline on the first 3 s (its per-frame
    # Python decoder is slow); frames are centred 5 ms apart and its decoder dithers the bins
    n = n_steps_for(3 * SAMPLE_RATE)
    head = torch.from_numpy(wav[: 3 * SAMPLE_RATE] / 32768.0).float()[None]
    reference, periodicity = torchcrepe.predict(head, SAMPLE_RATE, HOP, 50.0, 2006.0, "tiny",
                                                decoder=torchcrepe.decode.weighted_argmax,
                                                return_periodicity=True, batch_size=1024)
    reference, periodicity = reference[0, :n].numpy(), periodicity[0, :n].numpy()
    both = (periodicity > VOICED) & (feats[:n, 1] > VOICED)
    cents = 1200 * np.abs(feats[:n, 0][both] + np.log2(100.0 / reference[both]))
    assert both.mean() > 0.5 and np.median(cents) < 25, np.median(cents)  # measured 7 and 8 cents


def test_crepe_chunked_extraction_equals_whole_clip(shared_data, tmp_path):
    fe = F.build("audio=crepe-tiny")["audio"]
    wav = decode_wav(shared_data / "raw" / "hdtf" / "hdtf_aoc.mp4")[: 2 * SAMPLE_RATE + 77]
    with torch.no_grad():
        whole = fe(torch.from_numpy(wav)[None])[0].numpy()
    np.save(tmp_path / "wav.npy", wav)
    fe.chunk_steps = 37  # many chunk borders
    chunked = fe.extract(np.load(tmp_path / "wav.npy", mmap_mode="r"), n_steps_for(len(wav)))
    assert whole.shape == chunked.shape == (200, 258)
    np.testing.assert_allclose(chunked, whole, atol=1e-4)


# ------------------------------------------------------------------ raw -> features


def test_raw_to_features_on_a_grid_clip(grid_clip, default_frontends, tmp_path):
    timings = {}
    out = F.raw_to_features(grid_clip, default_frontends, timings)
    assert set(out) == {"json", "vision.npy", "vision_mask.npy", "audio.npy", "audio_mask.npy", "text.npy", "text_ids.npy"}
    meta = out["json"]
    assert meta["mode"] == "features" and meta["frontends"] == F.describe(default_frontends)
    duration = meta["duration"]
    # frame counts: duration x rate (+-1) for every modality, and exactly the raw ones
    assert abs(len(out["vision.npy"]) - duration * meta["fps"]) <= 1
    assert abs(len(out["audio.npy"]) - duration * 100) <= 1
    assert len(out["vision.npy"]) == len(grid_clip["face.npy"])
    assert len(out["audio.npy"]) == len(grid_clip["fbank.npy"])
    assert out["text.npy"].shape == (len(grid_clip["text_ids.npy"]), 384)
    assert all(out[k].dtype == np.float32 for k in ("vision.npy", "audio.npy", "text.npy"))
    # missing faces are zero rows, present ones carry 7 probabilities summing to 1
    vmask = out["vision_mask.npy"]
    np.testing.assert_array_equal(vmask, grid_clip["vision_mask.npy"])
    assert not vmask[[3, 4, 40]].any() and vmask.sum() >= 60
    assert not out["vision.npy"][~vmask].any()
    np.testing.assert_allclose(out["vision.npy"][vmask, -7:].sum(1), 1.0, atol=1e-5)
    # a GRID speaker says a 6-word sentence: voiced speech, a plausible pitch
    f0, voiced = median_f0(out["audio.npy"], VOICED)
    assert 80 <= f0 <= 400 and voiced > 0.3
    np.testing.assert_array_equal(out["text_ids.npy"], grid_clip["text_ids.npy"])
    assert set(timings) == {"vision", "audio", "text"}
    # the same clip given as .npy files (memory-mapped) gives the same features
    as_files = dict(grid_clip)
    for member in ("face.npy", "wav.npy", "vision_mask.npy"):
        np.save(tmp_path / member, grid_clip[member])
        as_files[member] = tmp_path / member
    again = F.raw_to_features(as_files, default_frontends)
    for member in ("vision.npy", "audio.npy", "text.npy"):
        np.testing.assert_allclose(again[member], out[member], atol=1e-5)


def test_text_states_are_the_encoders(grid_clip, default_frontends):
    from msaflow.extractors.text import load_text_encoder

    ids = torch.from_numpy(grid_clip["text_ids.npy"])[None]
    with torch.no_grad():
        expected = load_text_encoder().eval()(input_ids=ids).last_hidden_state[0].numpy()
    got = default_frontends["text"].extract(grid_clip["text_ids.npy"], len(ids[0]))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # hf-text on the same model's folder is the same front-end under another name
    from msaflow.extractors.text import text_model_path

    generic = F.build({"text": f"hf-text:{text_model_path()}"})["text"]
    np.testing.assert_allclose(generic.extract(grid_clip["text_ids.npy"], len(ids[0])), expected, atol=1e-5)
    assert generic.weights_sha256() == default_frontends["text"].weights_sha256()


def test_no_audio_no_face_empty_text(grid_clip, default_frontends):
    members = dict(grid_clip)
    n_steps = len(grid_clip["fbank.npy"])
    members.update({"wav.npy": np.zeros(0, np.int16), "fbank.npy": np.zeros((n_steps, 80), np.float32),
                    "audio_mask.npy": np.zeros(n_steps, bool), "vision_mask.npy": np.zeros(len(grid_clip["face.npy"]), bool),
                    "face.npy": np.zeros_like(grid_clip["face.npy"]), "text_ids.npy": np.array([101, 102], np.int64)})
    out = F.raw_to_features(members, default_frontends)
    assert out["audio.npy"].shape == (n_steps, 258) and not out["audio.npy"].any() and not out["audio_mask.npy"].any()
    assert out["vision.npy"].shape == (len(grid_clip["face.npy"]), 135) and not out["vision.npy"].any()
    assert out["text.npy"].shape == (2, 384)


def test_bad_member_names_the_clip_and_member(grid_clip, default_frontends, tmp_path):
    members = dict(grid_clip)
    members["face.npy"] = grid_clip["face.npy"][:-5]  # fewer crops than the mask has frames
    with pytest.raises(ValueError, match="test/bbaf2n: front-end fer on face.npy: .*70 steps, expected 75"):
        F.raw_to_features(members, default_frontends)
    broken = tmp_path / "wav.npy"
    broken.write_bytes(b"not an npy file")
    members = dict(grid_clip, **{"wav.npy": broken})
    with pytest.raises(ValueError, match=f"member wav.npy: cannot read {broken}"):
        F.raw_to_features(members, default_frontends)
    members = {k: v for k, v in grid_clip.items() if k != "wav.npy"}
    with pytest.raises(KeyError, match="raw member wav.npy missing"):
        F.raw_to_features(members, default_frontends)


def test_egemaps_descriptors_on_speech(shared_data):
    pytest.importorskip("opensmile", reason="optional extra: pip install opensmile")
    fe = F.build("audio=egemaps")["audio"]
    wav = decode_wav(shared_data / "raw" / "hdtf" / "hdtf_katiehill.mp4")
    feats = fe.extract(wav, n_steps_for(len(wav)))
    assert feats.shape == (800, 25) and np.isfinite(feats).all()
    # its own F0 (semitones from 27.5 Hz, 0 when unvoiced): measured 153 Hz, CREPE 157 Hz on this clip
    semitones = feats[:, fe.descriptor_names.index("F0semitoneFrom27.5Hz_sma3nz")]
    f0 = 27.5 * 2 ** (np.median(semitones[semitones > 0]) / 12)
    assert 120 <= f0 <= 190, f0


# ------------------------------------------------------------------ CLI


def test_frontends_command_lists_everything(capsys):
    from msaflow.pipeline.cli import main

    assert main(["frontends", "--json", "fer", "crepe-tiny", "facenet-vggface2"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["frontends"]}
    assert rows["fer"]["dim"] == 135 and rows["fer"]["status"] == "ok" and "MIT" in rows["fer"]["licence"]
    assert rows["crepe-tiny"]["rate"] == 100.0 and len(rows["crepe-tiny"]["sha256"]) == 64
    assert rows["facenet-vggface2"]["status"].startswith("front-end facenet-vggface2: weights not found")
    assert main(["frontends", "nope"]) == 2


# ------------------------------------------------------------------ features mode end to end


@pytest.mark.slow
def test_features_mode_run_has_the_samples_and_failures_of_raw_mode(shared_data, tmp_path):
    """`msaflow extract --mode features` over GRID, HDTF and bad inputs: same clips kept, same
    failures (stage and reason), same frame counts and masks as the raw run of the same manifest."""
    import csv
    import re
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from msaflow.pipeline.extraction.extract import run
    from msaflow.pipeline.extraction.settings import ExtractConfig
    from msaflow.datasets.manifest import MANIFEST_COLUMNS
    from msaflow.tario import read_sample_tar

    sys.path.insert(0, str(Path(__file__).parent))
    import media

    fast = {"fps": 5.0, "detect_every": 2, "threads": 1}
    src = shared_data / "raw/grid/sbia1a.mpg"
    bad = tmp_path / "bad"
    files = {
        "grid/bbaf2n": (shared_data / "raw/grid/bbaf2n.mpg", "", "", "bin blue at f two now"),
        "hdtf/aoc": (shared_data / "raw/hdtf/hdtf_aoc.mp4", "2.0", "5.0", ""),
        "bad/truncated": (media.make_truncated(src, bad / "truncated.mpg"), "", "", "x"),
        "bad/zero": (media.make_zero_bytes(bad / "zero.mp4"), "", "", "x"),
        "bad/text": (media.make_text_as_video(bad / "notes.mp4"), "", "", "x"),
        "bad/no_audio": (media.make_video_without_audio(src, bad / "no_audio.mpg"), "", "", "set blue"),
        "bad/audio_only": (media.make_audio_only(src, bad / "audio_only.m4a"), "", "", "set blue"),
        "bad/no_face": (media.make_no_face(src, bad / "no_face.mp4"), "", "", "set blue"),
        "bad/start_nan": (src, "soon", "", ""),
    }
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for id_, (path, start, end, text) in files.items():
            video_id, _, clip_id = id_.partition("/")
            writer.writerow({c: "" for c in MANIFEST_COLUMNS} | {
                "id": id_, "video_id": video_id, "clip_id": clip_id, "path": str(path), "start": start,
                "end": end, "text": text, "label": "0.5", "split": "train"})
    config = tmp_path / "extract.yaml"
    config.write_text(yaml.safe_dump({"extract": fast}), encoding="utf-8")

    raw_dir, feat_dir = tmp_path / "raw", tmp_path / "features"
    raw_summary = run(manifest, raw_dir, ExtractConfig(**fast, device="cpu"), progress=False)
    cli = subprocess.run([sys.executable, "-m", "msaflow.pipeline.cli", "extract", str(manifest), "-o", str(feat_dir),
                          "--mode", "features", "--frontends", F.DEFAULT_SPEC, "--config", str(config),
                          "--device", "cpu"], capture_output=True, text=True, timeout=1200)
    assert cli.returncode == 0, cli.stderr[-3000:]
    feat_summary = json.loads((feat_dir / "chunks" / "1-of-1.json").read_text(encoding="utf-8"))

    # the same clips kept and the same failures, with the same stage and reason
    assert sorted(p.name for p in (feat_dir / "clips").glob("*.tar")) == \
        sorted(p.name for p in (raw_dir / "clips").glob("*.tar"))
    def failures(out: Path) -> dict:  # decord stamps its messages with the time of day: drop it
        records = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in (out / "failures").glob("*.json")}
        return {n: r | {"reason": re.sub(r"\[\d\d:\d\d:\d\d\] ", "", r["reason"])} for n, r in records.items()}

    assert len(failures(raw_dir)) == 4  # truncated, zero bytes, text file, unparsable start
    assert failures(feat_dir) == failures(raw_dir)
    assert feat_summary["counts"] == raw_summary["counts"]
    assert feat_summary["frontends"]["vision"]["name"] == "fer" and "features" in feat_summary["seconds"]

    dims = {"vision": 135, "audio": 258, "text": 384}
    for tar in sorted((raw_dir / "clips").glob("*.tar")):
        _, raw = read_sample_tar(tar)
        _, feat = read_sample_tar(feat_dir / "clips" / tar.name)
        meta = feat["json"]
        assert meta["mode"] == "features" and meta["frontends"] == feat_summary["frontends"]
        assert {k: v for k, v in meta.items() if k not in ("mode", "frontends")} == \
            {k: v for k, v in raw["json"].items() if k != "mode"}, tar.name
        assert set(feat) == {"json", "vision.npy", "vision_mask.npy", "audio.npy", "audio_mask.npy", "text.npy", "text_ids.npy"}
        np.testing.assert_array_equal(feat["vision_mask.npy"], raw["vision_mask.npy"])
        np.testing.assert_array_equal(feat["audio_mask.npy"], raw["audio_mask.npy"])
        np.testing.assert_array_equal(feat["text_ids.npy"], raw["text_ids.npy"])
        assert feat["vision.npy"].shape == (len(raw["face.npy"]), dims["vision"])
        assert feat["audio.npy"].shape == (len(raw["fbank.npy"]), dims["audio"])
        assert feat["text.npy"].shape == (len(raw["text_ids.npy"]), dims["text"])
        assert abs(len(feat["vision.npy"]) - meta["duration"] * meta["fps"]) <= 1
        assert abs(len(feat["audio.npy"]) - meta["duration"] * 100) <= 1
        for modality in ("vision", "audio"):  # missing steps are zero rows, present ones are not
            rows, mask = feat[f"{modality}.npy"], feat[f"{modality}_mask.npy"]
            assert not rows[~mask].any() and (np.abs(rows[mask]).sum(1) > 0).all(), (tar.name, modality)
    _, no_audio = read_sample_tar(feat_dir / "clips" / "bad_no_audio.tar")
    assert not no_audio["audio_mask.npy"].any() and no_audio["vision_mask.npy"].mean() >= 0.95
    _, no_face = read_sample_tar(feat_dir / "clips" / "bad_no_face.tar")
    assert not no_face["vision_mask.npy"].any() and no_face["audio_mask.npy"].mean() > 0.9


def test_crepe_batch_of_clips_equals_each_clip_alone(shared_data):
    """A padded batch of clips gives each clip the features it gets alone (eval mode)."""
    fe = F.build("audio=crepe-tiny")["audio"].eval()
    wav = torch.from_numpy(decode_wav(shared_data / "raw" / "hdtf" / "hdtf_aoc.mp4")[: 2 * SAMPLE_RATE])
    clips = [wav[:SAMPLE_RATE], wav[SAMPLE_RATE // 2 : SAMPLE_RATE // 2 + 3 * SAMPLE_RATE // 2 + 80], wav[:2 * SAMPLE_RATE]]
    steps = [n_steps_for(len(c)) for c in clips]
    batch = torch.zeros(len(clips), max(len(c) for c in clips), dtype=wav.dtype)
    mask = torch.zeros(len(clips), max(steps), dtype=torch.bool)
    for i, (c, n) in enumerate(zip(clips, steps)):
        batch[i, : len(c)], mask[i, :n] = c, True
    with torch.no_grad():
        together = fe(batch, mask)
        alone = [fe(c[None], torch.ones(1, n, dtype=torch.bool))[0] for c, n in zip(clips, steps)]
    assert together.shape == (3, 200, 258)
    for i, (one, n) in enumerate(zip(alone, steps)):
        # a clip's last windows read past its end: zeros alone, the zero padding in the batch
        torch.testing.assert_close(together[i, :n], one, atol=1e-4, rtol=1e-4)
        assert not together[i, n:].any()
