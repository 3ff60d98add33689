"""What a shard set is, as the loader reads it (docs/data-contracts.md §3): the `.npy` members
and how they become batch tensors, the members each mode holds, where the files are (a local
path, an fsspec URL or a `pipe:` command: `ShardLocation`), and a split's `index.json`
checked against all of it (`SplitIndex`)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path


class ShardError(ValueError):
    """A shard or its index.json is missing, truncated, corrupt or off-contract."""


@dataclass(frozen=True)
class MemberSpec:
    """How one `.npy` member of a sample becomes batch tensors."""

    batch_key: str
    dtype: str  # dtype on disk, as the data contract states it
    ndim: int
    length_key: str | None = None  # batch key of the per-sample lengths of this member's first axis
    scale: float | None = None  # multiply after conversion to float32


MEMBER_SPECS: dict[str, MemberSpec] = {
    "text_ids.npy": MemberSpec("text_ids", "int64", 1, length_key="text_lengths"),
    "text.npy": MemberSpec("text", "float32", 2),
    "audio.npy": MemberSpec("audio", "float32", 2, length_key="audio_lengths"),
    "audio_mask.npy": MemberSpec("audio_present", "bool", 1),
    "vision.npy": MemberSpec("vision", "float32", 2, length_key="vision_lengths"),
    "vision_mask.npy": MemberSpec("vision_present", "bool", 1),
    "face.npy": MemberSpec("face", "uint8", 4, length_key="vision_lengths"),
    "fbank.npy": MemberSpec("fbank", "float32", 2, length_key="audio_lengths"),
    # int16 PCM on disk; float32 in [-1, 1) in the batch
    "wav.npy": MemberSpec("wav", "int16", 1, length_key="wav_lengths", scale=1.0 / 32768.0),
}


@dataclass(frozen=True)
class ModeLayout:
    """The members a shard mode may hold and how they depend on each other."""

    members: tuple[str, ...]
    # (a, b): a sample holding member a must hold b, with the same first-axis length
    aligned: tuple[tuple[str, str], ...]


MODE_LAYOUTS: dict[str, ModeLayout] = {
    "raw": ModeLayout(
        members=("face.npy", "vision_mask.npy", "wav.npy", "fbank.npy", "audio_mask.npy", "text_ids.npy"),
        aligned=(("face.npy", "vision_mask.npy"), ("vision_mask.npy", "face.npy"),
                 ("fbank.npy", "audio_mask.npy"), ("audio_mask.npy", "fbank.npy"),
                 ("wav.npy", "fbank.npy")),
    ),
    "features": ModeLayout(
        members=("vision.npy", "vision_mask.npy", "audio.npy", "audio_mask.npy", "text.npy", "text_ids.npy"),
        aligned=(("vision.npy", "vision_mask.npy"), ("vision_mask.npy", "vision.npy"),
                 ("audio.npy", "audio_mask.npy"), ("audio_mask.npy", "audio.npy"),
                 ("text.npy", "text_ids.npy")),
    ),
}
# wav has its own (sample-rate) time axis: it requires fbank but is not length-aligned with it
_PRESENCE_ONLY = {("wav.npy", "fbank.npy")}


# ---------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class ShardLocation:
    """A file or folder of a shard set named by URL: fsspec (`s3://`, `http(s)://`, ...) or `pipe:CMD`.

    `/` joins names as for a Path; `str()` is the URL (for `pipe:`, the command with `{path}` filled in).
    """

    url: str
    rel: str = ""

    def __truediv__(self, name: str) -> "ShardLocation":
        return ShardLocation(self.url, f"{self.rel}/{name}" if self.rel else str(name))

    @property
    def name(self) -> str:
        return (self.rel or self.url.rstrip("/")).rsplit("/", 1)[-1]

    def __str__(self) -> str:
        if self.url.startswith("pipe:"):
            return self.url.replace("{path}", self.rel)
        return f"{self.url.rstrip('/')}/{self.rel}" if self.rel else self.url


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def shard_location(location: str | os.PathLike) -> Path | ShardLocation:
    """A local Path, or a ShardLocation for a URL (`scheme://...`) or a `pipe:` command template."""
    if isinstance(location, ShardLocation):
        return location
    text = os.fspath(location)
    if text.startswith("pipe:"):
        if "{path}" not in text:
            raise ShardError(f"{text}: a pipe: shard folder needs {{path}} where a file's path inside it goes")
        return ShardLocation(text)
    if _URL.match(text) and not text.startswith("file://"):
        return ShardLocation(text)
    return Path(text.removeprefix("file://"))


def open_shard_file(location: Path | ShardLocation):
    """A readable, seekable binary file object for a local path, an fsspec URL or a pipe: command."""
    if isinstance(location, Path):
        return open(location, "rb")
    if location.url.startswith("pipe:"):
        spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # larger shards spill to a temporary file
        with tempfile.TemporaryFile() as errors:
            proc = subprocess.Popen(str(location)[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=errors)
            with proc.stdout:
                shutil.copyfileobj(proc.stdout, spool, 1 << 20)
            if proc.wait() != 0:
                spool.close()
                errors.seek(0)
                message = errors.read().decode("utf-8", "replace").strip()[-500:]
                raise FileNotFoundError(f"command exited with status {proc.returncode}: {message}")
        spool.seek(0)
        return spool
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec comes with torch
        raise ShardError(f"{location}: reading shards by URL needs fsspec: pip install 'msaflow[remote]'") from exc
    try:
        return fsspec.open(str(location), "rb").open()
    except (ImportError, ValueError) as exc:  # no back-end for the scheme
        raise ShardError(f"{location}: no fsspec back-end for this URL ({exc}): pip install 'msaflow[remote]'") from exc


def _file_size(fileobj) -> int:
    position = fileobj.tell()
    size = fileobj.seek(0, io.SEEK_END)
    fileobj.seek(position)
    return size


# ---------------------------------------------------------------------------- index.json


@dataclass(frozen=True)
class ShardEntry:
    path: Path | ShardLocation
    n_samples: int  # samples used from this shard
    n_stored: int | None = None  # samples the file holds, when more than are used (`SplitIndex.limited`)


@dataclass(frozen=True)
class SplitIndex:
    """What the loader needs from `SHARD_DIR/<split>/index.json`."""

    split: str
    mode: str
    n_samples: int
    shards: tuple[ShardEntry, ...]
    members: tuple[str, ...]  # the .npy members every sample holds, in MEMBER_SPECS order
    shapes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)
    rates: dict[str, float | None] = field(default_factory=dict)  # steps per second of each member

    @property
    def modalities(self) -> tuple[str, ...]:
        """The batch-contract modalities present: text / audio / vision."""
        has = {"text": "text_ids.npy", "audio": "audio_mask.npy", "vision": "vision_mask.npy"}
        return tuple(m for m, member in has.items() if member in self.members)

    @classmethod
    def load(cls, split_dir: str | os.PathLike, mode_hint: str | None = None) -> "SplitIndex":
        split_dir = shard_location(split_dir)
        path = split_dir / "index.json"
        try:
            with open_shard_file(path) as f:
                raw = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError as exc:
            raise ShardError(f"{path}: no index.json (is {split_dir} a split folder written by `msaflow shards`?)") from exc
        except ShardError:
            raise
        except Exception as exc:  # OSError, bad JSON, or a remote back-end's own error
            raise ShardError(f"{path}: unreadable index.json ({exc})") from exc
        try:
            mode = raw["mode"]
            shards = tuple(ShardEntry(split_dir / s["name"], int(s["n_samples"])) for s in raw["shards"])
            n_samples = int(raw["n_samples"])
            modalities = raw["modalities"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{path}: missing or malformed field {exc}") from exc
        if mode is None and n_samples == 0:  # an empty split of a run: nothing to read, any mode fits
            mode = mode_hint or "features"
        if mode not in MODE_LAYOUTS:
            raise ShardError(f"{path}: mode {mode!r} is not one of {sorted(MODE_LAYOUTS)}")
        if mode_hint is not None and mode_hint != mode:
            raise ShardError(f"{path}: shards are in {mode!r} mode, the caller expects {mode_hint!r}")
        if sum(s.n_samples for s in shards) != n_samples:
            raise ShardError(f"{path}: n_samples {n_samples} != sum over shards {sum(s.n_samples for s in shards)}")
        layout = MODE_LAYOUTS[mode]
        names = {m if m.endswith(".npy") else f"{m}.npy": v for m, v in modalities.items()}
        unknown = sorted(set(names) - set(layout.members))
        if unknown:
            raise ShardError(f"{path}: members {unknown} do not belong to {mode!r} shards (allowed: {list(layout.members)})")
        members = tuple(m for m in MEMBER_SPECS if m in names)
        for a, b in layout.aligned:
            if a in names and b not in names:
                raise ShardError(f"{path}: member {a} requires {b}, which the index does not list")
        if n_samples and not any(m in members for m in ("text_ids.npy", "audio_mask.npy", "vision_mask.npy")):
            raise ShardError(f"{path}: lists no modality (members {sorted(names)})")
        shapes = {m: tuple(names[m].get("shape") or ()) for m in members}
        for m, shape in shapes.items():
            if shape and len(shape) != MEMBER_SPECS[m].ndim:
                raise ShardError(f"{path}: {m} shape {list(shape)} should have {MEMBER_SPECS[m].ndim} axes")
        rates = {m: names[m].get("rate") for m in members}
        return cls(raw.get("split", split_dir.name), mode, n_samples, shards, members, shapes, rates)

    def limited(self, n: int) -> "SplitIndex":
        """The first n samples only (smoke tests); n <= 0 keeps everything."""
        if n <= 0 or n >= self.n_samples:
            return self
        shards, left = [], n
        for s in self.shards:
            if left <= 0:
                break
            shards.append(ShardEntry(s.path, min(s.n_samples, left), s.n_samples))
            left -= s.n_samples
        return replace(self, n_samples=n, shards=tuple(shards))
