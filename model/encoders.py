"""Unimodal encoders: each returns (utterance vector, local sequence, key padding mask).

Key padding masks are True where a position must be ignored by attention (padding, and
for text also [SEP]), the convention of `torch.nn.MultiheadAttention`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from msaflow.model.config import ModelConfig


@dataclass
class Encoded:
    utterance: torch.Tensor  # (B, D)
    local: torch.Tensor  # (B, T, D)
    padding: torch.Tensor  # (B, T) bool, True = ignore


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, max_len) bool, True at positions >= length."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


class TextEncoder(nn.Module):
    """A Hugging Face encoder (fine-tuned, or frozen), or precomputed hidden states.

    utterance = the [CLS] state; local = the states after [CLS]; [SEP] and padding are
    masked out of attention. When the batch carries `text` (precomputed states, features
    mode) the encoder is not run and no encoder weights are needed (`load_weights=False`).
    """

    def __init__(self, cfg: ModelConfig, load_weights: bool = True):
        super().__init__()
        self.frozen = cfg.freeze_text
        self.model = None
        if load_weights:
            from msaflow.extractors.text import load_text_encoder

            self.model = load_text_encoder(cfg.text_model)
            if getattr(self.model, "pooler", None) is not None:
                self.model.pooler = None  # [CLS] state is read directly; an unused pooler would get no gradient
            if self.frozen:
                self.model.requires_grad_(False)
                self.model.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        if self.frozen and self.model is not None:
            self.model.eval()  # a frozen encoder never uses dropout
        return self

    def states(self, batch: dict) -> torch.Tensor:
        """(B, L, D) hidden states, [CLS] first, trimmed to the longest sequence of the batch."""
        lengths = batch["text_lengths"]
        max_len = max(int(lengths.max()), 2)
        if "text" in batch:
            return batch["text"][:, :max_len]
        if self.model is None:
            raise ValueError("batch has no precomputed `text` states and the text encoder was built without weights")
        ids = batch["text_ids"][:, :max_len]
        attention = (~padding_mask(lengths, max_len)).long()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.model(input_ids=ids, attention_mask=attention).last_hidden_state

    def forward(self, batch: dict) -> Encoded:
        states = self.states(batch)
        local = states[:, 1:]
        # valid local positions: after [CLS] and before [SEP]
        ignore = padding_mask((batch["text_lengths"] - 2).clamp(min=0), local.shape[1])
        return Encoded(states[:, 0], local, ignore)


class SequenceEncoder(nn.Module):
    """1-layer unidirectional LSTM + Linear (released EMT-DLFR audio/vision encoder, `AuViSubNet`).

    utterance = linear(last valid hidden state); local = linear(every output). As released, the
    linear layer is an Identity when the LSTM's width already is the output width.
    A sequence of length 0 (modality absent from the clip) is read as one zero step.
    """

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, num_layers=1, batch_first=True)
        self.linear = nn.Linear(hidden, d_out) if hidden != d_out else nn.Identity()

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        max_len = x.shape[1]
        # oneDNN has no bfloat16 LSTM on CPUs without AVX-512: under CPU autocast the LSTM runs in fp32
        fp32 = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", enabled=False) if fp32 else nullcontext():
            packed = pack_padded_sequence(x.float() if fp32 else x, lengths.clamp(min=1).cpu(), batch_first=True,
                                          enforce_sorted=False)
            out, (h_n, _) = self.lstm(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)
        return Encoded(self.linear(h_n[-1]), self.linear(out), padding_mask(lengths.clamp(min=1), max_len))


def build_sequence_encoders(cfg: ModelConfig) -> nn.ModuleDict:
    """One SequenceEncoder per non-text modality of `cfg` (keys "audio", "vision")."""
    return nn.ModuleDict({
        m: SequenceEncoder(cfg.input_dim(m), cfg.lstm_hidden(m), cfg.utterance_dim(m))
        for m in cfg.modalities
        if m != "text"
    })
