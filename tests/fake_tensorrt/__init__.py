"""Fakes of the ``tensorrt``, ``cuda.bindings.driver`` (cuda-python) and ``pycuda.driver`` Python APIs.

Shaped like the real bindings, so the agent's feature detection, recipe choice, version floor and
graph rules run on every test run without a GPU:

- ``make_tensorrt(version)``: the attribute surface of the 8.6, 10.3, 10.x-latest and 11.x bindings
  (``BuilderFlag`` and ``NetworkDefinitionCreationFlag`` members with their values from NvInfer.h,
  calibrators on 10.x only, ``int8_calibrator`` gone in 11), a Builder and builder config that record
  what they were asked for, and an OnnxParser that enforces the rules a real build trips on
  (UINT8 only into Cast; implicit batch refused on 8.x). A STRONGLY_TYPED network with a precision
  builder flag fails the build, as TensorRT does. The "plan" carries the parsed ONNX, and the fake
  runtime executes it with ONNX Runtime reading and writing the fake device memory at the addresses
  bound with ``set_tensor_address``: I/O binding, copies and stream use are checked end to end.
- ``make_cuda_python(gpus)`` / ``make_pycuda(gpus)``: the two CUDA bindings' call shapes over one
  fake device memory; memory and stream calls fail without a current context, as CUDA does.

Values of enum members are the real ones; the fakes never claim more than the call shapes.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import itertools
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VERSIONS = {"8.6": "8.6.2.3", "10.1": "10.1.0.27", "10.3": "10.3.0.30", "10.x-latest": "10.13.3.9", "11.x": "11.1.0.2"}

# BuilderFlag members (NvInfer.h), by release: 10.3 ends at INT4; 10.x-latest adds up to 28.
_FLAGS_10_3 = [
    "FP16",
    "INT8",
    "DEBUG",
    "GPU_FALLBACK",
    "REFIT",
    "DISABLE_TIMING_CACHE",
    "TF32",
    "SPARSE_WEIGHTS",
    "SAFETY_SCOPE",
    "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS",
    "DIRECT_IO",
    "REJECT_EMPTY_ALGORITHMS",
    "VERSION_COMPATIBLE",
    "EXCLUDE_LEAN_RUNTIME",
    "FP8",
    "ERROR_ON_TIMING_CACHE_MISS",
    "BF16",
    "DISABLE_COMPILATION_CACHE",
    "STRIP_PLAN",
    "REFIT_IDENTICAL",
    "WEIGHT_STREAMING",
    "INT4",
]
_FLAGS_10_LATEST = [
    *_FLAGS_10_3,
    "REFIT_INDIVIDUAL",
    "STRICT_NANS",
    "MONITOR_MEMORY",
    "FP4",
    "EDITABLE_TIMING_CACHE",
    "DISTRIBUTIVE_INDEPENDENCE",
]
# TensorRT 11 removed the weak-typing precision flags and renumbered the rest.
_FLAGS_11 = {
    "DEBUG": 2,
    "GPU_FALLBACK": 3,
    "REFIT": 4,
    "DISABLE_TIMING_CACHE": 5,
    "TF32": 6,
    "SPARSE_WEIGHTS": 7,
    "SAFETY_SCOPE": 8,
    "DIRECT_IO": 11,
    "VERSION_COMPATIBLE": 12,
    "EXCLUDE_LEAN_RUNTIME": 13,
    "ERROR_ON_TIMING_CACHE_MISS": 15,
    "DISABLE_COMPILATION_CACHE": 17,
    "STRIP_PLAN": 18,
    "REFIT_IDENTICAL": 19,
    "WEIGHT_STREAMING": 20,
    "REFIT_INDIVIDUAL": 22,
    "STRICT_NANS": 23,
    "MONITOR_MEMORY": 24,
    "EDITABLE_TIMING_CACHE": 26,
    "DISTRIBUTIVE_INDEPENDENCE": 27,
    "REQUIRE_USER_ALLOCATION": 28,
}
PRECISION_FLAG_NAMES = {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4"}
_PLAN_MAGIC = b"FAKEPLAN"
_ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 3: "INT8", 6: "INT32", 9: "BOOL", 2: "UINT8", 16: "BF16", 7: "INT64"}
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_}
_NP |= {"UINT8": np.uint8, "INT64": np.int64}


# --- device memory shared by the fakes ---------------------------------------------------------------


@dataclass
class DeviceMemory:
    """Fake GPU memory and the CUDA context discipline the real driver enforces."""

    blocks: dict[int, bytearray] = field(default_factory=dict)
    context_depth: int = 0
    events: list[str] = field(default_factory=list)
    _next: Any = field(default_factory=lambda: itertools.count(0x7F0000000000, 0x100000))

    def alloc(self, nbytes: int) -> int:
        address = next(self._next)
        self.blocks[address] = bytearray(nbytes)
        return address

    def require_context(self, what: str) -> bool:
        if self.context_depth <= 0:
            self.events.append(f"{what} without a current context")
            return False
        return True


MEMORY = DeviceMemory()


def reset_memory() -> DeviceMemory:
    """A fresh device memory for the next test (the fakes all read the module-level one)."""
    global MEMORY
    MEMORY = DeviceMemory()
    return MEMORY


# --- tensorrt -----------------------------------------------------------------------------------------


def make_tensorrt(version: str) -> types.ModuleType:
    """A ``tensorrt`` module with the API surface of ``version`` (a key of VERSIONS or a version string)."""
    full = VERSIONS.get(version, version)
    major, minor = (int(p) for p in full.split(".")[:2])
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec() reads it
    trt.__version__ = full
    trt.builds = []  # one dict per build_serialized_network call: what the agent asked for
    if major >= 11:
        trt.BuilderFlag = enum.IntEnum("BuilderFlag", _FLAGS_11)
        creation = {"STRONGLY_TYPED": 1, "PREFER_AOT_PYTHON_PLUGINS": 2, "PREFER_JIT_PYTHON_PLUGINS": 3}
    else:
        names = _FLAGS_10_LATEST if (major, minor) >= (10, 13) else _FLAGS_10_3
        if major < 10:
            names = _FLAGS_10_3[:15]
        trt.BuilderFlag = enum.IntEnum("BuilderFlag", {n: i for i, n in enumerate(names)})
        creation = {"EXPLICIT_BATCH": 0}
        if major >= 10 or (major, minor) >= (9, 1):
            creation["STRONGLY_TYPED"] = 1
        for base in ("IInt8Calibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator"):
            setattr(trt, base, type(base, (), {"__init__": lambda self: None}))
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", creation)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1})
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    trt.DataType = enum.IntEnum(
        "DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "BF16": 7, "INT64": 8}
    )

    def nptype(dtype: Any) -> type:
        name = trt.DataType(dtype).name
        if name not in _NP:
            raise TypeError(f"Could not resolve TensorRT datatype to an equivalent numpy datatype. {name}")
        return _NP[name]

    trt.nptype = nptype

    class ILogger:
        Severity = enum.IntEnum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})

        def __init__(self) -> None:
            pass

    trt.ILogger = ILogger
    if major >= 10:
        trt.IProgressMonitor = type("IProgressMonitor", (), {"__init__": lambda self: None})

    strongly_typed_bit = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if major >= 9 else 0

    class Tensor:
        def __init__(self, name: str, shape: tuple[int, ...], dtype: Any) -> None:
            self.name, self.shape, self.dtype = name, shape, dtype

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.strongly_typed = major >= 11 or bool(flags & strongly_typed_bit)
            self.implicit_batch = major < 10 and not flags & 1
            self.inputs: list[Tensor] = []
            self.outputs: list[Tensor] = []
            self.onnx = b""

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i: int) -> Tensor:
            return self.inputs[i]

        def get_output(self, i: int) -> Tensor:
            return self.outputs[i]

    class ParserError:
        def __init__(self, desc: str, node: int = -1, name: str = "", op: str = "") -> None:
            self._d, self._n, self._name, self._op = desc, node, name, op

        def desc(self) -> str:
            return self._d

        def code(self) -> str:
            return "ErrorCode.UNSUPPORTED_NODE"

        def node(self) -> int:
            return self._n

        def node_name(self) -> str:
            return self._name

        def node_operator(self) -> str:
            return self._op

    class OnnxParser:
        def __init__(self, network: Network, logger: Any) -> None:
            self.network, self.errors = network, []

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i: int) -> ParserError:
            return self.errors[i]

        def parse_from_file(self, path: str) -> bool:
            import onnx

            data = Path(path).read_bytes()
            model = onnx.load_from_string(data)
            if self.network.implicit_batch:
                self.errors.append(ParserError("The ONNX parser only supports networks with an explicit batch"))
                return False
            inputs = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
            for index, node in enumerate(model.graph.node):
                for name in node.input:
                    if inputs.get(name) == 2 and node.op_type != "Cast":  # UINT8 network input
                        message = f"{node.op_type}: UINT8 input {name!r} may only feed a Cast layer"
                        self.errors.append(ParserError(message, index, node.name, node.op_type))
            if self.errors:
                return False

            def spec(value: Any) -> Tensor:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
                return Tensor(value.name, dims, trt.DataType[_ONNX_TO_TRT[value.type.tensor_type.elem_type]])

            self.network.inputs = [spec(v) for v in model.graph.input]
            self.network.outputs = [spec(v) for v in model.graph.output]
            self.network.onnx = data
            return True

    trt.OnnxParser = OnnxParser

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return self.data or b"timings"

        def combine(self, other: Any, ignore_mismatch: bool) -> bool:
            return True

    config_attributes = {"progress_monitor", "_flags", "_cache", "profiles", "pools"}
    if major < 11:
        config_attributes.add("int8_calibrator")

    class BuilderConfig:
        def __init__(self) -> None:
            self._flags: set[str] = set()
            self._cache = None
            self.profiles: list[Any] = []
            self.pools: dict[int, int] = {}
            self.progress_monitor = None

        def __setattr__(self, name: str, value: Any) -> None:
            if name not in config_attributes:  # the binding has no such property (int8_calibrator on 11)
                raise AttributeError(f"'tensorrt.IBuilderConfig' object has no attribute '{name}'")
            object.__setattr__(self, name, value)

        def set_flag(self, flag: Any) -> None:
            if not isinstance(flag, trt.BuilderFlag):
                raise TypeError("set_flag(): incompatible function arguments")
            self._flags.add(flag.name)

        def get_flag(self, flag: Any) -> bool:
            return flag.name in self._flags

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.pools[int(pool)] = int(size)

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self._cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self._cache

        def add_optimization_profile(self, profile: Any) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> Network:
            return Network(flags)

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
            trt.builds.append(
                {"strongly_typed": network.strongly_typed, "flags": set(config._flags), "flags_value": network.flags}
            )
            if network.strongly_typed and config._flags & PRECISION_FLAG_NAMES:
                self.logger.log(ILogger.Severity.ERROR, "precision flags are not allowed on a strongly typed network")
                return None
            monitor = config.progress_monitor
            if monitor is not None:
                monitor.phase_start("Building engine", None, 2)
                for step in range(2):
                    if not monitor.step_complete("Building engine", step):
                        return None
                monitor.phase_finish("Building engine")
            header = json.dumps(
                {
                    "inputs": [(t.name, list(t.shape), t.dtype.name) for t in network.inputs],
                    "outputs": [(t.name, list(t.shape), t.dtype.name) for t in network.outputs],
                }
            ).encode()
            return _PLAN_MAGIC + len(header).to_bytes(4, "little") + header + network.onnx

    trt.Builder = Builder

    class ExecutionContext:
        def __init__(self, engine: Any) -> None:
            self.engine, self.addresses = engine, {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return tuple(self.engine.specs[name][0])

        def set_tensor_address(self, name: str, address: int) -> bool:
            if not isinstance(address, int):
                raise TypeError("set_tensor_address(): incompatible function arguments")
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            if not isinstance(stream_handle, int):  # the binding takes the stream as an integer handle
                raise TypeError("execute_async_v3(): incompatible function arguments")
            feeds = {}
            for name in self.engine.input_names:
                shape, dtype = self.engine.specs[name]
                raw = bytes(MEMORY.blocks[self.addresses[name]])
                feeds[name] = np.frombuffer(raw, dtype=dtype)[: int(np.prod(shape))].reshape(shape)
            results = self.engine.session.run(self.engine.output_names, feeds)
            for name, array in zip(self.engine.output_names, results, strict=True):
                data = np.ascontiguousarray(array).tobytes()
                MEMORY.blocks[self.addresses[name]][: len(data)] = data
            return True

    class Engine:
        def __init__(self, header: dict, onnx_bytes: bytes) -> None:
            import onnxruntime

            self.session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            self.input_names = [n for n, _, _ in header["inputs"]]
            self.output_names = [n for n, _, _ in header["outputs"]]
            self.specs = {n: (tuple(s), _NP[d]) for n, s, d in header["inputs"] + header["outputs"]}
            self.dtypes = {n: trt.DataType[d] for n, _, d in header["inputs"] + header["outputs"]}

        num_io_tensors = property(lambda self: len(self.specs))

        def get_tensor_name(self, i: int) -> str:
            return [*self.input_names, *self.output_names][i]

        def get_tensor_mode(self, name: str) -> Any:
            return trt.TensorIOMode.INPUT if name in self.input_names else trt.TensorIOMode.OUTPUT

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.specs[name][0]

        def get_tensor_dtype(self, name: str) -> Any:
            return self.dtypes[name]

        def create_execution_context(self) -> ExecutionContext:
            return ExecutionContext(self)

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            if not plan.startswith(_PLAN_MAGIC):
                return None
            size = int.from_bytes(plan[8:12], "little")
            return Engine(json.loads(plan[12 : 12 + size]), plan[12 + size :])

    trt.Runtime = Runtime
    return trt


# --- cuda-python (cuda.bindings.driver) ---------------------------------------------------------------


class _Handle:
    """CUdeviceptr / CUstream / CUcontext: objects that convert to their address with int()."""

    def __init__(self, value: int) -> None:
        self._value = value

    def __int__(self) -> int:
        return self._value


def make_cuda_python(
    gpus: int = 1, name: str = "Orin", cc: tuple[int, int] = (8, 7), sms: int = 16
) -> types.ModuleType:
    """A ``cuda.bindings.driver`` module: every call returns ``(CUresult, *values)``."""
    cu = types.ModuleType("cuda.bindings.driver")
    cu.CUresult = enum.IntEnum(
        "CUresult",
        {
            "CUDA_SUCCESS": 0,
            "CUDA_ERROR_INVALID_VALUE": 1,
            "CUDA_ERROR_NO_DEVICE": 100,
            "CUDA_ERROR_INVALID_CONTEXT": 201,
        },
    )
    cu.CUdevice_attribute = enum.IntEnum(
        "CUdevice_attribute",
        {
            "CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT": 16,
            "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR": 75,
            "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR": 76,
        },
    )
    ok, no_context = cu.CUresult.CUDA_SUCCESS, cu.CUresult.CUDA_ERROR_INVALID_CONTEXT
    host: dict[int, Any] = {}
    streams: set[int] = set()
    counter = itertools.count(1)

    def cuInit(flags: int) -> tuple:
        return (ok,) if gpus else (cu.CUresult.CUDA_ERROR_NO_DEVICE,)

    def cuGetErrorName(error: Any) -> tuple:
        return ok, cu.CUresult(error).name.encode()

    cu.cuInit, cu.cuGetErrorName = cuInit, cuGetErrorName
    cu.cuDeviceGetCount = lambda: (ok, gpus)
    cu.cuDeviceGet = lambda index: (ok, index)
    cu.cuDeviceGetName = lambda length, dev: (ok, name.encode().ljust(length, b"\0"))
    attributes = {16: sms, 75: cc[0], 76: cc[1]}
    cu.cuDeviceGetAttribute = lambda attribute, dev: (ok, attributes[int(attribute)])
    cu.cuDeviceTotalMem = lambda dev: (ok, 7 * (1 << 30) + 123456)
    cu.cuDevicePrimaryCtxRetain = lambda dev: (ok, _Handle(0xC0))
    cu.cuDevicePrimaryCtxRelease = lambda dev: (ok,)

    def cuCtxPushCurrent(ctx: Any) -> tuple:
        MEMORY.context_depth += 1
        return (ok,)

    def cuCtxPopCurrent() -> tuple:
        MEMORY.context_depth -= 1
        return ok, _Handle(0xC0)

    def cuMemAllocHost(nbytes: int) -> tuple:
        if not MEMORY.require_context("cuMemAllocHost"):
            return (no_context, 0)
        buffer = ctypes.create_string_buffer(nbytes)
        host[ctypes.addressof(buffer)] = buffer
        return ok, ctypes.addressof(buffer)

    def cuMemFreeHost(pointer: int) -> tuple:
        if not MEMORY.require_context("cuMemFreeHost"):
            return (no_context,)
        return (ok,) if host.pop(int(pointer), None) is not None else (cu.CUresult.CUDA_ERROR_INVALID_VALUE,)

    def cuMemAlloc(nbytes: int) -> tuple:
        if not MEMORY.require_context("cuMemAlloc"):
            return (no_context, _Handle(0))
        return ok, _Handle(MEMORY.alloc(nbytes))

    def cuMemFree(pointer: Any) -> tuple:
        if not MEMORY.require_context("cuMemFree"):
            return (no_context,)
        return (ok,) if MEMORY.blocks.pop(int(pointer), None) is not None else (cu.CUresult.CUDA_ERROR_INVALID_VALUE,)

    def cuStreamCreate(flags: int) -> tuple:
        if not MEMORY.require_context("cuStreamCreate"):
            return (no_context, _Handle(0))
        handle = 0x5000 + next(counter)
        streams.add(handle)
        return ok, _Handle(handle)

    def cuStreamDestroy(stream: Any) -> tuple:
        if not MEMORY.require_context("cuStreamDestroy"):
            return (no_context,)
        streams.discard(int(stream))
        return (ok,)

    def cuMemcpyHtoDAsync(dst: Any, src: int, nbytes: int, stream: Any) -> tuple:
        if not MEMORY.require_context("cuMemcpyHtoDAsync") or int(stream) not in streams:
            return (no_context,)
        MEMORY.blocks[int(dst)][:nbytes] = ctypes.string_at(src, nbytes)
        return (ok,)

    def cuMemcpyDtoHAsync(dst: int, src: Any, nbytes: int, stream: Any) -> tuple:
        if not MEMORY.require_context("cuMemcpyDtoHAsync") or int(stream) not in streams:
            return (no_context,)
        ctypes.memmove(dst, bytes(MEMORY.blocks[int(src)][:nbytes]), nbytes)
        return (ok,)

    def cuStreamSynchronize(stream: Any) -> tuple:
        return (ok,) if MEMORY.require_context("cuStreamSynchronize") else (no_context,)

    for function in (cuCtxPushCurrent, cuCtxPopCurrent, cuMemAllocHost, cuMemFreeHost, cuMemAlloc, cuMemFree):
        setattr(cu, function.__name__, function)
    for function in (cuStreamCreate, cuStreamDestroy, cuMemcpyHtoDAsync, cuMemcpyDtoHAsync, cuStreamSynchronize):
        setattr(cu, function.__name__, function)
    cu.host_buffers, cu.streams = host, streams
    return cu


# --- pycuda.driver ------------------------------------------------------------------------------------


def make_pycuda(gpus: int = 1, name: str = "NVIDIA RTX A2000", cc: tuple[int, int] = (8, 6)) -> types.ModuleType:
    """A ``pycuda.driver`` module (objects that free themselves, a static Context.pop)."""
    cuda = types.ModuleType("pycuda.driver")

    class Error(Exception):
        pass

    class LogicError(Error):
        pass

    cuda.Error, cuda.LogicError = Error, LogicError
    cuda.device_attribute = types.SimpleNamespace(MULTIPROCESSOR_COUNT="MULTIPROCESSOR_COUNT")

    def init() -> None:
        if not gpus:
            raise cuda.LogicError("cuInit failed: no CUDA-capable device is detected")

    class Context:
        def push(self) -> None:
            MEMORY.context_depth += 1

        @staticmethod
        def pop() -> None:
            MEMORY.context_depth -= 1

        def detach(self) -> None:
            MEMORY.events.append("context detached")

    class Device:
        def __init__(self, index: int) -> None:
            self.index = index

        @staticmethod
        def count() -> int:
            return gpus

        def name(self) -> str:
            return name

        def compute_capability(self) -> tuple[int, int]:
            return cc

        def get_attribute(self, attribute: str) -> int:
            return 26

        def total_memory(self) -> int:
            return 12 * (1 << 30) - 300 * (1 << 20)

        def retain_primary_context(self) -> Context:
            return Context()

    class DeviceAllocation:
        def __init__(self, nbytes: int) -> None:
            self.address = MEMORY.alloc(nbytes)

        def __int__(self) -> int:
            return self.address

        def free(self) -> None:
            MEMORY.require_context("DeviceAllocation.free")
            MEMORY.blocks.pop(self.address, None)

    class PagelockedHostAllocation:
        """Exposes its memory through __array_interface__, so arrays made from it have it as ``base``."""

        def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
            self._buffer = ctypes.create_string_buffer(max(int(np.prod(shape)) * dtype.itemsize, 1))
            self.__array_interface__ = {
                "shape": tuple(shape),
                "typestr": dtype.str,
                "data": (ctypes.addressof(self._buffer), False),
                "version": 3,
            }
            self.freed = False

        def free(self) -> None:
            MEMORY.require_context("PagelockedHostAllocation.free")
            self.freed = True

    class Stream:
        def __init__(self) -> None:
            MEMORY.require_context("Stream()")
            self.handle = 0x6000 + id(self) % 0x1000

        def synchronize(self) -> None:
            MEMORY.require_context("Stream.synchronize")

        def __del__(self) -> None:
            # pycuda's destructor calls cuStreamDestroy in the stream's context; outside it, it fails.
            MEMORY.require_context("Stream destroyed")

    def pagelocked_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.asarray(PagelockedHostAllocation(tuple(shape), np.dtype(dtype)))

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        MEMORY.require_context("mem_alloc")
        return DeviceAllocation(nbytes)

    def memcpy_htod_async(dest: DeviceAllocation, src: np.ndarray, stream: Stream) -> None:
        MEMORY.require_context("memcpy_htod_async")
        data = np.ascontiguousarray(src).tobytes()
        MEMORY.blocks[int(dest)][: len(data)] = data

    def memcpy_dtoh_async(dest: np.ndarray, src: DeviceAllocation, stream: Stream) -> None:
        MEMORY.require_context("memcpy_dtoh_async")
        raw = bytes(MEMORY.blocks[int(src)][: dest.nbytes])
        dest[...] = np.frombuffer(raw, dtype=dest.dtype).reshape(dest.shape)

    cuda.init, cuda.Context, cuda.Device, cuda.Stream = init, Context, Device, Stream
    cuda.pagelocked_empty, cuda.mem_alloc = pagelocked_empty, mem_alloc
    cuda.memcpy_htod_async, cuda.memcpy_dtoh_async = memcpy_htod_async, memcpy_dtoh_async
    return cuda


def install(monkeypatch: Any, trt: types.ModuleType | None, cuda_python: Any = None, pycuda: Any = None) -> None:
    """Put the fakes (or their absence: None) into sys.modules for the agent's imports."""
    for name in ("tensorrt", "cuda", "cuda.bindings", "cuda.bindings.driver", "cuda.cuda", "pycuda", "pycuda.driver"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)  # None makes `import tensorrt` raise ImportError
    if cuda_python is not None:
        package = types.ModuleType("cuda")
        bindings = types.ModuleType("cuda.bindings")
        package.bindings, bindings.driver = bindings, cuda_python
        package.__path__ = bindings.__path__ = []  # packages, so submodule imports resolve through sys.modules
        monkeypatch.setitem(sys.modules, "cuda", package)
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.driver", cuda_python)
    else:
        monkeypatch.setitem(sys.modules, "cuda", None)
    if pycuda is not None:
        package = types.ModuleType("pycuda")
        package.driver = pycuda
        package.__path__ = []
        monkeypatch.setitem(sys.modules, "pycuda", package)
        monkeypatch.setitem(sys.modules, "pycuda.driver", pycuda)
    else:
        monkeypatch.setitem(sys.modules, "pycuda", None)
