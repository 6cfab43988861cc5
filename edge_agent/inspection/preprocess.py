"""Frame -> engine input: resize to the model size and reorder BGR to RGB.

The cast to float and the normalisation live inside the model graph (engine I/O contract), so the
host only moves uint8 pixels.
"""

from __future__ import annotations

import logging
import math

import cv2
import numpy as np

log = logging.getLogger(__name__)

# A frame whose aspect ratio differs from the model's by more than this is squashed visibly by the
# resize (5 %: a round hole becomes an ellipse with axes 5 % apart), so the model sees parts shaped
# unlike its training images. The agent, `edge-agent doctor` and `edge-agent segment` warn.
ASPECT_TOLERANCE = 0.05


def model_input(image_bgr: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 HxWx3 RGB at the model size from a uint8 BGR (or grayscale) image of any size."""
    if image_bgr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {image_bgr.dtype}")
    if image_bgr.ndim == 2:
        image_bgr = cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2BGR)
    if image_bgr.shape[:2] != (height, width):
        # INTER_AREA averages when shrinking (no aliasing of fine texture); bilinear when enlarging.
        shrinking = image_bgr.shape[0] >= height and image_bgr.shape[1] >= width
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        image_bgr = cv2.resize(image_bgr, (width, height), interpolation=interpolation)
    return np.ascontiguousarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))


def aspect_mismatch(frame_hw: tuple[int, int], model_hw: tuple[int, int]) -> float | None:
    """How much the resize to the model size stretches a frame: (frame w/h) / (model w/h), or None
    when it is within ``ASPECT_TOLERANCE`` of 1 (both sizes are (height, width))."""
    (fh, fw), (mh, mw) = frame_hw, model_hw
    if min(fh, fw, mh, mw) <= 0:
        raise ValueError(f"sizes must be positive, got frame {fw}x{fh} and model {mw}x{mh}")
    ratio = (fw / fh) / (mw / mh)
    return None if abs(math.log(ratio)) <= math.log1p(ASPECT_TOLERANCE) else ratio


def aspect_advice(frame_hw: tuple[int, int], model_hw: tuple[int, int], ratio: float) -> str:
    """One sentence for a person: the two shapes and what to do about the difference."""
    (fh, fw), (mh, mw) = frame_hw, model_hw
    return (
        f"frames are {fw}x{fh} (aspect {fw / fh:.2f}) but the model takes {mw}x{mh} (aspect {mw / mh:.2f}): "
        f"every frame is stretched {ratio:.2f}x horizontally, so parts look unlike the training images; "
        "set source.roi to a crop with the model's aspect, or retrain on frames from this camera"
    )


class AspectCheck:
    """Logs one structured warning per (frame size, model size) pair whose aspects differ.

    The agent calls it on every frame (a tuple comparison once the pair has been seen), so the warning
    comes when the source's size is first known and again only when the camera or the model changes.
    """

    def __init__(self, source: str = "source") -> None:
        self.source = source
        self._seen: set[tuple[tuple[int, int], tuple[int, int]]] = set()

    def check(self, frame_hw: tuple[int, int], model_hw: tuple[int, int]) -> float | None:
        """The stretch ratio when it is off (logged the first time), else None."""
        key = (frame_hw, model_hw)
        if key in self._seen:
            return None
        self._seen.add(key)
        ratio = aspect_mismatch(frame_hw, model_hw)
        if ratio is not None:
            log.warning(
                aspect_advice(frame_hw, model_hw, ratio),
                extra={
                    "event": "frame_aspect_mismatch",
                    "source": self.source,
                    "frame_width": frame_hw[1],
                    "frame_height": frame_hw[0],
                    "model_width": model_hw[1],
                    "model_height": model_hw[0],
                    "stretch": round(ratio, 3),
                },
            )
        return ratio
