"""End-to-end training: pretrained front-ends over the raw members, then any fusion model.

`EndToEnd` wraps a dict of registered front-ends (`msaflow.extractors.frontends`) and a
registered fusion model (`msaflow.model.registry`). Its forward maps a raw-mode batch
(`face` uint8 crops + `vision_present`, `wav` or `fbank` + `audio_present`, `text_ids`)
to the features batch of the batch contract (`vision`, `audio` + lengths + present
masks) and hands that to the fusion model. Text needs no front-end here: the fusion
model's own text encoder reads `text_ids` (fine-tuned unless `freeze_text`).

Missing-feature simulation in end-to-end mode works on the front-end OUTPUTS: the
complete view's features are computed once, and the incomplete view is the same feature
tensors with the dropped steps zeroed (text: dropped tokens are [UNK] in `text_ids`, as
in features mode). A zeroed face crop run through a CNN is not a zero feature, so
dropping raw frames would not be the setting the model is trained for.

Per front-end policy (`FrontEndPolicy`): `frozen` (no gradient, eval mode, run under
no_grad), `trained`, or `unfreeze_after: N` (frozen for epochs < N; `on_epoch_start`
applies it). Each front-end is its own optimiser group with its own learning rate,
beside the fusion model's groups, so unfreezing later needs no new optimiser.

Memory: frames go through a front-end in time chunks (`chunk_frames`), optionally under
activation checkpointing (`checkpoint`), so a long clip does not hold every frame's
activations at once; `bf16` runs front-ends and fusion under bfloat16 autocast (CPU or
GPU); losses are computed in float32.

One module: the policies, front-end chunking, bf16 checks and raw missing-feature simulation are
all parts of `EndToEnd` and read with it; only the config classes could stand apart, and they
only mean something beside the model they configure.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpoint_fn

from msaflow.contract import UNK_ID
from msaflow.model.config import ModelConfig, OptimConfig
from msaflow.model.registry import MSAModel, build_model, register

# front-end input member -> (batch key of the present mask, batch key of the lengths)
RAW_INPUTS = {
    "face": ("vision_present", "vision_lengths"),
    "fbank": ("audio_present", "audio_lengths"),
    "wav": ("audio_present", "audio_lengths"),
}
MODALITY_KEYS = ("vision", "audio")  # the modalities a front-end can serve here (text: the fusion's encoder)
RAW_KEYS = ("face", "wav", "wav_lengths", "fbank")  # raw members a features batch no longer carries
WAV_HOP = 160  # samples per 10 ms step at 16 kHz: the fbank grid the audio front-ends share
WAV_CONTEXT_STEPS = 8  # >= half a 1024-sample CREPE window each side of a wav chunk


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class FrontEndPolicy:
    """When a front-end's weights train: never, always, or from epoch `unfreeze_after` on."""

    unfreeze_after: int | None = None  # None = frozen for good; 0 = trained from the start

    @classmethod
    def parse(cls, value: "str | int | dict | FrontEndPolicy") -> "FrontEndPolicy":
        if isinstance(value, FrontEndPolicy):
            return value
        if isinstance(value, dict) and set(value) == {"unfreeze_after"}:
            return cls(int(value["unfreeze_after"]))
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "frozen":
                return cls(None)
            if text == "trained":
                return cls(0)
            match = re.fullmatch(r"unfreeze_after\s*[:=]\s*(\d+)", text)
            if match:
                return cls(int(match.group(1)))
        raise ValueError(
            f"front-end policy {value!r}: expected 'frozen', 'trained' or 'unfreeze_after: N' (N epochs)"
        )

    def trainable_at(self, epoch: int) -> bool:
        return self.unfreeze_after is not None and epoch >= self.unfreeze_after

    def __str__(self) -> str:
        if self.unfreeze_after is None:
            return "frozen"
        return "trained" if self.unfreeze_after == 0 else f"unfreeze_after: {self.unfreeze_after}"


@dataclass
class EndToEndConfig:
    fusion: str = "emt-dlfr"  # a registered fusion model
    # modality -> registered front-end name ("vision": "fer", "audio": "crepe-tiny")
    frontends: dict[str, str] = field(default_factory=lambda: {"vision": "fer", "audio": "crepe-tiny"})
    # modality -> policy ("frozen" | "trained" | "unfreeze_after: N"); absent = frozen
    policies: dict[str, str] = field(default_factory=dict)
    # modality -> learning rate / weight decay of that front-end's optimiser group
    lr: dict[str, float] = field(default_factory=lambda: {"vision": 1e-4, "audio": 1e-4})
    weight_decay: dict[str, float] = field(default_factory=dict)
    chunk_frames: int | None = None  # time steps per front-end call; None = the front-end's own chunk_steps
    checkpoint: bool = False  # activation checkpointing over each chunk of a trained front-end
    bf16: bool = False  # bfloat16 autocast for front-ends and fusion

    def __post_init__(self) -> None:
        self.frontends = {("vision" if m == "face" else m): n for m, n in self.frontends.items()}
        unknown = sorted(set(self.frontends) - set(MODALITY_KEYS))
        if unknown:
            raise ValueError(
                f"end-to-end front-ends exist for {sorted(MODALITY_KEYS)} only (text is read by the "
                f"fusion model's own encoder); got {unknown}"
            )
        for m in self.policies:
            if m not in self.frontends:
                raise ValueError(f"policy for {m!r} but no front-end for it; front-ends: {self.frontends}")
        for v in self.policies.values():
            FrontEndPolicy.parse(v)  # fail at config time, not at epoch N
        if self.chunk_frames is not None and self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}")

    def policy(self, modality: str) -> FrontEndPolicy:
        return FrontEndPolicy.parse(self.policies.get(modality, "frozen"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EndToEndConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"EndToEndConfig: unknown keys {unknown}; known: {sorted(names)}")
        return cls(**d)


# ---------------------------------------------------------------- bfloat16 on the CPU


class Bf16Unsupported(RuntimeError):
    """bf16 autocast was asked for on a CPU whose math library lacks a bf16 kernel the model needs."""


@functools.cache
def cpu_bf16_problem() -> str | None:
    """None when the ops the front-ends and fusion run under CPU autocast have bf16 kernels here,
    else what failed. (The LSTM always runs in fp32 on the CPU: `SequenceEncoder`.)"""
    x = torch.randn(2, 3, 16, 16)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            nn.functional.conv2d(x, torch.randn(4, 3, 3, 3))
            nn.functional.conv1d(x[:, :, 0], torch.randn(4, 3, 3))
            nn.functional.linear(x.flatten(1), torch.randn(5, x[0].numel()))
            torch.bmm(x[:, 0], x[:, 1])
            nn.functional.scaled_dot_product_attention(x, x, x)
    except RuntimeError as err:
        return str(err).splitlines()[0]
    return None


def require_cpu_bf16() -> None:
    problem = cpu_bf16_problem()
    if problem is not None:
        raise Bf16Unsupported(f"--bf16 on this CPU: its math library has no bfloat16 kernel for an op the model "
                              f"runs ({problem}); train in fp32 (drop --bf16 / bf16: false) or on a GPU")


# ---------------------------------------------------------------- chunked front-end calls


def _present_and_lengths(batch: dict, input_name: str, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    present_key, lengths_key = RAW_INPUTS[input_name]
    present = batch[present_key].bool()
    if lengths_key in batch:
        lengths = batch[lengths_key].long()
    else:  # a loader without lengths: every step up to the last present one is valid
        lengths = torch.full((present.shape[0],), n_steps, dtype=torch.long, device=present.device)
    return present, lengths


def _wav_chunk(wav: torch.Tensor, t0: int, t1: int) -> tuple[torch.Tensor, int]:
    """Samples feeding steps [t0, t1) plus WAV_CONTEXT_STEPS steps of context each side.

    Outside the clip the chunk is zero-padded, as a front-end pads a whole clip, so the
    chunked output equals the whole-clip output. Returns (chunk, steps of left context).
    """
    lo = (t0 - WAV_CONTEXT_STEPS) * WAV_HOP
    hi = (t1 + WAV_CONTEXT_STEPS) * WAV_HOP
    left_pad, right_pad = max(0, -lo), max(0, hi - wav.shape[1])
    piece = wav[:, max(lo, 0) : min(hi, wav.shape[1])]
    if left_pad or right_pad:
        piece = torch.nn.functional.pad(piece, (left_pad, right_pad))
    return piece, WAV_CONTEXT_STEPS


@contextmanager
def _keep_batchnorm_statistics(module: nn.Module):
    """Undo running-statistics updates: a recomputed chunk must not count its batch twice."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


class EndToEnd(MSAModel):
    """Front-ends over raw members + a fusion model; the same interface as every model."""

    registry_name = "end-to-end"

    def __init__(self, fusion: MSAModel, frontends: dict[str, nn.Module], cfg: EndToEndConfig):
        super().__init__()
        self.cfg = cfg
        self.fusion = fusion
        self.frontends = nn.ModuleDict(frontends)
        self.policies = {m: cfg.policy(m) for m in frontends}
        self.epoch = 0
        self.on_epoch_start(0)

    # -- policies

    def on_epoch_start(self, epoch: int) -> list[str]:
        """Freeze / unfreeze front-ends for `epoch`; returns the modalities that changed."""
        self.epoch = epoch
        changed = []
        for m, fe in self.frontends.items():
            trainable = self.policies[m].trainable_at(epoch)
            if trainable != self.trainable(m):
                changed.append(m)
            (fe.unfreeze if trainable else fe.freeze)()
        self.train(self.training)  # re-apply eval mode to the frozen ones
        return changed

    def trainable(self, modality: str) -> bool:
        return any(p.requires_grad for p in self.frontends[modality].parameters())

    def train(self, mode: bool = True) -> "EndToEnd":
        super().train(mode)
        for m, fe in self.frontends.items():
            if not self.trainable(m):
                fe.eval()  # frozen: fixed BatchNorm statistics, no dropout, as in features mode
        return self

    def param_groups(self, opt: OptimConfig) -> list[dict]:
        """The fusion model's groups, then one group per front-end (frozen ones included,
        so `unfreeze_after` needs no new optimiser: Adam skips parameters without a grad)."""
        groups = self.fusion.param_groups(opt)
        for m, fe in self.frontends.items():
            groups.append({
                "params": list(fe.parameters()),
                "lr": self.cfg.lr.get(m, opt.lr_other),
                "weight_decay": self.cfg.weight_decay.get(m, 0.0),
                "name": f"frontend_{m}",
            })
        return [g for g in groups if g["params"]]

    # -- raw batch -> features batch

    def _autocast(self, device: torch.device):
        if not self.cfg.bf16:
            return nullcontext()
        if device.type == "cpu":
            require_cpu_bf16()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def _run_frontend(self, modality: str, batch: dict) -> dict:
        fe = self.frontends[modality]
        x = batch[fe.input]
        n_steps = batch[RAW_INPUTS[fe.input][0]].shape[1]
        present, lengths = _present_and_lengths(batch, fe.input, n_steps)
        trainable = self.trainable(modality) and torch.is_grad_enabled()
        chunk = self.cfg.chunk_frames or getattr(fe, "chunk_steps", 256)
        chunks = []
        with torch.set_grad_enabled(trainable):
            for t0 in range(0, n_steps, chunk):
                t1 = min(t0 + chunk, n_steps)
                chunks.append(self._call_chunk(fe, x, present, t0, t1, trainable))
        feats = torch.cat(chunks, dim=1).float() if chunks else x.new_zeros((x.shape[0], 0, fe.out_dim)).float()
        feats = feats * present.unsqueeze(-1).to(feats.dtype)  # missing steps are zero rows, as in features mode
        return {modality: feats, f"{modality}_lengths": lengths, f"{modality}_present": present}

    def _call_chunk(self, fe, x, present, t0: int, t1: int, trainable: bool) -> torch.Tensor:
        if fe.input == "wav":
            piece, ctx = _wav_chunk(x, t0, t1)
            n = t1 - t0 + 2 * ctx
            mask = torch.nn.functional.pad(present[:, t0:t1], (ctx, ctx))
            trim = slice(ctx, ctx + (t1 - t0))
        else:
            piece, mask, n, trim = x[:, t0:t1], present[:, t0:t1], t1 - t0, slice(None)

        calls = [0]

        def run(piece: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            recompute = calls[0] > 0  # checkpointing runs the chunk again during backward
            calls[0] += 1
            with _keep_batchnorm_statistics(fe) if recompute else nullcontext():
                out = fe(piece, mask)
            if out.shape[1] != n:
                raise ValueError(f"front-end {fe.name}: {out.shape[1]} output steps for {n} input steps")
            return out[:, trim]

        if trainable and self.cfg.checkpoint:
            return checkpoint_fn(run, piece, mask, use_reentrant=False)
        return run(piece, mask)

    def features(self, batch: dict) -> dict:
        """The features batch of the batch contract, computed from a raw batch."""
        out = {k: v for k, v in batch.items() if k not in RAW_KEYS}
        device = next(self.parameters()).device
        with self._autocast(device):
            for m in self.frontends:
                out.update(self._run_frontend(m, batch))
        return out

    # -- the model interface

    def forward(self, batch: dict) -> dict:
        feats = batch if self._is_features(batch) else drop_features(self.features(batch), batch)
        device = next(self.parameters()).device
        with self._autocast(device):
            out = self.fusion(feats)
        return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in out.items()}

    def compute_loss(self, complete: dict, incomplete: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Front-ends run once, on the complete raw view; the incomplete view is those
        features with its `<modality>_missing` steps zeroed (`drop_features`)."""
        feats_c = complete if self._is_features(complete) else self.features(complete)
        if not self._is_features(incomplete):
            lacking = [m for m in self.frontends if f"{m}_missing" not in incomplete]
            if lacking:  # e.g. a features-mode simulation ran on the raw batch and only saw the text
                raise KeyError(f"incomplete raw view has no {', '.join(m + '_missing' for m in lacking)} "
                               f"mask: draw raw views with EndToEnd.simulate_missing")
        feats_i = incomplete if self._is_features(incomplete) else drop_features(feats_c, incomplete)
        device = next(self.parameters()).device
        with self._autocast(device):
            loss, logs = self.fusion.compute_loss(feats_c, feats_i)
        return loss.float(), logs

    def simulate_missing(self, batch: dict, rate: float, *, unk_id: int | None = None,
                         generator: torch.Generator | None = None, seed: int | None = None) -> dict:
        """`msaflow.model.missing.simulate_missing` with the same signature, for raw or features batches."""
        unk_id = self.unk_id if unk_id is None else unk_id
        if self._is_features(batch):
            from msaflow.model.missing import simulate_missing

            return simulate_missing(batch, rate, unk_id=unk_id, generator=generator, seed=seed)
        return simulate_missing_raw(batch, rate, modalities=list(self.frontends), unk_id=unk_id,
                                    generator=generator, seed=seed)

    @property
    def unk_id(self) -> int:
        return int(getattr(getattr(self.fusion, "cfg", None), "unk_id", UNK_ID))

    def _is_features(self, batch: dict) -> bool:
        return all(m in batch for m in self.frontends)


def drop_features(feats: dict, view: dict) -> dict:
    """Features of a (possibly corrupted) raw view: `feats` computed from the raw members,
    with the steps in the view's `<modality>_missing` masks zeroed and the view's other
    keys (text ids with [UNK] at dropped tokens, the masks themselves) taken over."""
    out = dict(feats)
    for k, v in view.items():
        if k not in RAW_KEYS and k not in MODALITY_KEYS:
            out[k] = v
    for m in MODALITY_KEYS:
        dropped = view.get(f"{m}_missing")
        if m in feats and dropped is not None:
            out[m] = feats[m].masked_fill(dropped.bool().unsqueeze(-1), 0.0)
    return out


def _step_proxy(batch: dict, modality: str) -> torch.Tensor:
    """A (B, T, 1) stand-in with the time axis of a raw modality, for the mask drawing."""
    present_key = "vision_present" if modality == "vision" else "audio_present"
    return batch[present_key].unsqueeze(-1)


def simulate_missing_raw(batch: dict, rate: float, *, modalities: list[str], unk_id: int = UNK_ID,
                         generator: torch.Generator | None = None, seed: int | None = None) -> dict:
    """The missing-feature simulation of `msaflow.model.missing` for a raw batch.

    Masks are drawn exactly as in features mode (valid steps only, same seeded per-sample
    uniforms over the same step axes: T_v frames, T_a fbank steps) and stored as
    `<modality>_missing`; text ids get [UNK]. Audio/vision raw members are left as they
    are: the end-to-end model zeroes the dropped steps of the front-end outputs.
    """
    from msaflow.model import missing

    proxy = dict(batch)
    for m in modalities:
        proxy[m] = _step_proxy(batch, m)
        proxy.setdefault(f"{m}_lengths", torch.full((proxy[m].shape[0],), proxy[m].shape[1], dtype=torch.long,
                                                    device=proxy[m].device))
    wanted = [m for m in ("text", *modalities) if m in missing.present_modalities(proxy)]
    masks = missing.drop_masks(proxy, rate, generator=generator, seed=seed, modalities=wanted)
    out = missing.apply_drop(batch, {"text": masks["text"]} if "text" in masks else {}, unk_id)
    for m in modalities:
        out[f"{m}_missing"] = masks[m]
    return out


# ---------------------------------------------------------------- construction


def build_end_to_end(model_cfg: ModelConfig, e2e_cfg: EndToEndConfig, device: str | torch.device = "cpu") -> EndToEnd:
    """Front-ends from the registry, then the fusion model sized to their output widths."""
    from msaflow.extractors import frontends as fe_registry

    frontends = fe_registry.build(dict(e2e_cfg.frontends), torch.device(device))
    dims = {f"d_{m}": fe.out_dim for m, fe in frontends.items()}
    modalities = (("text",) if "text" in model_cfg.modalities else ()) + tuple(frontends)
    model_cfg = dataclasses.replace(model_cfg, modalities=modalities, **dims)
    fusion = build_model(e2e_cfg.fusion, model_cfg)
    return EndToEnd(fusion, frontends, e2e_cfg).to(device)


@register("end-to-end")
class RegisteredEndToEnd(EndToEnd):
    """`build_model("end-to-end", cfg)`: the end-to-end settings ride in `cfg.extra["end_to_end"]`."""

    def __init__(self, cfg: ModelConfig):
        e2e = EndToEndConfig.from_dict(dict(cfg.extra.get("end_to_end", {})))
        built = build_end_to_end(cfg, e2e)
        super().__init__(built.fusion, dict(built.frontends), e2e)
