"""Build (and check) the TensorRT plan of a new bundle before the fleet updater switches to it.

Without this, a GPU box with ``backend = "auto"`` loads a new model after an update, finds no plan for
it, falls back to ONNX Runtime on the CPU and stays there until the next restart runs build-engine.
So the updater calls :func:`prebuild_plan` in its ``load_engine`` step, before ``models/current``
moves: the plan is built into the engine cache (keyed by the ONNX file's sha256, so it is found after
the bundle is renamed into place), the ONNX file passes the TensorRT graph check on the way (an old
export is migrated, anything else refused), and the engine the updater then loads for the self-test
is that TensorRT plan: the self-test checks the plan's outputs before the switch.

A box where TensorRT cannot run (not installed, no GPU reachable, too old) is not a failure with
``backend = "auto"``: it runs ONNX Runtime anyway, and the reason is logged. With
``backend = "tensorrt"`` it is, as it would be for the agent. A plan that fails to build fails the
update (EngineUnavailable, the step's error), and the old model, with its plan, keeps running.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edge_agent.bundle import Bundle
from edge_agent.config import ModelConfig
from edge_agent.engines import EngineUnavailable, tensorrt_missing_reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prebuilt:
    """The plan that is ready for the new bundle."""

    path: str
    recipe: str
    built: bool
    seconds: float


def prebuild_plan(bundle: Bundle, config: ModelConfig) -> Prebuilt | None:
    """Make sure this device's TensorRT plan for ``bundle`` exists; None where TensorRT is not used here."""
    if config.backend == "onnxruntime":
        return None
    reason = tensorrt_missing_reason()
    if reason is not None:
        _not_here(config, reason)
        return None
    from edge_agent.engines.tensorrt.build import ensure_plan
    from edge_agent.engines.tensorrt.cuda_buffers import open_cuda
    from edge_agent.engines.tensorrt.recipe import TensorRTBuildError
    from edge_agent.engines.tensorrt.runtime import engine_cache_for, import_tensorrt

    try:
        trt = import_tensorrt()
        cuda = open_cuda(str(trt.__version__))
    except EngineUnavailable as exc:  # too old, no CUDA binding, or no GPU reachable
        _not_here(config, str(exc))
        return None
    log.info(
        f"building the TensorRT {config.precision} plan for {bundle.manifest.name} {bundle.manifest.version} "
        "before switching to it",
        extra={"event": "trt_prebuild_start", "bundle": str(bundle.root), "precision": config.precision},
    )
    try:
        with cuda.current():
            result = ensure_plan(
                trt,
                bundle,
                config.precision,
                cuda.identity,
                engine_cache_for(config),
                workspace_mb=config.tensorrt_workspace_mb,
            )
    except TensorRTBuildError as exc:
        raise EngineUnavailable(f"the TensorRT plan for the new bundle cannot be built: {exc}") from exc
    finally:
        cuda.release()
    log.info(
        f"TensorRT plan ready for {bundle.manifest.version}: {result.path.name}",
        extra={
            "event": "trt_prebuild_done",
            "plan": str(result.path),
            "recipe": result.key.recipe,
            "built": result.built,
            "build_s": round(result.seconds, 1),
        },
    )
    return Prebuilt(str(result.path), result.key.recipe, result.built, result.seconds)


def _not_here(config: ModelConfig, reason: str) -> None:
    if config.backend == "tensorrt":
        raise EngineUnavailable(f"TensorRT not available on this device: {reason}")
    log.info(
        "no TensorRT plan built for the new bundle: this device runs ONNX Runtime",
        extra={"event": "trt_prebuild_skipped", "reason": reason},
    )
    return None
