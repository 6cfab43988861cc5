"""The preview's picture: the camera frame and the model's overlay side by side, at a readable size.

Left, the camera: the whole (rotated) frame with the region of interest outlined and, in tracked mode,
each part in view with its id (a decided part with its verdict: rejected parts in red) and the decision line. Right, the overlay of the inspected region: the
anomaly map blended in, the NFA detection outline and the region boxes. Both panels are enlarged by a
whole factor (nearest neighbour) to at least ``PANEL_MIN_PX``, so the browser shows the picture at its
natural size instead of blurring a small one; captions and the legend are HTML text on the page, sized
by the browser, so they always fit (tests/test_preview.py measures it in Chromium).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from edge_agent.inspection.drivers import Frame
from edge_agent.inspection.overlay import draw_overlay
from edge_agent.inspection.pipeline import FrameJob
from edge_agent.inspection.scoring import resize_map

PANEL_MIN_PX = 384  # each panel at least this wide (a 256 px frame is drawn at 512)
GAP_PX = 8
ROI_BGR = (80, 220, 80)
PART_BGR = (255, 200, 0)
DECIDED_BGR = (150, 150, 150)
REJECTED_BGR = (40, 40, 255)
LINE_BGR = (255, 0, 255)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def preview_picture(job: FrameJob) -> np.ndarray:
    """The two panels side by side (BGR uint8)."""
    frame, verdict = job.frame, job.verdict
    height, width = frame.image.shape[:2]
    factor = max(1, math.ceil(PANEL_MIN_PX / width))
    ox, oy = frame.roi_offset
    regions = [
        r.model_copy(update={"bbox": (r.bbox[0] - ox, r.bbox[1] - oy, r.bbox[2], r.bbox[3])}) for r in verdict.regions
    ]
    overlay = draw_overlay(
        frame.image,
        resize_map(verdict.anomaly_map, width, height),
        resize_map(verdict.log_nfa, width, height),
        verdict.log10_epsilon,
        regions,
        min_width=width * factor,
        legend=False,
    )
    full = frame.full if frame.full is not None else frame.image
    scale = overlay.shape[0] / full.shape[0]
    size = (max(1, round(full.shape[1] * scale)), overlay.shape[0])
    camera = cv2.resize(full, size, interpolation=cv2.INTER_NEAREST if scale >= 1 else cv2.INTER_AREA)
    thickness = max(2, round(scale))
    roi = (round(ox * scale), round(oy * scale), round((ox + width) * scale) - 1, round((oy + height) * scale) - 1)
    cv2.rectangle(camera, roi[:2], roi[2:], ROI_BGR, thickness)
    view = job.parts_view
    if view is not None:
        for panel, offset, panel_scale in ((camera, (ox, oy), scale), (overlay, (0, 0), float(factor))):
            _draw_parts(
                panel, view.parts, view.rejected, view.decision_line_x, offset, (width, height), panel_scale, thickness
            )
    gap = np.full((overlay.shape[0], GAP_PX, 3), 17, dtype=np.uint8)
    return np.hstack([camera, gap, overlay])


def live_picture(frame: Frame) -> np.ndarray:
    """The camera alone (triggered mode, between triggers): the whole frame, region of interest outlined."""
    full = frame.full if frame.full is not None else frame.image
    factor = max(1, math.ceil(PANEL_MIN_PX / full.shape[1]))
    camera = cv2.resize(full, (full.shape[1] * factor, full.shape[0] * factor), interpolation=cv2.INTER_NEAREST)
    ox, oy = frame.roi_offset
    height, width = frame.image.shape[:2]
    cv2.rectangle(
        camera, (ox * factor, oy * factor), ((ox + width) * factor - 1, (oy + height) * factor - 1), ROI_BGR, 2
    )
    return camera


def _draw_parts(
    panel: np.ndarray,
    parts: tuple[tuple[str, int, int, bool], ...],
    rejected: frozenset[str],
    decision_line_x: float,
    offset: tuple[int, int],
    roi_size: tuple[int, int],
    scale: float,
    thickness: int,
) -> None:
    ox, oy = offset
    width, height = roi_size
    top, bottom = round(oy * scale), round((oy + height) * scale) - 1
    line_x = round((ox + min(max(decision_line_x, 0.0), width - 1)) * scale)
    cv2.line(panel, (line_x, top), (line_x, bottom), LINE_BGR, thickness, cv2.LINE_AA)
    for part_id, x0, x1, decided in parts:
        colour = REJECTED_BGR if part_id in rejected else DECIDED_BGR if decided else PART_BGR
        left, right = round((ox + x0) * scale), round((ox + x1) * scale) - 1
        cv2.rectangle(panel, (left, top + thickness), (right, bottom - thickness), colour, thickness)
        # The part's verdict on its outline: the same word the caption and the part message say.
        word = "REJECTED" if part_id in rejected else "passed" if decided else ""
        label = "#" + part_id.rsplit("-", 1)[-1] + (f" {word}" if word else "")
        origin = (max(2, left + 4), top + 22)
        cv2.putText(panel, label, origin, _FONT, 0.6, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(panel, label, origin, _FONT, 0.6, colour, 1, cv2.LINE_AA)
