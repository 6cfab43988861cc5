"""Frame -> engine input: resize to the model size and reorder BGR to RGB.

The cast to float and the normalisation live inside the model graph (engine I/O contract), so the
host only moves uint8 pixels.
"""

from __future__ import annotations

import cv2
import numpy as np


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
