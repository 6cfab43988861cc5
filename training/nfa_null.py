"""Fit the ``fitted`` NFA's null model on good validation latents (numpy only).

The paper's null assumes that every pixel of m_s is chi^2(C_s)/C_s and that pixels are
independent. The latents of a flow trained on a few hundred images are neither: on good held-out
images the mean of m is above 1, its variance is about twice chi^2's and neighbours are correlated
(docs/nfa.md). The fitted null keeps the paper's machinery (max-tree, Chernoff tail, selection) and
measures three numbers per scale on good validation images, which the training never optimised on:

- ``mean``: the mean of m_s over all good pixels (the level t = m / mean is then 1 on average);
- ``dof``: the largest degrees of freedom whose Chernoff tail bound ``exp(-dof/2 (t - 1 - ln t))``
  stays above the empirical survival function of t at every observed level above the mean, i.e. the
  per-pixel bound holds on the good data, tail included;
- ``area``: the correlation area, the sum of the spatial autocorrelation of m_s over lags up to
  2 (:class:`Reach`; the variance inflation of a mean over a region): |R| pixels carry about
  |R| / area independent observations.

The envelope is set by the single most extreme good pixel, which makes it very conservative (on
magnetic tile the decision then fired on no good image at all, and on few defects). A last step,
:func:`calibrate`, multiplies every scale's ``dof`` by a factor from ``EVIDENCE_SCALES`` chosen by
cross-fitting: each block of validation images is counted by a null fitted on the other blocks, and
the factor is the last one, smallest first, whose out-of-fold false regions keep the 95 % upper bound
within the promise (or, where the images are too few for that, raise none). The counts and bounds
at the chosen factor go into the bundle (``nfa.calibration``); docs/nfa.md explains the method.
How well that carries to images the fit never saw is measured by ``uflow calibrate nfa``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edge_agent.inspection.nfa import MAX_PROFILE, ScaleNull, log_nfa_map, regions_from_log_nfa
from edge_agent.promise import PromiseCheck, check_promise, poisson_upper


@dataclass(frozen=True)
class Reach:
    """How far the correlation area looks (:func:`correlation_area`).

    Lags up to ``max_lag`` in each direction. ``noise_z`` = 0 sums the positive part of every lag's
    correlation (the default, at lag 2). ``noise_z`` > 0 counts a lag only when its correlation stands
    more than ``noise_z`` standard errors above the noise of independent pixels, and caps the reach at
    half the map: a long reach needs both, or it sums the noise of hundreds of far lags (independent
    32x32 maps read 4.7 instead of 1 at lag 16 without them). bench/correlation_lag.py measures reaches.
    """

    max_lag: int = 2
    noise_z: float = 0.0
    by_size: bool = False  # also fit the size-dependent profile (:func:`correlation_profile`)
    # The profile never below the lag-2 area: small regions count as today, large ones by their reach.
    floored: bool = False


DEFAULT_REACH = Reach()

# Factors below 1 shrink the envelope's evidence: where a null fitted on some images already flags
# others, the most conservative honest choice is less evidence than the envelope.
EVIDENCE_SCALES: tuple[float, ...] = (0.25, 0.35, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
MIN_CALIBRATION_IMAGES = 20
PROMISE_MARGIN = 0.1
CALIBRATION_FOLDS = 10


def tail_dof(t: np.ndarray) -> float:
    """The largest dof with ``exp(-dof/2 (t - 1 - ln t)) >= P(T >= t)`` at every sample above 1.

    ``t`` are samples of the normalised level (mean 1). The empirical survival at the k-th largest
    of n samples is k / n.
    """
    values = np.sort(np.asarray(t, dtype=np.float64).ravel())
    n = values.size
    if n == 0:
        raise ValueError("tail_dof: no samples")
    survival = (n - np.arange(n)) / n
    above = values > 1.0 + 1e-6
    if not above.any():
        raise ValueError("tail_dof: no sample above the mean; the maps are constant")
    rate = values[above] - 1.0 - np.log(values[above])
    bound = 2.0 * -np.log(survival[above]) / np.maximum(rate, 1e-12)
    return float(bound.min())


def _counted_correlation(maps: np.ndarray, reach: Reach, name: str) -> np.ndarray | None:
    """(2 reach_y + 1) x (2 reach_x + 1) autocorrelations of the lags ``reach`` counts (0 elsewhere), lag 0
    at the centre; None for constant maps. Each map is centred on its own mean; pooled over images."""
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"{name}: expected N x H x W maps, got shape {m.shape}")
    m = m - m.mean(axis=(1, 2), keepdims=True)
    var = float((m * m).mean())
    if var <= 0.0:
        return None
    count, height, width = m.shape
    reach_y, reach_x = reach.max_lag, reach.max_lag
    if reach.noise_z > 0.0:  # at least half of a map's rows and columns pair up at every lag counted
        reach_y, reach_x = min(reach_y, max(height // 2, 1)), min(reach_x, max(width // 2, 1))
    # Every lag's sum of products at once: the zero-padded FFT's power spectrum, summed over images, is
    # the autocorrelation (a loop over lags is too slow at a long reach on hundreds of images).
    shape = (2 * height, 2 * width)
    sums = np.fft.irfft2((np.abs(np.fft.rfft2(m, s=shape)) ** 2).sum(axis=0), s=shape)
    counted = np.zeros((2 * reach_y + 1, 2 * reach_x + 1))
    for dy in range(-reach_y, reach_y + 1):
        for dx in range(-reach_x, reach_x + 1):
            if abs(dy) >= height or abs(dx) >= width:
                continue
            pairs = count * (height - abs(dy)) * (width - abs(dx))
            rho = float(sums[dy % shape[0], dx % shape[1]]) / pairs / var
            if (dy == 0 and dx == 0) or rho > reach.noise_z / math.sqrt(pairs):
                counted[dy + reach_y, dx + reach_x] = rho
    return counted


def correlation_area(maps: np.ndarray, reach: Reach = DEFAULT_REACH) -> float:
    """Sum of the spatial autocorrelations of the maps over the lags of ``reach`` (see :class:`Reach`).

    Each map is centred on its own mean; the correlation is pooled over images. At least 1.
    """
    counted = _counted_correlation(maps, reach, "correlation_area")
    return 1.0 if counted is None else max(1.0, float(counted.sum()))


def correlation_profile(maps: np.ndarray, reach: Reach) -> tuple[float, ...]:
    """The variance inflation of a region's mean, by the region's size: entry k is that of a square of
    side k + 1, the sum over its lags of the autocorrelation times the share of the square's pixel pairs
    at that lag, (1 - |dx| / side) (1 - |dy| / side).

    A region of a pixels then carries a / inflation(sqrt(a)) independent observations: one for a single
    pixel, and for a large region as many as the map's whole correlation (to ``reach``) allows. A constant
    area (:func:`correlation_area`) must pick one reach for all sizes: at lag 2 it undercounts small
    regions and overcounts large ones, whose pixels are correlated further. Sides up to the reach's lag
    plus one (and half the map with a noise floor); non-decreasing.
    """
    counted = _counted_correlation(maps, reach, "correlation_profile")
    if counted is None:
        return (1.0,)
    reach_y, reach_x = (counted.shape[0] - 1) // 2, (counted.shape[1] - 1) // 2
    dy = np.abs(np.arange(-reach_y, reach_y + 1, dtype=np.float64))[:, None]
    dx = np.abs(np.arange(-reach_x, reach_x + 1, dtype=np.float64))[None, :]
    floor = correlation_area(maps) if reach.floored else 1.0
    profile: list[float] = []
    for side in range(1, min(max(reach_y, reach_x) + 1, MAX_PROFILE) + 1):
        weight = np.clip(1.0 - dy / side, 0.0, None) * np.clip(1.0 - dx / side, 0.0, None)
        profile.append(max(floor, float((counted * weight).sum()), profile[-1] if profile else 1.0))
    return tuple(profile)


def fit_scale_null(maps: np.ndarray, reach: Reach = DEFAULT_REACH) -> ScaleNull:
    """The null model of one scale from its m_s maps on good validation images (N x H x W)."""
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim != 3 or m.size == 0:
        raise ValueError(f"fit_scale_null: expected non-empty N x H x W maps, got shape {m.shape}")
    if not np.isfinite(m).all() or (m < 0).any():
        raise ValueError("fit_scale_null: maps must be finite and non-negative")
    mean = float(m.mean())
    if not mean > 0.0:
        raise ValueError("fit_scale_null: the maps are all zero")
    dof = tail_dof(m / mean)
    profile = correlation_profile(m, reach) if reach.by_size else ()
    return ScaleNull(mean=mean, dof=max(dof, 1e-3), area=correlation_area(m, reach), profile=profile)


def fit_null(scale_maps: list[np.ndarray], reach: Reach = DEFAULT_REACH) -> tuple[ScaleNull, ...]:
    """One fitted null per scale (maps finest first, each N x H_s x W_s)."""
    if not scale_maps:
        raise ValueError("fit_null: no scale maps")
    return tuple(fit_scale_null(m, reach) for m in scale_maps)


def scaled(nulls: tuple[ScaleNull, ...], factor: float) -> tuple[ScaleNull, ...]:
    """The nulls with every scale's dof multiplied by ``factor`` (evidence per region times ``factor``)."""
    return weighted(nulls, [factor] * len(nulls))


def weighted(nulls: tuple[ScaleNull, ...], weights: Sequence[float] | None) -> tuple[ScaleNull, ...]:
    """The nulls with scale k's dof multiplied by ``weights[k]`` (None: unchanged)."""
    if weights is None:
        return nulls
    if len(weights) != len(nulls):
        raise ValueError(f"weighted: {len(weights)} weights for {len(nulls)} maps")
    return tuple(ScaleNull(n.mean, n.dof * w, n.area, n.profile) for n, w in zip(nulls, weights, strict=True))


def false_regions_per_image(
    scale_maps: list[np.ndarray],
    channels: list[int],
    size: tuple[int, int],
    nulls: tuple[ScaleNull, ...],
    log10_epsilon: float = 0.0,
) -> float:
    """Mean number of NFA regions per image on good images' maps (each N x H_s x W_s)."""
    count = len(scale_maps[0])
    total = 0
    for i in range(count):
        log_nfa = log_nfa_map([m[i] for m in scale_maps], channels, size, nulls)
        total += len(regions_from_log_nfa(log_nfa, log10_epsilon))
    return total / max(count, 1)


@dataclass(frozen=True)
class FactorCount:
    """Out-of-fold false regions on the calibration images at one evidence factor."""

    factor: float
    false_regions: int  # regions at the deployed epsilon, summed over the images
    images_flagged: int  # images with at least one region at the deployed epsilon
    regions_at_0: int  # regions at log10 epsilon = 0 (the a-contrario promise of one per image)
    regions_at_check: int  # regions at the checkable epsilon (the loosest rate the images can vouch for)


@dataclass(frozen=True)
class Calibration:
    """The shipped null (fitted on every calibration image, times ``factor``) and what backs its promise."""

    nulls: tuple[ScaleNull, ...]
    factor: float
    log10_epsilon: float
    check_log10_epsilon: float  # where the rule counted: max(deployed, the rate the images can check)
    folds: int
    counts: tuple[FactorCount, ...]  # every factor tried, smallest first; the last one broke the rule
    check: PromiseCheck  # the out-of-fold counts at ``factor`` and their 95 % upper bounds

    @property
    def images(self) -> int:
        """Good calibration images (none used to fit the flow)."""
        return self.check.images

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (val_scores.json, then the manifest's ``nfa.calibration``)."""
        check = self.check
        return {
            "method": "cross-fit",
            "images": check.images,
            "folds": self.folds,
            "evidence_scale": self.factor,
            "log10_epsilon": self.log10_epsilon,
            "check_log10_epsilon": self.check_log10_epsilon,
            "false_regions": check.false_regions,
            "images_flagged": check.images_flagged,
            "false_regions_per_image_upper95": check.regions_upper,
            "flagged_share_upper95": check.flagged_upper,
            "images_needed": check.needed,
            "supported": check.supported,
            "counts": [asdict(c) for c in self.counts],
        }


def fold_slices(images: int, folds: int) -> list[slice]:
    """``folds`` contiguous blocks of the image order (neighbours in a sorted list, often taken together
    or one after the other, land in the same fold, so a fold's null never saw its near-duplicates)."""
    if images < 2 or folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 images and 2 folds, got {images} and {folds}")
    folds = min(folds, images)
    edges = [round(k * images / folds) for k in range(folds + 1)]
    return [slice(edges[k], edges[k + 1]) for k in range(folds)]


def checkable_log10_epsilon(log10_epsilon: float, images: int) -> float:
    """The epsilon the selection counts at: the deployed one when ``images`` can vouch for its rate with
    none flagged, else the loosest rate they can vouch for (log10 of the 95 % bound of 0 in ``images``)."""
    return max(log10_epsilon, math.log10(poisson_upper(0, images)))


def _acceptable(count: FactorCount, images: int, promise: float) -> bool:
    """The selection rule: the 95 % upper bound of out-of-fold false regions per image at the checkable
    epsilon within the promise, or, where ``images`` are too few to show the promise, no false region at
    all at the loosest epsilon they can check (a stricter deployed epsilon then only removes regions);
    and at log10 epsilon = 0 at most ``PROMISE_MARGIN`` regions per image (a tenth of the a-contrario
    promise)."""
    allowed = max(promise, poisson_upper(0, images))
    return (
        poisson_upper(count.regions_at_check, images) <= allowed * (1.0 + 1e-9)
        and count.regions_at_0 <= PROMISE_MARGIN * images
    )


def calibrate(
    scale_maps: list[np.ndarray],
    channels: list[int],
    size: tuple[int, int],
    log10_epsilon: float,
    folds: int = CALIBRATION_FOLDS,
    envelope: tuple[ScaleNull, ...] | None = None,
    weights: Sequence[float] | None = None,
    reach: Reach = DEFAULT_REACH,
) -> Calibration:
    """Fit the null on good calibration maps and choose the evidence factor by cross-fitting.

    ``scale_maps``: one N x H_s x W_s array per map (any evidence head), the same N good images, none of
    which fitted the flow. The images are cut into ``folds`` contiguous blocks; for each block the null is
    fitted on the other blocks and the block's images are counted at every factor of ``EVIDENCE_SCALES``
    (smallest first): every image is counted once, by a null that never saw it. Where the images are too
    few to vouch for the promise, the counting is done at the loosest epsilon they can vouch for
    (:func:`checkable_log10_epsilon`), a margin the deployed, stricter epsilon keeps. The factor is the
    largest one before the first that breaks :func:`_acceptable` (counts grow with the factor, so this is a
    fixed-sequence test and the bound at the chosen factor stays a 95 % bound despite the choice; a finer
    search between grid steps was measured and not kept, docs/nfa.md). The shipped null is fitted on all
    images (``envelope`` when the caller has it) times that factor. ``weights`` (one per map) multiply
    each map's dof before the factor, in the folds and in the shipped null alike (a per-map study,
    bench/evidence_per_map.py; None everywhere in training). ``reach``: the correlation area's
    (:class:`Reach`), in the folds' nulls as in the envelope's (bench/correlation_lag.py).
    """
    images = len(scale_maps[0])
    if any(len(m) != images for m in scale_maps):
        raise ValueError("calibrate: every map needs the same number of images")
    promise = 10.0**log10_epsilon
    check_epsilon = checkable_log10_epsilon(log10_epsilon, images)
    slices = fold_slices(images, folds)
    fold_nulls = []
    for block in slices:
        keep = np.ones(images, dtype=bool)
        keep[block] = False
        fold_nulls.append(weighted(fit_null([m[keep] for m in scale_maps], reach), weights))

    def count(factor: float) -> FactorCount:
        regions = flagged = at_0 = at_check = 0
        for block, nulls in zip(slices, fold_nulls, strict=True):
            candidate = scaled(nulls, factor)
            for i in range(block.start, block.stop):
                log_nfa = log_nfa_map([m[i] for m in scale_maps], channels, size, candidate)
                found = len(regions_from_log_nfa(log_nfa, log10_epsilon))
                regions += found
                flagged += found > 0
                at_0 += len(regions_from_log_nfa(log_nfa, 0.0))
                at_check += len(regions_from_log_nfa(log_nfa, check_epsilon))
        return FactorCount(factor, regions, flagged, at_0, at_check)

    counts: list[FactorCount] = []
    for factor in EVIDENCE_SCALES:
        counts.append(count(factor))
        if not _acceptable(counts[-1], images, promise):
            break
    passed = [c for c in counts if _acceptable(c, images, promise)]
    # Nothing passes: even the most conservative factor flags held-out images; ship it and say so.
    chosen = passed[-1] if passed else counts[0]
    final = weighted(envelope if envelope is not None else fit_null(scale_maps, reach), weights)
    return Calibration(
        nulls=scaled(final, chosen.factor),
        factor=chosen.factor,
        log10_epsilon=log10_epsilon,
        check_log10_epsilon=check_epsilon,
        folds=len(slices),
        counts=tuple(counts),
        check=check_promise(promise, images, chosen.false_regions, chosen.images_flagged),
    )


def calibrate_evidence(
    nulls: tuple[ScaleNull, ...],
    scale_maps: list[np.ndarray],
    channels: list[int],
    size: tuple[int, int],
    log10_epsilon: float,
) -> tuple[tuple[ScaleNull, ...], float]:
    """(scaled nulls, factor) of :func:`calibrate` with ``nulls`` as the all-image envelope.

    With fewer than ``MIN_CALIBRATION_IMAGES`` images the factor stays 1 (the conservative envelope).
    """
    if len(scale_maps[0]) < MIN_CALIBRATION_IMAGES:
        # A handful of images says almost nothing about a rate of 1 in 100: keep the envelope alone.
        return scaled(nulls, 1.0), 1.0
    result = calibrate(scale_maps, channels, size, log10_epsilon, envelope=nulls)
    return result.nulls, result.factor


def null_to_dict(nulls: tuple[ScaleNull, ...]) -> list[dict[str, Any]]:
    """JSON-ready list (run dirs and manifests store it); ``profile`` only where a null has one."""
    return [
        {"mean": n.mean, "dof": n.dof, "area": n.area, **({"profile": list(n.profile)} if n.profile else {})}
        for n in nulls
    ]


def null_from_dict(items: list[dict[str, Any]]) -> tuple[ScaleNull, ...]:
    """Inverse of :func:`null_to_dict`."""
    return tuple(
        ScaleNull(float(i["mean"]), float(i["dof"]), float(i["area"]), tuple(float(v) for v in i.get("profile", ())))
        for i in items
    )


def is_usable(nulls: tuple[ScaleNull, ...]) -> bool:
    """True when every scale's fit is finite (a constant or empty validation set is not)."""
    return all(math.isfinite(n.mean) and math.isfinite(n.dof) and math.isfinite(n.area) for n in nulls)
