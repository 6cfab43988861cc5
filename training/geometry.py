"""The model's input geometry from the data: keep the images' aspect ratio instead of squashing them.

Torch-free (numpy + OpenCV). The rule (docs/results.md "Input geometry", measured with
bench/geometry.py):

- the aspect ratio is the median width / height of a sample of the training images;
- the short side is ``short_side`` pixels (the recipe's 256), the long side follows the aspect, both
  rounded to a multiple of the largest backbone stride (the flow halves the map at every scale);
- when that exceeds ``max_pixels`` (the engine's frame-rate budget), both sides shrink by the same
  factor until it fits, again on multiples of the stride;
- images within ``SQUARE_TOLERANCE`` of square stay square (a near-square aspect rounds to the same
  grid anyway, and square models are what earlier bundles were).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

ASPECT_SAMPLE = 64  # images read to measure the aspect ratio (spread evenly over the training list)
SQUARE_TOLERANCE = 0.05  # |log aspect| below log(1.05): treat as square


@dataclass(frozen=True)
class Geometry:
    """The chosen model input size and why."""

    height: int
    width: int
    data_aspect: float  # median width / height of the sampled training images
    images_sampled: int
    capped: bool  # shrunk to fit the pixel budget

    @property
    def aspect(self) -> float:
        """The model's own width / height."""
        return self.width / self.height


def image_size_of(path: Path) -> tuple[int, int]:
    """(height, width) of an image file (decoded: OpenCV has no header-only reader)."""
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise ValueError(f"cannot read image {path} to measure its size")
    return int(data.shape[0]), int(data.shape[1])


def data_aspect(paths: Sequence[Path], sample: int = ASPECT_SAMPLE) -> tuple[float, int]:
    """Median width / height over up to ``sample`` of ``paths`` (evenly spaced), and how many were read."""
    if not paths:
        raise ValueError("no images to measure the aspect ratio of")
    step = max(1, len(paths) // sample)
    chosen = list(paths)[::step][:sample]
    ratios = [w / h for h, w in (image_size_of(p) for p in chosen)]
    return float(np.median(ratios)), len(chosen)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def input_size(aspect: float, short_side: int, multiple: int, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) for images of width / height ``aspect``: see the module docstring."""
    if aspect <= 0 or not math.isfinite(aspect):
        raise ValueError(f"aspect ratio must be a positive number, got {aspect}")
    if short_side < multiple or short_side % multiple:
        raise ValueError(f"image size {short_side} must be divisible by the largest stride {multiple}")
    if abs(math.log(aspect)) < math.log1p(SQUARE_TOLERANCE):
        aspect = 1.0
    short = float(short_side)
    if max_pixels is not None and short * short * max(aspect, 1 / aspect) > max_pixels:
        short = math.sqrt(max_pixels / max(aspect, 1 / aspect))
    while True:
        if aspect >= 1:
            height, width = _round_to(short, multiple), _round_to(short * aspect, multiple)
        else:
            height, width = _round_to(short / aspect, multiple), _round_to(short, multiple)
        if max_pixels is None or height * width <= max_pixels or min(height, width) <= multiple:
            return height, width
        short -= multiple / 2  # rounding went over the budget: one half-step smaller


def choose_geometry(paths: Sequence[Path], short_side: int, multiple: int, max_pixels: int | None = None) -> Geometry:
    """The input size for training images ``paths`` (aspect from the data, within the pixel budget)."""
    aspect, count = data_aspect(paths)
    height, width = input_size(aspect, short_side, multiple, max_pixels)
    uncapped = input_size(aspect, short_side, multiple, None)
    geometry = Geometry(height, width, aspect, count, capped=(height, width) != uncapped)
    log.info(
        "input geometry from the data",
        extra={
            "event": "train_geometry",
            "data_aspect": round(aspect, 3),
            "images_sampled": count,
            "height": height,
            "width": width,
            "capped": geometry.capped,
        },
    )
    return geometry


def resolve_geometry(
    paths: Sequence[Path],
    short_side: int,
    strides: Sequence[int],
    *,
    square: bool = False,
    fixed_input_size: int | None = None,
    max_pixels: int | None = None,
) -> Geometry:
    """What ``uflow train`` uses: a fixed-size backbone's size, ``short_side`` squared when ``square``,
    else the data's aspect (``choose_geometry``)."""
    if fixed_input_size is not None:
        return Geometry(fixed_input_size, fixed_input_size, 1.0, 0, capped=False)
    if square:  # UFlowConfig checks the stride
        return Geometry(short_side, short_side, 1.0, 0, capped=False)
    return choose_geometry(paths, short_side, max(strides), max_pixels)
