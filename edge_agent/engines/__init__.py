"""Inference backends behind one protocol (see base.Engine), and the factory that picks one.

``backend = "auto"`` uses TensorRT where the ``tensorrt`` Python package imports, else ONNX Runtime on
the CPU (the embedded default). Asking for ``"tensorrt"`` where it is missing is an error that says why.
The TensorRT backend (``edge_agent/engines/tensorrt/runtime.py``) exposes ``TensorRTEngine(bundle, model_config)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

from edge_agent.bundle import Bundle
from edge_agent.config import ModelConfig
from edge_agent.engines.base import Engine, EngineIO, EngineOutput, TensorSpec
from edge_agent.engines.errors import EngineUnavailable, GpuUnreachable, TensorRTTooOld

__all__ = [
    "Engine",
    "EngineIO",
    "EngineOutput",
    "EngineUnavailable",
    "GpuUnreachable",
    "TensorRTTooOld",
    "TensorSpec",
    "create_engine",
]

log = logging.getLogger(__name__)


def tensorrt_missing_reason() -> str | None:
    """Why TensorRT cannot be used here, or None when its Python package and our backend import."""
    if importlib.util.find_spec("tensorrt") is None:
        return (
            "the `tensorrt` Python package is not installed (pip install '.[tensorrt-cu12]'; on a Jetson use "
            "JetPack's python3-libnvinfer, docs/tensorrt.md)"
        )
    try:
        importlib.import_module("edge_agent.engines.tensorrt.runtime")
    except ImportError as exc:
        return f"the TensorRT backend does not import: {exc}"
    return None


def create_engine(bundle: Bundle, model_config: ModelConfig | None = None, live: bool = False) -> Engine:
    """An engine for a verified bundle, on the backend the config asks for (logged).

    ``live``: the frames come from a camera or stream (it is part of ONNX Runtime's thread plan,
    edge_agent/engines/threads.py).
    """
    config = model_config or ModelConfig()
    backend = config.backend
    if backend in ("auto", "tensorrt"):
        reason = tensorrt_missing_reason()
        if reason is None:
            backend = "tensorrt"
        elif backend == "tensorrt":
            raise EngineUnavailable(f"TensorRT not available on this device: {reason}")
        else:
            log.info(
                "TensorRT not available, using ONNX Runtime on the CPU",
                extra={"event": "backend_fallback", "reason": reason},
            )
            backend = "onnxruntime"
    engine: Engine | None = None
    if backend == "tensorrt":
        engine = _tensorrt_engine(bundle, config, fall_back=config.backend == "auto")
    if engine is None:
        from edge_agent.engines.onnxruntime import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine(
            bundle, precision=config.precision, threads=config.threads, spinning=config.spinning, live=live
        )
        log.info(
            "ONNX Runtime threads chosen",
            extra={
                "event": "engine_threads",
                "intra_op_threads": engine.threads.intra_op_threads,
                "inter_op_threads": engine.threads.inter_op_threads,
                "spinning": engine.threads.spinning,
                "pin_cores": engine.threads.pin_cores,
                "cores": engine.threads.cores,
                "live": live,
                "reason": engine.threads.reason,
            },
        )
    log.info(
        "engine loaded",
        extra={
            "event": "engine_loaded",
            "backend": engine.backend,
            "precision": config.precision,
            "model": bundle.manifest.name,
            "version": bundle.manifest.version,
            # The engine knows which ONNX file its plan was built from: ask it.
            "onnx_sha256": (getattr(engine, "onnx_sha256", None) or bundle.model_sha256(config.precision))[:12],
        },
    )
    return engine


def _tensorrt_engine(bundle: Bundle, config: ModelConfig, fall_back: bool) -> Engine | None:
    """The TensorRT engine; with ``fall_back``, None (logged) when the device cannot run it."""
    from edge_agent.engines.tensorrt.runtime import TensorRTEngine

    try:
        return TensorRTEngine(bundle, config)
    except EngineUnavailable as exc:
        if not fall_back:
            raise EngineUnavailable(f"TensorRT not available on this device: {exc}") from exc
        log.warning(
            "TensorRT cannot run here, using ONNX Runtime on the CPU",
            extra={"event": "backend_fallback", "reason": str(exc)},
        )
        return None
