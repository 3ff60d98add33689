"""DLFR: dual-level feature restoration, and EMT-DLFR (EMT trained with it).

Trained on two views of each batch, complete and incomplete (missing features simulated):
- low-level reconstruction: linear heads map the incomplete view's EMT output sequences
  back to the inputs (text: the complete view's detached encoder states after [CLS];
  audio/vision: the complete raw inputs); SmoothL1 summed over the dropped valid positions,
  divided by (dropped positions × feature dim + 1e-6);
- high-level attraction (SimSiam): the flattened global context and each utterance vector
  of the two views are pulled together through projector + predictor, with stop-gradient
  on the target branch.
total = L1(pred_incomplete) + w_att·(Σ attraction + L1(pred_complete)) + w_rec·Σ reconstruction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from msaflow.model.config import ModelConfig
from msaflow.model.emt import EMT
from msaflow.model.registry import register

EPS = 1e-6


class SimSiamHead(nn.Module):
    """Projector Linear(d→d)+BN(affine=False); predictor Linear(no bias)→BN→ReLU→Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim, affine=False))
        self.predictor = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
        )

    def forward(self, complete: torch.Tensor, incomplete: torch.Tensor) -> torch.Tensor:
        z_c, z_i = self.projector(complete), self.projector(incomplete)
        p_c, p_i = self.predictor(z_c), self.predictor(z_i)
        return attraction_loss(p_c, p_i, z_c, z_i)


def attraction_loss(p_c, p_i, z_c, z_i) -> torch.Tensor:
    """Symmetric negative cosine; the targets z are stop-gradient."""
    return -0.5 * (F.cosine_similarity(p_i, z_c.detach(), dim=-1).mean()
                   + F.cosine_similarity(p_c, z_i.detach(), dim=-1).mean())


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """SmoothL1 summed over dropped positions only, / (n_dropped × feature dim + eps)."""
    per_element = F.smooth_l1_loss(pred, target, reduction="none")
    mask = dropped[..., None].to(per_element.dtype)
    return (per_element * mask).sum() / (mask.sum() * pred.shape[-1] + EPS)


class DLFR(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.recon = nn.ModuleDict({m: nn.Linear(cfg.d_model, cfg.input_dim(m)) for m in cfg.modalities})
        heads = {"global": SimSiamHead(len(cfg.modalities) * cfg.d_model, cfg.predictor_hidden("global"))}
        for m in cfg.modalities:
            heads[m] = SimSiamHead(cfg.utterance_dim(m), cfg.predictor_hidden(m))
        self.attract = nn.ModuleDict(heads)

    def reconstruction(self, out_c: dict, out_i: dict, complete: dict, incomplete: dict) -> dict[str, torch.Tensor]:
        losses = {}
        for m in self.cfg.modalities:
            pred = self.recon[m](out_i["local"][m])
            if m == "text":
                target = out_c["encoded"]["text"].local.detach()  # states after [CLS]
                dropped = _missing(incomplete, m)[:, 1 : 1 + target.shape[1]]
            else:
                target = complete[m].detach()  # end to end these are trained front-end outputs: no collapse
                dropped = _missing(incomplete, m)
            losses[m] = reconstruction_loss(pred, target, dropped)
        return losses

    def attraction(self, out_c: dict, out_i: dict) -> dict[str, torch.Tensor]:
        losses = {"global": self.attract["global"](out_c["global"], out_i["global"])}
        for m in self.cfg.modalities:
            losses[m] = self.attract[m](out_c["utterance"][m], out_i["utterance"][m])
        return losses


def _missing(batch: dict, modality: str) -> torch.Tensor:
    key = f"{modality}_missing"
    if key in batch:
        return batch[key]
    ref = batch["text_ids"] if modality == "text" else batch[modality][..., 0]
    return torch.zeros(ref.shape, dtype=torch.bool, device=ref.device)  # no simulation applied: nothing dropped


@register("emt-dlfr")
class EMTDLFR(EMT):
    """EMT + dual-level feature restoration (the paper's full model)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.dlfr = DLFR(cfg)

    def compute_loss(self, complete: dict, incomplete: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out_c, out_i = self(complete), self(incomplete)
        label = complete["label"]
        l1_i = F.l1_loss(out_i["pred"], label)
        l1_c = F.l1_loss(out_c["pred"], label)
        att = self.dlfr.attraction(out_c, out_i)
        rec = self.dlfr.reconstruction(out_c, out_i, complete, incomplete)
        total = l1_i + self.cfg.w_att * (sum(att.values()) + l1_c) + self.cfg.w_rec * sum(rec.values())
        logs = {"loss": float(total.detach()), "l1": float(l1_i.detach()), "l1_complete": float(l1_c.detach())}
        logs.update({f"att_{k}": float(v.detach()) for k, v in att.items()})
        logs.update({f"rec_{k}": float(v.detach()) for k, v in rec.items()})
        return total, logs
