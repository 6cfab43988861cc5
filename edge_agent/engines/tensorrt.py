"""TensorRT backend (pycuda): deserialize a cached plan and run it on one CUDA stream.

Thin on purpose: the I/O contract checks, frame validation and output splitting are the same
functions the ONNX Runtime backend uses (engines/base.py); the plan cache and build recipes live in
engine_cache.py and trt_build.py. What is here is only TensorRT and CUDA calls:

- one pinned host buffer and one device buffer per I/O tensor name, bound once with
  ``set_tensor_address``;
- per frame, on one stream: copy the image in, ``execute_async_v3``, copy back only the outputs the
  manifest names (the anomaly map and the small m_s maps; latents are not engine outputs and never
  leave the GPU), then one ``synchronize``.

The CUDA context is the device's primary context (the one TensorRT's runtime API uses), pushed
around every call, so ``infer`` may run on the pipeline's inference thread.

With ``backend = "auto"`` a missing plan is not built here (that is ``edge-agent build-engine``'s
job, its own systemd unit): the engine is unavailable and the agent falls back to ONNX Runtime,
saying why. With ``backend = "tensorrt"`` a missing plan is built now, with progress logged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge_agent.bundle import Bundle, BundleError
from edge_agent.config import DEFAULT_STATE_DIR, ModelConfig
from edge_agent.engine_cache import DeviceIdentity, EngineCache
from edge_agent.engines import EngineUnavailable
from edge_agent.engines.base import (
    EngineIO,
    EngineOutput,
    TensorSpec,
    check_frame,
    check_io_matches,
    expected_io,
    split_outputs,
)
from edge_agent.engines.trt_build import (
    TensorRTBuildError,
    ensure_plan,
    fixed_input_shape,
    make_trt_logger,
    numpy_dtype_name,
)

log = logging.getLogger(__name__)


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or EngineUnavailable saying it is not installed."""
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineUnavailable(
            f"TensorRT is not installed ({exc}); on a Jetson use JetPack's python3-libnvinfer, "
            "elsewhere pip install '.[tensorrt]'"
        ) from exc
    return tensorrt


def import_pycuda() -> ModuleType:
    """``pycuda.driver``, initialised, or EngineUnavailable saying why not."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise EngineUnavailable(f"pycuda is not installed ({exc}); pip install '.[tensorrt]'") from exc
    try:
        cuda.init()
    except Exception as exc:  # pycuda raises its own cuda.Error (no driver, no device node)
        raise EngineUnavailable(f"CUDA cannot start, no usable NVIDIA GPU or driver: {exc}") from exc
    return cuda


@dataclass
class Gpu:
    """One CUDA device and its retained primary context."""

    cuda: ModuleType
    device: Any
    context: Any
    identity: DeviceIdentity

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """Make the primary context current on this thread for the duration of the block."""
        self.context.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def release(self) -> None:
        self.context.detach()


def open_gpu(cuda: ModuleType, tensorrt_version: str, index: int = 0) -> Gpu:
    """Device ``index`` with its primary context retained, or EngineUnavailable when there is none."""
    count = cuda.Device.count()
    if count <= index:
        raise EngineUnavailable(f"no NVIDIA GPU: CUDA sees {count} device(s)")
    device = cuda.Device(index)
    major, minor = device.compute_capability()
    identity = DeviceIdentity(str(device.name()), f"{major}.{minor}", tensorrt_version)
    return Gpu(cuda, device, device.retain_primary_context(), identity)


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
    inputs, outputs = [], []
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

    def __init__(self, bundle: Bundle, model_config: ModelConfig | None = None) -> None:
        config = model_config or ModelConfig()
        trt = import_tensorrt()
        cuda = import_pycuda()
        self._trt = trt
        self._gpu = open_gpu(cuda, str(trt.__version__))
        self.precision = config.precision
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._device: dict[str, Any] = {}
        self._host: dict[str, np.ndarray] = {}
        try:
            with self._gpu.current():
                self._load(bundle, config)
        except BaseException:
            self.close()
            raise
        log.info(
            "TensorRT engine ready",
            extra={
                "event": "trt_engine_ready",
                "gpu": self._gpu.identity.describe(),
                "plan": str(self.plan_path),
                "recipe": self.recipe,
            },
        )

    def _load(self, bundle: Bundle, config: ModelConfig) -> None:
        trt = self._trt
        cache = engine_cache_for(config)
        build = config.backend == "tensorrt"
        try:
            result = ensure_plan(trt, bundle, config.precision, self._gpu.identity, cache, build_if_missing=build)
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
        self._stream = self._gpu.cuda.Stream()

    def _allocate(self, tensors: list[TensorSpec]) -> None:
        """A pinned host buffer and a device buffer per I/O tensor, bound to the context by name."""
        cuda = self._gpu.cuda
        for spec in tensors:
            host = cuda.pagelocked_empty(spec.shape, np.dtype(spec.dtype))
            device = cuda.mem_alloc(max(host.nbytes, 1))
            self._host[spec.name] = host
            self._device[spec.name] = device
            # Every I/O tensor needs an address, including outputs the manifest does not name.
            if not self._context.set_tensor_address(spec.name, int(device)):
                raise RuntimeError(f"TensorRT refused the device address for tensor {spec.name!r}")

    def infer(self, image: np.ndarray) -> EngineOutput:
        """Run one uint8 HxWx3 RGB image at the model size."""
        batch = check_frame(self.io, image)
        cuda = self._gpu.cuda
        name_in = self.io.input.name
        with self._gpu.current():
            np.copyto(self._host[name_in], batch)
            cuda.memcpy_htod_async(self._device[name_in], self._host[name_in], self._stream)
            if not self._context.execute_async_v3(self._stream.handle):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the 'tensorrt' log)")
            for spec in self.io.outputs:
                cuda.memcpy_dtoh_async(self._host[spec.name], self._device[spec.name], self._stream)
            self._stream.synchronize()
            # Copies: the pinned buffers are reused by the next frame while this result travels on.
            arrays = [self._host[spec.name].copy() for spec in self.io.outputs]
        return split_outputs(self.io, arrays)

    def close(self) -> None:
        """Free device and pinned memory, then release the primary context."""
        gpu = getattr(self, "_gpu", None)
        if gpu is None:
            return
        with gpu.current():
            for allocation in self._device.values():
                allocation.free()
            for host in self._host.values():
                host.base.free()  # the PagelockedHostAllocation behind the array
            self._device.clear()
            self._host.clear()
            # Release order: execution context, engine, runtime (TensorRT's documented lifetime rule).
            self._context = None
            self._engine = None
            self._runtime = None
        gpu.release()
        self._gpu = None  # type: ignore[assignment]
