"""Engine output -> image score, log10 NFA map, regions in source pixels and the anomalous decision.

The engine gives the anomaly map at the model size and the small per-scale maps m_s. The image score
is the map's maximum (bilinear resizing never exceeds it, so it is the same at any size). The
decision is the a-contrario one (docs/design.md section 5): a frame is anomalous when at least one region has
log10 NFA below log10(epsilon), ignoring regions smaller than a minimum area.

Two resolutions of analysis: ``"model"`` (the agent's hot path) computes the log NFA map at the model
size and maps region boxes to the source frame; ``"frame"`` (offline ``segment``) computes maps at the
frame's own size, so the saved maps and boxes are pixel-exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import cv2
import numpy as np

from edge_agent.bundle import REGION_HEADS, ImageTestSpec, Manifest
from edge_agent.config import NfaConfig
from edge_agent.inspection import delineation, nfa
from edge_agent.inspection.image_test import ImageTest
from edge_agent.messages import Region

Resolution = Literal["model", "frame"]


def resize_map(values: np.ndarray, width: int, height: int) -> np.ndarray:
    """A float32 map resized bilinearly to width x height (a no-op at the same size)."""
    values = np.asarray(values, dtype=np.float32)
    if values.shape == (height, width):
        return values
    return cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)


def image_score(anomaly_map: np.ndarray) -> float:
    """The image-level anomaly score: the maximum of the anomaly map."""
    return float(np.max(anomaly_map))


class ModelMaps(Protocol):
    """One frame's model outputs as scoring reads them: the bundle's output contract (docs/design.md).

    Plain arrays, batch axis removed; ``edge_agent.engines.base.EngineOutput`` is one. Scoring depends on
    this shape only, never on the engines.
    """

    @property
    def anomaly_map(self) -> np.ndarray:
        """float32 (H, W) at the model size."""
        ...

    @property
    def scale_maps(self) -> Sequence[np.ndarray]:
        """Per map of ``manifest.scales`` float32 (H_s, W_s): the flow's m_s (mean over channels of z^2), then
        the heads' maps."""
        ...


@dataclass(frozen=True)
class DecisionRule:
    """When a frame is anomalous: a region with log10 NFA below ``log10_epsilon`` and big enough.

    The minimum area comes from the config in source pixels, or else from the bundle in model-input
    pixels (then scaled to the frame).
    """

    log10_epsilon: float
    min_area_source_px: int | None
    min_area_model_px: int
    mask_fraction: float = 0.0  # where a region's defect is (delineation.tighten); 0: the NFA's region

    @classmethod
    def from_bundle(cls, manifest: Manifest, config: NfaConfig | None = None) -> DecisionRule:
        """The bundle's decision with any config overrides applied."""
        config = config or NfaConfig()
        default = default_log10_epsilon(manifest, config.null_model)
        epsilon = default if config.log10_epsilon is None else config.log10_epsilon
        return cls(
            log10_epsilon=float(epsilon),
            min_area_source_px=config.min_region_area,
            min_area_model_px=manifest.nfa.min_region_area,
            mask_fraction=default_mask_fraction(manifest, config),
        )

    def min_area(self, scale_x: float, scale_y: float) -> float:
        """Minimum region area in frame pixels when model pixels are scale_x by scale_y frame pixels."""
        if self.min_area_source_px is not None:
            return float(self.min_area_source_px)
        return self.min_area_model_px * scale_x * scale_y


@dataclass(frozen=True)
class Verdict:
    """Everything decided about one frame."""

    image_score: float
    anomalous: bool
    regions: tuple[Region, ...]  # in source-frame pixels (ROI offset added)
    log10_epsilon: float
    anomaly_map: np.ndarray  # float32, at the analysis resolution
    log_nfa: np.ndarray  # float32 log10 NFA, at the analysis resolution


class NullModelError(ValueError):
    """The configured NFA null model is not available in this bundle."""


def scale_nulls(manifest: Manifest, choice: str = "bundle") -> tuple[nfa.ScaleNull, ...] | None:
    """The per-scale null models for ``nfa.log_nfa_map`` (None: the paper's polyomino NFA).

    ``choice``: ``bundle`` (what the bundle ships), ``polyomino`` (always the paper's exact NFA) or
    ``fitted`` (the bundle's fitted null; NullModelError if it ships none).
    """
    if choice == "polyomino":
        return None
    spec = manifest.nfa
    if spec.null_model == "fitted" and spec.scale_nulls:
        return tuple(nfa.ScaleNull(n.mean, n.dof, n.area) for n in spec.scale_nulls)
    if choice == "fitted":
        raise NullModelError(
            f"[nfa] null_model = 'fitted' but bundle {manifest.name} {manifest.version} ships no fitted null; "
            "re-export it with this version of `uflow export`, or use 'bundle'/'polyomino'"
        )
    return None


def nfa_inputs(
    maps: Sequence[np.ndarray], channels: Sequence[int], heads: Sequence[str], nulls: Sequence[nfa.ScaleNull] | None
) -> tuple[list[np.ndarray], list[int]]:
    """The maps the region tests read: under a fitted null every region map (not the ``texture`` head's 1 x 1
    score, which the image test reads, nor the ``detail`` map, which the anomaly map alone reads), under the
    paper's polyomino NFA the flow maps only (its chi^2(C_s) null is the flow's; the heads' maps have none)."""
    if not heads or not len(maps) == len(channels) == len(heads):
        return list(maps), list(channels)  # a count mismatch is reported by nfa.log_nfa_map, by name
    keep = [i for i, head in enumerate(heads) if (head == "flow" if nulls is None else head in REGION_HEADS)]
    return [maps[i] for i in keep], [channels[i] for i in keep]


def texture_score(maps: Sequence[np.ndarray], heads: Sequence[str]) -> float | None:
    """The ``texture`` head's image score (its 1 x 1 map), or None when the model has none."""
    for m, head in zip(maps, heads, strict=False):
        if head == "texture":
            return float(np.max(m))
    return None


def log_nfa_map_of(
    maps: Sequence[np.ndarray],
    channels: Sequence[int],
    heads: Sequence[str],
    out_shape: tuple[int, int],
    nulls: Sequence[nfa.ScaleNull] | None,
    image_test: ImageTest | None = None,
    log10_epsilon: float | None = None,
) -> np.ndarray:
    """``nfa.log_nfa_map`` on the maps the chosen null tests (see :func:`nfa_inputs`), joined under a fitted
    null with the image test when there is one (edge_agent/inspection/image_test.py): the regions' log NFA
    gains ``image_test.region_shift``, and the image test's log NFA, the same at every pixel, is the frame's
    wherever it is lower. With ``log10_epsilon`` (a decision), a frame where a region is detected keeps its
    regions alone: they say where; the whole frame is the detection only when the image test alone fires.
    """
    tested, tested_channels = nfa_inputs(maps, channels, heads, nulls)
    log_nfa = nfa.log_nfa_map(tested, tested_channels, out_shape, nulls)
    score = texture_score(maps, heads)
    if nulls is None or image_test is None or score is None:
        return log_nfa
    regions = log_nfa + np.float32(image_test.region_shift)
    if log10_epsilon is not None and float(regions.min()) < log10_epsilon:
        return regions
    return np.minimum(regions, np.float32(image_test.log10_nfa(score)))


def image_test_of(manifest: Manifest, choice: str = "bundle") -> ImageTest | None:
    """The bundle's image test (None: it ships none, or the paper's NFA is chosen)."""
    spec = manifest.nfa.image_test
    if spec is None or choice == "polyomino" or manifest.nfa.null_model != "fitted":
        return None
    return image_test_from(spec)


def image_test_from(spec: ImageTestSpec) -> ImageTest:
    """The image test a recorded spec describes (a bundle's ``nfa.image_test``, a run's val_scores.json)."""
    return ImageTest(spec.scores, spec.share, spec.tail)


def default_mask_fraction(manifest: Manifest, config: NfaConfig) -> float:
    """The config's mask fraction, else the bundle's; the paper's polyomino NFA keeps its own regions."""
    if config.mask_fraction is not None:
        return config.mask_fraction
    return 0.0 if config.null_model == "polyomino" else manifest.nfa.mask_fraction


def default_log10_epsilon(manifest: Manifest, choice: str = "bundle") -> float:
    """log10 epsilon when the config sets none: the bundle's, or the paper's 0 when the paper's NFA is
    chosen over a bundle whose own epsilon belongs to its fitted null."""
    if choice == "polyomino" and manifest.nfa.null_model == "fitted":
        return 0.0
    return float(manifest.nfa.log10_epsilon)


class FrameScorer:
    """Turns engine outputs of one bundle into verdicts."""

    def __init__(self, manifest: Manifest, config: NfaConfig | None = None) -> None:
        self.manifest = manifest
        self.rule = DecisionRule.from_bundle(manifest, config)
        self.channels = tuple(s.channels for s in manifest.scales)
        self.heads = tuple(s.head for s in manifest.scales)
        self.model_size = (manifest.input.width, manifest.input.height)
        self.nulls = scale_nulls(manifest, (config or NfaConfig()).null_model)
        self.image_test = image_test_of(manifest, (config or NfaConfig()).null_model)

    def score(
        self,
        output: ModelMaps,
        image_size: tuple[int, int],
        roi_offset: tuple[int, int] = (0, 0),
        resolution: Resolution = "model",
    ) -> Verdict:
        """Verdict for one frame whose inspected image is ``image_size`` (width, height) at ``roi_offset``."""
        rule = self.rule  # read once: the threshold command may replace it while a frame is scored
        model_w, model_h = self.model_size
        width, height = image_size
        if resolution == "frame":
            out_w, out_h = width, height
            anomaly_map = resize_map(output.anomaly_map, width, height)
        else:
            out_w, out_h = model_w, model_h
            anomaly_map = output.anomaly_map
        log_nfa = log_nfa_map_of(
            output.scale_maps,
            self.channels,
            self.heads,
            (out_h, out_w),
            self.nulls,
            self.image_test,
            rule.log10_epsilon,
        )
        scale_x, scale_y = width / out_w, height / out_h
        min_area = rule.min_area(width / model_w, height / model_h)
        found = nfa.regions_from_log_nfa(log_nfa, rule.log10_epsilon, min_area=0, score_map=anomaly_map)
        kept = [
            (raw, region)
            for raw in found
            if (region := map_region(raw, scale_x, scale_y, (width, height), roi_offset)).area >= min_area
        ]
        regions = [region for _, region in kept]
        if kept and rule.mask_fraction > 0.0:
            tight = tightened_regions(
                log_nfa, anomaly_map, rule.log10_epsilon, rule.mask_fraction, [raw for raw, _ in kept]
            )
            regions = [map_region(raw, scale_x, scale_y, (width, height), roi_offset) for raw in tight]
        return Verdict(
            image_score=image_score(output.anomaly_map),
            anomalous=bool(regions),
            regions=tuple(regions),
            log10_epsilon=rule.log10_epsilon,
            anomaly_map=anomaly_map,
            log_nfa=log_nfa,
        )


def tightened_regions(
    log_nfa: np.ndarray, anomaly_map: np.ndarray, log10_epsilon: float, fraction: float, kept: Sequence[nfa.NfaRegion]
) -> list[nfa.NfaRegion]:
    """The ``kept`` regions (those the decision counts), each with the box and area of its pixels where the
    anomaly map reaches ``fraction`` of the region's peak (delineation.tighten), and its own log10 NFA.

    The decision was taken on the NFA's regions: each keeps its place in the list, its evidence and its peak
    pixel, so tightening never removes one, and a region the minimum area dropped stays dropped.
    """
    detected = log_nfa < log10_epsilon
    # The same 4-connected partition as the NFA's labelling: a region is the component of its box and area.
    labels, stats = delineation.components(detected)
    tight = delineation.tighten(detected, anomaly_map, fraction, labels)
    index = {tuple(int(v) for v in row): k for k, row in enumerate(stats) if k > 0}
    out = []
    for raw in kept:
        label = index.get((*raw.bbox, raw.area), -1)  # -1: not matched (cannot happen)
        ys, xs = np.nonzero(tight & (labels == label))
        if len(ys) == 0:  # the NFA's region rather than none
            out.append(raw)
            continue
        box = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
        out.append(nfa.NfaRegion(bbox=box, area=len(ys), log_nfa=raw.log_nfa, max_score=raw.max_score))
    return out


def map_region(
    raw: nfa.NfaRegion, scale_x: float, scale_y: float, image_size: tuple[int, int], offset: tuple[int, int]
) -> Region:
    """An NFA region found on a grid of scale_x by scale_y image pixels per cell, as a message Region.

    The box grows outward to whole image pixels (it always covers the region), is clipped to the image
    and then shifted by the ROI offset into source-frame pixels.
    """
    x, y, w, h = raw.bbox
    width, height = image_size
    x0 = max(0, math.floor(x * scale_x))
    y0 = max(0, math.floor(y * scale_y))
    x1 = min(width, math.ceil((x + w) * scale_x))
    y1 = min(height, math.ceil((y + h) * scale_y))
    return Region(
        bbox=(x0 + offset[0], y0 + offset[1], max(1, x1 - x0), max(1, y1 - y0)),
        area=max(1, round(raw.area * scale_x * scale_y)),
        log_nfa=float(raw.log_nfa),
        max_score=float(raw.max_score) if raw.max_score is not None else 0.0,
    )
