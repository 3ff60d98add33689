"""Memo of a frozen text encoder's pooled output, keyed by the token-id sequence.

A frozen encoder is a pure function of the token ids, so its pooled vector can be computed
once per distinct (possibly [UNK]-corrupted) sequence and reused: by later epochs, by other
models and seeds, and by `msaflow evaluate`. With fixed per-sample drop masks (nested across
rates) a sample has at most (tokens + 1) distinct corrupted versions, so the memo stays small
and a warm lookup replaces a forward pass of the encoder (benchmarks/bench_text_memo.py).

The memo is exact up to float rounding: misses are encoded in padded batches, and the first
value stored for a sequence is the one every later lookup returns. It lives in a directory
(one namespace per encoder weights and pooling), as append-only `.npz` parts written
atomically; parts from several processes simply add up.

Not the same job as pipeline/training/text_cache.py (the frozen-encoder mode of `msaflow train
--text-cache`), and kept apart on purpose: that cache stores every token's hidden state (N, L, D)
in float16, keyed by position (split, sample ids, mask seed, rate), so it exists only for fixed
masks at a grid of rates and is built before training and attached to the batch for any model
(EMT's attention reads token states). This memo stores one float32 pooled vector per distinct id
sequence, keyed by content, filled lazily inside a baseline under any masks, redrawn ones too.
Serving one from the other would change results (float16 states pooled are not these float32
vectors) or cannot work (a pooled vector has no tokens for EMT to attend over).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from msaflow.tario import atomic_path

KEY_BYTES = 16


def sequence_key(ids: torch.Tensor) -> bytes:
    """Digest of one unpadded id sequence."""
    return hashlib.blake2b(ids.to(torch.int64).numpy().tobytes(), digest_size=KEY_BYTES).digest()


def encoder_fingerprint(model_dir: Path) -> str:
    """Identity of a local encoder: its config and the sizes of its weight files (cheap, no hashing of GBs)."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.iterdir()):
        if f.suffix in {".safetensors", ".bin"}:
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


class TextMemo:
    """key(ids) -> pooled vector, persisted under `directory/<namespace>/`."""

    def __init__(self, directory: str | os.PathLike, namespace: str, flush_every: int = 4096):
        self.root = Path(directory) / namespace
        self.flush_every = flush_every
        self.table: dict[bytes, np.ndarray] = {}
        self.pending: dict[bytes, np.ndarray] = {}
        self.hits = self.misses = 0
        self._load()
        atexit.register(self.flush)

    def _load(self) -> None:
        if not self.root.is_dir():
            return
        for part in sorted(self.root.glob("part-*.npz")):
            with np.load(part, allow_pickle=False) as z:
                keys, values = z["keys"], z["values"]
            if keys.ndim != 2 or keys.shape[1] != KEY_BYTES or len(keys) != len(values):
                raise ValueError(f"text memo part {part} is malformed: keys {keys.shape}, values {values.shape}")
            for k, v in zip(keys, values):
                self.table.setdefault(k.tobytes(), v)

    def __len__(self) -> int:
        return len(self.table)

    def flush(self) -> None:
        if not self.pending:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        part = self.root / f"part-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}-{len(self.table)}.npz"
        keys = np.frombuffer(b"".join(self.pending), dtype=np.uint8).reshape(-1, KEY_BYTES)
        values = np.stack(list(self.pending.values())).astype(np.float32)
        with atomic_path(part) as tmp, open(tmp, "wb") as f:
            np.savez(f, keys=keys, values=values)
        self.pending = {}

    def lookup(self, ids: torch.Tensor, lengths: torch.Tensor,
               encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(B, D) pooled vectors of the rows of `ids` (B, L); `encode(ids, lengths)` computes the misses."""
        keys = [sequence_key(row[: int(n)]) for row, n in zip(ids, lengths)]
        todo = [i for i, k in enumerate(keys) if k not in self.table]
        # a sequence repeated inside the batch is encoded once
        first = {}
        for i in todo:
            first.setdefault(keys[i], i)
        rows = list(first.values())
        self.hits += len(keys) - len(todo)
        self.misses += len(rows)
        if rows:
            sub_len = lengths[rows]
            fresh = encode(ids[rows][:, : max(int(sub_len.max()), 1)], sub_len).detach().float().cpu().numpy()
            for i, v in zip(rows, fresh):
                self.table[keys[i]] = v
                self.pending[keys[i]] = v
            if len(self.pending) >= self.flush_every:
                self.flush()
        return torch.from_numpy(np.stack([self.table[k] for k in keys]))

    def stats(self) -> dict:
        return {"entries": len(self.table), "hits": self.hits, "misses": self.misses}


_OPEN: dict[tuple[str, str], TextMemo] = {}


def open_memo(directory: str | os.PathLike, model_dir: Path, pooling: str) -> TextMemo:
    """One shared memo per (directory, encoder, pooling) in a process."""
    namespace = f"{pooling}-{encoder_fingerprint(model_dir)}"
    key = (str(Path(directory).resolve()), namespace)
    if key not in _OPEN:
        _OPEN[key] = TextMemo(directory, namespace)
        info = _OPEN[key].root / "encoder.json"
        if not info.is_file():
            info.parent.mkdir(parents=True, exist_ok=True)
            info.write_text(json.dumps({"model_dir": str(model_dir), "pooling": pooling}))
    return _OPEN[key]
