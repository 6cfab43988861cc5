"""A tiny contract bundle shaped like U-Flow, for precision tests that need convolutions.

Built with onnx.helper (no torch, no training), seconds to make and to quantize: a two-conv
"backbone", one affine coupling block exactly as FrEIA's AllInOneBlock exports it (subnet
conv-ReLU-conv, x0.1, split, clamp * tanh, exp, multiply, add), a fixed 1x1 permutation conv, then
the U-Flow head (m_s = mean over channels of z^2 at two scales, anomaly map = 1 - mean of upsampled
exp(-0.5 m_s)). The engine I/O contract is the real one: uint8 1xHxWx3 in, float32 maps out.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
from contract_bundle import build_contract_bundle
from onnx import TensorProto, helper, numpy_helper

from edge_agent.bundle import MODEL_NAME, ScaleSpec, file_hashes, read_manifest, write_manifest

SIZE = 32
CHANNELS = 8
NODE_NAMES = {
    "stem": "backbone_stem",
    "down": "backbone_down",
    "hidden": "coupling_subnet_hidden",
    "out": "coupling_subnet_out",
    "perm": "flow_permute",
}


def _conv(rng: np.random.Generator, name: str, cin: int, cout: int, k: int, gain: float) -> list:
    weight = (rng.normal(size=(cout, cin, k, k)) * gain / np.sqrt(cin * k * k)).astype(np.float32)
    bias = (rng.normal(size=cout) * 0.05).astype(np.float32)
    return [numpy_helper.from_array(weight, f"{name}.w"), numpy_helper.from_array(bias, f"{name}.b")]


def _graph(seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    half = CHANNELS // 2
    perm = np.eye(CHANNELS, dtype=np.float32)[rng.permutation(CHANNELS)][:, :, None, None]
    inits = [
        *_conv(rng, "stem", 3, CHANNELS, 3, 2.0),
        *_conv(rng, "down", CHANNELS, CHANNELS, 3, 1.5),
        *_conv(rng, "hidden", half, CHANNELS, 3, 1.5),
        *_conv(rng, "out", CHANNELS, CHANNELS, 1, 1.0),
        numpy_helper.from_array(perm, "perm.w"),
        helper.make_tensor("inv255", TensorProto.FLOAT, [], [1.0 / 255.0]),
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("contrast", TensorProto.FLOAT, [], [12.0]),
        helper.make_tensor("tenth", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("clamp", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("minus_half", TensorProto.FLOAT, [], [-0.5]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("split", TensorProto.INT64, [2], [half, half]),
        helper.make_tensor("zero_i", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one_i", TensorProto.INT64, [1], [1]),
        helper.make_tensor("one_s", TensorProto.INT64, [], [1]),
        helper.make_tensor("big_i", TensorProto.INT64, [1], [1 << 30]),
        helper.make_tensor("full", TensorProto.INT64, [4], [1, 1, SIZE, SIZE]),
    ]
    n = helper.make_node
    nodes = [
        n("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT, name="cast"),
        n("Transpose", ["image_f"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        n("Mul", ["nchw", "inv255"], ["unit"], name="scale"),
        n("Sub", ["unit", "half"], ["offset"], name="centre"),
        n("Mul", ["offset", "contrast"], ["centred"], name="contrast"),
        n("Conv", ["centred", "stem.w", "stem.b"], ["stem"], pads=[1, 1, 1, 1], name=NODE_NAMES["stem"]),
        n("Relu", ["stem"], ["stem_r"], name="stem_relu"),
        n("Conv", ["stem_r", "down.w", "down.b"], ["feat"], pads=[1, 1, 1, 1], strides=[2, 2], name=NODE_NAMES["down"]),
        n("Split", ["feat", "split"], ["x_a", "x_b"], axis=1, name="coupling_split"),
        n("Conv", ["x_a", "hidden.w", "hidden.b"], ["h"], pads=[1, 1, 1, 1], name=NODE_NAMES["hidden"]),
        n("Relu", ["h"], ["h_r"], name="subnet_relu"),
        n("Conv", ["h_r", "out.w", "out.b"], ["a"], name=NODE_NAMES["out"]),
        n("Mul", ["a", "tenth"], ["a_small"], name="coupling_scale_down"),
        # FrEIA's export slices the subnet output with a length read from x_b's shape at run time.
        n("Shape", ["x_b"], ["xb_shape"], name="coupling_shape"),
        n("Gather", ["xb_shape", "one_s"], ["xb_channels"], axis=0, name="coupling_channels"),
        n("Unsqueeze", ["xb_channels", "zero_i"], ["half_end"], name="coupling_end"),
        n("Slice", ["a_small", "zero_i", "half_end", "one_i"], ["s_raw"], name="coupling_slice_s"),
        n("Slice", ["a_small", "half_end", "big_i", "one_i"], ["t"], name="coupling_slice_t"),
        n("Tanh", ["s_raw"], ["s_tanh"], name="coupling_tanh"),
        n("Mul", ["s_tanh", "clamp"], ["s"], name="coupling_clamp"),
        n("Exp", ["s"], ["e"], name="coupling_exp"),
        n("Mul", ["x_b", "e"], ["y_b0"], name="coupling_mul"),
        n("Add", ["y_b0", "t"], ["y_b"], name="coupling_add"),
        n("Concat", ["x_a", "y_b"], ["y"], axis=1, name="coupling_concat"),
        n("Conv", ["y", "perm.w"], ["z0"], name=NODE_NAMES["perm"]),
        n("AveragePool", ["z0"], ["z1"], kernel_shape=[2, 2], strides=[2, 2], name="coarse"),
    ]
    likelihoods = []
    for s, z in enumerate(("z0", "z1")):
        nodes += [
            n("Pow", [z, "two"], [f"sq{s}"], name=f"head_square_{s}"),
            n("ReduceMean", [f"sq{s}"], [f"m_{s}"], axes=[1], keepdims=0, name=f"head_mean_{s}"),
            n("Mul", [f"m_{s}", "minus_half"], [f"hm{s}"], name=f"head_halve_{s}"),
            n("Exp", [f"hm{s}"], [f"lik{s}"], name=f"head_exp_{s}"),
            n("Unsqueeze", [f"lik{s}", "axis1"], [f"lik4_{s}"], name=f"head_unsqueeze_{s}"),
            n("Resize", [f"lik4_{s}", "", "", "full"], [f"up{s}"], mode="linear", name=f"head_resize_{s}"),
        ]
        likelihoods.append(f"up{s}")
    inits.append(helper.make_tensor("axis1", TensorProto.INT64, [1], [1]))
    nodes += [
        n("Add", likelihoods, ["lik_sum"], name="head_sum"),
        n("Mul", ["lik_sum", "half"], ["lik_mean"], name="head_mean"),
        n("Sub", ["one", "lik_mean"], ["amap4"], name="head_complement"),
        n("Squeeze", ["amap4", "axis1"], ["anomaly_map"], name="head_squeeze"),
    ]
    graph = helper.make_graph(
        nodes,
        "precision_test",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, SIZE, SIZE, 3])],
        [
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, SIZE, SIZE]),
            helper.make_tensor_value_info("m_0", TensorProto.FLOAT, [1, SIZE // 2, SIZE // 2]),
            helper.make_tensor_value_info("m_1", TensorProto.FLOAT, [1, SIZE // 4, SIZE // 4]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_precision_bundle(root: Path | str, seed: int = 0) -> Path:
    """Write the U-Flow-shaped graph as a verified bundle into ``root``."""
    root = build_contract_bundle(root, height=SIZE, width=SIZE, strides=(2, 4), name="precision-test")
    onnx.save(_graph(seed), str(root / MODEL_NAME))
    manifest = read_manifest(root)
    scales = tuple(
        ScaleSpec(name=f"m_{s}", channels=CHANNELS, height=SIZE // k, width=SIZE // k, stride=k)
        for s, k in enumerate((2, 4))
    )
    write_manifest(root, manifest.model_copy(update={"files": file_hashes(root, [MODEL_NAME]), "scales": scales}))
    return root


def write_good_images(folder: Path, count: int, seed: int = 1, size: int = 48) -> Path:
    """``count`` textured grey PNGs (larger than the model input, so preprocessing resizes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        base = rng.normal(128, 45, size=(size, size)).astype(np.float32)
        image = cv2.GaussianBlur(base, (5, 5), 1.0)
        cv2.imwrite(str(folder / f"good_{i:03d}.png"), np.clip(image, 0, 255).astype(np.uint8))
    return folder
