"""Synthetic defects planted on real good images: a label-free check of detection power (issue 11).

A model trained on good parts can look fine on every number that good images give (low validation
NLL, no false alarms) and still see nothing. Planting defects on the user's own good validation
images and asking the deployed decision (the NFA at the bundle's epsilon) whether it flags them
tells a plant engineer, before shipping, whether the model can see anything at all.

Kinds (``PLANTED_KINDS``), each at three sizes relative to the image's short side, and with a
contrast relative to the image's own spread of grey levels so that dark, noisy and bright parts
get comparable defects:

- ``cut_paste``: a patch of another good image (or elsewhere in the same one), flipped, pasted;
- ``scratch``: a thin straight or bent line, darker or brighter;
- ``blob``: a soft ellipse, darker or brighter (stains, blowholes, dents);
- ``texture``: a patch whose texture is replaced (blurred then re-grained), colour kept.

numpy + OpenCV only, deterministic from the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

PLANTED_KINDS: tuple[str, ...] = ("cut_paste", "scratch", "blob", "texture")
SIZES: dict[str, tuple[float, float]] = {"small": (0.04, 0.07), "medium": (0.08, 0.13), "large": (0.15, 0.22)}


@dataclass(frozen=True)
class Planted:
    """One good image with one planted defect."""

    image: np.ndarray  # uint8 H x W x 3 RGB
    mask: np.ndarray  # bool H x W: the pixels the defect changed
    kind: str
    size: str


def _contrast(image: np.ndarray) -> float:
    grey = image.astype(np.float32).mean(axis=2)
    spread = float(np.percentile(grey, 95) - np.percentile(grey, 5))
    return max(spread, 12.0)


def _centre(rng: np.random.Generator, height: int, width: int, radius: float) -> tuple[float, float]:
    margin = min(radius * 1.2, min(height, width) / 2 - 1)
    return float(rng.uniform(margin, width - margin)), float(rng.uniform(margin, height - margin))


def _ellipse_alpha(rng: np.random.Generator, height: int, width: int, radius: float) -> np.ndarray:
    cx, cy = _centre(rng, height, width, radius)
    axes = (max(1, round(radius)), max(1, round(radius * rng.uniform(0.5, 1.0))))
    alpha = np.zeros((height, width), np.float32)
    cv2.ellipse(alpha, (round(cx), round(cy)), axes, rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(alpha, (0, 0), max(0.6, 0.2 * radius))


def _line_alpha(rng: np.random.Generator, height: int, width: int, length: float) -> np.ndarray:
    side = min(height, width)
    thickness = max(1, round(side * rng.uniform(0.008, 0.016)))
    cx, cy = _centre(rng, height, width, length / 2)
    heading = rng.uniform(0, math.pi)
    bend = rng.normal(0, 0.4)
    points = []
    for k in range(9):
        s = (k / 8 - 0.5) * length
        angle = heading + bend * (k / 8 - 0.5)
        points.append((cx + s * math.cos(angle), cy + s * math.sin(angle)))
    alpha = np.zeros((height, width), np.float32)
    poly = np.clip(np.rint(np.array(points)), 0, [width - 1, height - 1]).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(alpha, [poly], False, 1.0, thickness=thickness, lineType=cv2.LINE_AA)
    return cv2.GaussianBlur(alpha, (0, 0), 0.6)


def _blend(image: np.ndarray, other: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return np.clip(image.astype(np.float32) * (1 - a) + other * a, 0, 255).astype(np.uint8)


def plant(
    image: np.ndarray,
    rng: np.random.Generator,
    kind: str,
    size: str,
    donor: np.ndarray | None = None,
) -> Planted:
    """Plant one defect of ``kind`` and ``size`` on a uint8 RGB image; ``donor`` feeds cut-paste."""
    if kind not in PLANTED_KINDS:
        raise ValueError(f"unknown planted defect kind {kind!r}; choose one of {', '.join(PLANTED_KINDS)}")
    if size not in SIZES:
        raise ValueError(f"unknown planted defect size {size!r}; choose one of {', '.join(SIZES)}")
    height, width = image.shape[:2]
    side = min(height, width)
    extent = rng.uniform(*SIZES[size]) * side  # SIZES are fractions of the short side: the defect's extent
    contrast = _contrast(image)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    base = image.astype(np.float32)
    if kind == "blob":
        alpha = _ellipse_alpha(rng, height, width, extent / 2)
        shifted = base + sign * rng.uniform(0.5, 0.8) * contrast
        out = _blend(image, shifted, alpha)
    elif kind == "scratch":
        alpha = _line_alpha(rng, height, width, length=extent * 3)
        shifted = base + sign * rng.uniform(0.6, 0.9) * contrast
        out = _blend(image, shifted, alpha)
    else:
        half = max(2, round(extent / 2))
        cx, cy = _centre(rng, height, width, half)
        x0, y0 = int(cx) - half, int(cy) - half
        x0, y0 = min(max(x0, 0), width - 2 * half), min(max(y0, 0), height - 2 * half)
        source = donor if donor is not None else image
        sx = int(rng.integers(0, max(1, source.shape[1] - 2 * half)))
        sy = int(rng.integers(0, max(1, source.shape[0] - 2 * half)))
        patch = source[sy : sy + 2 * half, sx : sx + 2 * half].astype(np.float32)
        if kind == "cut_paste":
            patch = np.ascontiguousarray(np.rot90(patch[::-1], k=int(rng.integers(4))))
            patch = patch * rng.uniform(0.75, 1.25)
        else:
            blurred = cv2.GaussianBlur(patch, (0, 0), max(1.0, half / 4))
            grain = rng.normal(0, 0.25 * contrast, size=patch.shape[:2]).astype(np.float32)[..., None]
            patch = blurred + grain
        layer = base.copy()
        layer[y0 : y0 + 2 * half, x0 : x0 + 2 * half] = patch
        alpha = np.zeros((height, width), np.float32)
        alpha[y0 : y0 + 2 * half, x0 : x0 + 2 * half] = 1.0
        alpha = cv2.GaussianBlur(alpha, (0, 0), 0.8)
        out = _blend(image, layer, alpha)
    changed = np.abs(out.astype(np.int16) - image.astype(np.int16)).max(axis=2) >= max(4, 0.1 * contrast)
    return Planted(out, changed & (alpha >= 0.3), kind, size)


def planted_set(images: np.ndarray, seed: int = 0, per_image: int = 1) -> list[Planted]:
    """Every kind and size in turn on the given good images (``per_image`` defects per image).

    Images with no changed pixel after planting (a patch pasted onto an identical patch) are skipped.
    """
    rng = np.random.default_rng(seed)
    combos = [(k, s) for k in PLANTED_KINDS for s in SIZES]
    out = []
    for index, image in enumerate(images):
        for j in range(per_image):
            kind, size = combos[(index * per_image + j) % len(combos)]
            donor = images[(index + 1 + j) % len(images)] if len(images) > 1 else None
            sample = plant(image, rng, kind, size, donor)
            if sample.mask.any():
                out.append(sample)
    return out
