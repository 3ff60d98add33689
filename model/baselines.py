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
- `tfn-style`: the fusion of Tensor Fusion (Zadeh et al. 2017), the outer product of [1; h_m]
  over modalities, on these shared encoders and head; not MMSA's TFN (whose subnets, a 3-layer
  MLP per utterance vector and an LSTM over the text, and output range differ);
- `lmf-style`: the fusion of Low-rank Multimodal Fusion (Liu et al. 2018), rank-r modality
  factors multiplied across modalities and summed over the rank, likewise not MMSA's LMF;
- `gated`: gated fusion: tanh(W_m h_m) weighted by per-dimension gates, softmax over modalities;
- `dynmm`: modality-level DynMM as released (Xue & Marculescu 2023, ModalityDynMM/affect/
  affect_dyn.py, `DynMMNetV2`): two stages. The experts are trained first as ordinary runs (a
  cheap text-only model, an expensive late-fusion model over every modality) and loaded from
  their run folders (`extra.dynmm_experts`), frozen by default; then a gate network over the
  inputs of every modality is trained. Weights = softmax(gate / tau) (no Gumbel noise),
  straight-through one-hot with `extra.dynmm_hard: true`; prediction = sum of weight x expert
  prediction, the same function in training and at test; loss = L1 + lambda * mean weight of
  the expensive expert. It reports the share of samples routed to the expensive expert and
  the FLOPs per sample it executes (`expensive_share`, `mflops_per_sample`, ...).

Knobs live in `ModelConfig.extra` (defaults in BASELINE_DEFAULTS). The head is the one of
EMT-DLFR (dropout, Linear-ReLU x2 at `head_dim`, Linear to 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from msaflow.contract import MODALITIES
from msaflow.model.config import ModelConfig, OptimConfig
from msaflow.model.encoders import TextEncoder, build_sequence_encoders, padding_mask
from msaflow.model.registry import MSAModel, register, released_param_groups

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


# ---------------------------------------------------------------- DynMM



def diff_softmax(logits: torch.Tensor, tau: float = 1.0, hard: bool = False) -> torch.Tensor:
    """The released gate function (DynMM `DiffSoftmax`): softmax(logits / tau); with `hard`, the
    one-hot of its argmax in the forward pass and the softmax's gradient (straight-through)."""
    soft = (logits / tau).softmax(-1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


def load_expert(run_dir: str | Path) -> tuple["Baseline", dict]:
    """(model with its best weights, run config) of a finished training run of a baseline."""
    from msaflow.model.registry import build_model

    run_dir = Path(run_dir)
    config_path, best = run_dir / "config.json", run_dir / "best.pt"
    if not config_path.is_file() or not best.is_file():
        raise FileNotFoundError(f"DynMM expert {run_dir}: not a finished training run (needs config.json and "
                                f"best.pt); train the expert first (`msaflow train --model text-only|late-fusion`)")
    run = json.loads(config_path.read_text())
    model = build_model(run["model"], ModelConfig.from_dict(run["model_config"]))
    if not isinstance(model, Baseline) or isinstance(model, DynMM):
        raise ValueError(f"DynMM expert {run_dir}: model {run['model']!r} is not a fusion baseline "
                         f"(text-only, late-fusion, tfn-style, lmf-style, gated)")
    model.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
    return model, run


def pooling_view(model_config: dict) -> dict:
    """A model config as `msaflow evaluate` compares runs before pooling them as seeds: DynMM's
    expert run folders (one pair per seed) are replaced by the experts' model names."""
    extra = dict(model_config.get("extra") or {})
    experts = extra.get("dynmm_experts")
    if not isinstance(experts, dict):
        return model_config
    names = {}
    for role, path in experts.items():
        try:
            names[role] = json.loads((Path(path) / "config.json").read_text())["model"]
        except (OSError, ValueError, KeyError):
            names[role] = str(path)
    return {**model_config, "extra": {**extra, "dynmm_experts": names}}


# ---------------------------------------------------------------- FLOPs (multiply-add = 2 FLOPs)

def text_encoder_flops(encoder: "TextEncoder", lengths: torch.Tensor) -> torch.Tensor:
    """(B,) FLOPs of a BERT-family encoder over sequences of `lengths` tokens: per layer the four
    attention projections, the two feed-forward matrices, and the n x n scores and mixing."""
    model = getattr(encoder, "model", None)
    if model is None:  # precomputed states: the encoder does not run in this model
        return torch.zeros(len(lengths), dtype=torch.float64)
    c = model.config
    h, ff, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    n = lengths.to(torch.float64)
    return layers * (2 * n * (4 * h * h + 2 * h * ff) + 4 * n * n * h)


def sequence_encoder_flops(enc: nn.Module, lengths: torch.Tensor) -> torch.Tensor:
    """(B,) FLOPs of the LSTM over `lengths` steps and of its linear layer on the last state."""
    lstm = enc.lstm
    d_in, hid = lstm.input_size, lstm.hidden_size
    steps = lengths.clamp(min=1).to(torch.float64)
    linear = 2 * enc.linear.in_features * enc.linear.out_features if isinstance(enc.linear, nn.Linear) else 0
    return steps * 2 * 4 * hid * (d_in + hid) + linear


def module_flops(fn, *args) -> float:
    """FLOPs of one call of `fn(*args)` on a batch of one (torch's FLOP counter: matmuls, einsums)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return float(counter.get_total_flops())


def baseline_flops(model: "Baseline", batch: dict, shared_text: bool = False) -> torch.Tensor:
    """(B,) FLOPs of one baseline per sample of `batch`: encoders (by each sample's lengths) + fusion
    and head (constant); `shared_text`: the text encoder's cost is counted elsewhere."""
    n = len(batch["id"])
    total = torch.zeros(n, dtype=torch.float64)
    for m in model.modalities:
        if m == "text":
            if not shared_text:
                total += text_encoder_flops(model.text_encoder, batch["text_lengths"].cpu())
        else:
            total += sequence_encoder_flops(model.seq_encoders[m], batch[f"{m}_lengths"].cpu())
    if not hasattr(model, "_fuse_flops"):
        dims = model.utterance_dims()
        vectors = {m: torch.zeros(1, d, device=next(model.parameters()).device) for m, d in dims.items()}
        was_training = model.training
        model.eval()
        model._fuse_flops = module_flops(model.fuse, vectors)
        model.train(was_training)
    return total + model._fuse_flops


@register("dynmm")
class DynMM(MSAModel):
    """Modality-level DynMM as released: a gate over every modality's inputs weighs a cheap and an
    expensive expert, both trained beforehand (run folders) and frozen by default.

    Gate inputs: for text the masked mean of the (frozen) word-embedding vectors of the tokens, the
    encoder's raw input (the released gate reads the raw GloVe vectors); for audio/vision the mean of
    the raw input steps over the real steps and the share of real steps. Gate: LayerNorm, Linear,
    ReLU, Linear to 2 logits (released: a 1-layer Transformer over the time-aligned concatenated
    inputs; these modalities are not aligned). Forward, training and test alike:
        w = diff_softmax(gate(x), tau, hard);  pred = w_cheap * cheap(x) + w_exp * expensive(x).
    At test with the hard gate the expensive expert runs only on the samples whose weight is 1 (the
    others get weight 0: the same predictions); with the soft gate both experts run on every sample.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.modalities = cfg.modalities
        experts = option(cfg, "dynmm_experts")
        if not isinstance(experts, dict) or set(experts) != {"cheap", "expensive"}:
            raise ValueError("dynmm needs trained experts: model extra.dynmm_experts = {cheap: RUN_DIR (text-only), "
                             "expensive: RUN_DIR (late-fusion)} (DynMM trains in two stages)")
        self.cheap, cheap_run = load_expert(experts["cheap"])
        self.expensive, expensive_run = load_expert(experts["expensive"])
        for role, run in (("cheap", cheap_run), ("expensive", expensive_run)):
            extra = [m for m in run["model_config"]["modalities"] if m not in self.modalities]
            if extra:
                raise ValueError(f"DynMM {role} expert {experts[role]} reads {extra}, which this data lacks")
        self.freeze = bool(option(cfg, "dynmm_freeze"))
        # two frozen copies of one pretrained text encoder are the same function: keep one
        self.shared_text = (self.freeze and "text" in self.cheap.modalities and "text" in self.expensive.modalities
                            and self.cheap.cfg.freeze_text and self.expensive.cfg.freeze_text
                            and self.cheap.cfg.text_model == self.expensive.cfg.text_model)
        if self.shared_text:
            self.expensive.text_encoder = self.cheap.text_encoder
        if self.freeze:
            for expert in (self.cheap, self.expensive):
                expert.requires_grad_(False)
                expert.eval()
        self.lam = float(option(cfg, "dynmm_lambda"))
        self.tau = float(option(cfg, "dynmm_tau"))
        self.hard = bool(option(cfg, "dynmm_hard"))
        gate_in = sum(self._gate_width(m) for m in self.modalities)
        width = int(option(cfg, "dynmm_gate_dim"))
        self.gate = nn.Sequential(nn.LayerNorm(gate_in), nn.Linear(gate_in, width), nn.ReLU(), nn.Linear(width, 2))

    def _text_embeddings(self):
        for expert in (self.cheap, self.expensive):
            enc = getattr(expert, "text_encoder", None)
            if enc is not None and enc.model is not None:
                return enc.model.get_input_embeddings()
        return None

    def _gate_width(self, m: str) -> int:
        if m == "text":
            emb = self._text_embeddings()
            return emb.embedding_dim if emb is not None else self.cfg.input_dim("text")
        return self.cfg.input_dim(m) + 1

    def train(self, mode: bool = True) -> "DynMM":
        super().train(mode)
        if self.freeze:  # frozen experts never use dropout
            self.cheap.eval()
            self.expensive.eval()
        return self

    def gate_inputs(self, batch: dict) -> torch.Tensor:
        parts = []
        for m in self.modalities:
            if m == "text":
                lengths = batch["text_lengths"]
                emb = self._text_embeddings()
                if emb is not None:
                    ids = batch["text_ids"][:, : max(int(lengths.max()), 1)]
                    with torch.no_grad():
                        x = emb(ids).detach()
                else:  # precomputed states only
                    x = batch["text"][:, : max(int(lengths.max()), 1)]
                parts.append(masked_mean_states(x, lengths))
                continue
            x, lengths = batch[m], batch[f"{m}_lengths"]
            real = (~padding_mask(lengths, x.shape[1])).to(x.dtype)
            if f"{m}_present" in batch:
                real = real * batch[f"{m}_present"][:, : x.shape[1]].to(x.dtype)
            count = real.sum(1, keepdim=True)
            parts += [(x * real[..., None]).sum(1) / count.clamp(min=1.0), count / lengths.clamp(min=1)[:, None]]
        return torch.cat(parts, dim=-1)

    def weights(self, batch: dict) -> torch.Tensor:
        """(B, 2) expert weights (cheap, expensive), the same function in training and at test."""
        return diff_softmax(self.gate(self.gate_inputs(batch)), self.tau, self.hard)

    def forward(self, batch: dict) -> dict:
        w = self.weights(batch)
        cheap_pred = self.cheap(batch)["pred"]
        n = len(batch["id"])
        if self.hard and not torch.is_grad_enabled():
            # forward values are one-hot: the expensive expert only where its weight is 1
            ran = w[:, 1] > 0.5
            expensive_pred = torch.zeros_like(cheap_pred)
            chosen = ran.nonzero().squeeze(-1)
            if len(chosen):
                expensive_pred[chosen] = self.expensive(subset(batch, chosen))["pred"]
            pred = torch.where(ran, expensive_pred, cheap_pred)
        else:  # soft weights (or the straight-through gradient) need both experts on every sample
            ran = torch.ones(n, dtype=torch.bool, device=cheap_pred.device)
            pred = w[:, 0] * cheap_pred + w[:, 1] * self.expensive(batch)["pred"]
        report = {"expensive_share": (w[:, 1] > w[:, 0]).float().mean(), "expensive_weight": w[:, 1].mean()}
        if not self.training:
            report.update(self.flops_report(batch, w, ran))
        return {"pred": pred, "expensive_weights": w[:, 1], "report": report}

    @torch.no_grad()
    def flops_report(self, batch: dict, w: torch.Tensor, ran: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean MFLOPs per sample: executed here (gate + cheap expert on every sample + expensive
        expert where it ran; a shared frozen text encoder counted once), the expensive expert alone,
        the saving, and DynMM's own count (sum over experts of mean weight x expert FLOPs)."""
        cheap = baseline_flops(self.cheap, batch)
        expensive = baseline_flops(self.expensive, batch, shared_text=self.shared_text)
        expensive_alone = baseline_flops(self.expensive, batch)
        if not hasattr(self, "_gate_flops"):
            self._gate_flops = module_flops(self.gate, torch.zeros(1, self.gate[0].normalized_shape[0],
                                                                   device=w.device))
        ran = ran.cpu().to(torch.float64)
        executed = self._gate_flops + cheap + ran * expensive
        weighted = w[:, 0].double().cpu() * cheap + w[:, 1].double().cpu() * expensive_alone
        mega = 1e6
        return {"mflops_per_sample": executed.mean() / mega, "mflops_expensive_alone": expensive_alone.mean() / mega,
                "mflops_saved": (expensive_alone - executed).mean() / mega, "mflops_dynmm_count": weighted.mean() / mega}

    def compute_loss(self, complete: dict, incomplete: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The released objective: L1 + lambda * mean weight of the expensive expert."""
        out = self(incomplete)
        l1 = F.l1_loss(out["pred"], incomplete["label"])
        weight = out["expensive_weights"].mean()
        loss = l1 + self.lam * weight
        return loss, {"loss": float(loss.detach()), "l1": float(l1.detach()), "expensive_weight": float(weight.detach()),
                      "expensive_share": float(out["report"]["expensive_share"])}

    def param_groups(self, opt: OptimConfig) -> list[dict]:
        """The released groups for fine-tuned experts' encoders (by their names inside the expert),
        the gate in "other"; frozen experts have no trainable parameters."""
        def inner(name: str) -> str:  # an expert's parameter by its name inside the expert
            head, _, rest = name.partition(".")
            return rest if head in ("cheap", "expensive") else name

        # named_parameters() lists a parameter shared by both experts (their text encoder) once
        return released_param_groups(((inner(n), p) for n, p in self.named_parameters()), opt)
