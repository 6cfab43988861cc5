"""A conveyor the contract bundle can judge: parts it passes, one part with a defect it flags.

The contract bundle (tests/contract_bundle.py) flags anything whose 4x4 or 8x8 block means leave the flat
grey level. These frames keep every 8x8-aligned block mean at that grey level while giving the part tracker
what it needs: the belt has column pairs (+a, -a) with random a (a texture whose column profile the belt
motion can be measured on), a part is a pixel checkerboard of +-60 grey levels (foreground to the tracker,
flat to the model), and a defective part carries a dark 16x16 square the model flags. Everything moves by
8 px a frame, so the 8x8 alignment holds in every frame. Frames are lossless PNG files (a folder source).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

GREY = 128.0
STEP = 8  # belt travel per frame (px): a multiple of the largest pooling stride


@dataclass(frozen=True)
class CheckerBelt:
    """Frame size, parts and which of them is defective (0-based)."""

    width: int = 192
    height: int = 128
    parts: int = 4
    part_px: int = 64
    gap_px: int = 64
    defect_parts: tuple[int, ...] = (1,)
    lead_px: int = 96  # empty belt before the first part enters (the tracker learns the belt on it)
    seed: int = 3

    @property
    def frames(self) -> int:
        length = self.lead_px + self.parts * (self.part_px + self.gap_px) + self.width
        return length // STEP

    def part_columns(self, frame: int, index: int) -> tuple[int, int]:
        """Frame columns [x0, x1) of part ``index`` in ``frame`` (unclipped; the belt runs right to left)."""
        x0 = self.width + self.lead_px + index * (self.part_px + self.gap_px) - frame * STEP
        return x0, x0 + self.part_px

    def in_view(self, frame: int, index: int) -> bool:
        x0, x1 = self.part_columns(frame, index)
        return x1 > 0 and x0 < self.width


def write_checker_belt(folder: Path, spec: CheckerBelt) -> Path:
    """The frames as ``000000.png`` ... into ``folder`` (created); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    world_w = spec.width * 2 + spec.lead_px + spec.parts * (spec.part_px + spec.gap_px)
    amplitude = rng.uniform(-8, 8, world_w // 2)
    world = np.full((spec.height, world_w), GREY)
    world += np.repeat(np.stack([amplitude, -amplitude], axis=1).reshape(-1), 1)[None, :world_w]
    top = (spec.height - spec.part_px) // 2 // 8 * 8
    yy, xx = np.mgrid[0 : spec.part_px, 0 : spec.part_px]
    checker = np.where((yy + xx) % 2 == 0, 60.0, -60.0)
    for index in range(spec.parts):
        x0 = spec.width + spec.lead_px + index * (spec.part_px + spec.gap_px)
        world[top : top + spec.part_px, x0 : x0 + spec.part_px] = GREY + checker
        if index in spec.defect_parts:
            world[top + 24 : top + 40, x0 + 24 : x0 + 40] = 20.0
    for frame in range(spec.frames):
        start = frame * STEP
        view = world[:, start : start + spec.width]
        noisy = view[:, :, None] + rng.normal(0.0, 8.0, (spec.height, spec.width, 3))
        image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{frame:06d}.png"), image)
    return folder
