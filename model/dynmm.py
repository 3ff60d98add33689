"""DynMM: a gate over the inputs weighs two trained baselines (model/baselines.py, model/fusion_heads.py).

`dynmm`, modality-level DynMM as released (Xue & Marculescu 2023, ModalityDynMM/affect/
affect_dyn.py, `DynMMNetV2`): two stages. The experts are trained first as ordinary runs (a
cheap text-only model, an expensive late-fusion model over every modality) and loaded from
their run folders (`extra.dynmm_experts`), frozen by default; then a gate network over the
inputs of every modality is trained. Weights = softmax(gate / tau) (no Gumbel noise),
straight-through one-hot with `extra.dynmm_hard: true`; prediction = sum of weight x expert
prediction, the same function in training and at test; loss = L1 + lambda * mean weight of
the expensive expert. It reports the share of samples routed to the expensive expert and
the FLOPs per sample it executes (`expensive_share`, `mflops_per_sample`, ...).

Also here: the FLOPs counts of a baseline per sample (multiply-add = 2 FLOPs) and `pooling_view`,
how `msaflow evaluate` compares DynMM runs of different seeds. Knobs in `ModelConfig.extra`
(`dynmm_*`; defaults in model/baselines.py's BASELINE_DEFAULTS).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from msaflow.model.baselines import Baseline, masked_mean_states, option, subset
from msaflow.model.config import ModelConfig, OptimConfig
from msaflow.model.encoders import TextEncoder, padding_mask
from msaflow.model.registry import MSAModel, register, released_param_groups
from msaflow.model.weights import load_stored_state


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
    load_stored_state(model, torch.load(best, map_location="cpu", weights_only=True))
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
