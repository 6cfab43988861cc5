"""TensorRT backend: deserialize a cached plan and run it on one CUDA stream.

Thin on purpose: the I/O contract checks, frame validation and output splitting are the same
functions the ONNX Runtime backend uses (engines/base.py); the plan cache and build recipes live in
cache.py and build.py; CUDA memory and streams go through cuda_buffers.CudaApi
(cuda-python, else pycuda). What is here is only TensorRT calls and their order:

- one pinned host buffer and one device buffer per I/O tensor name, bound once with
  ``set_tensor_address``;
- per frame, on one stream: copy the image in, ``execute_async_v3``, copy back only the outputs the
  manifest names (the anomaly map and the small m_s maps; latents are not engine outputs and never
  leave the GPU), then one ``synchronize``.

The CUDA context is the device's primary context (the one TensorRT's runtime API uses), pushed
around every call, so ``infer`` may run on the pipeline's inference thread.

With ``backend = "auto"`` a missing plan is not built here (that is ``edge-agent build-engine``'s
job, its own systemd unit, and the updater's before it switches models): the engine is unavailable
and the agent falls back to ONNX Runtime, saying why. With ``backend = "tensorrt"`` a missing plan
is built now, with progress logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge_agent.bundle import Bundle, BundleError
from edge_agent.config import DEFAULT_STATE_DIR, ModelConfig
from edge_agent.engines.base import (
    EngineIO,
    EngineOutput,
    TensorSpec,
    check_frame,
    check_io_matches,
    expected_io,
    split_outputs,
)
from edge_agent.engines.errors import EngineUnavailable, TensorRTTooOld
from edge_agent.engines.tensorrt.build import ensure_plan, fixed_input_shape, numpy_dtype_name
from edge_agent.engines.tensorrt.cache import EngineCache
from edge_agent.engines.tensorrt.cuda_buffers import CudaApi, open_cuda
from edge_agent.engines.tensorrt.progress import make_trt_logger
from edge_agent.engines.tensorrt.recipe import TensorRTBuildError, TensorRTVersionError, require_supported

log = logging.getLogger(__name__)


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module (10 or newer), or EngineUnavailable saying what to install."""
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineUnavailable(
            f"TensorRT is not installed ({exc}); on a Jetson use JetPack's python3-libnvinfer in a venv made "
            "with --system-site-packages, elsewhere pip install '.[tensorrt-cu12]' (docs/tensorrt.md)"
        ) from exc
    try:
        require_supported(str(tensorrt.__version__))
    except TensorRTVersionError as exc:
        raise TensorRTTooOld(str(exc)) from exc
    module: ModuleType = tensorrt
    return module


def engine_cache_for(config: ModelConfig) -> EngineCache:
    """The plan cache directory the config names (the default state dir when unset)."""
    return EngineCache(config.engine_cache_dir or Path(DEFAULT_STATE_DIR) / "engines")


def _io_specs(
    trt: ModuleType, engine: Any, context: Any, wanted_input: TensorSpec
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The I/O tensors by name (TensorRT 10/11 name-based API), dynamic inputs set to the manifest's shape.

    Output shapes are read from the execution context after the input shapes are set, so they are
    concrete even when the plan was built with an optimization profile.
    """
    names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
    is_input = {name: engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT for name in names}
    for name in names:
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        fixed = fixed_input_shape(shape, wanted_input.shape, name) if is_input[name] else None
        if fixed is not None and not context.set_input_shape(name, fixed):
            raise TensorRTBuildError(f"TensorRT refused input shape {list(fixed)} for {name!r}")
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for name in names:
        spec = TensorSpec(
            name,
            tuple(int(d) for d in context.get_tensor_shape(name)),
            numpy_dtype_name(trt, engine.get_tensor_dtype(name), name),
        )
        (inputs if is_input[name] else outputs).append(spec)
    return inputs, outputs


class TensorRTEngine:
    """Runs a bundle's TensorRT plan for this GPU (see the module docstring)."""

    backend = "tensorrt"

    def __init__(self, bundle: Bundle, model_config: ModelConfig | None = None, cuda: CudaApi | None = None) -> None:
        config = model_config or ModelConfig()
        trt = import_tensorrt()
        self._trt = trt
        self._cuda: CudaApi | None = cuda or open_cuda(str(trt.__version__))
        self.precision = config.precision
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: int | None = None
        self._device: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}
        try:
            with self._cuda.current():
                self._load(bundle, config)
        except BaseException:
            self.close()
            raise
        log.info(
            "TensorRT engine ready",
            extra={
                "event": "trt_engine_ready",
                "gpu": self._cuda.identity.describe(),
                "cuda": self._cuda.name,
                "plan": str(self.plan_path),
                "recipe": self.recipe,
            },
        )

    def _load(self, bundle: Bundle, config: ModelConfig) -> None:
        trt = self._trt
        assert self._cuda is not None
        cache = engine_cache_for(config)
        build = config.backend == "tensorrt"
        try:
            result = ensure_plan(trt, bundle, config.precision, self._cuda.identity, cache, build_if_missing=build)
        except TensorRTBuildError as exc:
            if build:
                raise
            raise EngineUnavailable(
                f"{exc}; build it with `edge-agent build-engine --bundle {bundle.root} --precision {config.precision}`"
            ) from exc
        self.plan_path = result.path
        self.recipe = result.key.recipe
        self.onnx_sha256 = result.key.onnx_sha256
        self._logger = make_trt_logger(trt)  # must outlive the runtime and engine
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(result.plan)
        if self._engine is None:
            # The key matched but TensorRT still refused it (driver update, corrupted cache): never
            # retry this file; the next build-engine run rebuilds it.
            cache.remove(result.key)
            raise EngineUnavailable(
                f"TensorRT could not deserialize {result.path.name}; it was removed from the cache, "
                f"rebuild with `edge-agent build-engine --bundle {bundle.root} --precision {config.precision}`"
            )
        self._context = self._engine.create_execution_context()
        inputs, outputs = _io_specs(trt, self._engine, self._context, expected_io(bundle.manifest).input)
        try:
            self.io: EngineIO = check_io_matches(bundle, inputs, outputs)
        except BundleError as exc:
            raise BundleError(f"{exc} (TensorRT plan {result.path.name})") from exc
        self._allocate(inputs + outputs)
        self._stream = self._cuda.create_stream()

    def _allocate(self, tensors: list[TensorSpec]) -> None:
        """A pinned host buffer and a device buffer per I/O tensor, bound to the context by name."""
        assert self._cuda is not None
        for spec in tensors:
            host = self._cuda.pinned_empty(spec.shape, np.dtype(spec.dtype))
            self._host[spec.name] = host
            device = self._cuda.device_alloc(host.nbytes)
            self._device[spec.name] = device
            # Every I/O tensor needs an address, including outputs the manifest does not name.
            if not self._context.set_tensor_address(spec.name, device):
                raise RuntimeError(f"TensorRT refused the device address for tensor {spec.name!r}")

    def infer(self, image: np.ndarray) -> EngineOutput:
        """Run one uint8 HxWx3 RGB image at the model size."""
        batch = check_frame(self.io, image)
        cuda = self._cuda
        assert cuda is not None and self._stream is not None
        name_in = self.io.input.name
        with cuda.current():
            np.copyto(self._host[name_in], batch)
            cuda.copy_htod_async(self._device[name_in], self._host[name_in], self._stream)
            if not self._context.execute_async_v3(self._stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the 'tensorrt' log)")
            for spec in self.io.outputs:
                cuda.copy_dtoh_async(self._host[spec.name], self._device[spec.name], self._stream)
            cuda.synchronize(self._stream)
            # Copies: the pinned buffers are reused by the next frame while this result travels on.
            arrays = [self._host[spec.name].copy() for spec in self.io.outputs]
        return split_outputs(self.io, arrays)

    def close(self) -> None:
        """Free the stream, device and pinned memory inside the context, then release it."""
        cuda = getattr(self, "_cuda", None)
        if cuda is None:
            return
        with cuda.current():
            if self._stream is not None:
                cuda.destroy_stream(self._stream)  # inside the context: pycuda frees streams on collection
                self._stream = None
            for pointer in self._device.values():
                cuda.free_device(pointer)
            for host in self._host.values():
                cuda.free_pinned(host)
            self._device.clear()
            self._host.clear()
            # Release order: execution context, engine, runtime (TensorRT's documented lifetime rule).
            self._context = None
            self._engine = None
            self._runtime = None
        cuda.release()
        self._cuda = None
