"""A small, fast, contract-conforming model bundle built with onnx.helper (no torch, no training).

The graph follows the engine I/O contract exactly: input ``image`` uint8 1xHxWx3 RGB; per scale s an
output ``m_s`` (1 x H/k_s x W/k_s) = mean over the 3 colour channels of z^2 with
z = (average-pooled pixel in [0, 1] - ``mean``) / (``pixel_noise`` / 255 / k_s); and
``anomaly_map`` = 1 - mean over scales of the bilinearly upsampled exp(-0.5 m_s), as U-Flow does.

On "good" images (a flat grey level ``mean * 255`` plus independent Gaussian pixel noise of std
``pixel_noise``), z is standard normal, so m_s follows chi^2(3)/3 and the a-contrario test is
calibrated: the manifest declares 3 channels per scale. Anything brighter or darker than the grey
level over a few pixels is far in the tail and detected. Useful wherever a test needs a real ONNX
Runtime session but not a trained U-Flow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.bundle import (
    ANOMALY_MAP_NAME,
    MODEL_NAME,
    SCHEMA_VERSION,
    InputSpec,
    Manifest,
    NfaSpec,
    Normalisation,
    ScaleSpec,
    file_hashes,
    utc_now,
    write_manifest,
)
from edge_agent.inspection.nfa import log10_number_of_tests

GREY = 0.5


def good_frame(rng: np.random.Generator, height: int, width: int, pixel_noise: float = 8.0) -> np.ndarray:
    """A "good" uint8 RGB frame for a contract bundle: flat grey plus independent pixel noise."""
    noise = rng.normal(0.0, pixel_noise, size=(height, width, 3))
    return np.clip(np.rint(GREY * 255 + noise), 0, 255).astype(np.uint8)


def defect_frame(
    rng: np.random.Generator, height: int, width: int, box: tuple[int, int, int, int], delta: float = 70.0
) -> np.ndarray:
    """A good frame with a darker rectangle (x, y, w, h): a defect a contract bundle must find."""
    image = good_frame(rng, height, width).astype(np.float64)
    x, y, w, h = box
    image[y : y + h, x : x + w] -= delta
    return np.clip(image, 0, 255).astype(np.uint8)


def _graph(height: int, width: int, strides: Sequence[int], pixel_noise: float) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["image_f"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["nchw", "inv255"], ["unit"]),
    ]
    inits = [
        helper.make_tensor("inv255", TensorProto.FLOAT, [], [1.0 / 255.0]),
        helper.make_tensor("grey", TensorProto.FLOAT, [], [GREY]),
        helper.make_tensor("minus_half", TensorProto.FLOAT, [], [-0.5]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("n_scales", TensorProto.FLOAT, [], [float(len(strides))]),
        helper.make_tensor("full_size", TensorProto.INT64, [4], [1, 1, height, width]),
    ]
    outputs = []
    likelihoods = []
    for s, k in enumerate(strides):
        sigma = pixel_noise / 255.0 / k
        inits.append(helper.make_tensor(f"sigma_{s}", TensorProto.FLOAT, [], [sigma]))
        nodes += [
            helper.make_node("AveragePool", ["unit"], [f"pool_{s}"], kernel_shape=[k, k], strides=[k, k]),
            helper.make_node("Sub", [f"pool_{s}", "grey"], [f"dev_{s}"]),
            helper.make_node("Div", [f"dev_{s}", f"sigma_{s}"], [f"z_{s}"]),
            helper.make_node("Mul", [f"z_{s}", f"z_{s}"], [f"z2_{s}"]),
            helper.make_node("ReduceMean", [f"z2_{s}"], [f"m_{s}"], axes=[1], keepdims=0),
            helper.make_node("Mul", [f"m_{s}", "minus_half"], [f"half_{s}"]),
            helper.make_node("Exp", [f"half_{s}"], [f"lik_{s}"]),
            helper.make_node("Unsqueeze", [f"lik_{s}", "axis1"], [f"lik4_{s}"]),
            helper.make_node("Resize", [f"lik4_{s}", "", "", "full_size"], [f"up_{s}"], mode="linear"),
        ]
        outputs.append(helper.make_tensor_value_info(f"m_{s}", TensorProto.FLOAT, [1, height // k, width // k]))
        likelihoods.append(f"up_{s}")
    inits.append(helper.make_tensor("axis1", TensorProto.INT64, [1], [1]))
    nodes += [
        helper.make_node("Sum", likelihoods, ["lik_sum"]),
        helper.make_node("Div", ["lik_sum", "n_scales"], ["lik_mean"]),
        helper.make_node("Sub", ["one", "lik_mean"], ["map4"]),
        helper.make_node("Squeeze", ["map4", "axis1"], [ANOMALY_MAP_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        "contract_bundle",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, height, width, 3])],
        [helper.make_tensor_value_info(ANOMALY_MAP_NAME, TensorProto.FLOAT, [1, height, width]), *outputs],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_contract_bundle(
    root: Path | str,
    height: int = 64,
    width: int = 64,
    strides: Sequence[int] = (4, 8),
    pixel_noise: float = 8.0,
    name: str = "contract",
    version: str = "1.0.0",
    log10_epsilon: float = 0.0,
    min_region_area: int = 0,
) -> Path:
    """Write model.onnx and model.json for the contract graph into ``root``; returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(_graph(height, width, strides, pixel_noise), str(root / MODEL_NAME))
    scales = tuple(
        ScaleSpec(name=f"m_{s}", channels=3, height=height // k, width=width // k, stride=k)
        for s, k in enumerate(strides)
    )
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        name=name,
        version=version,
        created=utc_now(),
        files=file_hashes(root, [MODEL_NAME]),
        backbone="contract-test-graph",
        input=InputSpec(height=height, width=width),
        normalisation=Normalisation(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        scales=scales,
        nfa=NfaSpec(
            log10_number_of_tests=log10_number_of_tests([(s.height, s.width) for s in scales]),
            log10_epsilon=log10_epsilon,
            min_region_area=min_region_area,
        ),
        image_score_threshold=0.5,
    )
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="session")
def contract_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64x64 contract bundle (strides 4 and 8) in a temporary directory."""
    return build_contract_bundle(tmp_path_factory.mktemp("contract_bundle"))
