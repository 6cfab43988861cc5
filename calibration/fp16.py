"""FP16 ONNX for strongly typed TensorRT builds (TensorRT 10.3+ and 11: the precision comes from the ONNX types).

The model's floating-point weights and activations become FP16 while the engine I/O contract is
kept: ``image`` stays uint8 and the outputs stay float32 (``keep_io_types``). The U-Flow head, where
m_s = mean of z^2 over channels and exp(-0.5 m_s) are computed, is kept in FP32 (``--keep-fp32
head``, the default): it costs nothing (tiny maps), and z^2 overflows FP16 for |z| > 256, which is
exactly what a defect produces. The TensorRT graph check (``head-fp32`` rule) verifies it. After
conversion, ONNX Runtime runs both models on held-out good images and the differences are recorded
in model.json.

The backbone's first layers can be kept in FP32 too. FP16 rounding in the high-resolution stages of the
backbone is carried through every later stage and amplified by the flow, which maps the good images'
narrow feature distribution to unit variance: on the default bottle bundle the flow's finest map moved
by 44 % of its mean and the anomaly map by 0.048 with the whole backbone in FP16, 0.010 with its first
three stages in FP32 (docs/precision.md). By default the conversion keeps as few of the backbone's
first convolutions in FP32 as the agreement limit needs (none when it passes as it is), found by
bisection, and records how many.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from calibration.agreement import Agreement, bundle_scorer, compare_models
from calibration.bundle_variants import load_for_variant, record_variant, variant_path
from calibration.data import model_batches, select_images
from edge_agent.bundle import Bundle, QuantizedModel
from edge_agent.engines.tensorrt.graph_check import check_graph, describe
from edge_agent.engines.tensorrt.graph_check import head_nodes as graph_head_nodes

log = logging.getLogger(__name__)

FP16_GROUPS = ("head", "backbone")
DEFAULT_KEEP_FP32: tuple[str, ...] = ("head",)
# Agreement beyond these on good images means the conversion changed the model's answers: the anomaly
# map's difference in absolute terms where it lies in [0, 1] (flow only), relative to it above 1 (the
# fused map of the evidence heads is unbounded; Agreement.anomaly_map_max_scaled).
MAX_ANOMALY_MAP_DIFF = 0.02


class Fp16Error(RuntimeError):
    """The FP16 model differs too much from FP32, or TensorRT would not take it."""


@dataclass(frozen=True)
class Fp16Settings:
    """How to convert (recorded verbatim in model.json)."""

    keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32
    block_ops: tuple[str, ...] = ()
    images: int = 8
    # How many of the backbone's first convolutions (and everything upstream of them) stay FP32;
    # None: the fewest that keep the anomaly map within max_anomaly_map_diff.
    backbone_fp32_convs: int | None = None
    max_anomaly_map_diff: float = MAX_ANOMALY_MAP_DIFF

    def __post_init__(self) -> None:
        unknown = sorted(set(self.keep_fp32) - set(FP16_GROUPS))
        if unknown:
            raise ValueError(f"unknown group(s) {unknown}; groups are {', '.join(FP16_GROUPS)}")
        if self.backbone_fp32_convs is not None and self.backbone_fp32_convs < 0:
            raise ValueError(f"the backbone's FP32 convolutions must be 0 or more, got {self.backbone_fp32_convs}")
        if self.backbone_fp32_convs is not None and "backbone" in self.keep_fp32:
            raise ValueError(
                "keep the whole backbone in FP32 (--keep-fp32 backbone) or a count of its first convs, not both"
            )
        if not self.max_anomaly_map_diff > 0:
            raise ValueError(f"the anomaly map's agreement limit must be above 0, got {self.max_anomaly_map_diff}")


def head_nodes(model: Any, scale_outputs: Sequence[str]) -> list[str]:
    """Names of the U-Flow head's nodes (z^2 and everything downstream), sorted.

    The head is found by the graph check's own walk (edge_agent.engines.tensorrt.graph_check.head_nodes), so
    the nodes kept in FP32 here are exactly the ones that check requires in FP32.
    """
    return sorted(node.name for node in graph_head_nodes(model.graph, scale_outputs))


def backbone_prefix(model: Any, count: int) -> list[str]:
    """Names of the nodes up to the backbone's ``count``-th convolution: that conv and everything feeding it.

    The backbone's convolutions are the ones ``calibration.int8.conv_groups`` finds outside the flow and
    the heads, in graph (topological) order, so a prefix is the backbone's first stages together with the
    input's scaling before them. ``count`` beyond the backbone's length keeps the whole backbone.
    """
    from calibration.int8 import conv_groups

    convs = conv_groups(model).groups["backbone"]
    if count <= 0 or not convs:
        return []
    last = convs[min(count, len(convs)) - 1]
    producer = {out: node for node in model.graph.node for out in node.output}
    by_name = {node.name: node for node in model.graph.node}
    found: set[str] = set()
    stack = [by_name[last]]
    while stack:
        node = stack.pop()
        if node.name in found:
            continue
        found.add(node.name)
        stack.extend(producer[name] for name in node.input if name in producer)
    return sorted(found)


def backbone_conv_count(model: Any) -> int:
    """How many convolutions the backbone has (``calibration.int8.conv_groups``)."""
    from calibration.int8 import conv_groups

    return len(conv_groups(model).groups["backbone"])


def prepare_model(source: Path) -> Any:
    """The model after ONNX Runtime's pre-processing (shape inference, folded constants), loaded."""
    import onnx

    from calibration.int8 import preprocess_model

    with tempfile.TemporaryDirectory(prefix="uflow-fp16-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        preprocess_model(source, prepared)
        return onnx.load(str(prepared))


def convert_prepared(
    prepared: Any, target: Path, output_names: Sequence[str], settings: Fp16Settings, backbone_convs: int = 0
) -> list[str]:
    """Write the FP16 model of a prepared FP32 model; returns the node names kept in FP32.

    ``backbone_convs`` of the backbone's first convolutions stay FP32 with everything upstream of them
    (all of it with ``keep_fp32`` "backbone"); the prepared model itself is not changed.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.ModelProto()
    model.CopyFrom(prepared)
    kept = set(head_nodes(model, output_names[1:])) if "head" in settings.keep_fp32 else set()
    whole = "backbone" in settings.keep_fp32
    kept |= set(backbone_prefix(model, backbone_conv_count(model) if whole else backbone_convs))
    # The converter logs whole node protos at INFO; what it kept is summarised in model.json instead.
    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.WARNING)
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(settings.block_ops),
        node_block_list=sorted(kept),
    )
    onnx.save(drop_fp16_round_trips(converted), str(target))
    return sorted(kept)


def convert_fp16(
    source: Path, target: Path, output_names: Sequence[str], settings: Fp16Settings, backbone_convs: int = 0
) -> list[str]:
    """Write the FP16 model of an FP32 ONNX file; returns the node names kept in FP32."""
    return convert_prepared(prepare_model(source), target, output_names, settings, backbone_convs)


def drop_fp16_round_trips(model: Any) -> Any:
    """Remove the FP32 -> FP16 -> FP32 Cast pairs the converter puts between two kept FP32 nodes.

    ``convert_float_to_float16`` casts every blocked node's output to FP16 and back before the next
    blocked node, so z² itself passed through FP16 and |z| > 256 still became inf (the TensorRT graph
    check's ``head-fp32`` rule finds this). Each Cast(to FP32) whose input is a Cast(to FP16) of an
    FP32 tensor reads that FP32 tensor directly instead; the FP16 casts left unused are removed.
    """
    import onnx
    from onnx import TensorProto

    graph = model.graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (*onnx.shape_inference.infer_shapes(model).graph.value_info, *graph.input, *graph.output)
    }
    types |= {init.name: init.data_type for init in graph.initializer}

    def cast_to(node: Any) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producer = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if cast_to(node) != TensorProto.FLOAT:
            continue
        down = producer.get(node.input[0])
        if down is not None and cast_to(down) == TensorProto.FLOAT16 and types.get(down.input[0]) == TensorProto.FLOAT:
            node.input[0] = down.input[0]  # now a Cast FP32 -> FP32: exact, and TensorRT drops it
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if cast_to(n) == TensorProto.FLOAT16 and not set(n.output) & used]
    for node in dead:
        graph.node.remove(node)
    return model


@dataclass(frozen=True)
class Fp16Attempt:
    """One conversion and how far it moved the outputs on the check images."""

    backbone_convs: int
    path: Path
    kept: list[str]
    agreement: Agreement


def calibrate_bundle(
    bundle_root: Path | str, data: Path | str, settings: Fp16Settings, split: str = "train"
) -> QuantizedModel:
    """``uflow calibrate fp16``: write model.fp16.onnx into the bundle and record it in model.json."""
    import onnxruntime

    bundle: Bundle = load_for_variant(bundle_root, "fp16")
    spec = bundle.manifest.input
    target = variant_path(bundle, "fp16")
    check = select_images(data, settings.images, split)
    batches = list(model_batches(check, spec.height, spec.width))
    scorer = bundle_scorer(bundle)
    with tempfile.TemporaryDirectory(prefix="uflow-fp16-", dir=bundle.root) as tmp:
        prepared = prepare_model(bundle.onnx_path)
        total = backbone_conv_count(prepared)

        def attempt(count: int) -> Fp16Attempt:
            staged = Path(tmp) / f"backbone-{count}.onnx"
            kept = convert_prepared(prepared, staged, bundle.manifest.output_names, settings, count)
            problems = check_graph(staged, "fp16")
            if problems:
                raise Fp16Error(describe(problems, staged))
            agreement = compare_models(bundle.onnx_path, staged, batches, spec.name, scorer)
            log.info(
                "FP16 conversion measured",
                extra={
                    "event": "fp16_attempt",
                    "backbone_fp32_convs": count,
                    "backbone_convs": total,
                    "anomaly_map_max_scaled_diff": round(agreement.anomaly_map_max_scaled, 5),
                    "decision": agreement.decision_problem() or "as FP32",
                },
            )
            return Fp16Attempt(count, staged, kept, agreement)

        chosen = _choose(attempt, settings, total)
        chosen.path.replace(target)
    variant = QuantizedModel(
        file=target.name,
        precision="fp16",
        settings={
            **asdict(settings),
            "backbone_fp32_convs": chosen.backbone_convs,
            "backbone_convs": total,
            "fp32_nodes": chosen.kept,
            "io_types": "kept: uint8 input, float32 outputs",
            "agreement_images": check.describe(),
            "onnxruntime": onnxruntime.__version__,
        },
        metrics=chosen.agreement.as_metrics(),
    )
    record_variant(bundle.root, variant)
    return variant


def _choose(attempt: Callable[[int], Fp16Attempt], settings: Fp16Settings, total: int) -> Fp16Attempt:
    """The conversion to keep: the settings' own, or the fewest FP32 backbone convs within the limit.

    The search bisects on the count: each step converts once and runs both models on the check images.
    It ends on a count that passes next to one less that does not (both measured).
    """
    limit = settings.max_anomaly_map_diff

    def passes(a: Fp16Attempt) -> bool:
        return a.agreement.anomaly_map_max_scaled <= limit and a.agreement.decision_problem() is None

    def why(a: Fp16Attempt) -> str:
        problem = a.agreement.decision_problem()
        moved = f"FP16 changes the anomaly map by up to {a.agreement.anomaly_map_max_scaled:.4f} on good images (limit {limit})"
        return moved if problem is None else f"{moved}, and {problem}"

    fixed = "backbone" in settings.keep_fp32 or settings.backbone_fp32_convs is not None
    first = attempt(total if "backbone" in settings.keep_fp32 else settings.backbone_fp32_convs or 0)
    if passes(first):
        return first
    if fixed:
        raise Fp16Error(
            f"{why(first)}, with {first.backbone_convs} of the backbone's {total} convolutions in FP32; "
            "keep more of the model in FP32 (--backbone-fp32-convs, --block-op) or stay with FP32"
        )
    best = attempt(total)
    if not passes(best):
        raise Fp16Error(
            f"{why(best)}, even with the whole backbone in FP32; keep more of the model in FP32 (--block-op) "
            "or stay with FP32"
        )
    low = 0  # fails
    while best.backbone_convs - low > 1:
        middle = attempt((low + best.backbone_convs) // 2)
        if passes(middle):
            best = middle
        else:
            low = middle.backbone_convs
    return best
