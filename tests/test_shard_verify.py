"""The loader checks every shard it opens whole against index.json, to the end of the file.

Shards are written with the loader test helpers, then copies are damaged with Python: extra
or missing members, extra or repeated samples, a missing end-of-archive marker, bytes after
it. Each one is a ShardError naming the shard, also when the damage lies after the last
sample a worker wants (reading does not stop early) and when it comes from a worker process.
"""

from __future__ import annotations

import io
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from loader_shards import write_split

from msaflow.pipeline.data.loader import make_loader
from msaflow.pipeline.data.shard_index import ShardError, SplitIndex
from msaflow.pipeline.data.shard_reader import read_shard

SIZES = [5, 3]  # train-000000.tar: 5 samples, train-000001.tar: 3


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    write_split(root, "train", "features", SIZES, seed=11)
    write_split(root, "raw", "raw", [4], seed=12, first_number=50)
    return root


@pytest.fixture
def shards(pristine, tmp_path) -> Path:
    """A fresh copy of the shard folder for a test to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "shards"))


def members_of(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]


def rewrite(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def keys_in_order(members) -> list[str]:
    keys: list[str] = []
    for info, _ in members:
        key = info.name.partition(".")[0]
        if not keys or keys[-1] != key:
            keys.append(key)
    return keys


def end_of_members(path: Path) -> int:
    """Byte offset right after the data of the last member (where the end-of-archive marker starts)."""
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


def read_all(shards: Path, split: str = "train", num_workers: int = 0) -> list[str]:
    return [i for batch in make_loader(shards, split, 2, shuffle=False, num_workers=num_workers) for i in batch["id"]]


def read_first_only(shards: Path, shard_no: int = 0, split: str = "train") -> list[str]:
    """What a worker that owns only the first sample of a shard reads."""
    index = SplitIndex.load(shards / split)
    return [s.key for s in read_shard(index.shards[shard_no], index, [(0, 1.0)])]


def damage(shards: Path, how: str) -> Path:
    """Damage train-000000.tar (5 samples) in one way; return its path."""
    victim = shards / "train" / "train-000000.tar"
    members = members_of(victim)
    keys = keys_in_order(members)
    last = keys[-1]
    if how == "extra member, last sample":
        members.append(file_member(f"{last}.extra.npy", npy(np.zeros(3, np.float32))))
    elif how == "extra member, middle sample":
        at = max(i for i, (m, _) in enumerate(members) if m.name.startswith(keys[2] + "."))
        members.insert(at + 1, file_member(f"{keys[2]}.notes.json", b"{}"))
    elif how == "missing member, last sample":
        members = [(m, d) for m, d in members if m.name != f"{last}.vision.npy"]
    elif how == "member twice":
        first = next((m, d) for m, d in members if m.name == f"{last}.json")
        members.append(first)
    elif how == "extra sample":
        members += [file_member(m.name.replace(last, "zz_extra", 1), d)
                    for m, d in members if m.name.startswith(last + ".")]
    elif how == "sample twice":
        members += [file_member(m.name, d) for m, d in members if m.name.startswith(keys[0] + ".")]
    elif how == "directory member":
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        members.append((info, b""))
    else:
        raise AssertionError(how)
    rewrite(victim, members)
    return victim


EXPECTED = {
    "extra member, last sample": r"sample '[^']+' \(#4\) has members \['extra.npy'\] that index.json does not list",
    "extra member, middle sample": r"sample '[^']+' \(#2\) has members \['notes.json'\] that index.json does not list",
    "missing member, last sample": r"sample '[^']+' \(#4\) lacks members \['vision.npy'\]",
    "member twice": r"sample '[^']+' \(#4\) holds member 'json' twice",
    "extra sample": r"holds 6 samples, index.json says 5",
    "sample twice": r"sample '[^']+' appears twice",
    "directory member": r"member 'somedir' is not a regular file",
}


@pytest.mark.parametrize("how", list(EXPECTED))
def test_damaged_sample_structure_is_an_error_naming_shard_and_problem(shards, how):
    victim = damage(shards, how)
    pattern = re.escape(str(victim)) + ": " + EXPECTED[how]
    with pytest.raises(ShardError, match=pattern):
        read_all(shards)
    # a worker that wants only the first sample still reads the shard to its end
    with pytest.raises(ShardError, match=pattern):
        read_first_only(shards)


@pytest.mark.parametrize("how", ["no end marker", "half an end marker", "garbage after the end",
                                 "garbage in the padding", "garbage instead of the end marker"])
def test_damaged_end_of_archive_is_an_error(shards, how):
    victim = shards / "train" / "train-000000.tar"
    data = bytearray(victim.read_bytes())
    end = end_of_members(victim)
    assert data[end:] == bytes(len(data) - end) and len(data) - end >= 1024  # zero blocks, then padding
    if how == "no end marker":
        data = data[:end]
    elif how == "half an end marker":
        data = data[:end + 512]
    elif how == "garbage after the end":
        data += b"not a tar member" * 40
    elif how == "garbage in the padding":
        data[end + 1024 + 7] = 0x41  # inside the record padding after the two zero blocks
    elif how == "garbage instead of the end marker":
        data[end:end + 16] = b"0123456789abcdef"
    victim.write_bytes(bytes(data))
    trailing = how in ("garbage after the end", "garbage in the padding")
    pattern = re.escape(str(victim)) + (": trailing data at byte" if trailing else ": no end-of-archive marker")
    with pytest.raises(ShardError, match=pattern):
        read_all(shards)
    with pytest.raises(ShardError, match=pattern):
        read_first_only(shards)


def test_index_count_disagreeing_with_a_well_formed_shard_is_an_error(shards):
    """index.json says 4 samples for a shard that holds 5 (e.g. index.json from another run)."""
    import json

    index_path = shards / "train" / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][0]["n_samples"] = 4
    index["n_samples"] -= 1
    index_path.write_text(json.dumps(index))
    victim = shards / "train" / "train-000000.tar"
    with pytest.raises(ShardError, match=re.escape(str(victim)) + ": holds 5 samples, index.json says 4"):
        read_all(shards)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_damage_after_the_last_batch_fails_the_epoch(shards, num_workers):
    """The epoch's very last sample comes from the damaged shard: the consumer stops asking for
    samples there, yet the epoch raises instead of ending quietly."""
    victim = shards / "train" / "train-000001.tar"  # the last shard in sequence order
    victim.write_bytes(victim.read_bytes() + b"\x01" * 100)
    with pytest.raises(ShardError, match=re.escape(str(victim)) + ": trailing data"):
        read_all(shards, num_workers=num_workers)


def test_intact_shards_pass_and_zero_padding_is_allowed(shards):
    expected = read_all(shards)
    assert len(expected) == sum(SIZES)
    assert read_all(shards, num_workers=2) == expected
    # a tar writer with a larger blocking factor pads with more zeros: still a valid shard
    victim = shards / "train" / "train-000000.tar"
    victim.write_bytes(victim.read_bytes() + bytes(3 * 10240))
    assert read_all(shards) == expected
    assert len(read_first_only(shards)) == 1
    raw = [i for batch in make_loader(shards, "raw", 3, shuffle=False) for i in batch["id"]]
    assert len(raw) == 4


def test_last_wanted_sample_is_held_until_the_shard_is_checked(shards):
    """Samples before the last wanted one stream out at once; the last waits for the whole check."""
    index = SplitIndex.load(shards / "train")
    victim = damage(shards, "extra member, last sample")
    reader = read_shard(index.shards[0], index, [(0, 1.0), (1, 1.0)])
    assert next(reader).key  # sample 0 is handed out before the end is read
    with pytest.raises(ShardError, match=re.escape(str(victim))):
        next(reader)  # sample 1 is the last wanted: the damage at sample 4 stops it
