"""The type-aware TensorRT graph check, and the migration of bundles exported before the cast-first fix.

:mod:`edge_agent.engines.tensorrt.ops` asks "does TensorRT's ONNX parser know this operator?". That is not
enough: TensorRT layers accept only some data types, and the first real build of every exported model
would have failed on one of them (a UINT8 input feeding a Transpose). This check runs ONNX shape and
type inference and then applies, per node, the rules a TensorRT build enforces:

- ``operator``/``opset``/``qdq-*``/``resize``: the operator-level checks of trt_ops;
- ``uint8-not-into-cast``: a UINT8 tensor may feed only a Cast (TensorRT accepts a UINT8 network input
  only straight into a Cast layer; even data-movement layers reject it: NVIDIA/TensorRT#3985 and the
  onnx-tensorrt operator notes);
- ``type``: the data type a node computes in must be in the operator's row of the support table
  (``trt_onnx_ops.json``: https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md);
- ``head-fp32``: z², the channel mean (m_s) and the anomaly map are FP32 in every model, FP16 ones
  included: |z| > 256 squares to inf in FP16, exactly on the defective frames;
- ``qdq-axis``: Q/DQ weights are quantized per output channel (axis 0) or per tensor, activations
  per tensor (TensorRT's explicit quantization);
- ``int8-no-qdq``: an INT8 model is an explicitly quantized (Q/DQ) one.

The check needs the ``onnx`` package (training machine; the ``tensorrt-*`` extras install it on GPU
boxes). It runs at ``uflow export``, ``uflow calibrate fp16/int8`` and ``edge-agent build-engine``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.engines.tensorrt.ops import (
    OpProblem,
    constant_values,
    describe_problems,
    model_problems,
    node_label,
    operator_table,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
UINT8_RULE = "uint8-not-into-cast"
HEAD_RULE = "head-fp32"
ANOMALY_MAP = "anomaly_map"
# Type-agnostic data movement: a cast commutes with them, so the migration may move a Cast in front.
_DATA_MOVEMENT = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"}
# Between an m_s output and its channel mean (a Cast is what keep_io_types adds at an FP16 output).
_PASSTHROUGH = {"Squeeze", "Unsqueeze", "Reshape", "Identity", "Cast", "Flatten"}
# Between a memory-bank map and its ReduceMin: the clamp at 0, the division by C, and the Add of ||x||²
# (a bank distance computed as ||x||² + min_b (||b||² - 2 x.b), training/heads.py).
_MEMORY_TAIL = _PASSTHROUGH | {"Clip", "Max", "Div", "Mul", "Add"}
# Inside the bank distance, between the ReduceMin and the Conv / sum of squares: ||x||² - 2 x.b + ||b||² in
# bundles exported before the fused form (today's graph has the biased Conv right under the ReduceMin).
_MEMORY_ARITHMETIC = {"Add", "Sub", "Mul", "Neg", "Cast"}
GAUSSIAN_PREFIX = "g_"  # the manifest's name of a Gaussian head's map (edge_agent.bundle.ScaleSpec)
DETAIL_PREFIX = "p_"  # the detail head's map: a positional Gaussian at the finest stride (training/heads.py)
TEXTURE_PREFIX = "t_"  # the texture head's 1 x 1 map: whitened texture statistics (training/heads.py)
# onnx.TensorProto data type numbers -> the names the support table uses (FP64 and strings: none).
_TABLE_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 16: "BF16"}
_TABLE_TYPES |= {17: "FP8", 22: "INT4"}  # FLOAT8E4M3FN, INT4
_FLOAT_TYPES = {1, 10, 16}
_FLOAT, _UINT8 = 1, 2


class GraphCheckError(RuntimeError):
    """The model breaks a TensorRT graph rule; the message lists every offending node."""


@dataclass(frozen=True)
class Migration:
    """What :func:`cast_first` changed in an old export."""

    input: str
    moved_over: tuple[str, ...]  # op types of the data-movement nodes the Cast now precedes


def check_graph(onnx_path: Path | str, precision: str = "fp32") -> list[OpProblem]:
    """Every TensorRT graph rule ``onnx_path`` breaks (empty = fine); see the module docstring."""
    import onnx

    return check_model(onnx.load(str(onnx_path), load_external_data=False), precision)


def check_model(model: Any, precision: str = "fp32") -> list[OpProblem]:
    """:func:`check_graph` on a loaded ``onnx.ModelProto``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    problems = model_problems(model)
    types, inferred = _inferred_types(model)
    if inferred is not None:
        problems.append(inferred)
    graph = model.graph
    consumers = _consumers(graph)
    problems += _uint8_problems(graph, types, consumers)
    problems += _type_problems(graph, types)
    problems += _head_problems(graph, types, consumers, precision)
    problems += _qdq_axis_problems(graph)
    if precision == "int8" and not any(n.op_type == "DequantizeLinear" for n in graph.node):
        problems.append(
            OpProblem(
                "<model>",
                "model",
                "an INT8 model must be explicitly quantized (Q/DQ); make it with `uflow calibrate int8`",
                "int8-no-qdq",
            )
        )
    return problems


def describe(problems: Sequence[OpProblem], onnx_path: Path | str) -> str:
    """One message for every problem, with what to do about the ones that have a known fix."""
    text = describe_problems(list(problems), onnx_path)
    if any(p.rule == UINT8_RULE for p in problems):
        text += (
            "\nThe UINT8 image must feed only a Cast: this is the graph of an export made before the "
            "cast-first fix. Export the run again with `uflow export` (and re-run `uflow calibrate`); "
            "`edge-agent build-engine` migrates such a model by moving the Cast in front."
        )
    if any(p.rule == HEAD_RULE for p in problems):
        text += "\nMake the FP16 model with `uflow calibrate fp16 --keep-fp32 head` (the default)."
    return text


def require_clean(onnx_path: Path | str, precision: str) -> None:
    """Raise GraphCheckError listing the problems when ``onnx_path`` breaks a rule."""
    problems = check_graph(onnx_path, precision)
    if problems:
        raise GraphCheckError(describe(problems, onnx_path))


# --- the rules ---------------------------------------------------------------------------------------


def _inferred_types(model: Any) -> tuple[dict[str, int], OpProblem | None]:
    """Element type of every tensor name ONNX shape and type inference can tell."""
    import onnx

    problem = None
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:  # onnx raises InferenceError or ValidationError subtypes; their text is the reason
        problem = OpProblem("<model>", "model", f"ONNX shape/type inference fails: {exc}", "inference")
        inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types: dict[str, int] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    types[node.output[0]] = attribute.t.data_type
    return types, problem


def _consumers(graph: Any) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                found.setdefault(name, []).append(node)
    return found


def _uint8_problems(graph: Any, types: dict[str, int], consumers: dict[str, list[Any]]) -> list[OpProblem]:
    problems = []
    for tensor, elem in types.items():
        if elem != _UINT8:
            continue
        for node in consumers.get(tensor, []):
            if node.op_type != "Cast":
                problems.append(
                    OpProblem(
                        node_label(node),
                        node.op_type,
                        f"takes the UINT8 tensor {tensor!r}; TensorRT accepts UINT8 only straight into a Cast",
                        UINT8_RULE,
                    )
                )
    return problems


def _node_type(node: Any, types: dict[str, int]) -> int | None:
    """The type a node computes in: its data input's, or its output's for nodes without a data input."""
    if node.op_type in ("Constant", "ConstantOfShape", "Shape", "Size", "Range", "EyeLike") or not node.input:
        # Shape/Size read only the shape; their INT64 result is what TensorRT computes.
        return types.get(node.output[0]) if node.output else None
    return types.get(node.input[0]) if node.input[0] else None


def _type_problems(graph: Any, types: dict[str, int]) -> list[OpProblem]:
    table = operator_table()
    problems = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in table.types:
            continue  # unknown operators are reported by trt_ops
        elem = _node_type(node, types)
        if elem is None or (elem == _UINT8 and node.op_type != "Cast"):
            continue  # type unknown, or the UINT8 rule already names this node
        name = _TABLE_TYPES.get(elem)
        allowed = table.types[node.op_type]
        if name is None or name not in allowed:
            import onnx

            onnx_name = onnx.TensorProto.DataType.Name(elem)
            problems.append(
                OpProblem(
                    node_label(node),
                    node.op_type,
                    f"computes in {onnx_name}; TensorRT's {node.op_type} takes {', '.join(allowed)}",
                    "type",
                )
            )
    return problems


def head_nodes(graph: Any, scale_outputs: Iterable[str]) -> list[Any]:
    """The U-Flow head: where each map output starts, and every node downstream of those starts.

    From each output, walk back through reshaping ops and Casts to the channel ReduceMean (a flow m_s,
    or a Gaussian map ``g_*``, whose whitening Conv also starts the head; a detail map ``p_*`` with a
    covariance per position starts at its whitening MatMul) whose input squares z (Pow or
    Mul), or through the clamp and division to the ReduceMin of a memory-bank map (whose bank Conv and
    sum of squares start it). Raises ValueError when an output is not built that way.
    """
    producer = {out: node for node in graph.node for out in node.output}
    consumers = _consumers(graph)
    squares: list[Any] = []
    for output in scale_outputs:
        node = producer.get(output)
        while node is not None and node.op_type in (_MEMORY_TAIL if _reaches_min(node, producer) else _PASSTHROUGH):
            if node.op_type == "Add":
                # ||x||² joins after the ReduceMin: its sum of squares starts the head too; walk on to the min.
                branches = [(producer.get(i), _reaches_min(producer.get(i), producer)) for i in node.input]
                squares.extend(s for b, to_min in branches if not to_min for s in _sum_of_squares(b, producer))
                node = next((b for b, to_min in branches if to_min), None)
                continue
            node = producer.get(node.input[0] if node.input[0] in producer else node.input[-1])
        if node is not None and node.op_type == "ReduceMin":
            squares.extend(_bank_distance_starts(node, producer))
            continue
        if node is None or node.op_type != "ReduceMean":
            raise ValueError(f"output {output!r} is not a mean over channels (found {getattr(node, 'op_type', None)})")
        square = producer.get(node.input[0])
        while square is not None and square.op_type == "Cast":
            square = producer.get(square.input[0])
        if square is None or square.op_type not in ("Pow", "Mul"):
            raise ValueError(f"output {output!r} is not the mean of a square")
        squares.append(square)
        whiten = producer.get(square.input[0])
        if output.startswith((GAUSSIAN_PREFIX, DETAIL_PREFIX)):
            # The whitening: a Conv under the square, or (a covariance per position) a batched MatMul that the
            # square reads back through its reshapes.
            while whiten is not None and whiten.op_type in _DATA_MOVEMENT:
                whiten = producer.get(whiten.input[0])
            if whiten is not None and whiten.op_type in ("Conv", "MatMul"):
                squares.append(whiten)
        if output.startswith(TEXTURE_PREFIX) and whiten is not None and whiten.op_type in ("Gemm", "MatMul"):
            squares.extend(_texture_starts(whiten, producer))
    found: dict[int, Any] = {}
    stack = list(squares)
    while stack:
        node = stack.pop()
        if id(node) in found:
            continue
        found[id(node)] = node
        for out in node.output:
            stack.extend(consumers.get(out, []))
    return list(found.values())


def _texture_starts(whiten: Any, producer: dict[str, Any]) -> list[Any]:
    """Where the texture statistics start: each scale's channel mean (ReduceMean of the features) and its
    centring (Sub), found from the whitening through the Concat, the reshapes, and the standard deviation's
    Sqrt, ReduceMean and square; the walk stops there, so no backbone node joins the head."""
    starts = [whiten]
    concat = producer.get(whiten.input[0])
    while concat is not None and concat.op_type in _PASSTHROUGH:
        concat = producer.get(concat.input[0])
    if concat is None or concat.op_type != "Concat":
        raise ValueError(f"texture whitening {whiten.name!r} does not read a Concat of statistics")
    for name in concat.input:
        node = producer.get(name)
        while node is not None and node.op_type in _PASSTHROUGH:
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Sqrt":  # a standard deviation: sqrt(mean((f - mean)^2))
            node = producer.get(node.input[0])
            square = producer.get(node.input[0]) if node is not None and node.op_type == "ReduceMean" else None
            node = producer.get(square.input[0]) if square is not None and square.op_type in ("Mul", "Pow") else None
            if node is None or node.op_type != "Sub":
                raise ValueError(f"texture statistic {name!r} is not a centred standard deviation")
        elif node is None or node.op_type != "ReduceMean":
            raise ValueError(f"texture statistic {name!r} is not a channel mean")
        starts.append(node)
    return starts


def _reaches_min(node: Any, producer: dict[str, Any], depth: int = 8) -> bool:
    """Whether walking back from ``node`` through the memory tail's ops meets a ReduceMin."""
    if node is None or depth == 0:
        return False
    if node.op_type == "ReduceMin":
        return True
    if node.op_type not in _MEMORY_TAIL:
        return False
    return any(_reaches_min(producer.get(i), producer, depth - 1) for i in node.input)


def _sum_of_squares(node: Any, producer: dict[str, Any]) -> list[Any]:
    """A ReduceSum / ReduceSumSquare of a square (through Casts), with that square; [] when it is not one."""
    while node is not None and node.op_type == "Cast":
        node = producer.get(node.input[0])
    if node is None or node.op_type not in ("ReduceSum", "ReduceSumSquare"):
        return []
    square = producer.get(node.input[0])
    return [node, square] if square is not None and square.op_type in ("Pow", "Mul") else [node]


def _bank_distance_starts(reduce_min: Any, producer: dict[str, Any]) -> list[Any]:
    """The bank Conv(s) and the sums of squares (with their squares) that feed a memory map's ReduceMin."""
    starts, seen, stack = [], set(), list(reduce_min.input[:1])
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Conv":
            starts.append(node)
        elif node.op_type in ("ReduceSum", "ReduceSumSquare"):
            starts.extend(_sum_of_squares(node, producer))
        elif node.op_type in _MEMORY_ARITHMETIC:
            stack.extend(node.input)
    if not any(n.op_type == "Conv" for n in starts):
        raise ValueError(f"ReduceMin {reduce_min.name!r} is not over a memory-bank distance (no bank Conv)")
    return starts


def _head_problems(
    graph: Any, types: dict[str, int], consumers: dict[str, list[Any]], precision: str
) -> list[OpProblem]:
    scale_outputs = [o.name for o in graph.output if o.name != ANOMALY_MAP]
    try:
        head = head_nodes(graph, scale_outputs)
    except ValueError as exc:
        if precision != "fp16":
            return []  # an FP32/INT8 model computes the head in FP32 whatever its shape
        return [
            OpProblem("<model>", "model", f"cannot find z² and the channel means in the FP16 model: {exc}", HEAD_RULE)
        ]
    problems = []
    for node in head:
        for out in node.output:
            elem = types.get(out)
            if elem in _FLOAT_TYPES and elem != _FLOAT:
                problems.append(
                    OpProblem(
                        node_label(node),
                        node.op_type,
                        f"computes {out!r} in {_TABLE_TYPES[elem]}; z², the channel mean and the anomaly map "
                        "must stay FP32 (|z| > 256 overflows FP16)",
                        HEAD_RULE,
                    )
                )
    return problems


def _qdq_axis_problems(graph: Any) -> list[OpProblem]:
    from onnx import numpy_helper

    constants = constant_values(graph)
    problems = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        scale = constants.get(node.input[1])
        if scale is None:
            problems.append(OpProblem(node_label(node), node.op_type, "scale is computed at run time", "qdq-axis"))
            continue
        if numpy_helper.to_array(scale).size <= 1:
            continue  # per tensor: always fine
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)  # ONNX's default axis is 1
        if node.input[0] not in constants:
            problems.append(
                OpProblem(
                    node_label(node),
                    node.op_type,
                    "quantizes an activation per channel; TensorRT takes activations per tensor",
                    "qdq-axis",
                )
            )
        elif axis != 0:
            problems.append(
                OpProblem(
                    node_label(node),
                    node.op_type,
                    f"quantizes weights per channel on axis {axis}; TensorRT takes axis 0 (output channels)",
                    "qdq-axis",
                )
            )
    return problems


# --- migration of old exports -----------------------------------------------------------------------


def cast_first(model: Any) -> Migration | None:
    """Move the Cast of a UINT8 graph input in front of the data-movement nodes it followed, in place.

    An export made before the fix reads ``image -> Transpose -> Cast(float)``; casting each element
    first and moving the data afterwards computes the same floats, and TensorRT accepts it. Returns
    what was moved, or None when no input has that shape (nothing changed; the check's message stands).
    """
    graph = model.graph
    for value in graph.input:
        if value.type.tensor_type.elem_type != _UINT8:
            continue
        consumers = _consumers(graph)
        outputs = {o.name for o in graph.output}
        chain: list[Any] = []
        tensor = value.name
        cast = None
        while True:
            users = consumers.get(tensor, [])
            if len(users) != 1 or tensor in outputs:
                break  # the uint8 tensor is also used elsewhere: moving the Cast would change that use
            user = users[0]
            if user.op_type == "Cast":
                cast = user
                break
            if user.op_type not in _DATA_MOVEMENT or user.input[0] != tensor:
                break
            chain.append(user)
            tensor = user.output[0]
        if cast is None or not chain:
            continue
        cast_out = cast.output[0]
        moved = f"{value.name}_cast_first"
        cast.input[0] = value.name
        cast.output[0] = moved
        chain[0].input[0] = moved
        chain[-1].output[0] = cast_out
        # The tensors between the moved nodes are floats now; drop their stale uint8 type annotations.
        renamed = {n.output[0] for n in chain}
        keep = [v for v in graph.value_info if v.name not in renamed | {cast_out, moved}]
        del graph.value_info[:]
        graph.value_info.extend(keep)
        nodes = list(graph.node)
        nodes.remove(cast)
        nodes.insert(nodes.index(chain[0]), cast)  # topological order: the Cast now comes first
        del graph.node[:]
        graph.node.extend(nodes)
        return Migration(value.name, tuple(n.op_type for n in chain))
    return None


def checked_onnx(onnx_path: Path, precision: str, work_dir: Path) -> tuple[Path, Migration | None]:
    """The ONNX file to give TensorRT's parser: ``onnx_path`` when it passes the check, else a migrated
    copy in ``work_dir`` when the only problem is an old export's UINT8 Transpose; otherwise
    GraphCheckError naming every problem. Without the ``onnx`` package the check is skipped (logged)
    and TensorRT's parser reports what it rejects.
    """
    try:
        import onnx
    except ImportError:
        log.warning(
            "the onnx package is not installed: the TensorRT graph check is skipped (pip install onnx)",
            extra={"event": "graph_check_skipped", "onnx": str(onnx_path)},
        )
        return onnx_path, None
    model = onnx.load(str(onnx_path))
    problems = check_model(model, precision)
    if not problems:
        log.info("TensorRT graph check passed", extra={"event": "graph_check_ok", "onnx": str(onnx_path)})
        return onnx_path, None
    if any(p.rule != UINT8_RULE for p in problems):
        raise GraphCheckError(describe(problems, onnx_path))
    migration = cast_first(model)
    remaining = check_model(model, precision) if migration else problems
    if migration is None or remaining:
        raise GraphCheckError(describe(remaining, onnx_path))
    from edge_agent.bundle import sha256_of

    work_dir.mkdir(parents=True, exist_ok=True)
    migrated = work_dir / f"{sha256_of(onnx_path)[:12]}-{onnx_path.stem}.cast-first.onnx"
    onnx.save(model, str(migrated))
    log.warning(
        f"{onnx_path.name} is an old export (UINT8 {migration.input!r} feeds {'/'.join(migration.moved_over)} "
        "before its Cast); building from a migrated copy with the Cast first. Export the run again to fix "
        "the bundle itself.",
        extra={"event": "onnx_migrated", "onnx": str(onnx_path), "migrated": str(migrated)},
    )
    return migrated, migration
