"""FP16 ONNX for strongly typed TensorRT builds (TensorRT 10.3+ and 11: the precision comes from the ONNX types).

The model's floating-point weights and activations become FP16 while the engine I/O contract is
kept: ``image`` stays uint8 and the outputs stay float32 (``keep_io_types``). The U-Flow head, where
m_s = mean of z^2 over channels and exp(-0.5 m_s) are computed, is kept in FP32 (``--keep-fp32
head``, the default): it costs nothing (tiny maps), and z^2 overflows FP16 for |z| > 256, which is
exactly what a defect produces. The TensorRT graph check (``head-fp32`` rule) verifies it. After
conversion, ONNX Runtime runs both models on held-out good images and the differences are recorded
in model.json.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from calibration.agreement import compare_models
from calibration.bundle_variants import load_for_variant, record_variant, variant_path
from calibration.data import model_batches, select_images
from edge_agent.bundle import Bundle, QuantizedModel
from edge_agent.engines.tensorrt.graph_check import check_graph, describe
from edge_agent.engines.tensorrt.graph_check import head_nodes as graph_head_nodes

log = logging.getLogger(__name__)

FP16_GROUPS = ("head",)
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

    def __post_init__(self) -> None:
        unknown = sorted(set(self.keep_fp32) - set(FP16_GROUPS))
        if unknown:
            raise ValueError(f"unknown group(s) {unknown}; groups are {', '.join(FP16_GROUPS)}")


def head_nodes(model: Any, scale_outputs: Sequence[str]) -> list[str]:
    """Names of the U-Flow head's nodes (z^2 and everything downstream), sorted.

    The head is found by the graph check's own walk (edge_agent.engines.tensorrt.graph_check.head_nodes), so
    the nodes kept in FP32 here are exactly the ones that check requires in FP32.
    """
    return sorted(node.name for node in graph_head_nodes(model.graph, scale_outputs))


def convert_fp16(source: Path, target: Path, output_names: Sequence[str], settings: Fp16Settings) -> list[str]:
    """Write the FP16 model; returns the node names kept in FP32."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from calibration.int8 import preprocess_model

    with tempfile.TemporaryDirectory(prefix="uflow-fp16-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        preprocess_model(source, prepared)
        model = onnx.load(str(prepared))
    kept = head_nodes(model, output_names[1:]) if "head" in settings.keep_fp32 else []
    # The converter logs whole node protos at INFO; what it kept is summarised in model.json instead.
    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.WARNING)
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(settings.block_ops),
        node_block_list=kept,
    )
    onnx.save(drop_fp16_round_trips(converted), str(target))
    return kept


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


def calibrate_bundle(
    bundle_root: Path | str, data: Path | str, settings: Fp16Settings, split: str = "train"
) -> QuantizedModel:
    """``uflow calibrate fp16``: write model.fp16.onnx into the bundle and record it in model.json."""
    import onnxruntime

    bundle: Bundle = load_for_variant(bundle_root, "fp16")
    spec = bundle.manifest.input
    target = variant_path(bundle, "fp16")
    check = select_images(data, settings.images, split)
    with tempfile.TemporaryDirectory(prefix="uflow-fp16-", dir=bundle.root) as tmp:
        staged = Path(tmp) / target.name
        kept = convert_fp16(bundle.onnx_path, staged, bundle.manifest.output_names, settings)
        problems = check_graph(staged, "fp16")
        if problems:
            raise Fp16Error(describe(problems, staged))
        agreement = compare_models(bundle.onnx_path, staged, model_batches(check, spec.height, spec.width), spec.name)
        if agreement.anomaly_map_max_scaled > MAX_ANOMALY_MAP_DIFF:
            raise Fp16Error(
                f"FP16 changes the anomaly map by up to {agreement.anomaly_map_max_scaled:.4f} on good images "
                f"(limit {MAX_ANOMALY_MAP_DIFF}); keep more of the model in FP32 (--block-op) or stay with FP32"
            )
        staged.replace(target)
    variant = QuantizedModel(
        file=target.name,
        precision="fp16",
        settings={
            **asdict(settings),
            "fp32_nodes": kept,
            "io_types": "kept: uint8 input, float32 outputs",
            "agreement_images": check.describe(),
            "onnxruntime": onnxruntime.__version__,
        },
        metrics=agreement.as_metrics(),
    )
    record_variant(bundle.root, variant)
    return variant
