"""The frames of each tracked part, kept until its decision, so a kept part shows the evidence, not the exit.

A tracked part is decided when it has crossed the decision line: by then the deciding frame shows the
part's tail, or the next part. What a person must see is the frame the decision names: the part message's
strongest region's ``best_sequence`` (edge_agent/inspection/part_verdict.py). This book, fed every
published frame (a pipeline observer, publish thread), holds per part in view:

- its ``KEEP_BEST`` frames with the lowest log10 NFA over the part's columns (the frame job itself: image
  and maps, by reference, no copy), one of which is the decision's best frame in practice;
- a small crop of the part from every frame (``THUMB_HEIGHT`` px high, at most ``MAX_THUMBS``), the contact
  sheet a person scans to see the defect come and go.

``take(part)`` hands both over once the part is decided and forgets the part. Parts the tracker drops
without a decision (noise) are forgotten once out of the tracker (``MAX_PARTS`` bounds the book anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from edge_agent.inspection.pipeline import FrameJob
from edge_agent.messages import PartMessage

KEEP_BEST = 3
THUMB_HEIGHT = 96
MAX_THUMBS = 64
MAX_PARTS = 32


@dataclass(frozen=True)
class PartShot:
    """One frame of a part: the job and the part's columns [x0, x1) in its image."""

    job: FrameJob
    x0: int
    x1: int
    view_log_nfa: float  # the lowest log10 NFA over the part's columns in this frame


@dataclass
class PartRecord:
    """What the book holds for one part."""

    best: list[PartShot] = field(default_factory=list)  # lowest view_log_nfa first
    thumbs: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (sequence, BGR crop)


@dataclass(frozen=True)
class PartEvidence:
    """A decided part's evidence frame and contact sheet."""

    shot: PartShot  # the frame shown (the decision's best frame when it was held)
    named: bool  # True when ``shot`` is the frame the decision names (best_sequence)
    thumbs: tuple[tuple[int, np.ndarray], ...]


def best_sequence(part: PartMessage) -> int | None:
    """The frame the part's decision names: its strongest region's best frame (None without regions)."""
    if not part.regions:
        return None
    return min(part.regions, key=lambda r: r.log_nfa).best_sequence


def thumbnail(crop: np.ndarray) -> np.ndarray:
    """A ``THUMB_HEIGHT`` px high copy of a part's crop, cheap enough for the publish thread.

    Large frames are first thinned by a whole step (every k-th row and column, no copy of the full
    crop), then area-averaged: bench/part_frames.py measures the cost per frame.
    """
    step = max(1, crop.shape[0] // (2 * THUMB_HEIGHT))
    small = crop[::step, ::step]
    scale = THUMB_HEIGHT / small.shape[0]
    size = (max(1, round(small.shape[1] * scale)), THUMB_HEIGHT)
    return cv2.resize(small, size, interpolation=cv2.INTER_AREA)


def view_log_nfa(job: FrameJob, x0: int, x1: int) -> float:
    """The lowest log10 NFA of a frame over the image columns [x0, x1) (map resolution)."""
    log_nfa = job.verdict.log_nfa
    width = job.frame.image.shape[1]
    sx = width / log_nfa.shape[1]
    a = max(0, math.floor(x0 / sx))
    b = min(log_nfa.shape[1], max(a + 1, math.ceil(x1 / sx)))
    return float(np.min(log_nfa[:, a:b]))


class PartFrameBook:
    """Per part in view: its best frames and its thumbnails (publish thread only)."""

    def __init__(self) -> None:
        self._parts: dict[str, PartRecord] = {}
        self._alive_before: frozenset[str] = frozenset()

    def observe(self, job: FrameJob) -> None:
        """Pipeline observer: note the undecided parts in view of this frame."""
        view = job.parts_view
        if view is None:
            return
        image = job.frame.image
        for part_id, x0, x1, decided in view.parts:
            if decided or x1 <= x0:
                continue
            record = self._parts.setdefault(part_id, PartRecord())
            shot = PartShot(job, x0, x1, view_log_nfa(job, x0, x1))
            record.best.append(shot)
            record.best.sort(key=lambda s: s.view_log_nfa)
            del record.best[KEEP_BEST:]
            if len(record.thumbs) < MAX_THUMBS:
                record.thumbs.append((job.frame.sequence, thumbnail(image[:, x0:x1])))
        # A part decided by this frame is announced after the frame's observers: keep it one frame longer.
        alive = view.undecided | {p[0] for p in view.parts}
        alive, self._alive_before = alive | self._alive_before, frozenset(alive)
        for part_id in [p for p in self._parts if p not in alive]:
            del self._parts[part_id]  # dropped by the tracker without a decision (noise)
        while len(self._parts) > MAX_PARTS:
            del self._parts[next(iter(self._parts))]

    def take(self, part: PartMessage) -> PartEvidence | None:
        """The evidence of a decided part (None when none of its frames was seen); forgets the part."""
        record = self._parts.pop(part.part_id, None)
        if record is None or not record.best:
            return None
        named = best_sequence(part)
        shot = next((s for s in record.best if s.job.frame.sequence == named), None)
        return PartEvidence(shot or record.best[0], shot is not None, tuple(record.thumbs))
