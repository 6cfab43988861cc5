"""The export-time TensorRT operator check on real ONNX files (built here, and a real exported bundle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_agent.engines import trt_ops  # noqa: E402


def _save(tmp_path: Path, nodes: list, initializers: list | None = None, opset: int = 17, name: str = "m") -> Path:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=initializers or [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def test_table_names_its_tensorrt_version_and_source() -> None:
    table = trt_ops.operator_table()
    assert table.tensorrt_version.startswith("10.")
    assert "onnx-tensorrt" in table.source
    # The operators a U-Flow export is made of must be in the table.
    for op in ("Conv", "Relu", "Exp", "Tanh", "Mul", "Add", "Resize", "ReduceMean", "Cast", "QuantizeLinear"):
        assert op in table.supported
    assert "Unique" not in table.supported


def test_supported_graph_has_no_problems(tmp_path: Path) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Exp", ["r"], ["y"], name="exp")]
    assert trt_ops.unsupported_ops(_save(tmp_path, nodes)) == []


def test_unsupported_operator_is_reported_with_its_node_name(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Unique", ["r"], ["y"], name="dedupe_values"),
        helper.make_node("Custom", ["r"], ["z"], name="my_plugin", domain="com.example"),
    ]
    path = _save(tmp_path, nodes)
    problems = trt_ops.unsupported_ops(path)
    assert [(p.node, p.op_type) for p in problems] == [("dedupe_values", "Unique"), ("my_plugin", "Custom")]
    assert "plugin" in problems[1].reason
    message = trt_ops.describe_problems(problems, path)
    assert "m.onnx" in message and "dedupe_values" in message and "TensorRT 10." in message


def test_opset_outside_the_parser_range_is_reported(tmp_path: Path) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    problems = trt_ops.unsupported_ops(_save(tmp_path, nodes, opset=8))
    assert len(problems) == 1 and problems[0].op_type == "opset" and "opset 8" in problems[0].reason


def _qdq(tmp_path: Path, zero_point: np.ndarray, name: str) -> Path:
    scale = numpy_helper.from_array(np.array(0.05, dtype=np.float32), "scale")
    zp = numpy_helper.from_array(zero_point, "zp")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], name="dq_x"),
    ]
    return _save(tmp_path, nodes, [scale, zp], name=name)


def test_symmetric_int8_qdq_passes(tmp_path: Path) -> None:
    assert trt_ops.unsupported_ops(_qdq(tmp_path, np.array(0, dtype=np.int8), "sym")) == []


def test_asymmetric_or_uint8_qdq_is_reported(tmp_path: Path) -> None:
    problems = trt_ops.unsupported_ops(_qdq(tmp_path, np.array(3, dtype=np.int8), "asym"))
    assert {p.node for p in problems} == {"q_x", "dq_x"}
    assert all("not 0" in p.reason for p in problems)
    problems = trt_ops.unsupported_ops(_qdq(tmp_path, np.array(128, dtype=np.uint8), "u8"))
    assert any("signed INT8" in p.reason for p in problems)


def test_resize_restrictions(tmp_path: Path) -> None:
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["r"], name="up_linear", mode="linear"),
        helper.make_node("Resize", ["r", "", "scales"], ["y"], name="up_cubic", mode="cubic", antialias=1),
    ]
    problems = trt_ops.unsupported_ops(_save(tmp_path, nodes, [scales], opset=18))
    assert {p.node for p in problems} == {"up_cubic"}
    assert len(problems) == 2  # the mode and the antialiasing


def test_nodes_inside_subgraphs_are_checked(tmp_path: Path) -> None:
    then_graph = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["t"], name="inside_then")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["e"], name="inside_else")],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph)]
    problems = trt_ops.unsupported_ops(_save(tmp_path, nodes, [cond]))
    assert [p.node for p in problems] == ["inside_then"]


def test_real_exported_bundle_passes(request: pytest.FixtureRequest) -> None:
    """The training export's model.onnx must be something TensorRT parses."""
    try:
        bundle_dir = request.getfixturevalue("tiny_bundle")
    except pytest.FixtureLookupError:
        pytest.skip("no tiny_bundle fixture (training export not available)")
    path = Path(bundle_dir) / "model.onnx"
    problems = trt_ops.unsupported_ops(path)
    assert problems == [], trt_ops.describe_problems(problems, path)
