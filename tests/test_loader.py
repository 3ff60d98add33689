"""The shard loader: epoch boundaries over ranks x workers, order, collation, broken shards."""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from loader_shards import CLS, SEP, write_split

from msaflow.pipeline.data.loader import epoch_sequence, make_loader, rank_batches, shuffle_buffer
from msaflow.pipeline.data.shard_index import ShardError

SHARD_SIZES = [7, 3, 5, 1]  # uneven on purpose; 16 samples


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_split(root, "train", "features", SHARD_SIZES, seed=1)
    write_split(root, "test", "raw", [4, 3], seed=2, first_number=100)
    write_split(root, "one", "features", [5], seed=3, first_number=200)
    write_split(root, "textaudio", "features", [3], seed=4, first_number=300, modalities=("text", "audio"))
    return root


def epoch_batches(shard_dir, split, batch_size, world_size, num_workers, **kw) -> list[list[dict]]:
    """Every rank's batches for one epoch (ranks simulated by rank/world_size)."""
    return [list(make_loader(shard_dir, split, batch_size, rank=r, world_size=world_size,
                             num_workers=num_workers, **kw)) for r in range(world_size)]


def real_ids(per_rank: list[list[dict]]) -> Counter:
    return Counter(i for batches in per_rank for b in batches for i, w in zip(b["id"], b["weight"]) if w == 1)


def all_ids(shard_dir, split) -> list[str]:
    return [b for batch in make_loader(shard_dir, split, 64, shuffle=False) for b in batch["id"]]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("split", ["train", "one"])
def test_every_sample_once_per_epoch_over_ranks_and_two_workers(shard_dir, split, world_size):
    expected = Counter(all_ids(shard_dir, split))
    assert len(expected) == sum(SHARD_SIZES) if split == "train" else 5
    for epoch in (0, 1):
        per_rank = epoch_batches(shard_dir, split, 3, world_size, num_workers=2,
                                 shuffle=True, seed=7, epoch=epoch)
        assert real_ids(per_rank) == expected
        # DDP needs the same number of steps on every rank
        assert len({len(batches) for batches in per_rank}) == 1
        pads = [b for batches in per_rank for batch in batches for b in batch["weight"].tolist() if b == 0]
        assert len(pads) < world_size  # only the short last step is topped up


def test_split_with_fewer_shards_than_ranks_times_workers_uses_every_worker(shard_dir):
    # one shard of 5 samples, 2 ranks x 2 workers, batch 1: the workers split samples, not shards
    per_rank = epoch_batches(shard_dir, "one", 1, 2, num_workers=2, shuffle=False)
    assert [len(b) for b in per_rank] == [3, 3]
    assert real_ids(per_rank) == Counter(all_ids(shard_dir, "one"))


def test_drop_last_gives_full_batches_and_no_padding(shard_dir):
    per_rank = epoch_batches(shard_dir, "train", 3, 2, num_workers=2, shuffle=True, seed=0, drop_last=True)
    sizes = [len(batch["id"]) for batches in per_rank for batch in batches]
    assert sizes == [3] * (2 * (16 // 6))
    assert all(bool((batch["weight"] == 1).all()) for batches in per_rank for batch in batches)
    assert len(real_ids(per_rank)) == 12 and max(real_ids(per_rank).values()) == 1


def test_order_is_seeded_per_epoch_and_independent_of_workers(shard_dir):
    def order(**kw):
        return [i for batch in make_loader(shard_dir, "train", 4, **kw) for i in batch["id"]]

    plain = order(shuffle=False, num_workers=0)
    assert plain == all_ids(shard_dir, "train")  # manifest order: shard by shard
    assert order(shuffle=False, num_workers=2) == plain
    e0 = order(shuffle=True, seed=3, epoch=0, num_workers=2)
    assert e0 == order(shuffle=True, seed=3, epoch=0, num_workers=2)
    assert sorted(e0) == sorted(plain)
    assert e0 != order(shuffle=True, seed=3, epoch=1, num_workers=2) and e0 != plain
    assert e0 != order(shuffle=True, seed=4, epoch=0, num_workers=2)


def test_ranks_together_see_the_single_process_global_batch(shard_dir):
    """Unshuffled, W ranks with batch B/W see exactly one process's batch B at every step."""
    single = [set(b["id"]) for b in make_loader(shard_dir, "train", 6, shuffle=False)]
    per_rank = epoch_batches(shard_dir, "train", 3, 2, num_workers=2, shuffle=False)
    together = [{i for b in step for i, w in zip(b["id"], b["weight"]) if w == 1} for step in zip(*per_rank)]
    assert together == single


def test_features_batch_shapes_padding_and_masks(shard_dir):
    batches = list(make_loader(shard_dir, "train", 5, shuffle=False))
    assert len(batches) == math.ceil(16 / 5)
    for batch in batches:
        n = len(batch["id"])
        numbers = [int(round((label + 1.5) * 10)) for label in batch["label"].tolist()]
        assert batch["text_ids"].dtype == torch.long and batch["text_ids"].shape == (n, int(batch["text_lengths"].max()))
        assert batch["text"].shape[:2] == batch["text_ids"].shape and batch["text"].shape[2] == 384
        for m, dim in (("audio", 32), ("vision", 64)):
            x, lengths, present = batch[m], batch[f"{m}_lengths"], batch[f"{m}_present"]
            assert x.dtype == torch.float32 and x.shape == (n, int(lengths.max()), dim)
            assert present.dtype == torch.bool and present.shape == x.shape[:2]
            steps = torch.arange(x.shape[1])
            assert not present[steps[None] >= lengths[:, None]].any()  # padding is never present
            assert (x[steps[None] >= lengths[:, None]] == 0).all()
            assert (x[~present] == 0).all()  # missing steps (no face / no audio) are zeros
            for row, number in enumerate(numbers):
                assert (x[row, present[row], 0] == number).all()  # the row is its own sample
        for row, number in enumerate(numbers):
            length = int(batch["text_lengths"][row])
            ids = batch["text_ids"][row]
            assert ids[0] == CLS and ids[length - 1] == SEP and (ids[length:] == 0).all()
            assert ids[1] == 1000 + number * 37
            assert (batch["text"][row, :length, 0] == number).all() and (batch["text"][row, length:] == 0).all()
        assert batch["weight"].tolist() == [1.0] * n
        assert "label_T" not in batch  # no per-modality labels in this data


def test_raw_batch_members(shard_dir):
    batches = list(make_loader(shard_dir, "test", 4, shuffle=False, mode_hint="raw", num_workers=2))
    assert [len(b["id"]) for b in batches] == [4, 3]
    seen_silent = False
    for batch in batches:
        n, t_v = len(batch["id"]), int(batch["vision_lengths"].max())
        assert batch["face"].dtype == torch.uint8 and batch["face"].shape == (n, t_v, 48, 48, 3)
        assert batch["fbank"].shape == (n, int(batch["audio_lengths"].max()), 80)
        assert batch["audio_present"].shape == batch["fbank"].shape[:2]
        assert batch["wav"].dtype == torch.float32 and batch["wav"].abs().max() <= 1.0
        assert "audio" not in batch and "vision" not in batch  # the front-end wrapper makes those
        for row in range(n):
            wav_len, number = int(batch["wav_lengths"][row]), int(round((batch["label"][row].item() + 1.5) * 10))
            assert (batch["wav"][row, wav_len:] == 0).all()
            if wav_len == 0:  # clip without audio: steps kept, none present
                seen_silent = True
                assert batch["audio_lengths"][row] > 0 and not batch["audio_present"][row].any()
            else:
                assert batch["wav"][row, 0].item() == pytest.approx(number / 32768)
            faces = batch["vision_present"][row]
            assert (batch["face"][row, faces, 0, 0, 0] == number).all()
            assert (batch["face"][row, ~faces] == 0).all()
    assert seen_silent


def test_modality_subset_has_only_its_keys(shard_dir):
    (batch,) = make_loader(shard_dir, "textaudio", 8, shuffle=False)
    assert {"text_ids", "text", "audio", "audio_present"} <= batch.keys()
    assert not {k for k in batch if k.startswith("vision")}
    assert make_loader(shard_dir, "textaudio", 8, shuffle=False).dataset.index.modalities == ("text", "audio")


def test_any_webdataset_reader_sees_the_same_samples(shard_dir):
    urls = [str(p) for p in sorted((shard_dir / "train").glob("*.tar"))]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert [k.replace("_", "/") for k in keys] == all_ids(shard_dir, "train")


def epoch_error(loader) -> Exception:
    """The error one epoch raises. Its traceback is dropped so that the DataLoader iterator
    is freed at once (shutting its workers down) instead of by a later garbage collection."""
    try:
        for _ in loader:
            pass
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        return exc.with_traceback(None)
    raise AssertionError("the epoch ran to the end without an error")


def copy_split(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def end_of_last_member(path: Path) -> int:
    import tarfile

    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + math.ceil(last.size / 512) * 512


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("cut", ["half", "end_marker"])
def test_truncated_shard_is_an_error_naming_it(shard_dir, tmp_path, num_workers, cut):
    split = copy_split(shard_dir / "train", tmp_path / "train")
    victim = split / "train-000002.tar"
    data = victim.read_bytes()
    # "end_marker": every member intact, only the closing zero blocks cut short
    keep = len(data) // 2 if cut == "half" else end_of_last_member(victim) + 700
    victim.write_bytes(data[:keep])
    error = epoch_error(make_loader(tmp_path, "train", 4, shuffle=True, num_workers=num_workers))
    assert isinstance(error, ShardError) and str(victim) in str(error)


def test_shard_short_of_samples_is_an_error(shard_dir, tmp_path):
    """A well-formed tar that lost its last sample (e.g. rewritten by hand): index.json's count catches it."""
    import tarfile

    split = copy_split(shard_dir / "train", tmp_path / "train")
    victim = split / "train-000000.tar"
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    last_key = members[-1][0].name.split(".")[0]
    with tarfile.open(victim, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if not info.name.startswith(last_key + "."):
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=re.escape(str(victim)) + ": holds 6 samples, index.json says 7"):
        list(make_loader(tmp_path, "train", 4, shuffle=False))


def test_off_contract_inputs_are_clear_errors(shard_dir, tmp_path):
    with pytest.raises(ShardError, match="'raw' mode, the caller expects 'features'"):
        make_loader(shard_dir, "test", 4, shuffle=False, mode_hint="features")
    with pytest.raises(ShardError, match="no index.json"):
        make_loader(shard_dir, "valid", 4, shuffle=False)
    split = copy_split(shard_dir / "one", tmp_path / "one")
    (split / "one-000000.tar").unlink()
    with pytest.raises(ShardError, match=re.escape(str(split / "one-000000.tar")) + ": cannot open"):
        list(make_loader(tmp_path, "one", 4, shuffle=False))


def test_plan_covers_positions_exactly_once():
    for n, batch_size, world_size in [(16, 3, 2), (5, 4, 3), (1, 2, 4), (0, 2, 2), (12, 3, 4)]:
        plans = [rank_batches(n, batch_size, r, world_size) for r in range(world_size)]
        real = sorted(s.position for plan in plans for b in plan for s in b if s.weight == 1)
        assert real == list(range(n))
        assert len({len(plan) for plan in plans}) == 1
        assert all(len(b) <= batch_size for plan in plans for b in plan)
    sequence = epoch_sequence([3, 0, 4], shuffle=True, seed=1, epoch=2)
    assert sorted(sequence) == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert np.array_equal(sequence, epoch_sequence([3, 0, 4], shuffle=True, seed=1, epoch=2))


def test_empty_split_yields_nothing(tmp_path):
    (tmp_path / "valid").mkdir()
    (tmp_path / "valid" / "index.json").write_text(json.dumps({
        "split": "valid", "mode": None, "n_samples": 0, "shards": [], "modalities": {}, "frontends": {},
        "config_hash": "x", "manifest_hash": "x", "msaflow_version": "0.1.0"}))
    loader = make_loader(tmp_path, "valid", 4, shuffle=True, num_workers=2, rank=1, world_size=2)
    assert len(loader) == 0 and list(loader) == []


@pytest.mark.slow
def test_real_grid_shards_from_the_pipeline(shared_data, tmp_path):
    """manifest -> extract (raw) -> shards on 5 real GRID clips, then the loader over 2 ranks x 2 workers."""
    import shutil

    from msaflow.datasets.grid import make_demo
    from msaflow.pipeline.cli import main as msaflow

    src = tmp_path / "grid"
    src.mkdir()
    for clip in sorted((shared_data / "raw" / "grid").glob("*.mpg"))[:5]:
        shutil.copyfile(clip, src / clip.name)
    make_demo(src, tmp_path / "dataset")
    manifest, extract, shards = tmp_path / "manifest.csv", tmp_path / "extract", tmp_path / "shards"
    assert msaflow(["manifest", str(tmp_path / "dataset"), "-o", str(manifest)]) == 0
    assert msaflow(["extract", str(manifest), "-o", str(extract), "--mode", "raw", "--device", "cpu"]) == 0
    assert msaflow(["shards", str(extract), "--manifest", str(manifest), "-o", str(shards)]) == 0

    seen = Counter()
    for split in ("train", "valid", "test"):
        expected = all_ids(shards, split)
        per_rank = epoch_batches(shards, split, 2, 2, num_workers=2, shuffle=True, seed=0, mode_hint="raw")
        assert real_ids(per_rank) == Counter(expected)
        seen.update(expected)
        for batch in (b for batches in per_rank for b in batches):
            size = json.loads((shards / split / "index.json").read_text())["modalities"]["face.npy"]["shape"][1]
            n = len(batch["id"])
            assert batch["face"].shape == (n, 75, size, size, 3)  # 3 s at 25 fps
            assert batch["vision_present"].float().mean() > 0.9  # frontal faces, found in nearly every frame
            assert batch["face"][batch["vision_present"]].float().std() > 10  # real pixels, not zeros
            assert (batch["audio_lengths"] == 300).all() and batch["fbank"].shape == (n, 300, 80)
            assert ((batch["wav_lengths"] - 48000).abs() < 1600).all() and batch["wav"].abs().max() > 0.01
            assert (batch["text_ids"][:, 0] == CLS).all()
            assert (batch["text_ids"][torch.arange(n), batch["text_lengths"] - 1] == SEP).all()
    assert sum(seen.values()) == 5


def test_shuffle_buffer_yields_everything_once_and_starts_early():
    consumed = []

    def source():
        for i in range(500):
            consumed.append(i)
            yield i

    out = shuffle_buffer(source(), 100, np.random.default_rng(0))
    first = next(out)
    assert len(consumed) <= 20  # yielding starts at size // 10, not after a full buffer
    rest = [first, *out]
    assert sorted(rest) == list(range(500)) and rest != list(range(500))
    assert rest == list(shuffle_buffer(range(500), 100, np.random.default_rng(0)))
    assert list(shuffle_buffer(range(3), 100, np.random.default_rng(0), initial=1000)) != []


def test_samples_are_length_capped_before_the_shuffle_buffer_holds_them(tmp_path):
    """The buffer's memory is buffer x capped length: every sample the buffer has taken in has been
    through the transform (a lazy transform after the buffer would have seen only the yielded ones)."""
    write_split(tmp_path, "train", "features", [20], seed=3)
    seen = []

    def transform(arrays):
        seen.append(len(seen))
        return arrays

    loader = make_loader(tmp_path, "train", 2, shuffle=True, shuffle_buffer=16, transform=transform)
    batches = iter(loader)
    for _ in range(4):  # 8 samples out; the buffer (two in, one out) has taken in 16
        next(batches)
    assert len(seen) >= 16
