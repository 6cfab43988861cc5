"""Where a detected defect is, once the NFA has said that it is: each region tightened to its peak.

The NFA's region is the level set of whichever map gave the strongest evidence, and a coarse map's
region (stride 32, upsampled) is a blob far wider than a small defect: the bounding box a reject
station logs, and the mask a person sees, would cover most of a bottle's rim for a chip. The fused
anomaly map is sharper (the finer maps take part in it). So each 4-connected detected region keeps the
pixels where the anomaly map reaches ``fraction`` of the region's own peak.

The decision does not change: a region keeps at least its peak pixel, so no region disappears, and a
region's evidence (its log10 NFA) is the NFA's. ``fraction`` 0 keeps the regions as the NFA gives them
(bundles exported before the bundle recorded a fraction, and the paper's NFA). docs/nfa.md, "Where the
defect is"; the fraction is chosen on planted defects (bench/mask_fraction.py).
"""

from __future__ import annotations

import cv2
import numpy as np


def components(detected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 4-connected components of ``detected`` (the NFA's own connectivity): per-pixel labels (0: not
    detected) and OpenCV's stats per label (x, y, width, height, area; row 0 is the background)."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(detected.astype(np.uint8), connectivity=4)
    return labels, stats


def tighten(detected: np.ndarray, score: np.ndarray, fraction: float, labels: np.ndarray | None = None) -> np.ndarray:
    """``detected`` (H x W bool) where ``score`` reaches ``fraction`` of its maximum over each 4-connected
    region of ``detected``; ``detected`` itself when ``fraction`` is 0 or nothing is detected. ``labels``:
    :func:`components`' labels of ``detected`` when the caller has them."""
    if detected.shape != score.shape:
        raise ValueError(f"tighten: mask {detected.shape} and score map {score.shape} differ")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"tighten: fraction must be in [0, 1), got {fraction!r}")
    if fraction == 0.0 or not detected.any():
        return detected
    if labels is None:
        labels, _ = components(detected)
    inside = labels[detected]
    values = np.asarray(score, dtype=np.float64)[detected]
    peaks = np.full(int(labels.max()) + 1, -np.inf)
    np.maximum.at(peaks, inside, values)
    keep = np.zeros_like(detected)
    # A region whose peak is not positive (a flat or negative map) keeps every pixel: nothing to tighten to.
    floor = np.where(peaks > 0.0, fraction * peaks, -np.inf)
    keep[detected] = values >= floor[inside]
    return keep
