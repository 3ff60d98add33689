"""Model registry and the interface every registered model implements.

Adding a model is adding a class:

    @register("my-fusion")
    class MyFusion(MSAModel):
        def __init__(self, cfg: ModelConfig): ...
        def forward(self, batch) -> dict: ...   # at least {"pred": (B,)}

`MSAModel` supplies the defaults: `compute_loss` = L1 of the incomplete view's prediction
(what every baseline trains on) and `param_groups` = the released code's optimiser groups,
found by attribute name: the text encoder under `text_encoder`, the audio/vision LSTM
encoders under `seq_encoders[<modality>]`, everything else in "other".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from msaflow.model.config import ModelConfig, OptimConfig

MODELS: dict[str, type["MSAModel"]] = {}

TEXT_PREFIX = "text_encoder."
SEQ_PREFIX = "seq_encoders."


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} already registered by {MODELS[name].__name__}")
        MODELS[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def _import_model_modules() -> None:
    # registration happens at import; import every module that defines models
    import importlib

    for module in ("msaflow.model.emt", "msaflow.model.dlfr", "msaflow.model.baselines", "msaflow.model.fusion_heads",
                   "msaflow.model.dynmm", "msaflow.model.end_to_end"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:  # a module not written yet must not hide the others
            if err.name != module:
                raise


def build_model(name: str, cfg: ModelConfig) -> "MSAModel":
    _import_model_modules()
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    return MODELS[name](cfg)


def available_models() -> list[str]:
    _import_model_modules()
    return sorted(MODELS)


class MSAModel(nn.Module):
    """Base of every sentiment model: batch dict in, {"pred": (B,), ...} out."""

    registry_name = "?"

    def forward(self, batch: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_loss(self, complete: dict, incomplete: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on a (complete, incomplete) pair of views of one batch; baselines use only the incomplete one."""
        out = self(incomplete)
        l1 = F.l1_loss(out["pred"], incomplete["label"])
        return l1, {"loss": float(l1.detach()), "l1": float(l1.detach())}

    def param_groups(self, opt: OptimConfig) -> list[dict]:
        """Adam groups: text (decay except bias/LayerNorm), text no-decay, audio, vision, other."""
        return released_param_groups(self.named_parameters(), opt)


def released_param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], opt: OptimConfig) -> list[dict]:
    """The released code's Adam groups of trainable parameters, found by name (module docstring)."""
    groups: dict[str, list[nn.Parameter]] = {k: [] for k in ("text", "text_nodecay", "audio", "vision", "other")}
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        if name.startswith(TEXT_PREFIX):
            no_decay = name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name
            groups["text_nodecay" if no_decay else "text"].append(p)
        elif name.startswith(SEQ_PREFIX + "audio."):
            groups["audio"].append(p)
        elif name.startswith(SEQ_PREFIX + "vision."):
            groups["vision"].append(p)
        else:
            groups["other"].append(p)
    settings = {
        "text": (opt.lr_text, opt.wd_text),
        "text_nodecay": (opt.lr_text, 0.0),
        "audio": (opt.lr_audio, opt.wd_audio),
        "vision": (opt.lr_vision, opt.wd_vision),
        "other": (opt.lr_other, opt.wd_other),
    }
    return [{"params": ps, "lr": settings[k][0], "weight_decay": settings[k][1], "name": k}
            for k, ps in groups.items() if ps]
