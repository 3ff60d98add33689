"""Optional face front-end: facenet-pytorch InceptionResnetV1 trained on VGGFace2 (512-d identity embedding).

Never a default. Its weights are not in the wheel (facenet-pytorch downloads them at first
use, which fails offline); we only look for them where facenet-pytorch would have cached
them, `$TORCH_HOME/checkpoints/20180402-114759-vggface2.pt`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from msaflow.extractors.frontend_base import FrontEnd, register

WEIGHTS_FILE = "20180402-114759-vggface2.pt"
WEIGHTS_URL = f"https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/{WEIGHTS_FILE}"
INPUT_SIZE = 160


def torch_home() -> Path:
    """facenet-pytorch's cache root: $TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch."""
    default = os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", default)))


def vggface2_weights_path() -> Path:
    path = torch_home() / "checkpoints" / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"front-end facenet-vggface2: weights not found at {path}. Download {WEIGHTS_URL} "
            f"on a machine with internet and copy it to {path} (or set TORCH_HOME to the folder "
            f"whose checkpoints/ subfolder holds {WEIGHTS_FILE})"
        )
    return path


@register
class FaceNetFrontEnd(FrontEnd):
    """Face crops (uint8 RGB, any size) -> L2-normalized 512-d embedding per frame."""

    name = "facenet-vggface2"
    modality = "vision"
    input = "face"
    licence = "MIT (facenet-pytorch); weights from davidsandberg/facenet (MIT), trained on VGGFace2"
    chunk_steps = 64

    def __init__(self, argument: str | None = None):
        super().__init__(argument)
        from facenet_pytorch import InceptionResnetV1

        self.weights_path = vggface2_weights_path()
        self.net = InceptionResnetV1(pretrained=None, classify=False)
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}  # identity classifier unused
        self.net.load_state_dict(state)
        self.out_dim, self.rate = 512, None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H, W, 3) uint8 -> (B, T, 512)."""
        b, t = x.shape[:2]
        images = x.reshape(b * t, *x.shape[2:]).permute(0, 3, 1, 2).to(torch.float32)
        if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        out = self.net((images - 127.5) / 128.0).reshape(b, t, -1)  # facenet's fixed_image_standardization
        return out if mask is None else out * mask[..., None].to(out.dtype)
