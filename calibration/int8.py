"""INT8 by explicit quantization: a Q/DQ ONNX made with ONNX Runtime's static quantizer.

One file serves every backend: TensorRT 10 and 11 build it as an explicitly quantized network, and
ONNX Runtime runs it on the CPU. TensorRT's ONNX parser only takes symmetric signed INT8 Q/DQ
(zero point 0), so activations and weights are both ``QInt8`` symmetric; weights are per output
channel. Only convolutions are quantized (NVIDIA's Q/DQ placement advice: quantize the inputs of
weighted layers); everything else, including the m_s and anomaly-map arithmetic, stays FP32.

Which convolutions to keep in FP32 is a choice per *group*, found structurally in the graph (names
differ between exports, structure does not):

- ``coupling``: the last conv of each coupling subnet, whose output becomes the affine scale through
  tanh and exp (an error there is multiplied into every later latent);
- ``subnet``: the other subnet convs;
- ``permutation``: the flow's fixed 1x1 channel permutations;
- ``backbone``: the frozen feature extractor, and ``stem``, its first conv (sees raw pixels).

The defaults (method, groups) were chosen by measurement on the magnetic tile test split; see
docs/precision.md and bench/precision.py. The choice and its reason are written into model.json.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.agreement import bundle_scorer, compare_models
from calibration.bundle_variants import load_for_variant, record_variant, variant_path
from calibration.data import ImageSet, model_batches, pick_evenly, select_images
from edge_agent.bundle import Bundle, QuantizedModel
from edge_agent.engines.tensorrt.graph_check import check_graph, describe

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
# The deployable form is the first: the only one TensorRT's parser builds. The other two are CPU-only
# experiments for ONNX Runtime on x86 (bench/precision.py --cpu-formats): uint8 activations with int8
# weights (U8S8) is the layout MLAS's AVX2 kernels (vpmaddubsw) are written for, and QOperator
# replaces each Q/DQ pair and Conv by one QLinearConv.
FORMATS = ("s8s8-qdq", "u8s8-qdq", "u8s8-qoperator")
TENSORRT_FORMAT = FORMATS[0]
GROUPS = ("coupling", "subnet", "permutation", "backbone", "stem")
# Chosen by measurement (docs/precision.md): see DEFAULT_REASON.
DEFAULT_METHOD = "minmax"
DEFAULT_KEEP_FP32: tuple[str, ...] = ("backbone",)
DEFAULT_REASON = "see docs/precision.md (bench/precision.py on the magnetic tile test split)"
AGREEMENT_IMAGES = 8


class QuantizationError(RuntimeError):
    """Quantization failed or produced a model TensorRT would not take; the message says which."""


@dataclass(frozen=True)
class Int8Settings:
    """How to quantize (recorded verbatim in model.json)."""

    method: str = DEFAULT_METHOD
    percentile: float = 99.999
    per_channel: bool = True
    op_types: tuple[str, ...] = ("Conv",)
    keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32
    exclude_nodes: tuple[str, ...] = ()
    images: int = 64
    format: str = TENSORRT_FORMAT

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        unknown = sorted(set(self.keep_fp32) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown layer group(s) {unknown}; groups are {', '.join(GROUPS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.images < 1:
            raise ValueError(f"the number of calibration images must be at least 1, got {self.images}")
        if self.format not in FORMATS:
            raise ValueError(f"INT8 format must be one of {', '.join(FORMATS)}, got {self.format!r}")


# --- the graph's conv groups ------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvGroups:
    """Node names of the quantizable convolutions, by role."""

    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def nodes(self, names: Sequence[str]) -> list[str]:
        return sorted({node for name in names for node in self.groups.get(name, ())})

    def counts(self) -> dict[str, int]:
        return {name: len(nodes) for name, nodes in self.groups.items()}


def _is_permutation(weight: np.ndarray) -> bool:
    if weight.ndim != 4 or weight.shape[0] != weight.shape[1] or weight.shape[2:] != (1, 1):
        return False
    matrix = weight[:, :, 0, 0]
    return bool(np.isin(matrix, (0.0, 1.0)).all() and (matrix.sum(0) == 1).all() and (matrix.sum(1) == 1).all())


def _head_layers(graph: Any) -> set[str]:
    """The evidence heads' weighted layers (a Gaussian's whitening Conv, a memory bank's Conv, the texture
    head's whitening Gemm): never quantized, see edge_agent.engines.tensorrt.graph_check's ``head-fp32`` rule
    (an FP32 graph keeps them FP32 anyway)."""
    from edge_agent.engines.tensorrt.graph_check import ANOMALY_MAP, head_nodes

    outputs = [o.name for o in graph.output if o.name != ANOMALY_MAP]
    try:
        return {node.name for node in head_nodes(graph, outputs) if node.op_type in ("Conv", "Gemm", "MatMul")}
    except ValueError:
        return set()


def conv_groups(model: Any) -> ConvGroups:
    """Classify every Conv of an exported U-Flow graph (see the module docstring)."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]

    def convs_upstream(start: Any) -> set[str]:
        """Names of the nearest Conv nodes feeding ``start`` through non-Conv nodes."""
        found, seen, stack = set(), set(), list(start.input)
        while stack:
            tensor = stack.pop()
            node = producer.get(tensor)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Conv":
                found.add(node.name)
            elif node.op_type not in ("Shape", "Size"):  # shape arithmetic carries no activations
                stack.extend(node.input)
        return found

    coupling: set[str] = set()
    for node in graph.node:
        if node.op_type == "Tanh":
            coupling |= convs_upstream(node)
    by_name = {node.name: node for node in convs}
    subnet: set[str] = set()
    for name in coupling:
        subnet |= convs_upstream(by_name[name]) - coupling
    permutation = {
        node.name
        for node in convs
        if len(node.input) > 1
        and node.input[1] in initializers
        and _is_permutation(numpy_helper.to_array(initializers[node.input[1]]))
    }
    flow = coupling | subnet | permutation
    heads = _head_layers(graph)
    backbone = [node.name for node in convs if node.name not in flow | heads]
    return ConvGroups(
        {
            "heads": tuple(sorted(heads)),
            "coupling": tuple(sorted(coupling)),
            "subnet": tuple(sorted(subnet)),
            "permutation": tuple(sorted(permutation)),
            "backbone": tuple(backbone),
            "stem": tuple(backbone[:1]),
        }
    )


# --- quantization -----------------------------------------------------------------------------------


class _Reader:
    """ONNX Runtime CalibrationDataReader over the calibration images (engine input format)."""

    def __init__(self, batches: Iterator[np.ndarray], input_name: str) -> None:
        self._batches = batches
        self._input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch}


@dataclass(frozen=True)
class QuantizeResult:
    """What quantization did."""

    excluded_nodes: tuple[str, ...]
    group_counts: dict[str, int]
    seconds: float


def _unique_node_names(model: Any) -> Any:
    """ONNX Runtime excludes nodes by name, so every node needs a distinct one."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)
    return model


def preprocess_model(source: Path, target: Path) -> None:
    """ONNX Runtime's quantization pre-processing (shape inference, constant folding, BN fusion)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    model = _unique_node_names(onnx.load(str(target)))
    onnx.save(model, str(target))


def quantize_int8(
    source: Path,
    target: Path,
    images: ImageSet,
    height: int,
    width: int,
    settings: Int8Settings,
    input_name: str = "image",
) -> QuantizeResult:
    """Write an INT8 model of ``source`` to ``target``, calibrated on ``images``.

    The default ``settings.format`` is the symmetric S8S8 Q/DQ model TensorRT builds; the others are
    for ONNX Runtime on the CPU only.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, quantize_static

    started = time.monotonic()
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with tempfile.TemporaryDirectory(prefix="uflow-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        preprocess_model(source, prepared)
        groups = conv_groups(onnx.load(str(prepared)))
        # The heads' Convs always stay FP32 (a quantized bank or whitening would drown the distances).
        always = set(groups.groups.get("heads", ()))
        excluded = sorted(set(groups.nodes(settings.keep_fp32)) | always | set(settings.exclude_nodes))
        log.info(
            f"quantizing {source.name} with {settings.method} calibration on {len(images.paths)} images",
            extra={
                "event": "int8_quantize_start",
                "groups": groups.counts(),
                "keep_fp32": list(settings.keep_fp32),
                "excluded": len(excluded),
            },
        )
        quantize_static(
            str(prepared),
            str(target),
            _Reader(model_batches(images, height, width), input_name),
            op_types_to_quantize=list(settings.op_types),
            per_channel=settings.per_channel,
            nodes_to_exclude=excluded,
            calibrate_method=methods[settings.method],
            **_format_options(settings),
        )
    return QuantizeResult(tuple(excluded), groups.counts(), time.monotonic() - started)


def _format_options(settings: Int8Settings) -> dict[str, Any]:
    """quantize_static's format, types and extra options for ``settings.format``."""
    from onnxruntime.quantization import QuantFormat, QuantType

    if settings.format == TENSORRT_FORMAT:
        extra: dict[str, Any] = {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "CalibPercentile": settings.percentile,
            # Biases stay FP32: TensorRT dequantizes INT8/FP8/INT4 only, not ONNX Runtime's INT32 biases.
            "QuantizeBias": False,
            # With FP32 biases there is no INT32 range to protect; the adjustment would coarsen
            # (up to thousands of times) the weight scale of channels whose weights are near zero.
            "QDQDisableWeightAdjustForInt32Bias": True,
            # Not CalibMaxIntermediateOutputs: in onnxruntime 1.32 MinMax drops the batches it clears.
        }
        return {
            "quant_format": QuantFormat.QDQ,
            "activation_type": QuantType.QInt8,
            "weight_type": QuantType.QInt8,
            "extra_options": extra,
        }
    # CPU-only forms: asymmetric uint8 activations (the zero point uses the whole range), symmetric
    # int8 weights, int32 biases as ONNX Runtime's QLinearConv expects.
    return {
        "quant_format": QuantFormat.QOperator if settings.format.endswith("qoperator") else QuantFormat.QDQ,
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        "extra_options": {"WeightSymmetric": True, "CalibPercentile": settings.percentile},
    }


def check_for_tensorrt(path: Path) -> None:
    """Raise QuantizationError when the quantized model breaks a TensorRT graph rule (types, Q/DQ axes, zero points)."""
    problems = check_graph(path, "int8")
    if problems:
        raise QuantizationError(describe(problems, path))


def held_out(images: ImageSet, data: Path | str, split: str, count: int = AGREEMENT_IMAGES) -> ImageSet:
    """Good images not used for calibration (the calibration set itself when none are left)."""
    from calibration.data import find_images

    used = set(images.paths)
    rest = [p for p in find_images(data, split) if p not in used]
    chosen = pick_evenly(rest or list(images.paths), count)
    source = f"{images.source} (held out)" if rest else f"{images.source} (calibration images, none held out)"
    return ImageSet(tuple(chosen), source, len(rest))


def calibrate_bundle(
    bundle_root: Path | str, data: Path | str, settings: Int8Settings, split: str = "train"
) -> QuantizedModel:
    """``uflow calibrate int8``: write model.int8.onnx into the bundle and record it in model.json."""
    import onnxruntime

    if settings.format != TENSORRT_FORMAT:
        raise QuantizationError(
            f"the bundle's model.int8.onnx must be {TENSORRT_FORMAT} (what TensorRT builds); "
            f"{settings.format} is a CPU-only benchmark format (bench/precision.py --cpu-formats)"
        )
    bundle: Bundle = load_for_variant(bundle_root, "int8")
    spec = bundle.manifest.input
    images = select_images(data, settings.images, split)
    target = variant_path(bundle, "int8")
    with tempfile.TemporaryDirectory(prefix="uflow-int8-", dir=bundle.root) as tmp:
        staged = Path(tmp) / target.name
        result = quantize_int8(bundle.onnx_path, staged, images, spec.height, spec.width, settings, spec.name)
        check_for_tensorrt(staged)
        check = held_out(images, data, split)
        batches = model_batches(check, spec.height, spec.width)
        agreement = compare_models(bundle.onnx_path, staged, batches, spec.name, bundle_scorer(bundle))
        problem = agreement.decision_problem()
        if problem is not None:
            raise QuantizationError(
                f"the INT8 model does not decide as FP32 on {agreement.images} held-out good images: {problem}. "
                "INT8 rounding in the flow inflates z^2, which the bundle's NFA null (fitted on FP32 maps) reads "
                "as evidence (docs/precision.md); deploy FP32 or FP16 (uflow calibrate fp16)"
            )
        staged.replace(target)
    variant = QuantizedModel(
        file=target.name,
        precision="int8",
        settings={
            **asdict(settings),
            "format": "QDQ, symmetric signed INT8 activations and weights (zero point 0)",
            "weights": "per output channel" if settings.per_channel else "per tensor",
            "excluded_nodes": list(result.excluded_nodes),
            "conv_groups": result.group_counts,
            "calibration_images": images.describe(),
            "agreement_images": check.describe(),
            "onnxruntime": onnxruntime.__version__,
            "why": DEFAULT_REASON,
            "seconds": round(result.seconds, 1),
        },
        metrics=agreement.as_metrics(),
    )
    record_variant(bundle.root, variant)
    log.info(
        "INT8 model written",
        extra={"event": "int8_done", "file": str(target), **agreement.as_metrics()},
    )
    return variant
