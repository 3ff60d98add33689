"""Fusion baselines: the utterance vectors of `Baseline` (model/baselines.py) through one fusion head.

Registered models (any non-empty subset of modalities):
- `late-fusion`: per-modality LayerNorm + Linear + ReLU, concatenated, then the head
  (the concatenation "late fusion" of MultiBench / MMSA's LF-DNN);
- `tfn-style`: the fusion of Tensor Fusion (Zadeh et al. 2017), the outer product of [1; h_m]
  over modalities, on these shared encoders and head; not MMSA's TFN (whose subnets, a 3-layer
  MLP per utterance vector and an LSTM over the text, and output range differ);
- `lmf-style`: the fusion of Low-rank Multimodal Fusion (Liu et al. 2018), rank-r modality
  factors multiplied across modalities and summed over the rank, likewise not MMSA's LMF;
- `gated`: gated fusion: tanh(W_m h_m) weighted by per-dimension gates, softmax over modalities.

Knobs in `ModelConfig.extra` (`fusion_dim`, `tfn_dims`, `lmf_rank`; defaults in
model/baselines.py's BASELINE_DEFAULTS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from msaflow.model.baselines import BASELINE_DEFAULTS, Baseline, ModalityProjections, option, regression_head
from msaflow.model.config import ModelConfig
from msaflow.model.registry import register


class LateFusionHead(nn.Module):
    def __init__(self, in_dims: dict[str, int], cfg: ModelConfig):
        super().__init__()
        width = option(cfg, "fusion_dim")
        self.proj = ModalityProjections(in_dims, {m: width for m in in_dims})
        self.head = regression_head(width * len(in_dims), cfg)

    def forward(self, vectors):
        h = self.proj(vectors)
        return self.head(torch.cat([h[m] for m in self.proj.nets], dim=-1)).squeeze(-1)


class TensorFusionHead(nn.Module):
    """z = vec([1; h_1] ⊗ [1; h_2] ⊗ ...): unimodal, bimodal and trimodal interactions in one tensor."""

    def __init__(self, in_dims: dict[str, int], cfg: ModelConfig):
        super().__init__()
        dims = {**BASELINE_DEFAULTS["tfn_dims"], **option(cfg, "tfn_dims")}
        self.proj = ModalityProjections(in_dims, {m: dims[m] for m in in_dims})
        flat = 1
        for m in in_dims:
            flat *= dims[m] + 1
        self.head = regression_head(flat, cfg)

    def forward(self, vectors):
        h = self.proj(vectors)
        z = None
        for m in self.proj.nets:
            x = F.pad(h[m], (1, 0), value=1.0)  # [1; h_m]
            z = x if z is None else rearrange(torch.einsum("bi,bj->bij", z, x), "b i j -> b (i j)")
        return self.head(z).squeeze(-1)


class LowRankFusionHead(nn.Module):
    """fused = sum_r prod_m ([1; h_m] W_m^(r)) (+ bias): TFN's weight tensor in rank-r CP form."""

    def __init__(self, in_dims: dict[str, int], cfg: ModelConfig):
        super().__init__()
        width, rank = option(cfg, "fusion_dim"), option(cfg, "lmf_rank")
        self.proj = ModalityProjections(in_dims, {m: width for m in in_dims})
        self.factors = nn.ParameterDict({
            m: nn.Parameter(nn.init.xavier_normal_(torch.empty(rank, width + 1, width))) for m in in_dims
        })
        self.rank_weights = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, rank)))
        self.bias = nn.Parameter(torch.zeros(width))
        self.head = regression_head(width, cfg)

    def forward(self, vectors):
        h = self.proj(vectors)
        product = None
        for m in self.proj.nets:
            x = F.pad(h[m], (1, 0), value=1.0)
            f = torch.einsum("bd,rdo->bro", x, self.factors[m])
            product = f if product is None else product * f
        fused = torch.einsum("r,bro->bo", self.rank_weights[0], product) + self.bias
        return self.head(fused).squeeze(-1)


class GatedFusionHead(nn.Module):
    """h = sum_m z_m * tanh(W_m x_m), z = softmax over m of W_z [x_1; ...; x_M] (per dimension)."""

    def __init__(self, in_dims: dict[str, int], cfg: ModelConfig):
        super().__init__()
        width = option(cfg, "fusion_dim")
        self.order = list(in_dims)
        self.norms = nn.ModuleDict({m: nn.LayerNorm(d) for m, d in in_dims.items()})
        self.values = nn.ModuleDict({m: nn.Linear(d, width) for m, d in in_dims.items()})
        self.gate = nn.Linear(sum(in_dims.values()), width * len(in_dims))
        self.head = regression_head(width, cfg)

    def forward(self, vectors):
        x = {m: self.norms[m](vectors[m]) for m in self.order}
        values = torch.stack([torch.tanh(self.values[m](x[m])) for m in self.order], dim=1)  # (B, M, W)
        gates = rearrange(self.gate(torch.cat([x[m] for m in self.order], dim=-1)), "b (m w) -> b m w",
                          m=len(self.order)).softmax(dim=1)
        return self.head((gates * values).sum(dim=1)).squeeze(-1)


FUSION_HEADS: dict[str, type[nn.Module]] = {
    "late-fusion": LateFusionHead,
    "tfn-style": TensorFusionHead,
    "lmf-style": LowRankFusionHead,
    "gated": GatedFusionHead,
}


class HeadBaseline(Baseline):
    """A Baseline whose fusion is one of FUSION_HEADS (name = registry name)."""

    head_name = "?"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.fusion = FUSION_HEADS[self.head_name](self.utterance_dims(), cfg)

    def fuse(self, vectors):
        return self.fusion(vectors)


for _name in FUSION_HEADS:
    register(_name)(type(f"{_name.title().replace('-', '')}Baseline", (HeadBaseline,), {"head_name": _name}))
