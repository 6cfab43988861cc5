"""Calibration images: which files, and how they become engine inputs.

Calibration must see exactly what the engine sees on the device: uint8 RGB NHWC at the model size,
made by the agent's own preprocessing (``edge_agent.inspection.preprocess.model_input``). Images come from a
folder of good-part images, a text file listing image paths, or a dataset ``split.json`` (its
``train`` list of path stems, STEM.jpg beside the json). Images are picked evenly across the sorted
list, so a run of similar frames at the start of a folder does not dominate the calibration.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.inspection.preprocess import model_input

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class CalibrationDataError(ValueError):
    """The calibration data cannot be used; the message names the path and the problem."""


@dataclass(frozen=True)
class ImageSet:
    """The chosen calibration images and a description of where they came from (recorded in model.json)."""

    paths: tuple[Path, ...]
    source: str
    available: int

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "images": len(self.paths), "available": self.available}


def find_images(data: Path | str, split: str = "train") -> list[Path]:
    """All image paths named by ``data``: a folder (recursively), a .txt list, or a split.json."""
    data = Path(data)
    if not data.exists():
        raise CalibrationDataError(f"calibration data {data} does not exist")
    if data.is_dir():
        paths = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif data.suffix == ".json":
        paths = _split_images(data, split)
    elif data.suffix == ".txt":
        lines = [line.strip() for line in data.read_text(encoding="utf-8").splitlines()]
        paths = [(data.parent / line) for line in lines if line and not line.startswith("#")]
    else:
        raise CalibrationDataError(f"calibration data {data} must be a folder, a .txt list or a split.json")
    if not paths:
        raise CalibrationDataError(f"calibration data {data} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise CalibrationDataError(
            f"calibration data {data}: {len(missing)} listed images are missing, e.g. {missing[0]}"
        )
    return paths


def _split_images(path: Path, split: str) -> list[Path]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CalibrationDataError(f"{path} is not valid JSON: {exc}") from exc
    stems = raw.get(split) if isinstance(raw, dict) else None
    if not isinstance(stems, list) or not all(isinstance(s, str) for s in stems):
        keys = sorted(raw) if isinstance(raw, dict) else []
        raise CalibrationDataError(f"{path} has no list of image stems under {split!r} (keys: {keys})")
    return [_stem_image(path.parent, stem) for stem in stems]


def _stem_image(root: Path, stem: str) -> Path:
    """STEM.jpg (or another image suffix) for a dataset path stem; a stem that has a suffix is kept."""
    candidate = root / stem
    if candidate.suffix.lower() in IMAGE_SUFFIXES:
        return candidate
    for suffix in (".jpg", ".jpeg", ".png", ".bmp"):
        if candidate.with_name(candidate.name + suffix).is_file():
            return candidate.with_name(candidate.name + suffix)
    return candidate.with_name(candidate.name + ".jpg")


def pick_evenly(paths: Sequence[Path], count: int | None) -> list[Path]:
    """``count`` paths spread evenly over the list (all of them when count is None or larger)."""
    if count is None or count >= len(paths):
        return list(paths)
    if count < 1:
        raise CalibrationDataError(f"the number of calibration images must be at least 1, got {count}")
    indices = np.linspace(0, len(paths) - 1, count).round().astype(int)
    return [paths[i] for i in indices]


def select_images(data: Path | str, count: int | None, split: str = "train") -> ImageSet:
    """The calibration images to use, chosen evenly from what ``data`` names."""
    available = find_images(data, split)
    chosen = pick_evenly(available, count)
    source = f"{data}" + (f" [{split}]" if Path(data).suffix == ".json" else "")
    return ImageSet(paths=tuple(chosen), source=source, available=len(available))


def read_model_input(path: Path, height: int, width: int) -> np.ndarray:
    """One image file as the engine takes it: uint8 HxWx3 RGB at the model size."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise CalibrationDataError(f"cannot read calibration image {path} (not an image, or corrupt)")
    return model_input(image, height, width)


def model_batches(images: ImageSet, height: int, width: int) -> Iterator[np.ndarray]:
    """Each image as a 1xHxWx3 uint8 batch, in order, logging progress every 10 %."""
    total = len(images.paths)
    step = max(1, total // 10)
    for index, path in enumerate(images.paths, start=1):
        yield read_model_input(path, height, width)[None]
        if index % step == 0 or index == total:
            log.info(
                "calibration images read",
                extra={"event": "calibration_progress", "done": index, "total": total},
            )


def add_data_arguments(parser: Any, default_images: int) -> None:
    """--data / --images / --split, shared by the calibration commands."""
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="good images: a folder, a .txt list of paths, or a dataset split.json (its --split list)",
    )
    parser.add_argument(
        "--images", type=int, default=default_images, help=f"images to use, picked evenly (default {default_images})"
    )
    parser.add_argument("--split", default="train", help="list to read from a split.json (default train)")
