"""Baselines through the same encoders, batch contract and training code as EMT-DLFR.

Every baseline reads one utterance vector per modality and fuses them:
- text: masked mean of the text encoder's states over the real tokens ([CLS] ... [SEP]),
  the pooling all-MiniLM-L6-v2 was trained with (`extra.text_pool: "cls"` uses [CLS]);
  with a frozen encoder and `extra.text_memo: DIR` the pooled vectors are memoised
  (model/text_memo.py), which makes frozen-encoder training cheap on a CPU;
- audio / vision: the SequenceEncoder (LSTM + linear) utterance vector.

Registered models (any non-empty subset of modalities unless said otherwise):
- `text-only`: the regression head on the text vector (needs text);
- `late-fusion`: per-modality LayerNorm + Linear + ReLU, concatenated, then the head
  (the concatenation "late fusion" of MultiBench / MMSA's LF-DNN);
- `tfn`: Tensor Fusion (Zadeh et al. 2017): the outer product of [1; h_m] over modalities;
- `lmf`: Low-rank Multimodal Fusion (Liu et al. 2018): rank-r modality factors, multiplied
  across modalities and summed over the rank;
- `gated`: gated fusion: tanh(W_m h_m) weighted by per-dimension gates, softmax over modalities;
- `dynmm`: DynMM-style modality-level dynamic fusion (Xue & Marculescu 2023): a gate routes each
  sample to a cheap unimodal expert (text when present) or an expensive multimodal expert
  (late fusion, or TFN with `extra.dynmm_expert: "tfn"`); Gumbel-softmax weights in training,
  argmax at test (the expensive expert then runs only on the samples routed to it), and a
  compute penalty lambda * E[weight of the expensive expert] added to the L1 loss.

Knobs live in `ModelConfig.extra` (defaults in BASELINE_DEFAULTS). The head is the one of
EMT-DLFR (dropout, Linear-ReLU x2 at `head_dim`, Linear to 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from msaflow.model.config import ModelConfig
from msaflow.model.encoders import TextEncoder, build_sequence_encoders, padding_mask
from msaflow.model.registry import MSAModel, register

BASELINE_DEFAULTS = {
    "text_pool": "mean",  # "mean" | "cls"
    "text_memo": None,  # directory of the frozen-encoder memo; None = no memo
    "fusion_dim": 64,  # per-modality width of late fusion / gated fusion / LMF output
    "tfn_dims": {"text": 32, "audio": 16, "vision": 16},
    "lmf_rank": 4,
    "dynmm_expert": "late-fusion",  # "late-fusion" | "tfn"
    "dynmm_lambda": 0.05,
    "dynmm_tau": 1.0,
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
    return {m for m in ("text", "audio", "vision") if (f"{m}_ids" if m == "text" else m) in batch}


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
    "tfn": TensorFusionHead,
    "lmf": LowRankFusionHead,
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


@register("dynmm")
class DynMM(Baseline):
    """Modality-level dynamic fusion: per sample, a cheap unimodal expert or the full multimodal expert."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        dims = self.utterance_dims()
        self.cheap_modality = self.modalities[0]  # text when present
        expert = option(cfg, "dynmm_expert")
        if expert not in FUSION_HEADS:
            raise ValueError(f"extra.dynmm_expert must be one of {sorted(FUSION_HEADS)}, got {expert!r}")
        self.lam = float(option(cfg, "dynmm_lambda"))
        self.tau = float(option(cfg, "dynmm_tau"))
        self.cheap = regression_head(dims[self.cheap_modality], cfg)
        self.expensive = FUSION_HEADS[expert](dims, cfg)
        # the gate sees the cheap modality's vector and, for the other modalities, only cheap input
        # statistics (mean over real steps, share of real steps), never their encoders
        self.others = [m for m in self.modalities if m != self.cheap_modality]
        gate_in = dims[self.cheap_modality] + sum(cfg.input_dim(m) + 1 for m in self.others)
        self.gate = nn.Sequential(nn.LayerNorm(gate_in), nn.Linear(gate_in, 64), nn.ReLU(), nn.Linear(64, 2))

    def gate_inputs(self, batch: dict, cheap_vector: torch.Tensor) -> torch.Tensor:
        parts = [cheap_vector]
        for m in self.others:
            x, lengths = batch[m], batch[f"{m}_lengths"]
            real = (~padding_mask(lengths, x.shape[1])).to(x.dtype)
            if f"{m}_present" in batch:
                real = real * batch[f"{m}_present"][:, : x.shape[1]].to(x.dtype)
            count = real.sum(1, keepdim=True)
            parts += [(x * real[..., None]).sum(1) / count.clamp(min=1.0), count / lengths.clamp(min=1)[:, None]]
        return torch.cat(parts, dim=-1)

    def forward(self, batch: dict) -> dict:
        cheap_vec = self.utterances(batch, (self.cheap_modality,))[self.cheap_modality]
        logits = self.gate(self.gate_inputs(batch, cheap_vec))
        cheap_pred = self.cheap(cheap_vec).squeeze(-1)
        if self.training:
            weights = F.gumbel_softmax(logits, tau=self.tau, hard=False)  # (B, 2): cheap, expensive
            vectors = {self.cheap_modality: cheap_vec, **self.utterances(batch, tuple(self.others))}
            full_pred = self.expensive(vectors)
            pred = weights[:, 0] * cheap_pred + weights[:, 1] * full_pred
            return {"pred": pred, "expensive_weight": weights[:, 1], "expensive_share": weights[:, 1].mean()}
        route = logits.argmax(dim=-1).bool()  # True = expensive expert
        pred = cheap_pred.clone()
        chosen = route.nonzero().squeeze(-1)
        if len(chosen):  # the expensive expert (and the other encoders) only for the routed samples
            sub = subset(batch, chosen)
            vectors = {self.cheap_modality: cheap_vec[chosen], **self.utterances(sub, tuple(self.others))}
            pred[chosen] = self.expensive(vectors)
        return {"pred": pred, "route": route, "expensive_share": route.float().mean()}

    def compute_loss(self, complete: dict, incomplete: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out = self(incomplete)
        l1 = F.l1_loss(out["pred"], incomplete["label"])
        share = out["expensive_weight"].mean() if "expensive_weight" in out else out["expensive_share"]
        loss = l1 + self.lam * share
        return loss, {"loss": float(loss.detach()), "l1": float(l1.detach()), "expensive_share": float(share.detach())}
