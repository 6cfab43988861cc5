"""CUDA for the TensorRT backend: cuda-python (``cuda.bindings``) first, pycuda as the fallback.

Both sit behind one small protocol, :class:`CudaApi`: the device's identity, its primary context
made current around a block, pinned host arrays, device allocations, one stream, async copies,
synchronize and free. The engine (runtime.py) and build-engine only talk to the protocol.

Why cuda-python first: NVIDIA's TensorRT samples moved to it (samples/python/common_runtime.py),
and it installs as a wheel on x86_64 and aarch64 (Jetson included), where pycuda compiles against
the CUDA toolkit at install time. pycuda stays supported because existing boxes have it.

Both use the CUDA *driver* API on the device's primary context (the one TensorRT's runtime uses),
pushed around every call so that any thread may call ``infer``. Allocations and the stream are
owned here and handed out as integers (device pointers, stream handles): the owner frees them while
the context is current, which pycuda in particular needs (a pycuda Stream or allocation collected
after its context is gone fails in its destructor).

Errors: no library at all is :class:`EngineUnavailable` (build-engine exit 3, "not installed");
a library that cannot reach a GPU (no driver, no device node, a sandbox that hides /dev/nvmap) is
:class:`GpuUnreachable` (exit 4), so a unit that should see a GPU fails loudly instead of skipping.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from edge_agent.engines.errors import EngineUnavailable, GpuUnreachable
from edge_agent.engines.tensorrt.cache import DeviceIdentity

log = logging.getLogger(__name__)

BACKENDS = ("cuda-python", "pycuda")
_GIB = 1 << 30


class CudaError(RuntimeError):
    """A CUDA call failed after the device was opened; the message names the call and the error."""


class CudaApi(Protocol):
    """What the TensorRT backend needs from CUDA (see the module docstring)."""

    name: str
    identity: DeviceIdentity

    def current(self) -> contextlib.AbstractContextManager[None]:
        """Make the device's primary context current on this thread for the block."""
        ...

    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A page-locked host array (async copies need pinned memory)."""
        ...

    def free_pinned(self, array: np.ndarray) -> None: ...

    def device_alloc(self, nbytes: int) -> int:
        """A device allocation; returns its address (what ``set_tensor_address`` takes)."""
        ...

    def free_device(self, pointer: int) -> None: ...

    def create_stream(self) -> int:
        """A new stream; returns its handle (what ``execute_async_v3`` takes)."""
        ...

    def destroy_stream(self, stream: int) -> None: ...

    def copy_htod_async(self, device: int, host: np.ndarray, stream: int) -> None: ...

    def copy_dtoh_async(self, host: np.ndarray, device: int, stream: int) -> None: ...

    def synchronize(self, stream: int) -> None: ...

    def release(self) -> None:
        """Release the primary context (after everything above was freed)."""
        ...


def open_cuda(tensorrt_version: str, index: int = 0, prefer: str | None = None) -> CudaApi:
    """Device ``index`` through cuda-python, else pycuda (or only ``prefer``)."""
    order = [prefer] if prefer else list(BACKENDS)
    missing = []
    for name in order:
        if name == "cuda-python":
            driver = _import_cuda_python()
            if driver is None:
                missing.append("cuda-python (cuda.bindings)")
                continue
            return CudaPythonApi(driver, tensorrt_version, index)
        if name == "pycuda":
            try:
                cuda = importlib.import_module("pycuda.driver")
            except ImportError:
                missing.append("pycuda")
                continue
            return PycudaApi(cuda, tensorrt_version, index)
        raise ValueError(f"unknown CUDA binding {name!r}; choose one of {', '.join(BACKENDS)}")
    raise EngineUnavailable(
        f"no CUDA Python binding is installed ({' and '.join(missing)} missing); "
        "pip install '.[tensorrt-cu12]' (cuda-python), or on a Jetson pip install '.[jetson]'"
    )


def _import_cuda_python() -> ModuleType | None:
    """cuda-python's driver module: ``cuda.bindings.driver`` (12.6.1+), else the older ``cuda.cuda``."""
    for module in ("cuda.bindings.driver", "cuda.cuda"):
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    return None


# --- cuda-python ------------------------------------------------------------------------------------


class CudaPythonApi:
    """The protocol on cuda-python's driver API; every call returns ``(CUresult, *values)``."""

    name = "cuda-python"

    def __init__(self, driver: ModuleType, tensorrt_version: str, index: int = 0) -> None:
        self._cu = driver
        try:
            self._call("cuInit", 0)
            count = self._call("cuDeviceGetCount")
        except CudaError as exc:
            raise GpuUnreachable(f"CUDA cannot start, no usable NVIDIA GPU or driver: {exc}") from exc
        if int(count) <= index:
            raise GpuUnreachable(f"no NVIDIA GPU: CUDA sees {int(count)} device(s)")
        attr = driver.CUdevice_attribute
        self._device = self._call("cuDeviceGet", index)
        raw_name = self._call("cuDeviceGetName", 256, self._device)
        major = self._call("cuDeviceGetAttribute", attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self._device)
        minor = self._call("cuDeviceGetAttribute", attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self._device)
        sms = self._call("cuDeviceGetAttribute", attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, self._device)
        memory = self._call("cuDeviceTotalMem", self._device)
        name = bytes(raw_name).split(b"\0", 1)[0].decode(errors="replace")
        self.identity = DeviceIdentity(
            name, f"{int(major)}.{int(minor)}", tensorrt_version, int(sms), round(int(memory) / _GIB)
        )
        self._context = self._call("cuDevicePrimaryCtxRetain", self._device)
        self._pinned: dict[int, int] = {}  # id(array) -> host pointer
        self._allocations: dict[int, Any] = {}  # address -> CUdeviceptr
        self._streams: dict[int, Any] = {}  # handle -> CUstream

    def _call(self, function: str, *args: Any) -> Any:
        result = getattr(self._cu, function)(*args)
        error, values = result[0], result[1:]
        if error != self._cu.CUresult.CUDA_SUCCESS:
            described = self._cu.cuGetErrorName(error)
            label = described[1].decode() if described[0] == self._cu.CUresult.CUDA_SUCCESS else str(error)
            raise CudaError(f"{function} failed: {label}")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        self._call("cuCtxPushCurrent", self._context)
        try:
            yield
        finally:
            self._call("cuCtxPopCurrent")

    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        pointer = int(self._call("cuMemAllocHost", nbytes))
        buffer = (ctypes.c_byte * nbytes).from_address(pointer)
        used = int(np.prod(shape)) * dtype.itemsize
        array = (
            np.frombuffer(memoryview(buffer).cast("B"), dtype=np.uint8, count=nbytes)[:used].view(dtype).reshape(shape)
        )
        self._pinned[id(array)] = pointer
        return array

    def free_pinned(self, array: np.ndarray) -> None:
        pointer = self._pinned.pop(id(array), None)
        if pointer is not None:
            self._call("cuMemFreeHost", pointer)

    def device_alloc(self, nbytes: int) -> int:
        allocation = self._call("cuMemAlloc", max(int(nbytes), 1))
        address = int(allocation)
        self._allocations[address] = allocation
        return address

    def free_device(self, pointer: int) -> None:
        allocation = self._allocations.pop(pointer, None)
        if allocation is not None:
            self._call("cuMemFree", allocation)

    def create_stream(self) -> int:
        stream = self._call("cuStreamCreate", 0)
        handle = int(stream)
        self._streams[handle] = stream
        return handle

    def destroy_stream(self, stream: int) -> None:
        found = self._streams.pop(stream, None)
        if found is not None:
            self._call("cuStreamDestroy", found)

    def copy_htod_async(self, device: int, host: np.ndarray, stream: int) -> None:
        self._call("cuMemcpyHtoDAsync", self._allocations[device], host.ctypes.data, host.nbytes, self._streams[stream])

    def copy_dtoh_async(self, host: np.ndarray, device: int, stream: int) -> None:
        self._call("cuMemcpyDtoHAsync", host.ctypes.data, self._allocations[device], host.nbytes, self._streams[stream])

    def synchronize(self, stream: int) -> None:
        self._call("cuStreamSynchronize", self._streams[stream])

    def release(self) -> None:
        self._call("cuDevicePrimaryCtxRelease", self._device)


# --- pycuda -----------------------------------------------------------------------------------------


class PycudaApi:
    """The protocol on pycuda's driver module (objects own their memory; freed here, in context)."""

    name = "pycuda"

    def __init__(self, cuda: ModuleType, tensorrt_version: str, index: int = 0) -> None:
        self._cuda = cuda
        try:
            cuda.init()
            count = cuda.Device.count()
        except Exception as exc:  # pycuda raises its own cuda.Error subclasses (no driver, no device node)
            raise GpuUnreachable(f"CUDA cannot start, no usable NVIDIA GPU or driver: {exc}") from exc
        if count <= index:
            raise GpuUnreachable(f"no NVIDIA GPU: CUDA sees {count} device(s)")
        device = cuda.Device(index)
        major, minor = device.compute_capability()
        sms = device.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)
        self.identity = DeviceIdentity(
            str(device.name()), f"{major}.{minor}", tensorrt_version, int(sms), round(device.total_memory() / _GIB)
        )
        self._context = device.retain_primary_context()
        self._allocations: dict[int, Any] = {}
        self._streams: dict[int, Any] = {}

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        self._context.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        array: np.ndarray = self._cuda.pagelocked_empty(shape, np.dtype(dtype))
        return array

    def free_pinned(self, array: np.ndarray) -> None:
        allocation: Any = array.base  # the PagelockedHostAllocation behind the array (pycuda has no stubs)
        allocation.free()

    def device_alloc(self, nbytes: int) -> int:
        allocation = self._cuda.mem_alloc(max(int(nbytes), 1))
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free_device(self, pointer: int) -> None:
        allocation = self._allocations.pop(pointer, None)
        if allocation is not None:
            allocation.free()

    def create_stream(self) -> int:
        stream = self._cuda.Stream()
        self._streams[int(stream.handle)] = stream
        return int(stream.handle)

    def destroy_stream(self, stream: int) -> None:
        # pycuda has no explicit destroy: dropping the last reference runs cuStreamDestroy, which must
        # happen while the context is current (the caller holds current()), not at a later collection.
        found = self._streams.pop(stream, None)
        del found

    def copy_htod_async(self, device: int, host: np.ndarray, stream: int) -> None:
        self._cuda.memcpy_htod_async(self._allocations[device], host, self._streams[stream])

    def copy_dtoh_async(self, host: np.ndarray, device: int, stream: int) -> None:
        self._cuda.memcpy_dtoh_async(host, self._allocations[device], self._streams[stream])

    def synchronize(self, stream: int) -> None:
        self._streams[stream].synchronize()

    def release(self) -> None:
        self._context.detach()
