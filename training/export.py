"""Export a training run as a model bundle (docs/design.md sections 3 and 4: the bundle and the engine I/O).

Steps: rebuild the best model of the run, trace the engine wrapper to ONNX (opset 17, fixed input
shape, TorchScript exporter), check ONNX Runtime against torch on the run's self-test images and a
synthetic defect image (anomaly map max difference under 1e-4 for a flow-only bundle; with heads the fused map
is unbounded and as exact as its maps, so under 1e-3 relative to max(1, |map|), like them; m_s under 1e-3 relative to
max(1, |m_s|): m_s are unbounded chi^2-like values that come out of deeper float32 arithmetic, and
the 4/8/16 magnetic tile model already reaches 5.6e-5 from ONNX Runtime's fused kernels alone,
while a real export bug is off by O(1)), write ``model.json``, then load the result with the agent's own
``load_bundle`` + ``OnnxRuntimeEngine`` and run the self-test images through it. The bundle is built
in a temporary sibling directory and renamed into place only when every check passed, so a failed
export never leaves something that looks like a bundle.

``image_score_threshold``: the maximum image score over the validation good images under the best
checkpoint (no false alarm on validation). It is secondary: the agent's decision is the NFA test.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_agent.bundle import (
    MANIFEST_NAME,
    MIN_PLANTED_DETECTION,
    MODEL_NAME,
    SCHEMA_VERSION,
    Bundle,
    DriftReference,
    ImageTestSpec,
    InputSpec,
    Manifest,
    NfaCalibration,
    NfaSpec,
    Normalisation,
    ScaleNullSpec,
    ScaleSpec,
    file_hashes,
    load_bundle,
    region_scales,
    utc_now,
    write_manifest,
)
from edge_agent.engines.tensorrt.graph_check import check_graph, describe
from edge_agent.inspection import nfa
from edge_agent.promise import shortfall
from training.backbones import backbone_info
from training.data import load_image
from training.model import ExportWrapper, UFlow, without_heads
from training.rundir import RunInfo, load_model
from training.synthetic import defect_image

log = logging.getLogger(__name__)

OPSET = 17
MAP_TOLERANCE = 1e-4
SCALE_MAP_TOLERANCE = 1e-3


class ExportError(RuntimeError):
    """The export failed a check; nothing was written at the destination."""


@dataclass(frozen=True)
class Parity:
    """Largest ONNX Runtime vs torch differences over the checked images."""

    anomaly_map_max_abs: float  # max |a - b| / max(1, |b|): absolute where the map is in [0, 1]
    scale_maps_max_scaled: float  # max |a - b| / max(1, |b|) over all m_s
    images: int


def export_onnx(model: UFlow, path: Path) -> list[str]:
    """Trace the engine wrapper to ONNX at the model's fixed input size; return the output names."""
    wrapper = ExportWrapper(model).eval()
    example = torch.zeros(1, model.config.image_height, model.config.image_width, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        # The tracer warns about Python ints derived from shapes (FrEIA, timm's same-padding);
        # the input shape is fixed by contract, so these are constants by design.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=["image"],
            output_names=wrapper.output_names,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    with torch.no_grad():
        shapes = [tuple(t.shape) for t in wrapper(example)]
    _declare_static_output_shapes(path, dict(zip(wrapper.output_names, shapes, strict=True)))
    return wrapper.output_names


def _declare_static_output_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Write the (fixed) output shapes, taken from a torch run, into the graph: the tracer leaves them
    symbolic, and TensorRT and the engine's I/O check read them from the file. The parity check that
    follows compares ONNX Runtime's actual output shapes with torch's.
    """
    import onnx

    model = onnx.load(str(path))
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for size in shapes[output.name]:
            dims.add().dim_value = int(size)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _torch_outputs(model: UFlow, image: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        outputs = ExportWrapper(model)(torch.from_numpy(image)[None])
    return [o.numpy()[0] for o in outputs]


def check_parity(model: UFlow, onnx_path: Path, images: list[np.ndarray]) -> Parity:
    """Run ONNX Runtime and torch on ``images``; raise ExportError if they differ beyond tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = ExportWrapper(model).output_names
    worst_map, worst_scale = 0.0, 0.0
    map_tolerance = _map_tolerance(model)
    for index, image in enumerate(images):
        got = session.run(names, {"image": image[None]})
        want = _torch_outputs(model, image)
        for name, g, w in zip(names, got, want, strict=True):
            if g.shape != (1, *w.shape) or g.dtype != np.float32:
                raise ExportError(f"ONNX output {name} is {g.dtype}{list(g.shape)}, torch gives float32{[1, *w.shape]}")
        diff_map = _scaled_diff(got[0][0], want[0])
        diff_scale = max(
            float((np.abs(g[0] - w) / np.maximum(1.0, np.abs(w))).max()) for g, w in zip(got[1:], want[1:], strict=True)
        )
        worst_map, worst_scale = max(worst_map, diff_map), max(worst_scale, diff_scale)
        if diff_map >= map_tolerance or diff_scale >= SCALE_MAP_TOLERANCE:
            raise ExportError(
                f"ONNX Runtime and torch disagree on parity image {index}: anomaly_map max scaled diff {diff_map:.3g} "
                f"(limit {map_tolerance}), m_s max scaled diff {diff_scale:.3g} (limit {SCALE_MAP_TOLERANCE})"
            )
    return Parity(worst_map, worst_scale, len(images))


def _map_tolerance(model: UFlow) -> float:
    """How far ONNX Runtime's anomaly map may be from torch's (scaled as :func:`_scaled_diff`).

    The fused map of a bundle with heads is a mean of its maps over their null means, so it can only be as
    exact as they are: the memory bank's ||x||^2 - 2 x.b + ||b||^2 cancels in float32, and ONNX Runtime sums
    in another order than torch (measured 1.2e-4 relative on a planted defect, default bundle).
    """
    return MAP_TOLERANCE if len(model.heads) == 0 else SCALE_MAP_TOLERANCE


def _scaled_diff(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(1, |want|): the absolute difference for the flow-only map (in [0, 1]), a
    relative one where the fused map of a bundle with heads (m / mean, unbounded) is large."""
    return float((np.abs(got - want) / np.maximum(1.0, np.abs(want))).max())


def _parity_images(info: RunInfo) -> list[np.ndarray]:
    height, width = info.model_config.image_height, info.model_config.image_width
    images = [load_image(path, height, width) for path in info.selftest_images]
    images.append(defect_image(seed=12345, height=height, width=width, kind="dark_blob").image)
    return images


TEST_METRIC_KEYS = (
    "pixel_auroc",
    "aupro",
    "image_auroc",
    "miou_nfa",
    "miou_oracle",
    "nfa_detection_rate",
    "nfa_false_alarm_rate",
)


def test_metrics_from_report(path: Path, info: RunInfo) -> dict[str, float]:
    """``test_<metric>`` entries from a ``uflow evaluate`` metrics.json of this run's model.

    Refused when the report is of another model config or another input size: the manifest must not
    carry numbers that belong to a different model.
    """
    import json

    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
        overall = report["overall"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{path} is not a metrics.json written by `uflow evaluate`: {exc}") from exc
    config = (report.get("model") or {}).get("model_config")
    if config is not None and config != info.model_config.to_dict():
        raise ExportError(f"{path} evaluates another model config than run {info.root}; evaluate this run first")
    metrics = {f"test_{key}": float(overall[key]) for key in TEST_METRIC_KEYS if key in overall}
    metrics["test_images"] = float(overall.get("images", 0))
    return metrics


def _validation_metrics(info: RunInfo, parity: Parity, selftest_scores: list[float], model: UFlow) -> dict[str, float]:
    metrics: dict[str, float] = {}
    meta = info.checkpoint_meta
    for key in ("epoch", "val_nll", "train_loss"):
        if meta.get(key) is not None:
            metrics["best_epoch" if key == "epoch" else key] = float(meta[key])
    scores = np.asarray(info.val_scores.get("scores", []), dtype=np.float64)
    if scores.size:
        metrics |= {
            "val_images": float(scores.size),
            "val_score_mean": float(scores.mean()),
            "val_score_p99": float(np.percentile(scores, 99)),
            "val_score_max": float(scores.max()),
        }
    flagged = info.val_scores.get("nfa_flagged")
    if flagged:
        metrics["val_nfa_false_alarm_rate"] = float(np.mean(flagged))
        metrics["val_min_log_nfa"] = float(np.min(info.val_scores["min_log_nfa"]))
    planted = info.val_scores.get("planted") or {}
    if planted.get("count"):
        metrics["planted_detection_rate"] = float(planted["detection_rate"])
        metrics["planted_count"] = float(planted["count"])
        for kind, rate in planted.get("per_kind", {}).items():
            metrics[f"planted_detection_{kind}"] = float(rate)
    metrics |= _map_choices(info, model)
    if selftest_scores:
        metrics["selftest_max_score"] = float(max(selftest_scores))
    metrics["onnx_parity_anomaly_map_max_abs"] = parity.anomaly_map_max_abs
    metrics["onnx_parity_scale_maps_max_scaled"] = parity.scale_maps_max_scaled
    return metrics


def _map_choices(info: RunInfo, model: UFlow) -> dict[str, float]:
    """What training's finish chose for the map a person sees: the detail map's weight in the fusion (when the
    bundle has it) and the planted mean IoU at the chosen mask fraction (training/detail_choice.py,
    training/mask_choice.py)."""
    metrics: dict[str, float] = {}
    weight = model.detail_weight()
    if weight is not None:
        metrics["anomaly_map_detail_weight"] = weight
    choice = info.val_scores.get("mask_fraction_choice") or {}
    fraction = info.val_scores.get("mask_fraction")
    miou = (choice.get("planted_miou") or {}).get(f"{fraction:g}") if fraction is not None else None
    if miou is not None:
        metrics["planted_mask_miou"] = float(miou)
    return metrics


def nfa_spec(
    info: RunInfo, shapes: list[tuple[int, int]], null_model: str = "fitted", *, flow_only: bool = True
) -> NfaSpec:
    """The bundle's NFA: the fitted null of the run (default) or the paper's exact polyomino NFA.

    Runs trained before the fitted null existed have none in val_scores.json and get the paper's NFA.
    ``shapes``: of every region map of the bundle (the fitted null's number of tests counts them all; the
    run's null has one entry per region map; the texture map's image test has its own null). The polyomino NFA is only built for a flow-only bundle (``flow_only``;
    :func:`export_bundle` drops the heads first).
    """
    fitted = info.val_scores.get("nfa_null")
    if null_model == "fitted" and fitted:
        if len(fitted) != len(shapes):
            raise ExportError(f"run {info.root} has {len(fitted)} fitted nulls for {len(shapes)} maps; train it again")
        return NfaSpec(
            log10_number_of_tests=nfa.log10_tree_tests(shapes),
            log10_epsilon=float(info.val_scores.get("log10_epsilon", 0.0)),
            null_model="fitted",
            scale_nulls=tuple(ScaleNullSpec(**item) for item in fitted),
            calibration=_calibration(info),
            image_test=_image_test(info),
            mask_fraction=float(info.val_scores.get("mask_fraction", 0.0)),  # runs before it: the NFA's regions
        )
    if not flow_only:
        raise ExportError("the polyomino NFA tests flow maps only; export the flow alone (flow_only)")
    if null_model == "fitted":
        log.warning(
            "run has no fitted NFA null: the bundle uses the paper's polyomino NFA",
            extra={"event": "export_no_fitted_null", "run": str(info.root)},
        )
    return NfaSpec(log10_number_of_tests=nfa.log10_number_of_tests(shapes))


def _image_test(info: RunInfo) -> ImageTestSpec | None:
    """The run's image test (the texture head's null and share); runs without a texture head have none."""
    raw = info.val_scores.get("image_test")
    return None if not raw else ImageTestSpec.model_validate(raw)


def _calibration(info: RunInfo) -> NfaCalibration | None:
    """The cross-fitted calibration record of the run; runs trained before it existed have none."""
    raw = info.val_scores.get("nfa_calibration")
    if not raw:
        return None
    fields = set(NfaCalibration.model_fields)
    return NfaCalibration.model_validate({k: v for k, v in raw.items() if k in fields})


def warn_if_unsupported(manifest: Manifest) -> str | None:
    """The warning text when the calibration images cannot support the promised false-alarm rate."""
    if manifest.nfa.null_model != "fitted":
        return None
    calibration = manifest.nfa.calibration
    if calibration is None:
        return (
            "WARNING: this bundle does not record how many good images calibrated its false-alarm promise "
            "(trained before it was recorded): nothing backs the promise; train again to get the check"
        )
    message = shortfall(calibration.promise_check())
    return None if message is None else f"WARNING: {message} (docs/nfa.md)."


def warn_if_blind(manifest: Manifest) -> str | None:
    """The loud warning text when the model flags fewer than half of the defects planted on its good images."""
    rate = manifest.validation_metrics.get("planted_detection_rate")
    if rate is None or rate >= MIN_PLANTED_DETECTION:
        return None
    message = (
        f"WARNING: this model's NFA decision found only {rate:.0%} of the defects planted on its own good "
        f"validation images (goal >= {MIN_PLANTED_DETECTION:.0%}). It may not see real defects: train longer, "
        "add good images, or check the camera set-up before shipping it (docs/results.md)."
    )
    return message


def _threshold(info: RunInfo) -> float:
    scores = info.val_scores.get("scores", [])
    if not scores:
        raise ExportError(f"run {info.root} has no validation scores (val_scores.json); train again to finish it")
    return float(max(scores))


def _default_name(info: RunInfo) -> str:
    data = Path(str(info.data_summary.get("root", "data"))).name or "data"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"uflow-{info.model_config.backbone}-{data}")


def build_manifest(
    model: UFlow,
    info: RunInfo,
    bundle_dir: Path,
    name: str,
    version: str,
    parity: Parity,
    selftest: list[str],
    selftest_scores: list[float],
    null_model: str = "fitted",
) -> Manifest:
    """The manifest of a bundle whose files are already in ``bundle_dir``."""
    backbone = backbone_info(model.config.backbone)
    scales = tuple(
        ScaleSpec.model_validate(
            {"name": s.name, "channels": s.channels, "height": s.height, "width": s.width, "stride": s.stride}
            | {"head": s.head}
        )
        for s in model.scales
    )
    return Manifest(
        schema_version=SCHEMA_VERSION,
        name=name,
        version=version,
        created=utc_now(),
        files=file_hashes(bundle_dir, [MODEL_NAME, *selftest]),
        backbone=model.config.backbone,
        input=InputSpec(height=model.config.image_height, width=model.config.image_width),
        normalisation=Normalisation(mean=backbone.mean, std=backbone.std),
        scales=scales,
        nfa=nfa_spec(info, [(s.height, s.width) for s in region_scales(scales)], null_model, flow_only=not model.heads),
        image_score_threshold=_threshold(info),
        validation_metrics=_validation_metrics(info, parity, selftest_scores, model),
        training_data=_training_data(info),
        self_test=tuple(selftest),
        drift_reference=_drift_reference(info),
    )


def _drift_reference(info: RunInfo) -> DriftReference | None:
    """The drift check's reference from val_scores.json; runs trained before it existed ship none (check off)."""
    raw = info.val_scores.get("drift_reference")
    return None if raw is None else DriftReference.model_validate(raw)


def _training_data(info: RunInfo) -> dict[str, Any]:
    keys = ("layout", "root", "train", "val", "test", "test_types", "image_height", "image_width")
    summary: dict[str, Any] = {k: info.data_summary[k] for k in keys if k in info.data_summary}
    summary["model_config"] = info.model_config.to_dict()
    summary["random_weights"] = info.random_weights
    summary["epochs"] = info.train_config.get("epochs")
    summary["best_epoch"] = info.checkpoint_meta.get("epoch")
    return summary


def _with_test_metrics(manifest: Manifest, path: Path, info: RunInfo) -> Manifest:
    import json

    metrics = test_metrics_from_report(path, info)
    data = json.loads(path.read_text(encoding="utf-8")).get("data", {})
    source = {"report": str(path), "root": data.get("root"), "layout": data.get("layout"), "test": data.get("test")}
    return manifest.model_copy(
        update={
            "validation_metrics": {**manifest.validation_metrics, **metrics},
            "training_data": {**manifest.training_data, "test_metrics_from": source},
        }
    )


def _verify_with_agent(bundle_dir: Path, model: UFlow) -> Bundle:
    """Load the bundle exactly as the device does and compare its outputs on the self-test images."""
    from edge_agent.engines.onnxruntime import OnnxRuntimeEngine

    bundle = load_bundle(bundle_dir)
    engine = OnnxRuntimeEngine(bundle)
    try:
        height, width = bundle.manifest.input.height, bundle.manifest.input.width
        for rel in bundle.manifest.self_test:
            image = load_image(bundle_dir / rel, height, width)
            output = engine.infer(image)
            want = _torch_outputs(model, image)[0]
            diff = _scaled_diff(output.anomaly_map, want)
            if diff >= _map_tolerance(model):
                raise ExportError(f"the agent's engine differs from torch on self-test image {rel} by {diff:.3g}")
    finally:
        engine.close()
    return bundle


def flow_only(model: UFlow) -> UFlow:
    """The same trained flow without the heads (the flow-only anomaly map and outputs)."""
    return without_heads(model, {k for k in model.config.heads if k != "flow"})


def _prepare_destination(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not overwrite:
        raise ExportError(f"{out_dir} already exists; choose another --out or pass --overwrite")
    if not (out_dir / MANIFEST_NAME).is_file() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not a model bundle; refusing to replace it")


def _check_tensorrt_operators(onnx_path: Path) -> None:
    """Refuse a graph TensorRT would reject (operators, and the types they compute in: the UINT8 image
    may feed only a Cast): the device would have no GPU path."""
    problems = check_graph(onnx_path, "fp32")
    if problems:
        raise ExportError(describe(problems, onnx_path))


def export_bundle(
    run_dir: Path | str,
    out_dir: Path | str,
    *,
    name: str | None = None,
    version: str | None = None,
    overwrite: bool = False,
    test_metrics: Path | str | None = None,
    null_model: str = "fitted",
) -> Path:
    """Write a verified bundle for the run's best checkpoint to ``out_dir``; return ``out_dir``.

    ``test_metrics``: a ``uflow evaluate`` metrics.json of this run, whose overall numbers go into the
    manifest's validation metrics as ``test_*`` (with the data it was measured on in training_data).
    """
    out_dir = Path(out_dir)
    _prepare_destination(out_dir, overwrite)
    model, info = load_model(run_dir)
    if model.heads and not (null_model == "fitted" and info.val_scores.get("nfa_null")):
        # The heads' maps have no null under the paper's NFA: a polyomino bundle is the flow alone.
        model = flow_only(model)
        log.warning(
            "the bundle keeps the flow only: the gaussian and memory heads need the fitted NFA null",
            extra={"event": "export_heads_dropped", "run": str(info.root), "null_model": null_model},
        )
    if "texture" in model.config.heads and not info.val_scores.get("image_test"):
        # No image test could be fitted (too few good images, or the paper's NFA): its map has no null.
        model = without_heads(model, {"texture"})
        log.warning(
            "the bundle drops the texture head: the run has no image test for it",
            extra={"event": "export_texture_dropped", "run": str(info.root), "null_model": null_model},
        )
    if not info.selftest_images:
        raise ExportError(f"run {info.root} has no self-test images in selftest/; train again to finish it")
    name = name or _default_name(info)
    version = version or utc_now().strftime("%Y.%m.%d-%H%M%S")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the agent may run as another user
    try:
        export_onnx(model, staging / MODEL_NAME)
        _check_tensorrt_operators(staging / MODEL_NAME)
        parity = check_parity(model, staging / MODEL_NAME, _parity_images(info))
        selftest = []
        for path in info.selftest_images:
            rel = f"selftest/{path.name}"
            (staging / "selftest").mkdir(exist_ok=True)
            shutil.copyfile(path, staging / rel)
            selftest.append(rel)
        height, width = model.config.image_height, model.config.image_width
        selftest_scores = [
            float(_torch_outputs(model, load_image(staging / rel, height, width))[0].max()) for rel in selftest
        ]
        manifest = build_manifest(
            model, info, staging, name, version, parity, selftest, selftest_scores, null_model=null_model
        )
        if test_metrics is not None:
            manifest = _with_test_metrics(manifest, Path(test_metrics), info)
        write_manifest(staging, manifest)
        _verify_with_agent(staging, model)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "bundle exported",
        extra={
            "event": "export_done",
            "bundle": str(out_dir),
            "bundle_name": name,
            "version": version,
            "parity_max_abs": parity.anomaly_map_max_abs,
            "null_model": manifest.nfa.null_model,
            "planted_detection_rate": manifest.validation_metrics.get("planted_detection_rate"),
        },
    )
    warning = warn_if_blind(manifest)
    if warning:
        log.warning(warning, extra={"event": "export_blind_model", "bundle": str(out_dir)})
    unsupported = warn_if_unsupported(manifest)
    if unsupported:
        log.warning(unsupported, extra={"event": "export_promise_unsupported", "bundle": str(out_dir)})
    return out_dir
