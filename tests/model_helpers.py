"""Shared helpers of the model tests: real CMU-MOSI batches and a tiny model configuration."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch

from msaflow.model.config import for_dataset
from msaflow.pipeline.data.mmsa_pickle import load_mmsa_pickle

TINY = dict(d_model=16, n_layers=2, n_heads=2, head_dim=32, attn_dropout=0.0, ffn_dropout=0.0, head_dropout=0.0,
            pred_hidden_global=8, pred_hidden_text=16, pred_hidden_audio=4, pred_hidden_vision=4)


def mosi_path(shared_data: Path) -> Path:
    return shared_data / "mosi_utt" / "mosi_utt_ta.pkl"


@lru_cache(maxsize=2)
def mosi_splits(path: str):
    return load_mmsa_pickle(path)


def mosi_batch(shared_data: Path, n: int = 8, split: str = "train", start: int = 0) -> dict:
    return mosi_splits(str(mosi_path(shared_data)))[split].batch(torch.arange(start, start + n))


def tiny_config(modalities=("text", "audio"), **overrides):
    cfg, _ = for_dataset("mosi", modalities=tuple(modalities), d_audio=73)
    return replace(cfg, **{**TINY, **overrides})
