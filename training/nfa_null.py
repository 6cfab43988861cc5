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
  ``max_lag`` (the variance inflation of a mean over a region): |R| pixels carry about
  |R| / area independent observations.

The envelope is set by the single most extreme good pixel, which makes it very conservative (on
magnetic tile the decision then fired on no good image at all, and on few defects). A last step,
:func:`calibrate_evidence`, multiplies every scale's ``dof`` by the largest factor from
``EVIDENCE_SCALES`` under which the decision keeps its promise on the validation images at the
deployed epsilon: at most epsilon false regions per image at log10 epsilon (0.01 at the default -2),
and at most a tenth of the promise at log10 epsilon = 0; with fewer than 20 validation images the
factor stays 1.
How well that carries to images the fit never saw is measured by ``uflow calibrate nfa``.
"""

from __future__ import annotations

import math

import numpy as np

from edge_agent.inspection.nfa import ScaleNull, log_nfa_map, regions_from_log_nfa

MAX_LAG = 2
EVIDENCE_SCALES: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
MIN_CALIBRATION_IMAGES = 20
PROMISE_MARGIN = 0.1


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


def correlation_area(maps: np.ndarray, max_lag: int = MAX_LAG) -> float:
    """Sum of the (positive) spatial autocorrelations of the maps over lags |dy|, |dx| <= max_lag.

    Each map is centred on its own mean; the correlation is pooled over images. At least 1.
    """
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"correlation_area: expected N x H x W maps, got shape {m.shape}")
    m = m - m.mean(axis=(1, 2), keepdims=True)
    var = float((m * m).mean())
    if var <= 0.0:
        return 1.0
    _, height, width = m.shape
    total = 0.0
    for dy in range(-max_lag, max_lag + 1):
        for dx in range(-max_lag, max_lag + 1):
            if abs(dy) >= height or abs(dx) >= width:
                continue
            a = m[:, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)]
            b = m[:, max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)]
            total += max(float((a * b).mean()) / var, 0.0)
    return max(1.0, total)


def fit_scale_null(maps: np.ndarray, max_lag: int = MAX_LAG) -> ScaleNull:
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
    return ScaleNull(mean=mean, dof=max(dof, 1e-3), area=correlation_area(m, max_lag))


def fit_null(scale_maps: list[np.ndarray], max_lag: int = MAX_LAG) -> tuple[ScaleNull, ...]:
    """One fitted null per scale (maps finest first, each N x H_s x W_s)."""
    if not scale_maps:
        raise ValueError("fit_null: no scale maps")
    return tuple(fit_scale_null(m, max_lag) for m in scale_maps)


def scaled(nulls: tuple[ScaleNull, ...], factor: float) -> tuple[ScaleNull, ...]:
    """The nulls with every scale's dof multiplied by ``factor`` (evidence per region times ``factor``)."""
    return tuple(ScaleNull(n.mean, n.dof * factor, n.area) for n in nulls)


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


def calibrate_evidence(
    nulls: tuple[ScaleNull, ...],
    scale_maps: list[np.ndarray],
    channels: list[int],
    size: tuple[int, int],
    log10_epsilon: float,
) -> tuple[tuple[ScaleNull, ...], float]:
    """(scaled nulls, factor): the largest ``EVIDENCE_SCALES`` factor whose false regions per validation
    image stay at most epsilon at ``log10_epsilon`` and at most ``PROMISE_MARGIN`` at log10 epsilon = 0
    (a tenth of the a-contrario promise). More evidence never removes a region, so the counts grow with
    the factor and the search stops at the first factor past either. With fewer than
    ``MIN_CALIBRATION_IMAGES`` validation images the factor stays 1 (the conservative envelope).
    """
    best = EVIDENCE_SCALES[0]
    if len(scale_maps[0]) < MIN_CALIBRATION_IMAGES:
        # A handful of images says almost nothing about a rate of 1 in 100: keep the envelope alone.
        return scaled(nulls, best), best
    target = 10.0**log10_epsilon
    for factor in EVIDENCE_SCALES:
        candidate = scaled(nulls, factor)
        if (
            false_regions_per_image(scale_maps, channels, size, candidate, log10_epsilon) > target
            or false_regions_per_image(scale_maps, channels, size, candidate, 0.0) > PROMISE_MARGIN
        ):
            break
        best = factor
    return scaled(nulls, best), best


def null_to_dict(nulls: tuple[ScaleNull, ...]) -> list[dict[str, float]]:
    """JSON-ready list (run dirs and manifests store it)."""
    return [{"mean": n.mean, "dof": n.dof, "area": n.area} for n in nulls]


def null_from_dict(items: list[dict[str, float]]) -> tuple[ScaleNull, ...]:
    """Inverse of :func:`null_to_dict`."""
    return tuple(ScaleNull(float(i["mean"]), float(i["dof"]), float(i["area"])) for i in items)


def is_usable(nulls: tuple[ScaleNull, ...]) -> bool:
    """True when every scale's fit is finite (a constant or empty validation set is not)."""
    return all(math.isfinite(n.mean) and math.isfinite(n.dof) and math.isfinite(n.area) for n in nulls)
