"""EMT: Efficient Multimodal Transformer (global multimodal context ↔ local sequences).

Per layer and modality m, a mutual-promotion unit (MPU) updates the local sequence from the
global context, H_m ← MPU(H_m, G), and a context copy from the local sequence,
G_m ← MPU(G, H_m); both read the layer's old H_m and G. The copies G_m are fused into the
new G by attention pooling over m. Cost per layer: O(M·T²) (one T×T self-attention per
modality) instead of the O(M²·T²) of pairwise local-local fusion.

Also here, for side-by-side cost and accuracy: the two local-local variants of the paper,
`emt-one-to-one` (MulT-like: a stream per ordered modality pair) and `emt-one-to-all`
(each modality attends to the concatenation of all modalities).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from msaflow.model.config import ModelConfig
from msaflow.model.encoders import Encoded, TextEncoder, build_sequence_encoders
from msaflow.model.registry import MSAModel, register


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """(length, dim) fixed sine/cosine position table (Vaswani et al.)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


class Attention(nn.Module):
    """Multi-head attention: q/kv projections without bias, output with bias, dropout on probabilities."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        scores = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
        if key_padding is not None:
            ignore = rearrange(key_padding, "b j -> b 1 1 j")
            scores = scores.masked_fill(ignore, torch.finfo(scores.dtype).min)
            # a row whose keys are all ignored (e.g. empty transcript) attends to nothing
            probs = scores.softmax(dim=-1) * (~ignore)
        else:
            probs = scores.softmax(dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", self.dropout(probs), v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLUFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(dim, 2 * mult * dim)
        self.down = nn.Linear(mult * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.up(x).chunk(2, dim=-1)
        return self.dropout(self.down(a * F.gelu(gate)))


class MPU(nn.Module):
    """Mutual-promotion unit: pre-LN cross-attention (x reads context), self-attention, GEGLU FF; residuals."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.norm_q, self.norm_ctx = nn.LayerNorm(d), nn.LayerNorm(d)
        self.cross = Attention(d, cfg.n_heads, cfg.attn_dropout)
        self.norm_self = nn.LayerNorm(d)
        self.self_attn = Attention(d, cfg.n_heads, cfg.attn_dropout)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = GEGLUFeedForward(d, cfg.ff_mult, cfg.ffn_dropout)

    def forward(self, x, context, context_padding=None, x_padding=None):
        x = x + self.cross(self.norm_q(x), self.norm_ctx(context), context_padding)
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, x_padding)
        return x + self.ff(self.norm_ff(x))


class AttentionPooling(nn.Module):
    """Fuse K copies of the (M, d) context: Linear(Md→Md), tanh, Linear(Md→1), softmax over copies."""

    def __init__(self, flat_dim: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(flat_dim, flat_dim), nn.Tanh(), nn.Linear(flat_dim, 1))

    def forward(self, copies: torch.Tensor) -> torch.Tensor:  # (B, K, M, d) -> (B, M, d)
        weights = self.score(rearrange(copies, "b k m d -> b k (m d)")).softmax(dim=1)
        return torch.einsum("bk,bkmd->bmd", weights.squeeze(-1), copies)


class MPUBank(nn.Module):
    """The MPUs of a fusion stack, shared or not across layer / modality / direction."""

    def __init__(self, cfg: ModelConfig, modalities: tuple[str, ...], directions: tuple[str, ...]):
        super().__init__()
        self.share = (cfg.share_layer, cfg.share_modality, cfg.share_direction)
        self.units = nn.ModuleDict()
        for layer in range(cfg.n_layers):
            for m in modalities:
                for direction in directions:
                    key = self.key(layer, m, direction)
                    if key not in self.units:
                        self.units[key] = MPU(cfg)

    def key(self, layer: int, modality: str, direction: str) -> str:
        share_layer, share_modality, share_direction = self.share
        return "/".join((
            "*" if share_layer else str(layer),
            "*" if share_modality else modality,
            "*" if share_direction else direction,
        ))

    def __call__(self, layer: int, modality: str, direction: str) -> MPU:
        return self.units[self.key(layer, modality, direction)]


class FusionBase(MSAModel):
    """Encoders, bias-free projections to d_model, sinusoidal positions and the regression head."""

    def __init__(self, cfg: ModelConfig, fused_dim: int):
        super().__init__()
        self.cfg = cfg
        self.modalities = cfg.modalities
        if "text" in self.modalities:
            self.text_encoder = TextEncoder(cfg)
        self.seq_encoders = build_sequence_encoders(cfg)
        self.proj = nn.ModuleDict({m: nn.Linear(cfg.utterance_dim(m), cfg.d_model, bias=False) for m in self.modalities})
        head_in = sum(cfg.utterance_dim(m) for m in self.modalities) + fused_dim
        self.head = nn.Sequential(
            nn.Dropout(cfg.head_dropout),
            nn.Linear(head_in, cfg.head_dim), nn.ReLU(),
            nn.Linear(cfg.head_dim, cfg.head_dim), nn.ReLU(),
            nn.Linear(cfg.head_dim, 1),
        )

    def encode(self, batch: dict) -> dict[str, Encoded]:
        missing = [m for m in self.modalities if (f"{m}_ids" if m == "text" else m) not in batch]
        if missing:
            raise KeyError(f"batch lacks modalities {missing} the model was built for ({self.modalities})")
        out = {}
        for m in self.modalities:
            out[m] = self.text_encoder(batch) if m == "text" else self.seq_encoders[m](batch[m], batch[f"{m}_lengths"])
        return out

    def local_inputs(self, enc: dict[str, Encoded]) -> dict[str, torch.Tensor]:
        local = {}
        for m, e in enc.items():
            h = self.proj[m](e.local)
            local[m] = h + sinusoidal_positions(h.shape[1], h.shape[2]).to(h)
        return local

    def predict(self, enc: dict[str, Encoded], fused: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([enc[m].utterance for m in self.modalities] + [fused], dim=-1)).squeeze(-1)


@register("emt")
class EMT(FusionBase):
    """EMT trained on the incomplete view only (L1), i.e. EMT-DLFR without DLFR."""

    def __init__(self, cfg: ModelConfig):
        n_mod = len(cfg.modalities)
        super().__init__(cfg, fused_dim=n_mod * cfg.d_model)
        self.mpus = MPUBank(cfg, cfg.modalities, ("local", "global"))
        self.pools = nn.ModuleList(
            [AttentionPooling(n_mod * cfg.d_model) for _ in range(1 if cfg.share_layer else cfg.n_layers)]
        )

    def fuse(self, enc: dict[str, Encoded]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        local = self.local_inputs(enc)
        padding = {m: e.padding for m, e in enc.items()}
        context = torch.stack([self.proj[m](enc[m].utterance) for m in self.modalities], dim=1)  # (B, M, d)
        for layer in range(self.cfg.n_layers):
            copies, new_local = [], {}
            for m in self.modalities:
                copies.append(self.mpus(layer, m, "global")(context, local[m], context_padding=padding[m]))
                new_local[m] = self.mpus(layer, m, "local")(local[m], context, x_padding=padding[m])
            context = self.pools[0 if self.cfg.share_layer else layer](torch.stack(copies, dim=1))
            local = new_local
        return context, local

    def forward(self, batch: dict) -> dict:
        enc = self.encode(batch)
        context, local = self.fuse(enc)
        fused = context.flatten(1)
        return {
            "pred": self.predict(enc, fused),
            "utterance": {m: e.utterance for m, e in enc.items()},
            "global": fused,
            "local": local,
            "encoded": enc,
        }


@register("emt-one-to-one")
class EMTOneToOne(FusionBase):
    """Local-local fusion as in MulT: one cross-modal stream per ordered pair (m ← n), O(M²·T²)."""

    def __init__(self, cfg: ModelConfig):
        if len(cfg.modalities) < 2:
            raise ValueError("emt-one-to-one needs at least two modalities")
        self.pairs = [(m, n) for m in cfg.modalities for n in cfg.modalities if m != n]
        super().__init__(cfg, fused_dim=len(self.pairs) * cfg.d_model)
        self.mpus = MPUBank(cfg, tuple(f"{m}<{n}" for m, n in self.pairs), ("local",))

    def forward(self, batch: dict) -> dict:
        enc = self.encode(batch)
        local = self.local_inputs(enc)
        streams = {(m, n): local[m] for m, n in self.pairs}
        for layer in range(self.cfg.n_layers):
            streams = {
                (m, n): self.mpus(layer, f"{m}<{n}", "local")(s, local[n], context_padding=enc[n].padding,
                                                              x_padding=enc[m].padding)
                for (m, n), s in streams.items()
            }
        pooled = [masked_mean(s, enc[m].padding) for (m, _), s in streams.items()]
        return {"pred": self.predict(enc, torch.cat(pooled, dim=-1))}


@register("emt-one-to-all")
class EMTOneToAll(FusionBase):
    """Local-local fusion where each modality attends to all modalities' sequences at once, O(M²·T²)."""

    def __init__(self, cfg: ModelConfig):
        if len(cfg.modalities) < 2:
            raise ValueError("emt-one-to-all needs at least two modalities")
        super().__init__(cfg, fused_dim=len(cfg.modalities) * cfg.d_model)
        self.mpus = MPUBank(cfg, cfg.modalities, ("local",))

    def forward(self, batch: dict) -> dict:
        enc = self.encode(batch)
        local = self.local_inputs(enc)
        all_padding = torch.cat([enc[m].padding for m in self.modalities], dim=1)
        for layer in range(self.cfg.n_layers):
            everything = torch.cat([local[m] for m in self.modalities], dim=1)
            local = {
                m: self.mpus(layer, m, "local")(local[m], everything, context_padding=all_padding,
                                                x_padding=enc[m].padding)
                for m in self.modalities
            }
        pooled = [masked_mean(local[m], enc[m].padding) for m in self.modalities]
        return {"pred": self.predict(enc, torch.cat(pooled, dim=-1))}


def masked_mean(x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    keep = (~padding).float()[..., None]
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)

