"""Datasets for training and evaluation: four on-disk layouts, one record type, image loading.

Torch-free (numpy + OpenCV), so that evaluation helpers and the demo can use it anywhere.

Layouts (detected by :func:`open_dataset`):
- ``folder``: every image under a directory (recursively) is a good part. A deterministic 30 % of
  them, at most 333 (chosen by a hash of the relative path, so adding images does not reshuffle the
  rest), is held out for validation: those images calibrate the NFA's false-alarm promise
  (docs/nfa.md, "How many good images calibrate"). No test split.
- ``mvtec``: an MVTec AD category directory: ``train/good`` (train; the same hash rule holds out a
  validation part), ``test/<type>/`` (``good`` or a defect type) and
  ``ground_truth/<type>/<stem>_mask.png``.
- ``mvtec3d``: an MVTec 3D-AD category directory, RGB only: ``train/good/rgb`` (train),
  ``validation/good/rgb`` (validation; without it the hash rule holds out a part of train),
  ``test/<type>/rgb/<stem>.png`` with its mask ``test/<type>/gt/<stem>.png`` (the ``xyz`` point
  clouds are ignored).
- ``split_json``: a ``split.json`` (like ../shared/data/magnetic_tile) with ``train``, ``val``,
  ``test_good`` and ``test_defect`` {type: [stems]}; paths are stems relative to the json's
  directory, ``STEM.jpg`` the (grey) image and ``STEM.png`` its mask.

Images of any size and channel count are read as RGB and resized to the model size with the agent's
own ``edge_agent.inspection.preprocess.model_input`` (so training sees exactly what the device feeds the
engine); masks use nearest neighbour.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.inspection.drivers import IMAGE_SUFFIXES  # one list: what the agent reads, training reads
from edge_agent.inspection.preprocess import model_input
from edge_agent.promise import FOLDER_CALIBRATION_MAX, FOLDER_CALIBRATION_SHARE

GOOD = "good"
# The validation images never train the flow: they calibrate the NFA's null and its evidence factor, and
# their count bounds what the false-alarm promise can vouch for (about 3 / n). 30 % of a folder, measured
# against 10 % on 210-image folders drawn from magnetic tile (bench/val_fraction.py, docs/nfa.md): unseen
# good tiles flagged 2.0 % [1.3, 2.9] -> 0.8 % [0.4, 1.5] against a promise of 1 %. At most
# DEFAULT_VAL_MAX: 333 images with none flagged vouch for the regions' share of the default promise
# (9 in 1,000, edge_agent.promise.images_needed); more would only take images from the flow.
DEFAULT_VAL_FRACTION = FOLDER_CALIBRATION_SHARE
DEFAULT_VAL_MAX = FOLDER_CALIBRATION_MAX


class DatasetError(ValueError):
    """A dataset that cannot be read as any known layout; the message names the path and the problem."""


@dataclass(frozen=True)
class Record:
    """One image: where it is, its mask (None for good parts), label (0 good, 1 defect), defect type."""

    image: Path
    mask: Path | None
    label: int
    defect_type: str


@dataclass(frozen=True)
class DatasetSplits:
    """Train (good only), validation (good only) and test records of one dataset."""

    layout: str
    root: Path
    train: tuple[Record, ...]
    val: tuple[Record, ...]
    test: tuple[Record, ...]

    def summary(self) -> dict[str, Any]:
        """Counts per split and per defect type, for run configs and the bundle manifest."""
        test_types: dict[str, int] = {}
        for record in self.test:
            test_types[record.defect_type] = test_types.get(record.defect_type, 0) + 1
        return {
            "layout": self.layout,
            "root": str(self.root),
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "test_types": test_types,
        }


def _hash_order(root: Path, paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest())


def hold_out(root: Path, paths: list[Path], fraction: float, most: int | None = None) -> tuple[list[Path], list[Path]]:
    """Split good images into (train, val) deterministically by a hash of their path relative to root.

    ``fraction`` of the images, at most ``most`` (None: no limit), go to validation; at least one when
    there are two or more and ``fraction`` > 0.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if most is not None and most < 1:
        raise ValueError(f"the limit on held-out validation images must be at least 1, got {most}")
    ordered = _hash_order(root, paths)
    count = 0 if fraction == 0 or len(paths) < 2 else max(1, round(len(paths) * fraction))
    count = count if most is None else min(count, most)
    val = set(ordered[:count])
    return [p for p in sorted(paths) if p not in val], sorted(val)


def list_images(directory: Path) -> list[Path]:
    """Image files under a directory, recursively, sorted."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _good(paths: list[Path]) -> tuple[Record, ...]:
    return tuple(Record(image=p, mask=None, label=0, defect_type=GOOD) for p in paths)


def folder_dataset(
    root: Path, val_fraction: float = DEFAULT_VAL_FRACTION, val_max: int | None = DEFAULT_VAL_MAX
) -> DatasetSplits:
    """All images under ``root`` are good parts; a hashed part of them is the validation split."""
    images = list_images(root)
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    train, val = hold_out(root, images, val_fraction, val_max)
    return DatasetSplits("folder", root, _good(train), _good(val), ())


def mvtec_dataset(
    category: Path, val_fraction: float = DEFAULT_VAL_FRACTION, val_max: int | None = DEFAULT_VAL_MAX
) -> DatasetSplits:
    """One MVTec AD category directory (train/good, test/<type>, ground_truth/<type>/<stem>_mask.png)."""
    good_dir = category / "train" / GOOD
    images = list_images(good_dir)
    if not images:
        raise DatasetError(f"MVTec layout: no training images in {good_dir}")
    train, val = hold_out(good_dir, images, val_fraction, val_max)
    test: list[Record] = []
    test_dir = category / "test"
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []:
        for image in list_images(type_dir):
            if type_dir.name == GOOD:
                test.append(Record(image, None, 0, GOOD))
                continue
            mask = category / "ground_truth" / type_dir.name / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise DatasetError(f"MVTec layout: defect image {image} has no mask at {mask}")
            test.append(Record(image, mask, 1, type_dir.name))
    return DatasetSplits("mvtec", category, _good(train), _good(val), tuple(test))


def mvtec3d_dataset(
    category: Path, val_fraction: float = DEFAULT_VAL_FRACTION, val_max: int | None = DEFAULT_VAL_MAX
) -> DatasetSplits:
    """One MVTec 3D-AD category directory, RGB images only (train/good/rgb, validation/good/rgb, test/<type>/rgb+gt)."""
    train_dir = category / "train" / GOOD / "rgb"
    images = list_images(train_dir)
    if not images:
        raise DatasetError(f"MVTec 3D-AD layout: no training images in {train_dir}")
    val_dir = category / "validation" / GOOD / "rgb"
    if val_dir.is_dir():
        train, val = images, list_images(val_dir)
        if not val:
            raise DatasetError(f"MVTec 3D-AD layout: {val_dir} exists but holds no images")
    else:
        train, val = hold_out(train_dir, images, val_fraction, val_max)
    test: list[Record] = []
    test_dir = category / "test"
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []:
        rgb_dir = type_dir / "rgb"
        if not rgb_dir.is_dir():
            raise DatasetError(f"MVTec 3D-AD layout: {type_dir} has no rgb/ folder")
        for image in list_images(rgb_dir):
            if type_dir.name == GOOD:
                test.append(Record(image, None, 0, GOOD))
                continue
            mask = type_dir / "gt" / f"{image.stem}.png"
            if not mask.is_file():
                raise DatasetError(f"MVTec 3D-AD layout: defect image {image} has no mask at {mask}")
            test.append(Record(image, mask, 1, type_dir.name))
    return DatasetSplits("mvtec3d", category, _good(train), _good(val), tuple(test))


def _stem_paths(base: Path, stems: Any, where: str) -> list[Path]:
    if not isinstance(stems, list) or not all(isinstance(s, str) for s in stems):
        raise DatasetError(f"split.json: {where} must be a list of path stems")
    paths = []
    for stem in stems:
        image = base / f"{stem}.jpg"
        if not image.is_file():
            raise DatasetError(f"split.json: {where} lists {stem!r} but {image} does not exist")
        paths.append(image)
    return paths


def split_json_dataset(path: Path) -> DatasetSplits:
    """The split.json layout: stems relative to the json's directory, STEM.jpg image, STEM.png mask."""
    try:
        split = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    missing = [key for key in ("train", "val", "test_good", "test_defect") if key not in split]
    if missing:
        raise DatasetError(f"{path} lacks the key(s) {missing}")
    base = path.parent
    if not isinstance(split["test_defect"], dict):
        raise DatasetError(f"split.json: test_defect must map defect type -> list of stems in {path}")
    test = [Record(p, None, 0, GOOD) for p in _stem_paths(base, split["test_good"], "test_good")]
    for defect_type, stems in split["test_defect"].items():
        for image in _stem_paths(base, stems, f"test_defect.{defect_type}"):
            mask = image.with_suffix(".png")
            if not mask.is_file():
                raise DatasetError(f"split.json: defect image {image} has no mask {mask}")
            test.append(Record(image, mask, 1, defect_type))
    return DatasetSplits(
        "split_json",
        base,
        _good(_stem_paths(base, split["train"], "train")),
        _good(_stem_paths(base, split["val"], "val")),
        tuple(test),
    )


def model_made_masks(path: Path | str) -> list[str]:
    """Defect stems of a split.json whose masks the model drew itself (``mask_source: model``; review.py).

    Empty for other layouts and for split.json files without ``mask_source`` (masks from elsewhere).
    """
    path = Path(path)
    path = path / "split.json" if path.is_dir() else path
    if path.suffix != ".json" or not path.is_file():
        return []
    try:
        sources = json.loads(path.read_text(encoding="utf-8")).get("mask_source") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return []
    return sorted(stem for stem, source in sources.items() if source == "model") if isinstance(sources, dict) else []


def open_dataset(
    path: Path | str, val_fraction: float = DEFAULT_VAL_FRACTION, val_max: int | None = DEFAULT_VAL_MAX
) -> DatasetSplits:
    """Detect the layout of ``path`` (split.json file or dir with one, MVTec 3D-AD or MVTec AD category, image folder).

    ``val_fraction`` of the good images, at most ``val_max``, are held out for validation in the folder
    and MVTec layouts; a split.json lists its own.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset path {path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise DatasetError(f"dataset path {path} is a file but not a split.json")
        return split_json_dataset(path)
    if (path / "split.json").is_file():
        return split_json_dataset(path / "split.json")
    if (path / "train" / GOOD / "rgb").is_dir():
        return mvtec3d_dataset(path, val_fraction, val_max)
    if (path / "train" / GOOD).is_dir():
        return mvtec_dataset(path, val_fraction, val_max)
    categories = sorted(p.name for p in path.iterdir() if (p / "train" / GOOD).is_dir())
    if categories:
        raise DatasetError(
            f"{path} looks like an MVTec AD / 3D-AD root with categories {categories}; pass one category directory"
        )
    return folder_dataset(path, val_fraction, val_max)


def _read_bgr(path: Path) -> np.ndarray:
    data = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if data is None:
        raise DatasetError(f"cannot read image {path} (missing, unreadable or not an image)")
    return data


def load_image(path: Path, height: int, width: int) -> np.ndarray:
    """uint8 HxWx3 RGB at the model size, resized exactly as the agent resizes camera frames."""
    return model_input(_read_bgr(path), height, width)


def load_mask(path: Path | None, height: int, width: int) -> np.ndarray:
    """Boolean HxW defect mask at the model size (nearest neighbour); all False when ``path`` is None."""
    if path is None:
        return np.zeros((height, width), dtype=bool)
    data = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if data is None:
        raise DatasetError(f"cannot read mask {path}")
    return cv2.resize(data, (width, height), interpolation=cv2.INTER_NEAREST) >= 128


def load_images(records: tuple[Record, ...] | list[Record], height: int, width: int) -> np.ndarray:
    """Stack of uint8 NxHxWx3 RGB images at the model size."""
    if not records:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    return np.stack([load_image(r.image, height, width) for r in records])
