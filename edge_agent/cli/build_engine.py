"""``edge-agent build-engine``: compile a bundle to a TensorRT plan for this GPU, once, with progress.

Run by the ``edge-agent-build-engine`` oneshot unit before the agent starts, so the agent never
blocks for minutes compiling. The plan is cached (edge_agent/engines/tensorrt/cache.py): on every later start this finds
it and exits in about a second. A plan built for another GPU or TensorRT version is never loaded;
this builds the right one beside it. After a build the plan is loaded once and run on a frame next
to ONNX Runtime, and the difference is logged.

Before building, the ONNX file passes the TensorRT graph check (graph_check.py); a bundle exported
before the cast-first fix is built from a migrated copy (logged), any other problem fails with the
nodes named. While TensorRT builds, the systemd start timeout is extended as long as the build makes
progress (EXTEND_TIMEOUT_USEC; the unit has NotifyAccess=main).

Exit status: 0 plan ready (built or cached); 1 the bundle or the build failed (e.g. a graph TensorRT
rejects: the errors name the nodes; or TensorRT older than 10); 2 bad configuration or options;
3 TensorRT or a CUDA binding (cuda-python, pycuda) is not installed here; 4 both are installed but no
GPU can be opened (no driver, or the sandbox hides the device: a Jetson without its drop-in);
130 stopped (SIGTERM/SIGINT) before the end. The unit treats only 3 as success.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edge_agent.bundle import Bundle, BundleError, load_bundle
from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_NO_GPU, EXIT_OK, EXIT_STOPPED, EXIT_UNAVAILABLE
from edge_agent.config import AgentSettings, ConfigError, ModelConfig, load_settings
from edge_agent.logs import setup_logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent build-engine``."""
    parser.add_argument("--config", type=Path, default=None, help="agent TOML file (precision, cache dir, log format)")
    parser.add_argument(
        "--bundle", type=Path, default=None, help="bundle directory (default: model.bundle of the config)"
    )
    parser.add_argument(
        "--precision", choices=("fp32", "fp16", "int8"), default=None, help="default: model.precision of the config"
    )
    parser.add_argument(
        "--workspace-mb",
        type=int,
        default=None,
        help="TensorRT builder workspace (default: model.tensorrt_workspace_mb)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="plan cache (default: model.engine_cache_dir)")
    # Kept so that existing scripts still parse; TensorRT's implicit INT8 calibration is no longer used.
    parser.add_argument("--calibration-data", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--calibration-images", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--force", action="store_true", help="rebuild even when a matching plan is cached")
    parser.add_argument("--no-verify", action="store_true", help="skip running the new plan next to ONNX Runtime")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edge-agent build-engine``."""
    try:
        settings = load_settings(args.config)
        model = _model_config(settings, args)
    except (ConfigError, ValueError) as exc:
        setup_logging("INFO", "text")
        log.error("configuration error: %s", exc, extra={"event": "config_error"})
        return EXIT_CONFIG
    setup_logging(settings.log_level, settings.log_format)
    try:
        bundle = load_bundle(settings.bundle_dir if model.bundle is None else model.bundle)
    except BundleError as exc:
        log.error("cannot use the bundle: %s", exc, extra={"event": "bundle_error"})
        return EXIT_FAILURE
    cancel = threading.Event()
    with _stop_on_signals(cancel):
        return build(bundle, model, args, cancel)


def _model_config(settings: AgentSettings, args: argparse.Namespace) -> ModelConfig:
    """The config's model section with the command-line options applied."""
    updates: dict[str, object] = {"backend": "tensorrt"}
    if args.bundle is not None:
        updates["bundle"] = args.bundle
    if args.precision is not None:
        updates["precision"] = args.precision
    if args.cache_dir is not None:
        updates["engine_cache_dir"] = args.cache_dir
    if args.workspace_mb is not None:
        if args.workspace_mb < 64:
            raise ValueError(f"--workspace-mb must be at least 64, got {args.workspace_mb}")
        updates["tensorrt_workspace_mb"] = args.workspace_mb
    return ModelConfig.model_validate(settings.model.model_dump() | updates)


@contextmanager
def _stop_on_signals(cancel: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT ask TensorRT to stop at its next progress step instead of killing it mid-write."""

    def handler(signum: int, _frame: object) -> None:
        log.warning("stop requested, cancelling the build", extra={"event": "trt_build_cancel", "signal": signum})
        cancel.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def build(bundle: Bundle, model: ModelConfig, args: argparse.Namespace, cancel: threading.Event) -> int:
    """Find or build the plan; 0 when it is ready."""
    from edge_agent.engines import EngineUnavailable, GpuUnreachable, TensorRTTooOld
    from edge_agent.engines.tensorrt.build import ensure_plan
    from edge_agent.engines.tensorrt.cuda_buffers import open_cuda
    from edge_agent.engines.tensorrt.progress import BuildProgress
    from edge_agent.engines.tensorrt.recipe import BuildCancelled, TensorRTBuildError
    from edge_agent.engines.tensorrt.runtime import engine_cache_for, import_tensorrt

    if getattr(args, "calibration_data", None) is not None:
        log.warning(
            "--calibration-data is ignored: INT8 is built only from the bundle's Q/DQ model "
            f"(make it with `uflow calibrate int8 --bundle {bundle.root} --data GOOD_IMAGES`)",
            extra={"event": "calibration_ignored"},
        )
    try:
        trt = import_tensorrt()
        gpu = open_cuda(str(trt.__version__))
    except TensorRTTooOld as exc:
        log.error("cannot build a TensorRT engine here: %s", exc, extra={"event": "trt_too_old"})
        return EXIT_FAILURE
    except GpuUnreachable as exc:
        log.error("no GPU reachable: %s", exc, extra={"event": "gpu_unreachable"})
        return EXIT_NO_GPU
    except EngineUnavailable as exc:
        log.error("cannot build a TensorRT engine here: %s", exc, extra={"event": "trt_unavailable"})
        return EXIT_UNAVAILABLE
    cache = engine_cache_for(model)
    progress = BuildProgress(cancel=cancel)
    try:
        with gpu.current():
            result = ensure_plan(
                trt,
                bundle,
                model.precision,
                gpu.identity,
                cache,
                workspace_mb=model.tensorrt_workspace_mb,
                force=args.force,
                progress=progress,
            )
    except BuildCancelled as exc:
        log.warning("%s", exc, extra={"event": "trt_build_cancelled"})
        return EXIT_STOPPED
    except (TensorRTBuildError, BundleError, ValueError) as exc:
        log.error("TensorRT engine build failed: %s", exc, extra={"event": "trt_build_failed"})
        return EXIT_FAILURE
    finally:
        gpu.release()
    state = "built" if result.built else "already built"
    print(f"TensorRT plan {state}: {result.path} ({model.precision}, {result.key.recipe}, {gpu.identity.describe()})")
    if result.built and not args.no_verify:
        return verify(bundle, model)
    return EXIT_OK


def verify(bundle: Bundle, model: ModelConfig) -> int:
    """Load the new plan as the agent will and compare one frame with ONNX Runtime (FP32 model)."""
    from edge_agent.engines.onnxruntime import OnnxRuntimeEngine
    from edge_agent.engines.tensorrt.runtime import TensorRTEngine

    spec = bundle.manifest.input
    frame = _verification_frame(bundle, spec.height, spec.width)
    engine = TensorRTEngine(bundle, model)
    try:
        trt_out = engine.infer(frame)
    finally:
        engine.close()
    reference = OnnxRuntimeEngine(bundle, precision="fp32")
    ort_out = reference.infer(frame)
    reference.close()
    if not all(np.isfinite(m).all() for m in (trt_out.anomaly_map, *trt_out.scale_maps)):
        log.error("the TensorRT plan produces NaN or infinite values", extra={"event": "trt_verify_failed"})
        return EXIT_FAILURE
    diff = float(np.max(np.abs(trt_out.anomaly_map - ort_out.anomaly_map)))
    log.info(
        f"TensorRT vs ONNX Runtime FP32 on one frame: anomaly map max |diff| {diff:.4f}",
        extra={"event": "trt_verified", "anomaly_map_max_abs_diff": diff, "precision": model.precision},
    )
    return EXIT_OK


def _verification_frame(bundle: Bundle, height: int, width: int) -> np.ndarray:
    """The bundle's first self-test image, or a mid-grey frame when it has none."""
    from edge_agent.inspection.preprocess import model_input

    for rel in bundle.manifest.self_test:
        import cv2

        image = cv2.imread(str(bundle.root / rel), cv2.IMREAD_COLOR)
        if image is not None:
            return model_input(image, height, width)
    return np.full((height, width, 3), 128, dtype=np.uint8)


if __name__ == "__main__":  # pragma: no cover
    from edge_agent.cli import main

    sys.exit(main(["build-engine", *sys.argv[1:]]))
