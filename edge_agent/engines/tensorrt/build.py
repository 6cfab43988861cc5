"""Building TensorRT plans from a bundle: which ONNX and flags per TensorRT version, and the build itself.

The recipes (docs/tensorrt.md has the table and the reasons):

- **fp32**: ``model.onnx``, no precision flag (TensorRT 11: strongly typed, which is the same thing).
- **fp16**: ``model.fp16.onnx`` from ``uflow calibrate fp16`` in a STRONGLY_TYPED network: every layer
  runs in the type the ONNX file gives it, so z², the channel mean and the anomaly map stay FP32 (the
  graph check proves the file does that). ``BuilderFlag.FP16`` on the FP32 graph is never used: it
  lets TensorRT compute z² in FP16, which overflows to inf for |z| > 256 on exactly the defective
  frames.
- **int8**: ``model.int8.onnx`` (explicit Q/DQ, backbone FP32) from ``uflow calibrate int8``, strongly
  typed, no ``BuilderFlag.INT8``. TensorRT's implicit calibrator (``IInt8EntropyCalibrator2``) is not
  used: it quantizes the backbone (−12.6 pixel-AUROC points for the stem alone, docs/precision.md),
  and it is deprecated since 10.1 and removed in 11.

Versions: TensorRT < 10 is refused with a message naming the JetPack to install (on 8.x
``create_network(0)`` makes an implicit-batch network, which the ONNX parser refuses; JetPack 6.0 ships
8.6); FP16 and INT8 need 10.3 or newer (JetPack 6.1+), as on 11. A STRONGLY_TYPED network never gets a precision builder flag: TensorRT
rejects the combination, and :class:`BuildRecipe` refuses to describe it. Features are detected
from the module at run time (``hasattr``), never assumed from the platform.

Everything here that is not a TensorRT call (recipes, error text, progress bookkeeping) is pure and
tested without a GPU, against fakes of the 10.3, 10.x-latest and 11.x Python APIs (tests/fake_tensorrt).
The TensorRT calls follow NVIDIA's samples (samples/python/common.py, samples/python/common_runtime.py,
simple_progress_monitor) for the 10.x and 11.x Python API.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge_agent.bundle import Bundle, BundleError
from edge_agent.engines.base import TensorSpec, expected_io
from edge_agent.engines.tensorrt.cache import (
    DeviceIdentity,
    EngineCache,
    EngineKey,
    new_metadata,
)
from edge_agent.engines.tensorrt.graph_check import GraphCheckError, checked_onnx
from edge_agent.engines.tensorrt.progress import BuildProgress, Heartbeat, make_progress_monitor, make_trt_logger
from edge_agent.engines.tensorrt.recipe import (
    DEFAULT_WORKSPACE_MB,
    PRECISION_FLAGS,
    BuildCancelled,
    BuildRecipe,
    OnnxParseError,
    TensorRTBuildError,
    TrtFeatures,
    _parser_issues,
    choose_recipe,
    describe_parser_errors,
    detect_features,
    require_supported,
)
from edge_agent.fileio import atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltPlan:
    """A serialized plan and what went into it."""

    plan: bytes
    seconds: float
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    settings: dict[str, object]


def numpy_dtype_name(trt: ModuleType, dtype: Any, tensor: str) -> str:
    """The numpy name of a TensorRT data type; a clear error for types numpy lacks (BF16, FP8, INT4)."""
    try:
        return str(np.dtype(trt.nptype(dtype)).name)
    except TypeError as exc:
        raise TensorRTBuildError(
            f"tensor {tensor!r} is {dtype}, which has no numpy type; engine I/O must be uint8 in, float32 out"
        ) from exc


def _tensor_spec(trt: ModuleType, tensor: Any) -> TensorSpec:
    name = str(tensor.name)
    return TensorSpec(name, tuple(int(d) for d in tensor.shape), numpy_dtype_name(trt, tensor.dtype, name))


def fixed_input_shape(actual: tuple[int, ...], wanted: tuple[int, ...], name: str) -> tuple[int, ...] | None:
    """The shape to pin a dynamic input to (the manifest's), or None when ``actual`` is already static.

    A -1 dimension (a dynamic axis, e.g. an exporter's dynamic batch) takes the manifest's value; a
    fixed dimension must already equal it.
    """
    if all(d >= 0 for d in actual):
        return None
    if len(actual) != len(wanted) or any(a >= 0 and a != w for a, w in zip(actual, wanted, strict=True)):
        raise TensorRTBuildError(
            f"input {name!r} has shape {list(actual)}, which cannot run the manifest's shape {list(wanted)}"
        )
    return tuple(wanted)


def load_timing_cache(config: Any, path: Path) -> Any:
    """Attach the persistent timing cache (empty when the file is missing or unusable)."""
    data = b""
    if path.is_file():
        data = path.read_bytes()
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # a damaged file: the binding may raise instead of returning None
        cache = None
    if cache is None and data:
        log.warning(
            "timing cache unreadable, starting a new one", extra={"event": "timing_cache_reset", "path": str(path)}
        )
        cache = config.create_timing_cache(b"")
    # ignore_mismatch=False: a cache from another GPU or TensorRT must not steer tactic choice.
    if not config.set_timing_cache(cache, False):
        log.warning(
            "timing cache does not match this device, starting a new one",
            extra={"event": "timing_cache_reset", "path": str(path)},
        )
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def save_timing_cache(config: Any, path: Path) -> None:
    """Merge this build's timings into the file (another build may have written it meanwhile)."""
    cache = config.get_timing_cache()
    if cache is None:
        return
    if path.is_file():
        on_disk = config.create_timing_cache(path.read_bytes())
        if on_disk is not None and not cache.combine(on_disk, False):
            log.warning(
                "could not merge the timing cache on disk; keeping this build's",
                extra={"event": "timing_cache_merge_failed", "path": str(path)},
            )
    atomic_write(path, bytes(memoryview(cache.serialize())))


def build_serialized(
    trt: ModuleType,
    features: TrtFeatures,
    onnx_path: Path,
    recipe: BuildRecipe,
    *,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: Path | None = None,
    progress: BuildProgress | None = None,
    verbose: bool = False,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> BuiltPlan:
    """Parse ``onnx_path`` and build a serialized plan with ``recipe`` (needs a GPU).

    ``input_shapes`` (the manifest's) pin dynamic input axes through one optimization profile with
    min = opt = max; static inputs need none.
    """
    progress = progress or BuildProgress()
    require_supported(features.version)
    logger = make_trt_logger(trt, verbose)
    builder = trt.Builder(logger)
    flags = 0
    if recipe.strongly_typed and features.major < 11:
        # TensorRT 11 is always strongly typed and has deprecated the flag; 10.x needs it.
        if not features.strongly_typed_flag:
            raise TensorRTBuildError(f"TensorRT {features.version} has no strongly typed networks")
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    log.info("parsing ONNX", extra={"event": "trt_parse", "onnx": str(onnx_path), "recipe": recipe.name})
    if not parser.parse_from_file(str(onnx_path)):
        raise OnnxParseError(describe_parser_errors(onnx_path, _parser_issues(parser), features.version))
    inputs = tuple(_tensor_spec(trt, network.get_input(i)) for i in range(network.num_inputs))
    outputs = tuple(_tensor_spec(trt, network.get_output(i)) for i in range(network.num_outputs))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    pinned = {}
    for spec in inputs:
        wanted = (input_shapes or {}).get(spec.name)
        if wanted is None and any(d < 0 for d in spec.shape):
            raise TensorRTBuildError(f"input {spec.name!r} of {onnx_path.name} is dynamic {list(spec.shape)}")
        fixed = fixed_input_shape(spec.shape, wanted, spec.name) if wanted is not None else None
        if fixed is not None:
            pinned[spec.name] = fixed
    if pinned:
        profile = builder.create_optimization_profile()
        for name, shape in pinned.items():
            profile.set_shape(name, shape, shape, shape)
        config.add_optimization_profile(profile)
        log.info("dynamic inputs pinned to the manifest's shape", extra={"event": "trt_profile", "inputs": pinned})
    for flag in recipe.builder_flags:
        if recipe.strongly_typed and flag in PRECISION_FLAGS:  # BuildRecipe refuses this too; never reach TensorRT
            raise TensorRTBuildError(f"{flag} cannot be set on a strongly typed network")
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if timing_cache is not None:
        load_timing_cache(config, timing_cache)
    if features.progress_monitor:
        config.progress_monitor = make_progress_monitor(trt, progress)

    with Heartbeat(progress, f"{onnx_path.name} ({recipe.name})"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        if progress.cancel.is_set():
            raise BuildCancelled(f"TensorRT build of {onnx_path.name} cancelled after {progress.elapsed():.0f} s")
        raise TensorRTBuildError(
            f"TensorRT {features.version} could not build {onnx_path.name} ({recipe.name}); "
            "its errors are in the log above (logger 'tensorrt')"
        )
    if timing_cache is not None:
        save_timing_cache(config, timing_cache)
    settings = recipe.describe() | {"workspace_mb": int(workspace_mb), "tensorrt": features.version}
    return BuiltPlan(bytes(memoryview(serialized)), progress.elapsed(), inputs, outputs, settings)


@dataclass(frozen=True)
class PlanResult:
    """A plan ready to deserialize, and whether it was just built."""

    plan: bytes
    key: EngineKey
    path: Path
    built: bool
    seconds: float


def ensure_plan(
    trt: ModuleType,
    bundle: Bundle,
    precision: str,
    device: DeviceIdentity,
    cache: EngineCache,
    *,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    force: bool = False,
    build_if_missing: bool = True,
    progress: BuildProgress | None = None,
) -> PlanResult:
    """The cached plan for this bundle, precision and device, building (and caching) it when needed.

    Before a build the ONNX file passes the TensorRT graph check (graph_check.checked_onnx): an old
    export whose UINT8 input feeds a Transpose is built from a migrated copy in the cache directory,
    any other problem is a GraphCheckError (a TensorRTBuildError) that names the nodes.
    """
    features = detect_features(trt)
    if features.version != device.tensorrt_version:
        raise TensorRTBuildError(
            f"device identity says TensorRT {device.tensorrt_version}, module is {features.version}"
        )
    recipe = choose_recipe(bundle, precision, features)
    key = EngineKey.for_device(device, recipe.onnx_sha256, precision, recipe.name)
    if not force:
        found = cache.load(key)
        if found.plan is not None:
            log.info("using cached TensorRT plan", extra={"event": "trt_plan_cached", "path": str(found.path)})
            return PlanResult(found.plan, key, found.path, built=False, seconds=0.0)
        if not build_if_missing:
            raise TensorRTBuildError(found.reason)
        log.warning(
            f"building a TensorRT plan: {found.reason}",
            extra={"event": "trt_build_needed", "reason": found.reason, "device": device.describe()},
        )
    onnx_path = bundle.root / recipe.onnx_file
    if not onnx_path.is_file():
        raise BundleError(f"bundle {bundle.root}: {recipe.onnx_file} is missing")
    log.info(
        f"building TensorRT {precision} plan for {bundle.manifest.name} {bundle.manifest.version} on "
        f"{device.describe()} (this can take minutes)",
        extra={
            "event": "trt_build_start",
            "recipe": recipe.name,
            "onnx": recipe.onnx_file,
            "workspace_mb": workspace_mb,
        },
    )
    try:
        parse_path, migration = checked_onnx(onnx_path, precision, cache.root / "migrated")
    except GraphCheckError as exc:
        raise TensorRTBuildError(f"bundle {bundle.root}: {exc}") from exc
    built = build_serialized(
        trt,
        features,
        parse_path,
        recipe,
        workspace_mb=workspace_mb,
        timing_cache=cache.timing_cache_path(device),
        progress=progress,
        input_shapes={bundle.manifest.input.name: expected_io(bundle.manifest).input.shape},
    )
    settings = built.settings | (
        {"migrated": f"cast moved before {'/'.join(migration.moved_over)}"} if migration else {}
    )
    metadata = new_metadata(
        key,
        built.plan,
        built.seconds,
        recipe.onnx_file,
        bundle.manifest.name,
        bundle.manifest.version,
        builder=settings
        | {"inputs": [t.describe() for t in built.inputs], "outputs": [t.describe() for t in built.outputs]},
    )
    path = cache.store(key, built.plan, metadata)
    log.info(
        f"TensorRT plan built in {built.seconds:.1f} s ({len(built.plan) / 1e6:.1f} MB)",
        extra={
            "event": "trt_build_done",
            "path": str(path),
            "build_s": round(built.seconds, 1),
            "plan_mb": round(len(built.plan) / 1e6, 2),
        },
    )
    return PlanResult(built.plan, key, path, built=True, seconds=built.seconds)
