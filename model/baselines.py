"""Baselines through the same encoders, batch contract and training code as EMT-DLFR: the shared part.

Every baseline reads one utterance vector per modality and fuses them:
- text: masked mean of the text encoder's states over the real tokens ([CLS] ... [SEP]),
  the pooling all-MiniLM-L6-v2 was trained with (`extra.text_pool: "cls"` uses [CLS]);
  with a frozen encoder and `extra.text_memo: DIR` the pooled vectors are memoised
  (model/text_memo.py), which makes frozen-encoder training cheap on a CPU;
- audio / vision: the SequenceEncoder (LSTM + linear) utterance vector.

Registered models (any non-empty subset of modalities unless said otherwise):
- `text-only` (here): the regression head on the text vector (needs text);
- `late-fusion`, `tfn-style`, `lmf-style`, `gated`: the fusion heads over these vectors,
  model/fusion_heads.py;
- `dynmm`: modality-level DynMM, a gate over two trained experts, model/dynmm.py.

This module holds what they share: `Baseline` (encoders -> utterance vectors -> `fuse`), the
per-modality projections, the regression head, and the knobs. Knobs live in `ModelConfig.extra`
(defaults in BASELINE_DEFAULTS). The head is the one of EMT-DLFR (dropout, Linear-ReLU x2 at
`head_dim`, Linear to 1).
"""

from __future__ import annotations

import torch
from torch import nn

from msaflow.contract import MODALITIES
from msaflow.model.config import ModelConfig
from msaflow.model.encoders import TextEncoder, build_sequence_encoders, padding_mask
from msaflow.model.registry import MSAModel, register

BASELINE_DEFAULTS = {
    "text_pool": "mean",  # "mean" | "cls"
    "text_memo": None,  # directory of the frozen-encoder memo; None = no memo
    "fusion_dim": 64,  # per-modality width of late fusion / gated fusion / LMF output
    "tfn_dims": {"text": 32, "audio": 16, "vision": 16},
    "lmf_rank": 4,
    # DynMM: {"cheap": RUN_DIR, "expensive": RUN_DIR} of finished training runs (text-only and
    # late-fusion in the released setting); "{seed}" in a path is not expanded: give each seed's folders
    "dynmm_experts": None,
    "dynmm_freeze": True,  # experts frozen (and in eval mode) while the gate trains; False fine-tunes them too
    "dynmm_lambda": 0.01,  # released `--reg`: weight of the mean expensive-expert weight in the loss
    "dynmm_tau": 1.0,  # released `--temp`
    "dynmm_hard": False,  # released `--hard-gate`: straight-through one-hot weights
    "dynmm_gate_dim": 64,
}


def option(cfg: ModelConfig, name: str):
    return cfg.extra.get(name, BASELINE_DEFAULTS[name])


def regression_head(d_in: int, cfg: ModelConfig) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(cfg.head_dropout),
        nn.Linear(d_in, cfg.head_dim), nn.ReLU(),
        nn.Linear(cfg.head_dim, cfg.head_dim), nn.ReLU(),
        nn.Linear(cfg.head_dim, 1),
    )


def masked_mean_states(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    keep = (~padding_mask(lengths.clamp(min=1), states.shape[1])).to(states.dtype)[..., None]
    return (states * keep).sum(1) / keep.sum(1)


def batch_modalities(batch: dict) -> set[str]:
    return {m for m in MODALITIES if (f"{m}_ids" if m == "text" else m) in batch}


def subset(batch: dict, index: torch.Tensor) -> dict:
    """Rows `index` of every per-sample tensor or list of a batch."""
    n = len(batch["id"])
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            out[k] = v[index]
        elif isinstance(v, list) and len(v) == n:
            out[k] = [v[i] for i in index.tolist()]
        else:
            out[k] = v
    return out


class Baseline(MSAModel):
    """Shared encoders -> one utterance vector per modality -> `fuse` -> prediction.

    The encoders sit under the registry's parameter-group names (`text_encoder`,
    `seq_encoders.<modality>`), so the released code's optimiser groups apply unchanged.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.modalities = cfg.modalities
        self.text_pool = option(cfg, "text_pool")
        if self.text_pool not in ("mean", "cls"):
            raise ValueError(f"extra.text_pool must be 'mean' or 'cls', got {self.text_pool!r}")
        self.memo = None
        if "text" in self.modalities:
            self.text_encoder = TextEncoder(cfg)
            memo_dir = option(cfg, "text_memo")
            if memo_dir and cfg.freeze_text:
                from msaflow.extractors.text import text_model_path
                from msaflow.model.text_memo import open_memo

                self.memo = open_memo(memo_dir, text_model_path(cfg.text_model), self.text_pool)
        self.seq_encoders = build_sequence_encoders(cfg)

    def utterance_dims(self) -> dict[str, int]:
        return {m: self.cfg.utterance_dim(m) for m in self.modalities}

    def _pool(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return states[:, 0] if self.text_pool == "cls" else masked_mean_states(states, lengths)

    def _encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self._pool(self.text_encoder.states({"text_ids": ids, "text_lengths": lengths}), lengths)

    def text_vector(self, batch: dict) -> torch.Tensor:
        if "text" in batch:  # precomputed states (features mode)
            return self._pool(self.text_encoder.states(batch), batch["text_lengths"])
        if self.memo is not None:
            return self.memo.lookup(batch["text_ids"], batch["text_lengths"], self._encode_text)
        return self._encode_text(batch["text_ids"], batch["text_lengths"])

    def utterances(self, batch: dict, modalities: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        wanted = self.modalities if modalities is None else modalities
        missing = [m for m in self.modalities if m not in batch_modalities(batch)]
        if missing:
            raise KeyError(f"batch lacks modalities {missing} the model was built for ({self.modalities})")
        return {
            m: self.text_vector(batch) if m == "text" else self.seq_encoders[m](batch[m], batch[f"{m}_lengths"]).utterance
            for m in wanted
        }

    def fuse(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch: dict) -> dict:
        vectors = self.utterances(batch)
        return {"pred": self.fuse(vectors), "utterance": vectors}


class ModalityProjections(nn.Module):
    """Per modality: LayerNorm (MiniLM states and LSTM outputs live on different scales), Linear, ReLU."""

    def __init__(self, in_dims: dict[str, int], out_dims: dict[str, int], dropout: float = 0.0):
        super().__init__()
        self.nets = nn.ModuleDict({
            m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, out_dims[m]), nn.ReLU(), nn.Dropout(dropout))
            for m, d in in_dims.items()
        })

    def forward(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.nets[m](vectors[m]) for m in self.nets}


@register("text-only")
class TextOnly(Baseline):
    def __init__(self, cfg: ModelConfig):
        if "text" not in cfg.modalities:
            raise ValueError("text-only needs the text modality")
        super().__init__(ModelConfig.from_dict({**cfg.to_dict(), "modalities": ["text"]}))
        self.head = regression_head(self.cfg.utterance_dim("text"), self.cfg)

    def fuse(self, vectors):
        return self.head(vectors["text"]).squeeze(-1)
