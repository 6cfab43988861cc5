"""Anomaly-detection metrics on whole test sets, vectorised numpy (no torch, no scikit-learn).

All maps and masks are compared at one size: ``maps`` float (N, H, W), ``masks`` bool-like (N, H, W)
where True marks a defect pixel. Higher scores mean more anomalous.

- :func:`pixel_auroc`: ROC AUC over every pixel of every image.
- :func:`image_auroc`: ROC AUC of one score per image (usually the map's maximum).
- :func:`aupro`: area under the per-region-overlap curve up to a false-positive rate (0.3), divided by
  that rate, so 1.0 is perfect. Every connected defect region of every image weighs the same.
- :func:`mean_iou`: IoU of predicted and true masks averaged over ALL images; an image where both are
  empty scores 1 (a good part with no detection is a correct answer), so all-empty predictions score
  the fraction of good images.
- :func:`best_mean_iou`: the best :func:`mean_iou` of ``maps >= t`` over a set of thresholds.

The curves are exact: ties are grouped into one threshold, as scikit-learn's ``roc_curve`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_MAX_FPR = 0.3


@dataclass(frozen=True)
class Curve:
    """A curve swept over decreasing thresholds: x and y at each distinct threshold, starting at (0, 0)."""

    x: np.ndarray
    y: np.ndarray
    thresholds: np.ndarray


def _check_maps(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps)
    masks = np.asarray(masks).astype(bool, copy=False)
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must have the same shape (N, H, W)")
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W) or (H, W), got shape {maps.shape}")
    if not np.all(np.isfinite(maps)):
        raise ValueError("maps contain NaN or infinite values")
    return maps, masks


def _sweep(scores: np.ndarray, weights_pos: np.ndarray, weights_neg: np.ndarray) -> Curve:
    """Cumulative weighted positives/negatives above each distinct threshold (descending).

    x = cumulative negative weight, y = cumulative positive weight; both start at 0 (threshold +inf).
    """
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    # Last index of each run of equal scores: the curve only has a point where the score changes.
    distinct = np.flatnonzero(np.diff(sorted_scores)) if sorted_scores.size > 1 else np.empty(0, dtype=np.int64)
    ends = np.concatenate([distinct, [sorted_scores.size - 1]])
    pos = np.cumsum(weights_pos[order], dtype=np.float64)[ends]
    neg = np.cumsum(weights_neg[order], dtype=np.float64)[ends]
    return Curve(
        x=np.concatenate([[0.0], neg]),
        y=np.concatenate([[0.0], pos]),
        thresholds=np.concatenate([[np.inf], sorted_scores[ends]]),
    )


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> Curve:
    """False-positive rate (x) and true-positive rate (y) at every distinct threshold."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool, copy=False).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs both classes; got {n_pos} positives and {n_neg} negatives")
    curve = _sweep(scores, labels.astype(np.float64), (~labels).astype(np.float64))
    return Curve(x=curve.x / n_neg, y=curve.y / n_pos, thresholds=curve.thresholds)


def area_under(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Trapezoidal area under y(x) for non-decreasing x, optionally cut at x_max (interpolated there)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x_max is not None:
        inside = x <= x_max
        last = int(np.flatnonzero(inside)[-1])
        if last + 1 < x.size and x[last] < x_max:
            x0, x1, y0, y1 = x[last], x[last + 1], y[last], y[last + 1]
            y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            x = np.concatenate([x[: last + 1], [x_max]])
            y = np.concatenate([y[: last + 1], [y_cut]])
        else:
            x, y = x[: last + 1], y[: last + 1]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of scores against binary labels (ties count half, as in scikit-learn)."""
    curve = roc_curve(scores, labels)
    return area_under(curve.x, curve.y)


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """ROC AUC over all pixels of all images."""
    maps, masks = _check_maps(maps, masks)
    return auroc(maps.ravel(), masks.ravel())


def image_auroc(image_scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """ROC AUC of one score per image against its label (True = defective)."""
    return auroc(np.asarray(image_scores, dtype=np.float64), np.asarray(labels, dtype=bool))


def region_labels(masks: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected defect regions numbered 1..K across the whole set (0 = background), and K."""
    masks = np.asarray(masks).astype(bool, copy=False)
    labels = np.zeros(masks.shape, dtype=np.int32)
    total = 0
    for i, mask in enumerate(masks):
        count, image_labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=connectivity)
        regions = image_labels > 0
        labels[i][regions] = image_labels[regions] + total
        total += count - 1
    return labels, total


def pro_curve(maps: np.ndarray, masks: np.ndarray, connectivity: int = 8) -> Curve:
    """Per-region overlap (y) against the false-positive rate on defect-free pixels (x), exact.

    At a threshold t the PRO is the mean over all regions of the fraction of the region's pixels
    with score >= t; the FPR is the fraction of defect-free pixels with score >= t.
    """
    maps, masks = _check_maps(maps, masks)
    labels, n_regions = region_labels(masks, connectivity)
    n_neg = int((~masks).sum())
    if n_regions == 0 or n_neg == 0:
        raise ValueError(f"PRO needs defect regions and defect-free pixels; got {n_regions} regions, {n_neg} free")
    flat_labels = labels.ravel()
    sizes = np.bincount(flat_labels, minlength=n_regions + 1).astype(np.float64)
    # Each pixel of region k adds 1/(|k| * K) to the PRO when the threshold passes it.
    per_region = np.zeros(n_regions + 1)
    per_region[1:] = 1.0 / (sizes[1:] * n_regions)
    weights_pos = per_region[flat_labels]
    weights_neg = (flat_labels == 0) / n_neg
    return _sweep(maps.ravel().astype(np.float64), weights_pos, weights_neg.astype(np.float64))


def aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = DEFAULT_MAX_FPR, connectivity: int = 8) -> float:
    """Area under the PRO curve for FPR in [0, max_fpr], divided by max_fpr (1.0 = perfect)."""
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    curve = pro_curve(maps, masks, connectivity)
    return area_under(curve.x, np.minimum(curve.y, 1.0), x_max=max_fpr) / max_fpr


def iou_per_image(predictions: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """IoU of each predicted mask with its true mask; 1.0 where both are empty."""
    predictions, masks = _check_maps(np.asarray(predictions).astype(bool), masks)
    inter = np.logical_and(predictions, masks).sum(axis=(1, 2)).astype(np.float64)
    union = np.logical_or(predictions, masks).sum(axis=(1, 2)).astype(np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)


def mean_iou(predictions: np.ndarray, masks: np.ndarray) -> float:
    """Mean over all images of :func:`iou_per_image`."""
    return float(iou_per_image(predictions, masks).mean())


def default_thresholds(maps: np.ndarray, count: int = 256) -> np.ndarray:
    """Candidate thresholds: quantiles of the scores, dense in the upper tail where defects live."""
    values = np.asarray(maps, dtype=np.float64).ravel()
    # Half the levels spread over all scores, half over the top 5 %.
    levels = np.unique(np.concatenate([np.linspace(0.0, 1.0, count // 2), np.linspace(0.95, 1.0, count - count // 2)]))
    return np.unique(np.quantile(values, levels))


def mean_iou_curve(maps: np.ndarray, masks: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Mean IoU of ``maps >= t`` for each threshold t, computed from sorted scores (no T x pixels arrays)."""
    maps, masks = _check_maps(maps, masks)
    thresholds = np.asarray(thresholds, dtype=np.float64).ravel()
    total = np.zeros(thresholds.size)
    for scores, mask in zip(maps.reshape(len(maps), -1), masks.reshape(len(masks), -1), strict=True):
        all_sorted = np.sort(scores.astype(np.float64))
        pos_sorted = np.sort(scores[mask].astype(np.float64))
        predicted = all_sorted.size - np.searchsorted(all_sorted, thresholds, side="left")
        inter = pos_sorted.size - np.searchsorted(pos_sorted, thresholds, side="left")
        union = predicted + pos_sorted.size - inter
        total += np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return total / len(maps)


@dataclass(frozen=True)
class BestIoU:
    """The best mean IoU over thresholds and the threshold that gave it."""

    miou: float
    threshold: float


def best_mean_iou(maps: np.ndarray, masks: np.ndarray, thresholds: np.ndarray | None = None) -> BestIoU:
    """The best mean IoU of ``maps >= t`` over ``thresholds`` (default: :func:`default_thresholds`)."""
    maps, masks = _check_maps(maps, masks)
    candidates = default_thresholds(maps) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    curve = mean_iou_curve(maps, masks, candidates)
    best = int(np.argmax(curve))
    return BestIoU(miou=float(curve[best]), threshold=float(candidates[best]))


def segmentation_report(
    maps: np.ndarray,
    masks: np.ndarray,
    image_scores: np.ndarray | None = None,
    image_labels: np.ndarray | None = None,
    predicted_masks: np.ndarray | None = None,
    max_fpr: float = DEFAULT_MAX_FPR,
) -> dict[str, float]:
    """Every metric of docs/design.md section 6 that the inputs allow, keyed by name.

    ``image_scores`` defaults to each map's maximum and ``image_labels`` to "the mask is not empty"
    (pass the folder labels where some defect masks are empty); ``predicted_masks`` (e.g. the
    log10 NFA < 0 mask) adds ``miou``.
    """
    maps, masks = _check_maps(maps, masks)
    scores = maps.reshape(len(maps), -1).max(axis=1) if image_scores is None else np.asarray(image_scores)
    labels = (
        np.asarray(masks.reshape(len(masks), -1).any(axis=1))
        if image_labels is None
        else np.asarray(image_labels, bool)
    )
    report = {"pixel_auroc": pixel_auroc(maps, masks), "aupro": aupro(maps, masks, max_fpr)}
    if labels.any() and not labels.all():
        report["image_auroc"] = image_auroc(scores, labels)
    best = best_mean_iou(maps, masks)
    report["best_miou"] = best.miou
    report["best_miou_threshold"] = best.threshold
    if predicted_masks is not None:
        report["miou"] = mean_iou(predicted_masks, masks)
    return report
