"""Pictures for people: the anomaly map as a heat map and the NFA detection contour over the image."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from edge_agent.messages import Region

DETECTION_BGR = (255, 255, 255)
BOX_BGR = (0, 255, 255)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def heat_map(anomaly_map: np.ndarray) -> np.ndarray:
    """BGR uint8 colour image of an anomaly map in [0, 1] (values outside are clipped)."""
    scaled = np.clip(np.nan_to_num(anomaly_map, nan=0.0), 0.0, 1.0)
    return np.asarray(cv2.applyColorMap(np.rint(scaled * 255).astype(np.uint8), cv2.COLORMAP_JET))


def detection_mask(log_nfa: np.ndarray, log10_epsilon: float) -> np.ndarray:
    """Boolean mask of the pixels where log10 NFA is below the decision threshold."""
    return np.asarray(log_nfa) < log10_epsilon


def draw_overlay(
    image_bgr: np.ndarray,
    anomaly_map: np.ndarray,
    log_nfa: np.ndarray,
    log10_epsilon: float,
    regions: Sequence[Region] = (),
    title: str = "",
    alpha: float = 0.45,
    min_width: int = 512,
    legend: bool = True,
) -> np.ndarray:
    """The image with the heat map blended in, the NFA mask outlined, region boxes and a legend.

    ``anomaly_map`` and ``log_nfa`` must have the image's height and width; region boxes are in the
    image's pixels. Small images are enlarged (whole factor) to ``min_width`` so the text stays legible.
    ``legend=False`` leaves out the band below (the preview page says it in text).
    """
    height, width = image_bgr.shape[:2]
    if anomaly_map.shape != (height, width) or log_nfa.shape != (height, width):
        raise ValueError(
            f"overlay: maps {anomaly_map.shape} / {log_nfa.shape} must match the image size {(height, width)}"
        )
    factor = max(1, -(-min_width // width))
    size = (width * factor, height * factor)
    base = image_bgr if image_bgr.ndim == 3 else cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2BGR)
    base = cv2.resize(base, size, interpolation=cv2.INTER_NEAREST) if factor > 1 else base
    heat = heat_map(cv2.resize(anomaly_map.astype(np.float32), size) if factor > 1 else anomaly_map)
    canvas = cv2.addWeighted(base, 1.0 - alpha, heat, alpha, 0.0)
    mask: np.ndarray = detection_mask(log_nfa, log10_epsilon).astype(np.uint8)
    if factor > 1:
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    thickness = max(1, round(min(size) / 250))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, DETECTION_BGR, thickness + 1, lineType=cv2.LINE_AA)
    for region in regions:
        x, y, w, h = (v * factor for v in region.bbox)
        cv2.rectangle(canvas, (x, y), (x + w - 1, y + h - 1), BOX_BGR, thickness)
        _label(canvas, f"log10 NFA {region.log_nfa:.1f}", (x, max(12, y - 5)), BOX_BGR)
    return _with_legend(canvas, title, log10_epsilon) if legend else canvas


def _label(canvas: np.ndarray, text: str, origin: tuple[int, int], colour: tuple[int, int, int]) -> None:
    scale = 0.5
    cv2.putText(canvas, text, origin, _FONT, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(canvas, text, origin, _FONT, scale, colour, 1, cv2.LINE_AA)


def _with_legend(canvas: np.ndarray, title: str, log10_epsilon: float) -> np.ndarray:
    """Add a band below the image: the title, a 0..1 colour bar and what the outline means."""
    width = canvas.shape[1]
    band = np.full((64, width, 3), 32, dtype=np.uint8)
    cv2.putText(band, title, (8, 22), _FONT, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    bar_w = 120
    band[40:54, 8 : 8 + bar_w] = heat_map(np.tile(np.linspace(0.0, 1.0, bar_w, dtype=np.float32), (14, 1)))
    cv2.putText(band, "map 0", (8 + bar_w + 6, 52), _FONT, 0.4, (200, 200, 200), 1, cv2.LINE_AA)
    cv2.putText(band, "..1", (8 + bar_w + 50, 52), _FONT, 0.4, (200, 200, 200), 1, cv2.LINE_AA)
    cv2.putText(
        band,
        f"white outline: log10 NFA < {log10_epsilon:g}",
        (8 + bar_w + 84, 52),
        _FONT,
        0.45,
        (255, 255, 255),
        1,
        cv2.LINE_AA,
    )
    return np.vstack([canvas, band])
