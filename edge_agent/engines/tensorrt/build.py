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
The TensorRT calls follow NVIDIA's samples (samples/python/common.py, common_runtime.py,
simple_progress_monitor) for the 10.x and 11.x Python API.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge_agent.bundle import MODEL_NAME, Bundle, BundleError
from edge_agent.engines.base import TensorSpec, expected_io
from edge_agent.engines.tensorrt.cache import (
    DeviceIdentity,
    EngineCache,
    EngineKey,
    new_metadata,
)
from edge_agent.engines.tensorrt.graph_check import GraphCheckError, checked_onnx
from edge_agent.fileio import atomic_write
from edge_agent.service.systemd import SystemdNotifier

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_WORKSPACE_MB = 1024
HEARTBEAT_S = 30.0
STALL_S = 600.0  # no TensorRT progress for this long: stop extending systemd's start timeout
MIN_TENSORRT = (10, 0)
MIN_STRONGLY_TYPED = (10, 3)  # JetPack 6.1; strongly typed FP16/INT8 recipes from here on
# Builder flags that choose a precision: never together with a STRONGLY_TYPED network.
PRECISION_FLAGS = frozenset({"FP16", "BF16", "INT8", "FP8", "INT4", "FP4"})
JETPACK_HINT = (
    "on a Jetson install JetPack 6.1 or newer (L4T r36.4, TensorRT 10.3) and use its python3-libnvinfer; "
    "elsewhere pip install '.[tensorrt-cu12]' (docs/tensorrt.md)"
)


class TensorRTBuildError(RuntimeError):
    """A plan could not be built; the message says why and what to do."""


class RecipeError(TensorRTBuildError):
    """The bundle lacks what this TensorRT version needs for the precision asked for."""


class TensorRTVersionError(TensorRTBuildError):
    """The installed TensorRT is older than this agent supports; the message names what to install."""


class OnnxParseError(TensorRTBuildError):
    """TensorRT's ONNX parser rejected the model; the message lists each error with its node."""


class BuildCancelled(TensorRTBuildError):
    """The build was stopped (SIGTERM/SIGINT) before it finished; nothing was written."""


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string such as "10.3.0.30" or "11.1.0"."""
    match = re.match(r"(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise TensorRTVersionError(f"cannot read the TensorRT version {version!r}")
    return int(match.group(1)), int(match.group(2) or 0)


@dataclass(frozen=True)
class TrtFeatures:
    """What the installed TensorRT Python API offers, detected with hasattr (10.x vs 11.x)."""

    version: str
    fp16_flag: bool
    int8_flag: bool
    strongly_typed_flag: bool
    calibrators: bool
    progress_monitor: bool

    @property
    def major(self) -> int:
        return version_tuple(self.version)[0]

    @property
    def weakly_typed(self) -> bool:
        """TensorRT 10: precision flags exist and networks are weakly typed unless asked otherwise."""
        return self.fp16_flag and self.int8_flag

    @property
    def strongly_typed_builds(self) -> bool:
        """FP16/INT8 can be built as strongly typed networks (10.3+ with the flag, or 11+ where it is implicit)."""
        return version_tuple(self.version) >= MIN_STRONGLY_TYPED and (self.strongly_typed_flag or self.major >= 11)


def detect_features(trt: ModuleType) -> TrtFeatures:
    """Inspect the imported ``tensorrt`` module."""
    builder_flag = getattr(trt, "BuilderFlag", None)
    creation_flag = getattr(trt, "NetworkDefinitionCreationFlag", None)
    return TrtFeatures(
        version=str(trt.__version__),
        fp16_flag=hasattr(builder_flag, "FP16"),
        int8_flag=hasattr(builder_flag, "INT8"),
        strongly_typed_flag=hasattr(creation_flag, "STRONGLY_TYPED"),
        calibrators=hasattr(trt, "IInt8EntropyCalibrator2"),
        progress_monitor=hasattr(trt, "IProgressMonitor"),
    )


def require_supported(version: str) -> None:
    """Raise TensorRTVersionError for a TensorRT older than 10, naming the JetPack to install."""
    if version_tuple(version) < MIN_TENSORRT:
        raise TensorRTVersionError(
            f"TensorRT {version} is too old: the agent needs TensorRT 10 or newer (10.3+ for FP16/INT8); {JETPACK_HINT}"
        )


@dataclass(frozen=True)
class BuildRecipe:
    """Which ONNX file to parse and how to configure the builder for one precision."""

    precision: str
    name: str  # recorded in the cache key: fp32, fp16-typed, int8-qdq-typed
    onnx_file: str  # relative to the bundle
    onnx_sha256: str
    strongly_typed: bool
    builder_flags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        mixed = sorted(set(self.builder_flags) & PRECISION_FLAGS)
        if self.strongly_typed and mixed:
            # TensorRT rejects precision flags on a strongly typed network; the types come from the ONNX.
            raise ValueError(f"recipe {self.name}: builder flag(s) {mixed} cannot be set on a strongly typed network")

    def describe(self) -> dict[str, object]:
        return {
            "recipe": self.name,
            "onnx_file": self.onnx_file,
            "strongly_typed": self.strongly_typed,
            "builder_flags": list(self.builder_flags),
        }


def choose_recipe(bundle: Bundle, precision: str, features: TrtFeatures) -> BuildRecipe:
    """The recipe for a precision on this TensorRT, or a RecipeError that says what to make first."""
    if precision not in PRECISIONS:
        raise RecipeError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    require_supported(features.version)
    where = f"bundle {bundle.root}"
    if precision == "fp32":
        # TensorRT 11 is always strongly typed; on 10.x an FP32 graph without flags builds in FP32 (TF32 allowed).
        return BuildRecipe("fp32", "fp32", MODEL_NAME, bundle.onnx_sha256, strongly_typed=features.major >= 11)
    if not features.strongly_typed_builds:
        raise RecipeError(
            f"TensorRT {features.version} cannot build {precision} safely: FP16/INT8 are built as strongly typed "
            f"networks, which needs TensorRT 10.3 or newer; {JETPACK_HINT}. FP32 works on this TensorRT."
        )
    variant = bundle.manifest.variant(precision)
    if precision == "fp16":
        if variant is None:
            raise RecipeError(
                f"{where} has no FP16 model; FP16 is built from its own ONNX (strongly typed, with z² and the "
                f"anomaly map in FP32), make it with `uflow calibrate fp16 --bundle {bundle.root} --data GOOD_IMAGES`"
            )
        return BuildRecipe("fp16", "fp16-typed", variant.file, bundle.model_sha256("fp16"), True)
    if variant is None:
        raise RecipeError(
            f"{where} has no INT8 Q/DQ model; make one with `uflow calibrate int8 --bundle {bundle.root} "
            "--data GOOD_IMAGES` (TensorRT's own INT8 calibration is not used: it quantizes the backbone, "
            "see docs/precision.md, and it is removed in TensorRT 11)"
        )
    return BuildRecipe("int8", "int8-qdq-typed", variant.file, bundle.model_sha256("int8"), True)


@dataclass(frozen=True)
class ParserIssue:
    """One error reported by TensorRT's ONNX parser."""

    description: str
    code: str = ""
    node_index: int = -1
    node_name: str = ""
    node_operator: str = ""


def describe_parser_errors(onnx_path: Path, issues: list[ParserIssue], version: str) -> str:
    """A message naming every node TensorRT's parser rejected."""
    lines = [f"TensorRT {version} cannot parse {onnx_path.name} ({len(issues)} error(s)):"]
    for issue in issues:
        where = ""
        if issue.node_name or issue.node_operator:
            where = f"{issue.node_operator or 'node'} {issue.node_name!r}".strip()
            if issue.node_index >= 0:
                where += f" (node #{issue.node_index})"
            where += ": "
        code = f" [{issue.code}]" if issue.code else ""
        lines.append(f"  - {where}{issue.description}{code}")
    lines.append("Check the model with `uflow export` (it lists operators TensorRT does not support).")
    return "\n".join(lines)


def _parser_issues(parser: Any) -> list[ParserIssue]:
    """Read the parser's errors; node_name/node_operator exist from TensorRT 10.0 on."""
    issues = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        issues.append(
            ParserIssue(
                description=str(error.desc()),
                code=str(error.code()),
                node_index=int(error.node()),
                node_name=str(error.node_name()) if hasattr(error, "node_name") else "",
                node_operator=str(error.node_operator()) if hasattr(error, "node_operator") else "",
            )
        )
    return issues


@dataclass
class BuildProgress:
    """Build phases and their timing, fed by TensorRT's progress monitor; thread-safe, pure Python.

    ``step`` returns False once ``cancel`` is set, which asks TensorRT to stop the build.
    """

    started: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    log_every_s: float = 10.0
    _phases: dict[str, tuple[float, int, str | None]] = field(default_factory=dict)
    _last_log: float = 0.0
    _last_activity: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def idle_s(self) -> float:
        """Seconds since TensorRT last reported a phase or a step (or since the build started)."""
        with self._lock:
            return time.monotonic() - self._last_activity

    def phase_start(self, name: str, parent: str | None, steps: int) -> None:
        with self._lock:
            self._phases[name] = (time.monotonic(), steps, parent)
            self._last_activity = time.monotonic()
        if parent is None:  # nested phases are many and short; the top level is what a person follows
            log.info(
                f"TensorRT build phase started: {name}",
                extra={
                    "event": "trt_phase_start",
                    "phase": name,
                    "steps": steps,
                    "elapsed_s": round(self.elapsed(), 1),
                },
            )

    def step(self, name: str, step: int) -> bool:
        now = time.monotonic()
        with self._lock:
            self._last_activity = now
            _, steps, _ = self._phases.get(name, (now, 0, None))
            due = now - self._last_log >= self.log_every_s
            if due:
                self._last_log = now
        if due:
            log.info(
                f"TensorRT build: {name} {step}/{steps}",
                extra={
                    "event": "trt_progress",
                    "phase": name,
                    "step": step,
                    "steps": steps,
                    "elapsed_s": round(self.elapsed(), 1),
                },
            )
        return not self.cancel.is_set()

    def phase_finish(self, name: str) -> None:
        with self._lock:
            began, _, parent = self._phases.pop(name, (time.monotonic(), 0, None))
            self._last_activity = time.monotonic()
        if parent is None:
            log.info(
                f"TensorRT build phase finished: {name} in {time.monotonic() - began:.1f} s",
                extra={
                    "event": "trt_phase_finish",
                    "phase": name,
                    "phase_s": round(time.monotonic() - began, 1),
                    "elapsed_s": round(self.elapsed(), 1),
                },
            )

    def active_phases(self) -> list[str]:
        with self._lock:
            return list(self._phases)


class Heartbeat:
    """Logs "still building" with the elapsed time every ``period`` seconds until stopped, and keeps
    systemd's start timeout from killing a build that is making progress.

    TensorRT's progress monitor can be silent for minutes inside one tactic search; a person
    watching ``journalctl`` must still see that the build is alive. Under systemd (NOTIFY_SOCKET set:
    the agent's Type=notify unit, or the build unit with NotifyAccess=main) each beat sends
    EXTEND_TIMEOUT_USEC while TensorRT reported a phase or step in the last ``stall_s`` seconds: a
    killed build starts again from nothing, so a progressing one must be allowed to finish, and a
    stuck one must still time out.
    """

    def __init__(
        self,
        progress: BuildProgress,
        what: str,
        period: float = HEARTBEAT_S,
        notifier: SystemdNotifier | None = None,
        stall_s: float = STALL_S,
    ) -> None:
        self._progress = progress
        self._what = what
        self._period = period
        self._own_notifier = notifier is None
        self._notifier = notifier if notifier is not None else SystemdNotifier()
        self._stall_s = stall_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trt-build-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._own_notifier:
            self._notifier.close()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            elapsed = self._progress.elapsed()
            log.info(
                f"still building the TensorRT engine for {self._what}: {elapsed:.0f} s elapsed",
                extra={
                    "event": "trt_build_heartbeat",
                    "elapsed_s": round(elapsed, 1),
                    "phases": self._progress.active_phases(),
                },
            )
            if self._progress.idle_s() <= self._stall_s:
                # Three beats of margin: one late or lost datagram must not let the timeout fire.
                self._notifier.extend_timeout(
                    3 * self._period, status=f"building TensorRT engine for {self._what}: {elapsed:.0f} s"
                )


_TRT_LEVELS = {
    "INTERNAL_ERROR": logging.CRITICAL,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "INFO": logging.DEBUG,
    "VERBOSE": logging.DEBUG,
}


def make_trt_logger(trt: ModuleType, verbose: bool = False) -> Any:
    """A ``trt.ILogger`` that forwards TensorRT's messages to Python logging (journald)."""
    trt_log = logging.getLogger("tensorrt")
    minimum = trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.WARNING

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # the binding requires the explicit base __init__

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) > int(minimum):  # lower value = more severe
                return
            level = _TRT_LEVELS.get(getattr(severity, "name", str(severity)).split(".")[-1], logging.INFO)
            trt_log.log(level, msg, extra={"event": "tensorrt_log"})

    return _Logger()


def make_progress_monitor(trt: ModuleType, progress: BuildProgress) -> Any:
    """A ``trt.IProgressMonitor`` (TensorRT >= 10.0) that feeds ``progress``."""

    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return progress.step(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            progress.phase_finish(phase_name)

    return _Monitor()


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
        return np.dtype(trt.nptype(dtype)).name
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
