"""Can TensorRT's ONNX parser take this model? An export-time check, no GPU needed.

The operator table (``trt_onnx_ops.json`` beside this module) is onnx-tensorrt's support matrix with
the TensorRT version it describes. Besides unknown operators, the check catches the restrictions that
bite quantized and exported U-Flow graphs: Q/DQ zero points must be 0 and signed INT8 (TensorRT's
quantization is symmetric), the opset must be in the parser's range, and Resize has a limited set of
modes. The agent's build step still reports the parser's own errors; this check lets ``uflow export``
and ``uflow calibrate`` fail on the training machine instead of on the camera box.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

TABLE_NAME = "trt_onnx_ops.json"
_STANDARD_DOMAINS = ("", "ai.onnx")
_RESIZE_MODES = {"nearest", "linear"}
_RESIZE_TRANSFORMS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_QUANTIZED_TYPES = {"INT8": 3}  # onnx.TensorProto.INT8; UINT8 (2) is what TensorRT rejects


@dataclass(frozen=True)
class OperatorTable:
    """The parser's support matrix and where it came from."""

    tensorrt_version: str
    source: str
    opset_min: int
    opset_max: int
    supported: frozenset[str]
    restrictions: dict[str, str]
    types: dict[str, tuple[str, ...]]  # data types per operator, as the table names them (FP32, UINT8, ...)


@dataclass(frozen=True)
class OpProblem:
    """One node (or the model itself) that TensorRT's ONNX parser is not expected to accept."""

    node: str
    op_type: str
    reason: str
    rule: str = ""  # a stable name for the check that failed (tests and the migration key on it, not on wording)

    def describe(self) -> str:
        return f"{self.op_type} node {self.node!r}: {self.reason}"


@lru_cache(maxsize=1)
def operator_table() -> OperatorTable:
    """The support matrix shipped with the package."""
    raw = json.loads(
        resources.files(__package__ or "edge_agent.engines.tensorrt.runtime")
        .joinpath(TABLE_NAME)
        .read_text(encoding="utf-8")
    )
    return OperatorTable(
        tensorrt_version=str(raw["tensorrt_version"]),
        source=str(raw["source"]),
        opset_min=int(raw["opset_min"]),
        opset_max=int(raw["opset_max"]),
        supported=frozenset(raw["supported"]),
        restrictions={name: spec["restrictions"] for name, spec in raw["supported"].items() if "restrictions" in spec},
        types={name: tuple(spec["types"]) for name, spec in raw["supported"].items()},
    )


def unsupported_ops(onnx_path: Path | str) -> list[OpProblem]:
    """Every node of the model that TensorRT's ONNX parser is not expected to accept (empty = fine).

    Reads the graph only (external weights are not loaded). Needs the ``onnx`` package.
    """
    try:
        import onnx
    except ImportError as exc:  # the device image may not ship onnx; the TensorRT parser then reports
        raise RuntimeError("checking ONNX operators needs the `onnx` package (pip install onnx)") from exc
    return model_problems(onnx.load(str(onnx_path), load_external_data=False))


def model_problems(model: Any) -> list[OpProblem]:
    """:func:`unsupported_ops` on a loaded ``onnx.ModelProto`` (operators, opset, Q/DQ zero points, Resize)."""
    table = operator_table()
    problems = _opset_problems(model, table)
    constants = constant_values(model.graph)
    for node in _all_nodes(model.graph):
        problems.extend(_node_problems(node, table, constants))
    return problems


def describe_problems(problems: list[OpProblem], onnx_path: Path | str) -> str:
    """One message listing every problem, naming the model and the operator table's TensorRT version."""
    table = operator_table()
    lines = [
        f"{Path(onnx_path).name}: {len(problems)} node(s) TensorRT {table.tensorrt_version}'s ONNX parser "
        "is not expected to accept:"
    ]
    lines += [f"  - {p.describe()}" for p in problems]
    return "\n".join(lines)


def node_label(node: Any) -> str:
    """A node's name, or a stand-in naming its first output when the exporter left it unnamed."""
    return node.name or f"<unnamed, output {node.output[0] if node.output else '?'}>"


def _opset_problems(model: Any, table: OperatorTable) -> list[OpProblem]:
    problems = []
    for opset in model.opset_import:
        if opset.domain in _STANDARD_DOMAINS and not table.opset_min <= opset.version <= table.opset_max:
            problems.append(
                OpProblem(
                    node="<model>",
                    op_type="opset",
                    reason=f"opset {opset.version} is outside TensorRT {table.tensorrt_version}'s range "
                    f"{table.opset_min}..{table.opset_max}; export with an opset in that range",
                    rule="opset",
                )
            )
    return problems


def _all_nodes(graph: Any) -> Iterator[Any]:
    """Nodes of a graph and of every subgraph (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _all_nodes(attribute.g)
            for sub in attribute.graphs:
                yield from _all_nodes(sub)


def constant_values(graph: Any) -> dict[str, Any]:
    """Name -> TensorProto for initializers and Constant node outputs (zero points live there)."""
    values = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = attribute.t
    return values


def _node_problems(node: Any, table: OperatorTable, constants: dict[str, Any]) -> list[OpProblem]:
    name = node_label(node)
    if node.domain not in _STANDARD_DOMAINS:
        return [OpProblem(name, node.op_type, f"operator domain {node.domain!r} needs a TensorRT plugin", "plugin")]
    if node.op_type not in table.supported:
        return [
            OpProblem(
                name, node.op_type, f"not supported by TensorRT {table.tensorrt_version}'s ONNX parser", "operator"
            )
        ]
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return _zero_point_problems(node, name, constants)
    if node.op_type == "Resize":
        return _resize_problems(node, name)
    return []


def _zero_point_problems(node: Any, name: str, constants: dict[str, Any]) -> list[OpProblem]:
    from onnx import numpy_helper

    if len(node.input) < 3 or not node.input[2]:
        return []  # no zero point: the parser quantizes to INT8 with zero 0 (onnx-tensorrt QuantDequantLinearHelper)
    zero_point = constants.get(node.input[2])
    if zero_point is None:
        return [
            OpProblem(
                name, node.op_type, "zero point is computed at run time; TensorRT needs a constant 0", "qdq-zero-point"
            )
        ]
    from onnx import TensorProto

    problems = []
    if zero_point.data_type not in _QUANTIZED_TYPES.values():
        # The parser rejects UINT8 Q/DQ and dequantizes INT8/FP8/INT4 only (not INT32 biases).
        kind = TensorProto.DataType.Name(zero_point.data_type)
        problems.append(
            OpProblem(
                name,
                node.op_type,
                f"quantized type is {kind}, TensorRT takes signed INT8 (QuantType.QInt8)",
                "qdq-type",
            )
        )
    if numpy_helper.to_array(zero_point).any():
        problems.append(
            OpProblem(name, node.op_type, "zero point is not 0 (TensorRT quantization is symmetric)", "qdq-zero-point")
        )
    return problems


def _resize_problems(node: Any, name: str) -> list[OpProblem]:
    attributes = {a.name: a for a in node.attribute}
    problems = []
    mode = attributes["mode"].s.decode() if "mode" in attributes else "nearest"
    if mode not in _RESIZE_MODES:
        problems.append(OpProblem(name, node.op_type, f"mode {mode!r} is not supported (nearest or linear)", "resize"))
    if "coordinate_transformation_mode" in attributes:
        transform = attributes["coordinate_transformation_mode"].s.decode()
        if transform not in _RESIZE_TRANSFORMS:
            problems.append(
                OpProblem(
                    name, node.op_type, f"coordinate_transformation_mode {transform!r} is not supported", "resize"
                )
            )
    if "antialias" in attributes and attributes["antialias"].i:
        problems.append(OpProblem(name, node.op_type, "antialiasing is not supported", "resize"))
    return problems
