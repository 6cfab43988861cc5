"""TensorRT versions and build recipes: which ONNX file and flags per precision and TensorRT version, and
what the ONNX parser's complaints mean (pure: tested without a GPU; ``build`` has the reasons)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from edge_agent.bundle import MODEL_NAME, Bundle

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_WORKSPACE_MB = 1024
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
