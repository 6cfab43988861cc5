"""A synthetic conveyor: textured parts (edge_agent/demo/synthetic.py surfaces) riding a belt past a fixed camera.

The belt and its parts are one long "world" image; frame t is the camera's window onto it after the
belt moved t * speed pixels, so parts enter on the right and leave on the left. Some parts carry a
planted defect with a known mask, which gives the ground truth per frame: the defect is fully in
view, partly in view, or not in view. Torch-free (numpy + OpenCV), for ``edge-agent demo``, tests and
benchmarks on machines with no camera.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge_agent.demo.synthetic import DEFECT_KINDS, good_surface, plant_defect

BELT_GREY = 46.0


@dataclass(frozen=True)
class ConveyorSpec:
    """What the camera sees and how the belt moves."""

    width: int = 256
    height: int = 256
    parts: int = 10
    part_size: float = 0.72  # part side as a fraction of the frame height
    gap: float = 0.45  # belt between parts, as a fraction of the part side
    speed_px: int = 8  # belt travel per frame
    defect_parts: tuple[int, ...] = (2, 6)  # 0-based indices of parts with a planted defect
    defect_kinds: tuple[str, ...] = ("scratch", "dark_blob")  # cycled over defect_parts
    seed: int = 0
    fps: float = 25.0

    @property
    def part_px(self) -> int:
        return round(self.part_size * self.height)

    @property
    def pitch_px(self) -> int:
        return round(self.part_px * (1.0 + self.gap))


@dataclass(frozen=True)
class PlacedPart:
    """One part on the belt, in world pixels."""

    index: int
    x: int
    y: int
    kind: str | None  # defect kind, None for a good part
    defect_columns: tuple[int, int] | None = None  # first and last world column of the defect mask


@dataclass(frozen=True)
class ConveyorTruth:
    """Ground truth of a generated video."""

    frames: int
    parts: tuple[PlacedPart, ...]
    defect_frames: tuple[int, ...]  # a defect is entirely in view
    partial_frames: tuple[int, ...]  # a defect is only partly in view (neither good nor defect)
    clean_frames: tuple[int, ...] = field(default=())  # no defect pixel in view

    def defect_part_in_frame(self, frame: int, speed_px: int, width: int) -> PlacedPart | None:
        """The defective part whose defect is at least partly in view in a frame, if any."""
        left = frame * speed_px
        for part in self.parts:
            if part.defect_columns and part.defect_columns[1] >= left and part.defect_columns[0] < left + width:
                return part
        return None


class Conveyor:
    """The belt world for a spec; frames are windows onto it."""

    def __init__(self, spec: ConveyorSpec, good_only: bool = False) -> None:
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 11])
        size, pitch = spec.part_px, spec.pitch_px
        # The first part starts just right of the first frame; the belt runs until the last part left.
        first_x = spec.width
        world_w = first_x + spec.parts * pitch + spec.width
        self.frames = math.ceil((world_w - spec.width) / spec.speed_px) + 1
        world_w = (self.frames - 1) * spec.speed_px + spec.width
        self.world = _belt(rng, spec.height, world_w)
        parts = []
        kinds = spec.defect_kinds or DEFECT_KINDS
        for index in range(spec.parts):
            x = first_x + index * pitch + int(rng.integers(-pitch // 12, pitch // 12 + 1))
            y = (spec.height - size) // 2 + int(rng.integers(-spec.height // 25, spec.height // 25 + 1))
            surface = good_surface(int(rng.integers(2**31)), size, size)
            kind = None
            columns = None
            if not good_only and index in spec.defect_parts:
                kind = kinds[spec.defect_parts.index(index) % len(kinds)]
                surface, mask, kind = plant_defect(surface, np.random.default_rng([spec.seed, 23, index]), kind)
                cols = np.flatnonzero(mask.any(axis=0))
                columns = (x + int(cols[0]), x + int(cols[-1]))
            _place(self.world, surface, x, y)
            parts.append(PlacedPart(index=index, x=x, y=y, kind=kind, defect_columns=columns))
        self.parts = tuple(parts)

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as uint8 BGR."""
        left = index * self.spec.speed_px
        window = self.world[:, left : left + self.spec.width]
        grey = np.clip(np.rint(window), 0, 255).astype(np.uint8)
        return np.asarray(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))

    def truth(self) -> ConveyorTruth:
        """Which frames show a whole defect, part of one, or none."""
        full: list[int] = []
        partial: list[int] = []
        clean: list[int] = []
        width, speed = self.spec.width, self.spec.speed_px
        for index in range(self.frames):
            left, right = index * speed, index * speed + width - 1
            state = "clean"
            for part in self.parts:
                if part.defect_columns is None:
                    continue
                first, last = part.defect_columns
                if first >= left and last <= right:
                    state = "full"
                elif last >= left and first <= right and state != "full":
                    state = "partial"
            {"full": full, "partial": partial, "clean": clean}[state].append(index)
        return ConveyorTruth(self.frames, self.parts, tuple(full), tuple(partial), tuple(clean))

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(self.frames):
            yield self.frame(index)


def _belt(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Dark rubber belt: fine grain plus faint ribs across the direction of travel."""
    grain = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 0.8) * 5.0
    ribs = 3.0 * np.sin(np.arange(width, dtype=np.float32) * (2 * math.pi / 23.0))[None, :]
    return np.asarray(BELT_GREY + grain + ribs, np.float32)


def _place(world: np.ndarray, surface: np.ndarray, x: int, y: int) -> None:
    """Put a part on the belt with a soft shadow along its lower and right edges."""
    size = surface.shape[0]
    shadow = np.zeros((size + 8, size + 8), np.float32)
    shadow[6 : size + 6, 6 : size + 6] = 1.0
    shadow = cv2.GaussianBlur(shadow, (0, 0), 2.5)
    region = world[y : y + size + 8, x : x + size + 8]
    region -= 18.0 * shadow[: region.shape[0], : region.shape[1]]
    world[y : y + size, x : x + size] = surface


def write_video(path: Path, frames: Iterator[np.ndarray] | list[np.ndarray], fps: float, size: tuple[int, int]) -> str:
    """Write BGR frames losslessly (FFV1) when this OpenCV can, else MJPG; returns the codec used."""
    for codec in ("FFV1", "MJPG"):
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*codec), fps, size)
        if writer.isOpened():
            break
        writer.release()
    else:
        raise RuntimeError(f"this OpenCV cannot write video to {path} (no FFV1 or MJPG writer)")
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()
    return codec


def write_conveyor_video(path: Path, spec: ConveyorSpec) -> ConveyorTruth:
    """Render the conveyor for ``spec`` into a video file and return its ground truth."""
    conveyor = Conveyor(spec)
    write_video(Path(path), iter(conveyor), spec.fps, (spec.width, spec.height))
    return conveyor.truth()


def good_training_frames(spec: ConveyorSpec, count: int, seed: int) -> list[np.ndarray]:
    """``count`` frames of good parts only (another belt, other parts), at evenly spread belt positions."""
    # About one distinct part per six frames, so the model sees many part textures, not one part many times.
    parts = max(spec.parts, count // 6)
    good_spec = ConveyorSpec(**{**spec.__dict__, "seed": seed, "defect_parts": (), "parts": parts})
    conveyor = Conveyor(good_spec, good_only=True)
    positions = np.linspace(0, conveyor.frames - 1, count).round().astype(int)
    return [conveyor.frame(int(i)) for i in positions]
