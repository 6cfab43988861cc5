"""The TensorRT graph check (operators, and the types they compute in) on real ONNX files: built here
with onnx.helper, exported from a real (random-weight) U-Flow by the training export, and the
FP16/INT8 models the calibration commands make."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_agent.engines.tensorrt import graph_check  # noqa: E402
from edge_agent.engines.tensorrt import ops as trt_ops  # noqa: E402


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
    problems = graph_check.check_graph(path, "fp32")
    assert problems == [], graph_check.describe(problems, path)


# --- the type-aware rules ---------------------------------------------------------------------------


def _typed(tmp_path: Path, nodes: list, inputs: list, initializers: list | None = None, name: str = "t") -> Path:
    graph = helper.make_graph(
        nodes,
        name,
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=initializers or [],
    )
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _rules(problems: list[trt_ops.OpProblem]) -> list[tuple[str, str]]:
    return [(p.node, p.rule) for p in problems]


def test_uint8_may_feed_only_a_cast(tmp_path: Path) -> None:
    image = [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 8, 8, 3])]
    cast_first = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Transpose", ["f"], ["y"], perm=[0, 3, 1, 2], name="nchw"),
    ]
    assert graph_check.check_graph(_typed(tmp_path, cast_first, image, name="good")) == []
    transpose_first = [
        helper.make_node("Transpose", ["image"], ["t"], perm=[0, 3, 1, 2], name="nchw"),
        helper.make_node("Cast", ["t"], ["y"], to=TensorProto.FLOAT, name="cast"),
    ]
    # The operator check alone passes this graph: Transpose and Cast are both in the parser's table.
    assert trt_ops.unsupported_ops(_typed(tmp_path, transpose_first, image, name="old")) == []
    problems = graph_check.check_graph(tmp_path / "old.onnx")
    assert _rules(problems) == [("nchw", graph_check.UINT8_RULE)]
    assert "uflow export" in graph_check.describe(problems, tmp_path / "old.onnx")


def test_types_outside_the_operator_row_are_reported(tmp_path: Path) -> None:
    x = [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 4])]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu_f64"),
        helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT, name="to_float"),
    ]
    problems = graph_check.check_graph(_typed(tmp_path, nodes, x))
    # TensorRT has no FP64 at all: neither the Relu nor a Cast from FP64 builds.
    assert _rules(problems) == [("relu_f64", "type"), ("to_float", "type")]


def test_int8_model_must_be_explicitly_quantized(tmp_path: Path) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    path = _save(tmp_path, nodes)
    assert graph_check.check_graph(path, "fp32") == []
    assert [p.rule for p in graph_check.check_graph(path, "int8")] == ["int8-no-qdq"]
    with pytest.raises(ValueError, match="precision must be one of"):
        graph_check.check_graph(path, "int4")


def _per_channel(tmp_path: Path, axis: int | None, weights: bool, name: str) -> Path:
    scale = numpy_helper.from_array(np.full(4, 0.02, dtype=np.float32), "scale")
    zero = numpy_helper.from_array(np.zeros(4, dtype=np.int8), "zp")
    inits = [scale, zero]
    attrs = {} if axis is None else {"axis": axis}
    if weights:
        inits.append(numpy_helper.from_array(np.ones((4, 4, 1, 1), dtype=np.int8), "w_q"))
        nodes = [
            helper.make_node("DequantizeLinear", ["w_q", "scale", "zp"], ["w"], name="dq_w", **attrs),
            helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
        ]
    else:
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="q_x", **attrs),
            helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], name="dq_x", **attrs),
        ]
    return _save(tmp_path, nodes, inits, name=name)


def test_qdq_weights_per_output_channel_activations_per_tensor(tmp_path: Path) -> None:
    assert graph_check.check_graph(_per_channel(tmp_path, 0, weights=True, name="w0"), "int8") == []
    assert _rules(graph_check.check_graph(_per_channel(tmp_path, 1, weights=True, name="w1"), "int8")) == [
        ("dq_w", "qdq-axis")
    ]
    # ONNX's default axis is 1, so a per-channel scale without the attribute is on the wrong axis.
    assert _rules(graph_check.check_graph(_per_channel(tmp_path, None, weights=True, name="wd"), "int8")) == [
        ("dq_w", "qdq-axis")
    ]
    activations = graph_check.check_graph(_per_channel(tmp_path, 1, weights=False, name="a1"), "int8")
    assert {(p.node, p.rule) for p in activations} == {("q_x", "qdq-axis"), ("dq_x", "qdq-axis")}


def test_fp16_model_keeps_the_head_in_fp32(tmp_path: Path) -> None:
    """The shipped FP16 recipe passes; the same conversion without the head kept fails on z² and after."""
    pytest.importorskip("onnxruntime")
    from precision_bundle import build_precision_bundle

    from calibration.fp16 import Fp16Settings, convert_fp16

    root = build_precision_bundle(tmp_path / "bundle")
    outputs = ["anomaly_map", "m_0", "m_1"]
    convert_fp16(root / "model.onnx", tmp_path / "kept.onnx", outputs, Fp16Settings())
    assert graph_check.check_graph(tmp_path / "kept.onnx", "fp16") == []
    convert_fp16(root / "model.onnx", tmp_path / "all.onnx", outputs, Fp16Settings(keep_fp32=()))
    problems = graph_check.check_graph(tmp_path / "all.onnx", "fp16")
    bad = {p.node for p in problems if p.rule == graph_check.HEAD_RULE}
    assert {"head_square_0", "head_square_1", "head_mean_0", "head_mean_1", "head_complement"} <= bad
    assert {p.rule for p in problems} == {graph_check.HEAD_RULE}


def test_fp16_conversion_leaves_no_fp16_round_trip_inside_the_head(tmp_path: Path) -> None:
    """onnxruntime's converter casts each kept node's output to FP16 and back; z² must not pass through FP16."""
    pytest.importorskip("onnxruntime")
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from precision_bundle import build_precision_bundle

    from calibration.fp16 import drop_fp16_round_trips

    root = build_precision_bundle(tmp_path / "bundle")
    model = onnx.load(str(root / "model.onnx"))
    head = [n.name for n in graph_check.head_nodes(model.graph, ["m_0", "m_1"])]
    raw = convert_float_to_float16(model, keep_io_types=True, node_block_list=head)
    assert HEAD in {p.rule for p in graph_check.check_model(raw, "fp16")}
    assert graph_check.check_model(drop_fp16_round_trips(raw), "fp16") == []


HEAD = graph_check.HEAD_RULE


# --- a real export from main, and the old export -------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """model.onnx exported by today's training export and by the pre-fix wrapper (Transpose before Cast)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    pytest.importorskip("FrEIA")
    from training import export
    from training.model import ExportWrapper, UFlow, UFlowConfig, anomaly_map, scale_maps

    class OldExportWrapper(ExportWrapper):
        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
            x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # the shipped bug: permute, then cast
            maps = scale_maps(self.model(x).latents)
            return (anomaly_map(maps, self.model.config.image_height, self.model.config.image_width), *maps)

    torch.manual_seed(0)
    # flow only: the old wrapper predates the heads (tests/test_heads.py checks a hybrid graph)
    config = UFlowConfig(image_height=64, image_width=64, strides=(8, 16), heads=("flow",))
    model = UFlow(config, random_weights=True)
    root = tmp_path_factory.mktemp("exports")
    export.export_onnx(model, root / "main.onnx")
    original = export.ExportWrapper
    export.ExportWrapper = OldExportWrapper  # type: ignore[misc]
    try:
        export.export_onnx(model, root / "old.onnx")
    finally:
        export.ExportWrapper = original  # type: ignore[misc]
    return {"main": root / "main.onnx", "old": root / "old.onnx", "root": root}


def test_export_from_main_passes_and_the_old_graph_fails(exports: dict[str, Path]) -> None:
    main = graph_check.check_graph(exports["main"], "fp32")
    assert main == [], graph_check.describe(main, exports["main"])
    graph = onnx.load(str(exports["main"])).graph
    assert [n.op_type for n in graph.node if "image" in n.input] == ["Cast"]
    old = graph_check.check_graph(exports["old"], "fp32")
    assert [(p.op_type, p.rule) for p in old] == [("Transpose", graph_check.UINT8_RULE)]


def test_old_export_is_migrated_with_identical_outputs(exports: dict[str, Path]) -> None:
    ort = pytest.importorskip("onnxruntime")
    with pytest.raises(graph_check.GraphCheckError, match="UINT8"):
        graph_check.require_clean(exports["old"], "fp32")
    migrated, migration = graph_check.checked_onnx(exports["old"], "fp32", exports["root"] / "work")
    assert migration is not None and migration.moved_over == ("Transpose",)
    assert graph_check.check_graph(migrated, "fp32") == []
    image = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    before = ort.InferenceSession(str(exports["old"]), providers=["CPUExecutionProvider"]).run(None, {"image": image})
    after = ort.InferenceSession(str(migrated), providers=["CPUExecutionProvider"]).run(None, {"image": image})
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    # A model that passes is used as it is.
    assert graph_check.checked_onnx(exports["main"], "fp32", exports["root"] / "work") == (exports["main"], None)
