"""Model bundle: the contract between offline training and the device.

A bundle is a directory (a ``.tar`` of it when shipped) holding ``model.onnx``, ``model.json``
(the manifest below), optionally ``model.int8.onnx`` / ``model.fp16.onnx``, self-test images and a
``signature`` (ed25519 over ``model.json``). The agent refuses a bundle whose hashes, schema version
or shapes do not match, and the error says which.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_agent.fileio import sha256_file
from edge_agent.promise import PromiseCheck

SCHEMA_VERSION = 1
MANIFEST_NAME = "model.json"
MODEL_NAME = "model.onnx"
SIGNATURE_NAME = "signature"
INPUT_NAME = "image"
ANOMALY_MAP_NAME = "anomaly_map"


class BundleError(ValueError):
    """A bundle that cannot be used; the message says which file or field is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The largest model input a box accepts: an engine this size already needs gigabytes; larger is a broken or
# hostile manifest that would make the box allocate without bound before anything runs.
MAX_INPUT_SIDE = 8192


def _inside_bundle(rel: str, what: str) -> str:
    """``rel`` when it is a relative path that stays inside the bundle; ValueError naming ``what`` otherwise."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or Path(rel).is_absolute() or ".." in path.parts or "\\" in rel or "\0" in rel:
        raise ValueError(f"{what} path {rel!r} must be relative and stay inside the bundle")
    return rel


class InputSpec(_Strict):
    """The engine's single input: uint8 NHWC at the model size; cast and normalisation are in the graph."""

    name: str = INPUT_NAME
    height: int = Field(gt=0, le=MAX_INPUT_SIDE)
    width: int = Field(gt=0, le=MAX_INPUT_SIDE)
    channels: Literal[3] = 3
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NHWC"] = "NHWC"
    colour_order: Literal["RGB"] = "RGB"


class Normalisation(_Strict):
    """Per-channel mean/std applied inside the graph after scaling to [0, 1] (recorded for reference)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# The kinds of map the region tests read (under the fitted null; the paper's polyomino NFA reads ``flow`` only).
REGION_HEADS = ("flow", "gaussian", "memory")


class ScaleSpec(_Strict):
    """One evidence map of the engine: output ``name`` (1 x height x width) made by ``head``.

    ``flow``: m_s, the mean over the C_s latent channels of z^2 (the paper's map; bundles from before
    the heads have only these). ``gaussian``: the mean over C_s channels of the whitened features'
    squares. ``memory``: the squared distance to the nearest memory-bank row, divided by C_s. The paper's
    polyomino NFA reads the flow maps only; the fitted NFA every map, each with its own null. ``texture``:
    a 1 x 1 map, the frame's texture statistics' distance to the good images', read by the image test
    (``nfa.image_test``), not by the region tests. ``detail``: a Gaussian with a mean per position at the
    finest stride, read by the anomaly map only (where a defect is, not whether): no null, no test.
    """

    name: str
    channels: int = Field(gt=0, description="C_s: channels behind the map (for flow maps the NFA's chi^2 dof)")
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    stride: int = Field(gt=0, description="input pixels per map pixel")
    head: Literal["flow", "gaussian", "memory", "texture", "detail"] = Field(
        default="flow", description="the evidence that made it"
    )


def region_scales(scales: Iterable[ScaleSpec]) -> tuple[ScaleSpec, ...]:
    """The maps the region tests read, in order: every map but the texture map (the image test's) and the
    detail map (the anomaly map's alone)."""
    return tuple(s for s in scales if s.head in REGION_HEADS)


class ScaleNullSpec(_Strict):
    """The fitted null model of one scale (edge_agent.inspection.nfa.ScaleNull; fitted by training/nfa_null.py)."""

    mean: float = Field(gt=0, allow_inf_nan=False, description="mean of m_s on good validation pixels")
    dof: float = Field(gt=0, allow_inf_nan=False, description="Chernoff degrees of freedom that bound the good tail")
    area: float = Field(ge=1, allow_inf_nan=False, description="correlation area: pixels per independent observation")


class NfaCalibration(_Strict):
    """What backs the fitted null's promise: good images that never fitted the flow, counted out of fold.

    Written by training (training/nfa_null.py ``calibrate``); bundles exported before it have none.
    The bounds are one-sided 95 % (exact Poisson for regions per image, Clopper-Pearson for the share
    of images flagged) at the deployed ``log10_epsilon``; edge_agent/promise.py has the math.
    """

    method: Literal["cross-fit"] = "cross-fit"
    images: int = Field(ge=1, description="good calibration images (the validation split) behind the null")
    folds: int = Field(ge=1, description="cross-fitting folds: each image counted by a null fitted without it")
    evidence_scale: float = Field(gt=0, allow_inf_nan=False, description="factor on every scale's dof")
    log10_epsilon: float = Field(allow_inf_nan=False, description="the epsilon the counts were taken at")
    check_log10_epsilon: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="where the selection counted: the deployed epsilon, or the loosest the images can vouch for",
    )
    false_regions: int = Field(ge=0, description="out-of-fold false regions on the calibration images")
    images_flagged: int = Field(ge=0, description="calibration images with at least one false region")
    false_regions_per_image_upper95: float = Field(ge=0, allow_inf_nan=False)
    flagged_share_upper95: float = Field(ge=0, le=1, allow_inf_nan=False)
    images_needed: int | None = Field(
        default=None, description="calibration images that would support the promise (None: more cannot)"
    )

    def promise_check(self) -> PromiseCheck:
        """The counts as the promise module's check (bounds as recorded)."""
        return PromiseCheck(
            promised=10.0**self.log10_epsilon,
            images=self.images,
            false_regions=self.false_regions,
            images_flagged=self.images_flagged,
            regions_upper=self.false_regions_per_image_upper95,
            flagged_upper=self.flagged_share_upper95,
            needed=self.images_needed,
        )


MIN_GOOD_SCORES = 20  # an image test on fewer out-of-sample good scores cannot place even a 5 % tail


class ImageTestSpec(_Strict):
    """The image test of the fitted NFA (edge_agent/inspection/image_test.py): the ``texture`` map's null and
    its share of epsilon. Bundles exported before it have none."""

    share: float = Field(gt=0, lt=1, allow_inf_nan=False, description="the image test's share of epsilon")
    tail: float = Field(gt=0, le=0.5, allow_inf_nan=False, description="top share of good scores the tail law fits")
    scores: tuple[float, ...] = Field(
        min_length=MIN_GOOD_SCORES, description="out-of-sample texture scores of the good images: the null"
    )

    @field_validator("scores")
    @classmethod
    def _positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not all(math.isfinite(v) and v > 0 for v in value):
            raise ValueError("nfa.image_test.scores must be finite and positive")
        return value


NULL_MODELS = ("polyomino", "fitted")
# validation_metrics["planted_detection_rate"] below this: the model may be blind (export warns, doctor too).
MIN_PLANTED_DETECTION = 0.5


class NfaSpec(_Strict):
    """The a-contrario decision shipped with the model.

    ``null_model``: ``polyomino`` is the paper's exact NFA (chi^2(C_s) pixels, independent, the
    polyomino number of tests); ``fitted`` uses ``scale_nulls`` (one per scale, fitted on good
    validation latents) and the tree-node number of tests. Bundles without the field are the paper's.
    """

    log10_number_of_tests: float
    log10_epsilon: float = 0.0
    min_region_area: int = Field(default=0, ge=0, description="in model-input pixels")
    null_model: Literal["polyomino", "fitted"] = "polyomino"
    scale_nulls: tuple[ScaleNullSpec, ...] = ()
    calibration: NfaCalibration | None = Field(
        default=None, description="how many images calibrated the fitted null and the bound they give; None: unknown"
    )
    image_test: ImageTestSpec | None = Field(default=None, description="the texture map's test; None: regions only")
    mask_fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="each detected region keeps the pixels where the anomaly map reaches this fraction of the "
        "region's peak (edge_agent/inspection/delineation.py); 0: the NFA's regions as they are",
    )

    @model_validator(mode="after")
    def _nulls_match_model(self) -> NfaSpec:
        if self.null_model == "fitted" and not self.scale_nulls:
            raise ValueError("nfa.null_model 'fitted' needs scale_nulls (one per scale)")
        if self.null_model == "polyomino" and self.scale_nulls:
            raise ValueError("nfa.scale_nulls are only used with null_model 'fitted'")
        return self


class QuantizedModel(_Strict):
    """An extra precision variant of model.onnx (INT8 Q/DQ or FP16)."""

    file: str
    precision: Literal["int8", "fp16"]
    settings: dict[str, object] = Field(default_factory=dict)

    @field_validator("file")
    @classmethod
    def _file_inside(cls, value: str) -> str:
        return _inside_bundle(value, "variant file")

    metrics: dict[str, float] = Field(default_factory=dict)


class DriftStat(_Strict):
    """One statistic over the training images: its quantiles (0 to 1, evenly spaced) and the image count."""

    quantiles: tuple[float, ...] = Field(min_length=2, max_length=1025)
    count: int = Field(ge=1)

    @field_validator("quantiles")
    @classmethod
    def _sorted_finite(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not all(math.isfinite(v) for v in value):
            raise ValueError("quantiles must be finite")
        if any(b < a for a, b in itertools.pairwise(value)):
            raise ValueError("quantiles must be sorted ascending")
        return value


class DriftReference(_Strict):
    """What the training images looked like, for the agent's drift check (edge_agent/inspection/drift.py).

    Image statistics of the training images; ``score`` and ``nll`` of the good validation images under the
    exported model (None: not watched). Bundles without this field run with the drift check off.
    """

    brightness: DriftStat
    contrast: DriftStat
    sharpness: DriftStat
    score: DriftStat | None = None
    nll: DriftStat | None = None


class Manifest(_Strict):
    """``model.json``."""

    schema_version: int
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    created: datetime
    files: dict[str, str] = Field(description="relative path -> sha256 hex of every file but model.json")
    backbone: str
    input: InputSpec
    normalisation: Normalisation
    scales: tuple[ScaleSpec, ...] = Field(min_length=1)
    nfa: NfaSpec
    image_score_threshold: float
    validation_metrics: dict[str, float] = Field(default_factory=dict)
    training_data: dict[str, object] = Field(default_factory=dict)
    variants: tuple[QuantizedModel, ...] = ()
    self_test: tuple[str, ...] = Field(default=(), description="relative paths of good images to run after install")
    drift_reference: DriftReference | None = Field(
        default=None, description="statistics of the training images for the drift check; None: check off"
    )

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"schema_version {value} is not supported (this agent reads {SCHEMA_VERSION})")
        return value

    @field_validator("files")
    @classmethod
    def _has_model(cls, value: dict[str, str]) -> dict[str, str]:
        if MODEL_NAME not in value:
            raise ValueError(f"files must list {MODEL_NAME}")
        for rel in value:
            _inside_bundle(rel, "file")
        return value

    @field_validator("self_test")
    @classmethod
    def _self_test_inside(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for rel in value:
            _inside_bundle(rel, "self_test")
        return value

    @model_validator(mode="after")
    def _one_null_per_scale(self) -> Manifest:
        regions = region_scales(self.scales)
        if self.nfa.scale_nulls and len(self.nfa.scale_nulls) != len(regions):
            raise ValueError(f"nfa.scale_nulls has {len(self.nfa.scale_nulls)} entries for {len(regions)} region maps")
        if not any(s.head == "flow" for s in self.scales):
            raise ValueError("scales need at least one flow map (the paper's NFA and the drift check read them)")
        if self.scales[0].head != "flow":
            raise ValueError("the first scale must be a flow map (m_0: the drift check reads it)")
        if any(s.head != "flow" for s in self.scales) and self.nfa.null_model != "fitted":
            raise ValueError(
                "gaussian, memory, texture and detail maps need the fitted NFA (the paper's is the flow's)"
            )
        if sum(s.head == "detail" for s in self.scales) > 1:
            raise ValueError("at most one detail map (the finest stride's)")
        textures = [s for s in self.scales if s.head == "texture"]
        if len(textures) > 1 or any((s.height, s.width) != (1, 1) for s in textures):
            raise ValueError("at most one texture map, of 1 x 1")
        if bool(textures) != (self.nfa.image_test is not None):
            raise ValueError("a texture map and nfa.image_test come together (the image test reads that map)")
        return self

    @property
    def output_names(self) -> tuple[str, ...]:
        """Engine output names in the order the engine returns them."""
        return (ANOMALY_MAP_NAME, *(s.name for s in self.scales))

    def variant(self, precision: str) -> QuantizedModel | None:
        """The recorded variant of that precision, if any."""
        return next((v for v in self.variants if v.precision == precision), None)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    root: Path
    manifest: Manifest

    @property
    def onnx_path(self) -> Path:
        return self.root / MODEL_NAME

    @property
    def onnx_sha256(self) -> str:
        return self.manifest.files[MODEL_NAME]

    def model_path(self, precision: str = "fp32") -> Path:
        """The ONNX file for a precision; fp32 is model.onnx."""
        if precision == "fp32":
            return self.onnx_path
        variant = self.manifest.variant(precision)
        if variant is None:
            raise BundleError(
                f"bundle {self.root} has no {precision} model; make one with `uflow calibrate {precision}`"
            )
        return self.root / variant.file

    def model_sha256(self, precision: str = "fp32") -> str:
        """The recorded sha256 of the ONNX file for a precision."""
        path = self.model_path(precision)
        return self.manifest.files[path.relative_to(self.root).as_posix()]


sha256_of = sha256_file  # the name the bundle's callers use (hex sha256 of a file, streamed)


def read_manifest(root: Path) -> Manifest:
    """Parse and validate model.json without checking the files it lists."""
    if not Path(root).is_dir():
        raise BundleError(f"model bundle {root} does not exist or is not a directory")
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{root} is not a model bundle: {MANIFEST_NAME} is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise BundleError(f"{path} does not match manifest schema {SCHEMA_VERSION}: {problems}") from exc


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check that every listed file exists with the recorded sha256."""
    for rel, expected in manifest.files.items():
        path = Path(root) / rel
        if not path.is_file():
            raise BundleError(f"bundle {root}: {rel} is listed in {MANIFEST_NAME} but missing")
        actual = sha256_of(path)
        if actual != expected:
            raise BundleError(
                f"bundle {root}: {rel} is corrupt or was modified "
                f"(sha256 {actual[:12]}…, manifest says {expected[:12]}…)"
            )


def load_bundle(root: Path | str) -> Bundle:
    """Read and verify a bundle directory (hashes and schema; shapes are checked by the engine)."""
    root = Path(root)
    manifest = read_manifest(root)
    verify_files(root, manifest)
    return Bundle(root=root, manifest=manifest)


def file_hashes(root: Path, names: Iterable[str]) -> dict[str, str]:
    """sha256 of each named file under root, for writing a manifest."""
    return {name: sha256_of(Path(root) / name) for name in sorted(names)}


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write model.json (pretty, stable key order)."""
    path = Path(root) / MANIFEST_NAME
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def utc_now() -> datetime:
    """Timezone-aware now, for ``created``."""
    return datetime.now(timezone.utc)
