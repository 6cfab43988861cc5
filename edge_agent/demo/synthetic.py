"""Synthetic textured surfaces (good) and planted defects with pixel masks.

Torch-free on purpose (numpy + OpenCV only): ``edge-agent demo`` imports this on devices that have no
torch, to make a training set and a conveyor video when there is no camera and no model. It lives in
the device package for that reason; training/synthetic.py re-exports it for training and the tests.

The surface imitates a magnetic tile / brushed metal part: a smooth illumination gradient and
vignette, directional "brushed" streaks, fine grain, and mild variation between parts (brightness,
light direction, grain strength). Every image is a pure function of its seed and size. Texture and
defect sizes are relative to the image size, so the same seed at another size shows the same part
at another resolution.

Defects (``DEFECT_KINDS``): dark and bright blobs (blowholes, stains), straight scratches and
branching-free random-walk cracks. Each comes with a boolean mask of the pixels it changed
noticeably (alpha >= 0.5 of the soft defect footprint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

DEFECT_KINDS: tuple[str, ...] = ("dark_blob", "bright_blob", "scratch", "crack")

# Roles keep the random streams of train, test and defect images apart for one base seed.
_ROLE_TRAIN, _ROLE_VAL, _ROLE_TEST_GOOD, _ROLE_TEST_DEFECT = 1, 2, 3, 4
_DEFECT_STREAM = 7


@dataclass(frozen=True)
class DefectSample:
    """One synthetic defect image: uint8 RGB, its boolean mask and the defect kind."""

    image: np.ndarray
    mask: np.ndarray
    kind: str


@dataclass(frozen=True)
class SyntheticDataset:
    """What :func:`write_synthetic_dataset` wrote (MVTec AD layout rooted at ``root``)."""

    root: Path
    train_good: int
    test_good: int
    test_defect: dict[str, int]
    height: int
    width: int
    seed: int


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def _check_size(height: int, width: int) -> None:
    if height < 16 or width < 16:
        raise ValueError(f"synthetic images must be at least 16x16 pixels, got {height}x{width}")


def _illumination(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth lighting: base level + linear gradient in a random direction + a soft vignette."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy = yy / max(height - 1, 1) - 0.5
    xx = xx / max(width - 1, 1) - 0.5
    angle = rng.uniform(0.0, 2.0 * math.pi)
    base = rng.uniform(105.0, 135.0)
    slope = rng.uniform(15.0, 30.0)
    gradient = slope * (np.cos(angle) * xx + np.sin(angle) * yy)
    cy, cx = rng.uniform(-0.15, 0.15, size=2)
    vignette = -rng.uniform(10.0, 20.0) * ((xx - cx) ** 2 + (yy - cy) ** 2)
    return np.asarray(base + gradient + vignette, np.float32)


def _brushed_streaks(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Directional texture: white noise smeared along a near-horizontal brushing direction."""
    noise = rng.standard_normal((height, width)).astype(np.float32)
    length = max(3, round(24 * scale) | 1)
    kernel: np.ndarray = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    angle = rng.uniform(-6.0, 6.0)
    rotation = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), angle, 1.0)
    kernel = np.asarray(cv2.warpAffine(kernel, rotation, (length, length)), np.float32)
    kernel /= max(float(kernel.sum()), 1e-6)
    streaks: np.ndarray = cv2.filter2D(noise, -1, kernel, borderType=cv2.BORDER_REFLECT)
    streaks /= max(float(streaks.std()), 1e-6)
    return streaks * rng.uniform(5.0, 7.0)


def _grain(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Fine isotropic grain, slightly blurred so that it scales with the image."""
    noise = rng.standard_normal((height, width)).astype(np.float32)
    sigma = max(0.5, 0.8 * scale)
    grain: np.ndarray = cv2.GaussianBlur(noise, (0, 0), sigma)
    grain /= max(float(grain.std()), 1e-6)
    return grain * rng.uniform(3.0, 4.5)


def good_surface(seed: int, height: int, width: int) -> np.ndarray:
    """A defect-free surface as float32 grey levels (0..255, not clipped), deterministic from seed."""
    _check_size(height, width)
    rng = _rng(seed)
    scale = min(height, width) / 256.0
    surface = _illumination(rng, height, width)
    surface += _brushed_streaks(rng, height, width, scale)
    surface += _grain(rng, height, width, scale)
    return surface


def to_rgb(surface: np.ndarray) -> np.ndarray:
    """Grey float surface -> uint8 HxWx3 RGB (grey replicated, like the magnetic tile images)."""
    grey = np.clip(np.rint(surface), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def good_image(seed: int, height: int = 256, width: int = 256) -> np.ndarray:
    """A defect-free uint8 HxWx3 RGB surface image, deterministic from seed and size."""
    return to_rgb(good_surface(seed, height, width))


def _blob_alpha(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    side = min(height, width)
    radius = rng.uniform(0.06, 0.11) * side
    axes = (max(2, int(radius)), max(2, int(radius * rng.uniform(0.6, 1.0))))
    margin = radius * 1.3
    center = (int(rng.uniform(margin, width - margin)), int(rng.uniform(margin, height - margin)))
    alpha = np.zeros((height, width), np.float32)
    cv2.ellipse(alpha, center, axes, rng.uniform(0, 180), 0, 360, 1.0, thickness=-1, lineType=cv2.LINE_AA)
    return cv2.GaussianBlur(alpha, (0, 0), max(0.8, 0.15 * radius))


def _line_alpha(rng: np.random.Generator, height: int, width: int, wandering: bool) -> np.ndarray:
    side = min(height, width)
    thickness = max(2, round(side * rng.uniform(0.018, 0.028)))
    length = rng.uniform(0.35, 0.6) * side
    start = np.array([rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height])
    heading = rng.uniform(0.0, 2.0 * math.pi)
    steps = 12 if wandering else 1
    points = [start.copy()]
    for _ in range(steps):
        if wandering:
            heading += rng.normal(0.0, 0.5)
        step = length / steps * np.array([math.cos(heading), math.sin(heading)])
        nxt = np.clip(points[-1] + step, [2, 2], [width - 3, height - 3])
        points.append(nxt)
    alpha = np.zeros((height, width), np.float32)
    polyline = np.rint(np.array(points)).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(alpha, [polyline], False, 1.0, thickness=thickness, lineType=cv2.LINE_AA)
    return cv2.GaussianBlur(alpha, (0, 0), max(0.6, 0.25 * thickness))


def plant_defect(
    surface: np.ndarray, rng: np.random.Generator, kind: str | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Add one defect to a grey float surface; return (new surface, boolean mask, kind).

    The defect changes the grey level by 45..80 (blobs and scratches darker, bright blobs lighter)
    with a soft edge; the mask is where the soft footprint reaches one half.
    """
    if kind is None:
        kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
    if kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; choose one of {', '.join(DEFECT_KINDS)}")
    height, width = surface.shape
    if kind in ("dark_blob", "bright_blob"):
        alpha = _blob_alpha(rng, height, width)
    else:
        alpha = _line_alpha(rng, height, width, wandering=kind == "crack")
    peak = float(alpha.max())
    if peak > 0:
        alpha /= peak
    delta = rng.uniform(45.0, 80.0) * (1.0 if kind == "bright_blob" else -1.0)
    return surface + delta * alpha, alpha >= 0.5, kind


def defect_image(seed: int, height: int = 256, width: int = 256, kind: str | None = None) -> DefectSample:
    """A surface with one planted defect and its mask, deterministic from seed, size and kind."""
    surface, mask, chosen = plant_defect(good_surface(seed, height, width), _rng(seed, _DEFECT_STREAM), kind)
    return DefectSample(image=to_rgb(surface), mask=mask, kind=chosen)


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), data):
        raise OSError(f"could not write image {path}")


def _seed(base: int, role: int, index: int) -> int:
    return int(np.random.SeedSequence([base, role, index]).generate_state(1)[0])


def write_synthetic_dataset(
    root: Path | str,
    *,
    train_good: int = 40,
    test_good: int = 8,
    defects_per_kind: int = 4,
    height: int = 256,
    width: int = 256,
    seed: int = 0,
    kinds: tuple[str, ...] = DEFECT_KINDS,
) -> SyntheticDataset:
    """Write a dataset in the MVTec AD layout that ``training.data`` reads.

    ``root/train/good/*.png`` (good parts), ``root/test/good/*.png``, ``root/test/<kind>/*.png`` and
    ``root/ground_truth/<kind>/<stem>_mask.png`` (255 = defect). Existing files are overwritten.
    """
    root = Path(root)
    for i in range(train_good):
        _write_png(root / "train" / "good" / f"{i:04d}.png", good_image(_seed(seed, _ROLE_TRAIN, i), height, width))
    for i in range(test_good):
        _write_png(root / "test" / "good" / f"{i:04d}.png", good_image(_seed(seed, _ROLE_TEST_GOOD, i), height, width))
    counts: dict[str, int] = {}
    for k, kind in enumerate(kinds):
        for i in range(defects_per_kind):
            sample = defect_image(_seed(seed, _ROLE_TEST_DEFECT, k * 100_000 + i), height, width, kind)
            _write_png(root / "test" / kind / f"{i:04d}.png", sample.image)
            _write_png(root / "ground_truth" / kind / f"{i:04d}_mask.png", sample.mask.astype(np.uint8) * 255)
        counts[kind] = defects_per_kind
    return SyntheticDataset(
        root=root,
        train_good=train_good,
        test_good=test_good,
        test_defect=counts,
        height=height,
        width=width,
        seed=seed,
    )
