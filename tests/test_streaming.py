"""The one data path (`msaflow.pipeline.data.sources`): streamed shards, stored statistics, length caps.

Fast tests run on small shard sets written exactly as `msaflow shards` writes them
(tests/loader_shards.py); the slow ones on features shards extracted from real GRID clips
whose transcripts differ in length.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from loader_shards import write_split

from msaflow.pipeline.cli import main as cli
from msaflow.pipeline.data.sources import (DataError, Normaliser, PickleSource, ShardSource, keep_real, open_source,
                                   streaming_stats)
from msaflow.pipeline.data.lengths import LengthConfig, ModalityLength, control_padded, control_sample, pool_steps

NO_DROPOUT = {"model": {"attn_dropout": 0.0, "ffn_dropout": 0.0, "head_dropout": 0.0}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream_shards")
    write_split(root, "train", "features", [7, 6, 4], seed=1)  # 17: the last global step is short
    write_split(root, "valid", "features", [5], seed=2, first_number=100)
    write_split(root, "test", "features", [3, 4], seed=3, first_number=200)
    return root


def real_ids(batches) -> Counter:
    return Counter(i for b in batches for i, w in zip(b["id"], b["weight"].tolist()) if w > 0)


# ---------------------------------------------------------------- streaming, ranks, bucketing


@pytest.mark.parametrize("epoch", [0, 1])
def test_two_ranks_together_see_every_sample_once(shards, epoch):
    source = open_source(shards)
    every = real_ids(source.batches("train", 4))
    assert len(every) == 17 and set(every.values()) == {1}
    ranks = [list(source.batches("train", 4, shuffle=True, epoch=epoch, seed=3, rank=r, world_size=2))
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # DDP needs the same number of steps on every rank
    assert real_ids(ranks[0] + ranks[1]) == every
    # training drops the short last step instead: every sample at most once, full batches only
    train = [list(source.batches("train", 4, shuffle=True, epoch=epoch, drop_last=True, rank=r, world_size=2))
             for r in range(2)]
    seen = real_ids(train[0] + train[1])
    assert set(seen.values()) == {1} and sum(seen.values()) == 16 and all(len(b["id"]) == 2 for b in train[0])


def test_bucketing_cuts_padding_and_keeps_every_sample(shards):
    def padding(source):
        total = filled = 0
        for b in source.batches("train", 3, shuffle=True, seed=0):
            total += b["audio"].shape[0] * b["audio"].shape[1]
            filled += int(b["audio_lengths"].sum())
        return 1 - filled / total

    plain = ShardSource(shards, LengthConfig(), bucket=1)
    bucketed = ShardSource(shards, LengthConfig(), bucket=8)
    assert real_ids(bucketed.batches("train", 3, shuffle=True)) == real_ids(plain.batches("train", 3))
    assert padding(bucketed) < padding(plain)


def test_a_short_last_batch_takes_the_shortest_clips(shards):
    """Bucketed, the test split's 7 clips at batch 4 make a batch of 4 and one of 3: the 4 longest
    clips fill the whole batch, so the widest batch shape (peak memory) is that of a larger split."""
    source = ShardSource(shards, LengthConfig(), bucket=8)
    whole = next(iter(ShardSource(shards, LengthConfig(), bucket=1).batches("test", 64)))
    longest = sorted(zip(whole["audio_lengths"].tolist(), whole["id"]))[-4:]
    batches = list(source.batches("test", 4))
    assert [len(b["id"]) for b in batches] == [4, 3]  # the batch sizes keep their order
    assert sorted(batches[0]["id"]) == sorted(i for _, i in longest)
    assert batches[0]["audio"].shape[1] == max(whole["audio_lengths"].tolist())


def test_streaming_statistics_equal_whole_split_statistics(shards):
    source = open_source(shards)
    streamed = streaming_stats(source.batches("train", 3))
    whole = next(iter(ShardSource(shards, LengthConfig(), bucket=1).batches("train", 64)))
    for m in ("audio", "vision"):
        frames = whole[m][whole[f"{m}_present"]]
        mean, std = streamed.stats[m]
        torch.testing.assert_close(mean, frames.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(std, frames.std(0, unbiased=False) + 1e-6, rtol=1e-5, atol=1e-5)
    # stored and read back: the same function
    out = shards.parent / "norm_run"
    out.mkdir(exist_ok=True)
    streamed.save(out)
    again = Normaliser.load(out)(whole)
    np.testing.assert_allclose(again["audio"].numpy(), streamed(whole)["audio"].numpy(), rtol=1e-6)
    assert float(again["audio"][~whole["audio_present"]].abs().sum()) == 0.0  # absent steps stay zero


def test_keep_real_drops_top_up_rows(shards):
    source = open_source(shards)
    last = list(source.batches("test", 3, rank=1, world_size=2))[-1]
    assert (last["weight"] == 0).any()
    kept = keep_real(last)
    assert len(kept["id"]) == int((last["weight"] > 0).sum()) == kept["audio"].shape[0]


def test_limit_takes_the_first_samples(shards):
    source = open_source(shards, limit=9)
    assert source.size("train") == 9 and sum(len(b["id"]) for b in source.batches("train", 4)) == 9


# ---------------------------------------------------------------- length control


def test_subsample_truncate_and_text_keeps_its_sep():
    arrays = {"text_ids.npy": np.arange(10), "text.npy": np.arange(20, dtype=np.float32).reshape(10, 2),
              "audio.npy": np.arange(30, dtype=np.float32)[:, None], "audio_mask.npy": np.ones(30, bool),
              "vision.npy": np.arange(7, dtype=np.float32)[:, None], "vision_mask.npy": np.ones(7, bool)}
    cfg = LengthConfig(text=ModalityLength(max_steps=4, how="truncate"), audio=ModalityLength(max_steps=6),
                       vision=ModalityLength(max_steps=3, how="truncate"))
    out = control_sample(arrays, "features", cfg, {})
    assert out["text_ids.npy"].tolist() == [0, 1, 2, 9] and out["text.npy"][:, 0].tolist() == [0, 2, 4, 18]
    assert out["audio.npy"][:, 0].tolist() == [0, 5, 10, 15, 20, 25]  # evenly over the whole clip
    assert out["vision.npy"][:, 0].tolist() == [0, 1, 2] and len(out["vision_mask.npy"]) == 3
    assert len(arrays["audio.npy"]) == 30  # inputs untouched


def test_raw_audio_is_truncated_with_its_waveform():
    arrays = {"fbank.npy": np.zeros((50, 4), np.float32), "audio_mask.npy": np.ones(50, bool),
              "wav.npy": np.zeros(50 * 160, np.int16), "face.npy": np.zeros((40, 2, 2, 3), np.uint8),
              "vision_mask.npy": np.ones(40, bool)}
    cfg = LengthConfig(audio=ModalityLength(max_steps=20), vision=ModalityLength(max_steps=10))
    out = control_sample(arrays, "raw", cfg, {})
    assert len(out["fbank.npy"]) == 20 and len(out["wav.npy"]) == 20 * 160 and len(out["face.npy"]) == 10


def test_pooling_averages_present_steps():
    x = np.array([[1.0], [3.0], [5.0], [100.0], [7.0]], np.float32)
    present = np.array([True, True, True, False, True])
    pooled, mask = pool_steps(x, present, 2)
    assert pooled[:, 0].tolist() == [2.0, 5.0, 7.0] and mask.tolist() == [True, True, True]
    cfg = LengthConfig(audio=ModalityLength(max_steps=0, pool_hz=25.0))
    out = control_sample({"audio.npy": np.ones((100, 3), np.float32), "audio_mask.npy": np.ones(100, bool)},
                         "features", cfg, {"audio.npy": 100.0})
    assert out["audio.npy"].shape == (25, 3)


def test_pickle_tensors_capped_per_row():
    tensors = {"audio": torch.arange(12.0).reshape(2, 6, 1), "audio_lengths": torch.tensor([6, 2]),
               "text_ids": torch.tensor([[101, 5, 6, 7, 102], [101, 8, 102, 0, 0]]), "text_lengths": torch.tensor([5, 3])}
    cfg = LengthConfig(text=ModalityLength(max_steps=3, how="truncate"), audio=ModalityLength(max_steps=3))
    out = control_padded(tensors, cfg)
    assert out["audio"][0, :, 0].tolist() == [0.0, 2.0, 4.0] and out["audio"][1, :2, 0].tolist() == [6.0, 7.0]
    assert out["audio_lengths"].tolist() == [3, 2]
    assert out["text_ids"][0].tolist() == [101, 5, 102] and out["text_ids"][1].tolist() == [101, 8, 102]


def test_text_must_be_truncated():
    with pytest.raises(ValueError, match="text"):
        LengthConfig(text=ModalityLength(max_steps=10, how="subsample"))


# ---------------------------------------------------------------- what --data accepts


def test_data_must_be_shards_or_a_named_pickle(tmp_path, capsys):
    odd = tmp_path / "features.bin"
    odd.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"\*\.pkl"):
        open_source(odd)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a shard folder"):
        open_source(tmp_path / "empty")
    assert cli(["train", "--data", str(odd), "-o", str(tmp_path / "run")]) == 2
    assert "*.pkl" in capsys.readouterr().err


def test_pickle_source_warns_once_and_splits_rows_over_ranks(shared_data, capsys, monkeypatch):
    from msaflow.pipeline.data import sources

    monkeypatch.setattr(sources, "_WARNED", set())  # a fresh process: earlier tests opened the pickle too
    pkl = shared_data / "mosi_utt" / "mosi_utt_ta.pkl"
    source = open_source(pkl, limit=40)
    open_source(pkl, limit=40)
    assert capsys.readouterr().err.count("runs code") == 1
    assert isinstance(source, PickleSource)
    whole = [b["id"] for b in source.batches("train", 8, drop_last=True)]
    halves = [list(source.batches("train", 8, drop_last=True, rank=r, world_size=2)) for r in range(2)]
    assert [a["id"] + b["id"] for a, b in zip(*halves)] == whole


# ---------------------------------------------------------------- msaflow train on shards


def train(shards: Path, out: Path, *extra: str, launcher: list[str] | None = None) -> None:
    args = ["train", "--data", str(shards), "--model", "emt", "--freeze-text", "--epochs", "2", "--batch-size", "4",
            "--grad-accum", "1", "--seed", "3", "--threads", "1", "--device", "cpu", "-o", str(out), *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run([*(launcher or [sys.executable, "-m"]), "msaflow.pipeline.cli", *args], check=True, env=env,
                   timeout=900)


def test_features_shards_train_with_transcripts_of_different_lengths(shards, tmp_path):
    """Batches lack the split's longest transcript: text states are cut with the token ids."""
    out = tmp_path / "run"
    assert cli(["train", "--data", str(shards), "--model", "emt-dlfr", "--freeze-text", "--epochs", "2",
                "--batch-size", "4", "--grad-accum", "1", "--threads", "1", "-o", str(out)]) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and all(np.isfinite(h["train"]["loss"]) for h in history)
    assert (out / "normaliser.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["lengths"]["vision"]["max_steps"] == 500
    assert torch.load(out / "last.pt", weights_only=True)["lengths"] == config["lengths"]


@pytest.mark.slow
def test_two_processes_on_shards_match_one(shards, tmp_path):
    """torchrun x2 (gloo, global batch 4 = 2 per rank) vs one process: same weights, same metrics.

    Train masks fixed per sample id and dropout off (both are drawn per process otherwise);
    no shuffle buffer or bucketing, which mix per rank."""
    config = tmp_path / "no_dropout.yaml"
    config.write_text(json.dumps(NO_DROPOUT))
    extra = ["--config", str(config), "--fixed-train-masks", "--protocol", "per-rate", "--missing-rate", "0.3",
             "--shuffle-buffer", "1", "--bucket", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(shards, one, *extra)
    train(shards, two, *extra, launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node", "2", "-m"])
    a = torch.load(one / "last.pt", weights_only=True)
    b = torch.load(two / "last.pt", weights_only=True)
    assert (a["state"]["world_size"], b["state"]["world_size"]) == (1, 2)
    assert len(b["rng"]["mask_by_rank"]) == 2
    tensors = [k for k, v in a["model"].items() if torch.is_tensor(v)]  # besides: a frozen encoder's fingerprint
    assert {k: v for k, v in a["model"].items() if k not in tensors} == \
        {k: v for k, v in b["model"].items() if k not in tensors}
    worst = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in tensors)
    assert worst < 1e-4, f"weights differ by {worst:.2e}"
    valid_a = [h["valid"]["loss"] for h in json.loads((one / "history.json").read_text())]
    valid_b = [h["valid"]["loss"] for h in json.loads((two / "history.json").read_text())]
    np.testing.assert_allclose(valid_a, valid_b, atol=1e-4)
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m1["n_test"] == m2["n_test"] == 7
    assert abs(m1["rates"]["0.3"]["MAE"] - m2["rates"]["0.3"]["MAE"]) < 1e-3


# ---------------------------------------------------------------- real clips


GRID_TEXTS = {  # transcripts of different lengths: batches lack the split's longest one
    "bbaf2n": ("train", "bin blue at f two now"),
    "lbax4n": ("train", "lay blue at x four now and then once more please"),
    "pwij3p": ("train", "place white"),
    "swiz3n": ("train", "set white in z three now, said the speaker with a smile on her face"),
    "brbk7n": ("train", "bin red by k seven now"),
    "sbia1a": ("valid", "set blue in a one again"),
    "lbbc2a": ("valid", "lay blue"),
    "lrwp9a": ("test", "lay red with p nine again"),
    "lwbsza": ("test", "lay white by s zero again and then stop"),
    "sbwe5n": ("test", "set blue"),
}


@pytest.fixture(scope="module")
def grid_shards(shared_data, tmp_path_factory) -> Path:
    import yaml

    from msaflow.datasets.manifest import MANIFEST_COLUMNS

    tmp = tmp_path_factory.mktemp("grid_stream")
    available = {p.stem for p in (shared_data / "raw" / "grid").glob("*.mpg")}
    rows = [{"id": f"grid/{name}", "video_id": f"grid{i}", "clip_id": name,
             "path": str(shared_data / "raw" / "grid" / f"{name}.mpg"), "text": text,
             "label": round(-2.0 + 0.5 * i, 2), "split": split}
            for i, (name, (split, text)) in enumerate(GRID_TEXTS.items()) if name in available]
    assert len(rows) == len(GRID_TEXTS), f"GRID clips missing from {shared_data}"
    manifest = tmp / "manifest.csv"
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(manifest, index=False)
    config = tmp / "workflow.yaml"
    config.write_text(yaml.safe_dump({"extract": {"mode": "features", "fps": 5.0, "detect_every": 2, "threads": 1,
                                                  "frontends": "face=fer,audio=crepe-tiny,text=minilm"}}))
    assert cli(["extract", str(manifest), "-o", str(tmp / "extract"), "--config", str(config)]) == 0
    assert cli(["shards", str(tmp / "extract"), "--manifest", str(manifest), "-o", str(tmp / "shards"),
                "--config", str(config)]) == 0
    return tmp / "shards"


@pytest.mark.slow
def test_real_clips_train_and_streaming_evaluation_equals_whole_split(grid_shards, tmp_path):
    from msaflow.model.metrics import compute_metrics
    from msaflow.model.missing import simulate_missing
    from msaflow.pipeline.training.run_dir import RunDir

    lengths = [b["text_lengths"].tolist() for b in open_source(grid_shards).batches("train", 64)]
    assert len(set(lengths[0])) > 2  # transcripts of different lengths in one split
    run = tmp_path / "run"
    assert cli(["train", "--data", str(grid_shards), "--model", "emt-dlfr", "--freeze-text", "--epochs", "2",
                "--batch-size", "2", "--grad-accum", "1", "--protocol", "single-model", "--threads", "2",
                "-o", str(run)]) == 0
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 2 and all(np.isfinite(h["train"]["loss"]) for h in history)

    # a copy of the shards: evaluate scores afresh (streamed, batch by batch) instead of reusing metrics.json
    copy = tmp_path / "shards_copy"
    shutil.copytree(grid_shards, copy)
    out = tmp_path / "metrics.json"
    assert cli(["evaluate", str(run), "--data", str(copy), "--rates", "0.0,0.5", "-o", str(out)]) == 0
    streamed = json.loads(out.read_text())["rates"]

    # the reference: the whole test split in one padded batch, the run's stored statistics
    config = RunDir(run).config()
    model = RunDir(run).build_model(config)
    whole = Normaliser.load(run)(next(iter(ShardSource(copy, LengthConfig(), bucket=1).batches("test", 64))))
    model.eval()
    for rate in (0.0, 0.5):
        with torch.no_grad():
            pred = model(simulate_missing(whole, rate, unk_id=config["model_config"]["unk_id"],
                                          seed=config["mask_seed"]))["pred"].numpy()
        expected = compute_metrics(pred, whole["label"].numpy(), dataset="mosi")
        assert streamed[repr(rate)]["MAE"] == pytest.approx(expected["MAE"], abs=1e-5)
        assert streamed[repr(rate)]["Acc-7"] == pytest.approx(expected["Acc-7"])


def test_a_run_folder_has_one_writer(shards, tmp_path, capsys):
    from msaflow.lock import output_lock

    out = tmp_path / "run"
    with output_lock(out, "another msaflow train"):
        code = cli(["train", "--data", str(shards), "--model", "emt", "--freeze-text", "--epochs", "1",
                    "-o", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(os.getpid()) in err and "another msaflow train" in err
    assert not (out / "config.json").exists()


def test_a_train_split_smaller_than_the_batch_trains(tmp_path, capsys):
    """7 train clips and the preset's batch of 32: one batch of 7 per epoch, said on stderr."""
    root = tmp_path / "small"
    write_split(root, "train", "features", [7], seed=4)
    write_split(root, "valid", "features", [2], seed=5, first_number=100)
    write_split(root, "test", "features", [2], seed=6, first_number=200)
    out = tmp_path / "run"
    assert cli(["train", "--data", str(root), "--model", "emt-dlfr", "--freeze-text", "--epochs", "1",
                "--threads", "1", "-o", str(out)]) == 0
    assert "batch size 32 > 7 train samples" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert config["optim_config"]["batch_size"] == 7 and history[0]["train_samples"] == 7
    assert config["optim_config"]["grad_accum"] == 1  # one batch per epoch: every epoch takes its step
    assert torch.load(out / "last.pt", weights_only=True)["optimizer"]["state"]


def test_a_pinned_source_gives_the_same_batches(shards):
    """`pin_memory` (set by `msaflow train` on a GPU) changes where batches live, not what they hold;
    without a GPU the loader leaves them in ordinary memory (torch warns that nothing is pinned)."""
    plain = list(open_source(shards).batches("train", 4, shuffle=True, seed=3))
    with pytest.warns(UserWarning, match="pin_memory") if not torch.cuda.is_available() else nullcontext():
        pinned = list(open_source(shards, pin_memory=True).batches("train", 4, shuffle=True, seed=3))
    assert len(pinned) == len(plain)
    for a, b in zip(plain, pinned):
        assert a["id"] == b["id"]
        for k, v in a.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b[k]) and b[k].is_pinned() == torch.cuda.is_available(), k


def test_first_batch_reads_the_first_samples_only(shards):
    """`msaflow train` looks at each split's first samples before making the run folder: the same
    samples a plain sequential read starts with, at most `limit`, and None for an empty split."""
    from msaflow.pipeline.data.loader import make_loader

    sequential = next(iter(make_loader(shards, "train", 17, shuffle=False)))["id"]
    assert open_source(shards).first_batch("train", 5)["id"] == sequential[:5]
    assert open_source(shards, limit=3).first_batch("train", 8)["id"] == sequential[:3]
    empty = shards.parent / f"{shards.name}_empty_valid"
    shutil.copytree(shards, empty)
    (empty / "valid").rename(empty / "valid_full")
    write_split(empty, "valid", "features", [], seed=2)
    assert open_source(empty).first_batch("valid", 8) is None
