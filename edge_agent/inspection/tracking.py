"""Parts on a moving belt: found against the empty belt, followed along the belt axis, decided once.

Three pieces, each O(pixels) numpy/OpenCV per frame (``bench/parts.py`` measures the cost):

- :class:`BeltModel`: the empty belt, per image row. The belt moves along x, so its texture moves too
  and no pixel of the frame sees a stationary background; what *is* stationary is each row's grey
  level distribution (the belt's material, the lighting across the belt). The model is a robust mean
  and spread per row (median and 1.4826 x MAD), learned from the first frames (the belt is empty at
  start-up) and then updated slowly from the columns that hold no part (lighting drift). A pixel is
  foreground when it differs from its row's belt level by more than ``threshold_sigma`` spreads and
  ``min_contrast`` grey levels; a column belongs to a part when enough of its rows are foreground.
  docs/parts.md says why this and not a per-pixel model or the anomaly map's complement.
- :class:`BeltMotion`: belt displacement per frame, configured (px/s, times the capture interval) or
  measured by phase correlation of consecutive frames' column profiles (1-D, along the belt axis).
- :class:`PartTracker`: assigns a ``part_id`` when a part enters, matches parts from frame to frame in
  *belt coordinates* (a point on the belt keeps its belt coordinate ``u`` while it rides through the
  view: ``x = u - B`` for a belt moving right to left, ``B`` the belt's travel so far), and decides a
  part once its trailing edge has crossed the decision line (by default the exit edge: it left).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

import cv2
import numpy as np

from edge_agent.config import PartsConfig

Direction = Literal["right_to_left", "left_to_right"]
_MAD_TO_SIGMA = 1.4826
_UPDATE_EVERY = 8  # frames between updates of the belt model


# The ``[parts]`` section's defaults: the config holds them, the mirror below repeats none of them.
_PARTS_DEFAULTS = PartsConfig()


@dataclass(frozen=True)
class TrackingSettings:
    """How parts are found and followed: a mirror of the ``[parts]`` section, built by field name
    (``from_config``), with the section's defaults; ``merge_gap_px`` and ``background_rate`` are not config keys.
    """

    direction: Direction = _PARTS_DEFAULTS.direction
    background_frames: int = _PARTS_DEFAULTS.background_frames  # frames of empty belt learned at start
    # foreground: |grey - belt level of the row| > threshold_sigma spreads and > min_contrast grey levels
    threshold_sigma: float = _PARTS_DEFAULTS.threshold_sigma
    min_contrast: float = _PARTS_DEFAULTS.min_contrast
    column_fill: float = _PARTS_DEFAULTS.column_fill  # a column is part when this share of its rows is foreground
    min_part_px: int = _PARTS_DEFAULTS.min_part_px  # shorter runs of part columns (along the belt) are noise
    merge_gap_px: int = 6  # part columns closer than this belong to one part
    decision_line: float = _PARTS_DEFAULTS.decision_line  # from the exit edge, fraction of the width
    speed_px_s: float | None = _PARTS_DEFAULTS.speed_px_s  # None: measured by phase correlation
    min_frames: int = _PARTS_DEFAULTS.min_frames  # a part seen in fewer frames is noise, not decided
    background_rate: float = 0.02  # per-frame weight of new belt columns in the belt model

    @classmethod
    def from_config(cls, config: PartsConfig) -> TrackingSettings:
        """Every field the section has, by name (a field added to both is carried without another line here)."""
        keys = type(config).model_fields
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if f.name in keys})

    def __post_init__(self) -> None:
        if self.background_frames < 1:
            raise ValueError("background_frames must be at least 1")
        if not 0.0 < self.column_fill < 1.0:
            raise ValueError(f"column_fill must lie in (0, 1), got {self.column_fill}")
        if not 0.0 <= self.decision_line < 1.0:
            raise ValueError(f"decision_line must lie in [0, 1), got {self.decision_line}")
        if self.speed_px_s is not None and not (math.isfinite(self.speed_px_s) and self.speed_px_s >= 0):
            raise ValueError(f"speed_px_s must be a finite number >= 0, got {self.speed_px_s}")


def grey_of(image: np.ndarray) -> np.ndarray:
    """uint8 grey of a BGR or grey frame (the column fill, not single pixels, decides: no blur needed)."""
    if image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return image


@dataclass(frozen=True)
class Detection:
    """One part in one frame, in frame pixels: columns [x0, x1), rows [y0, y1)."""

    x0: int
    x1: int
    y0: int
    y1: int
    clipped_low: bool  # touches x = 0 (may continue outside the view)
    clipped_high: bool  # touches the right border


class BeltModel:
    """Per-row belt level and spread (see the module docstring)."""

    def __init__(self, settings: TrackingSettings) -> None:
        self.settings = settings
        self._learning: list[np.ndarray] = []
        self.level: np.ndarray | None = None  # float32 (H,)
        self.spread: np.ndarray | None = None
        self._level_image: np.ndarray | None = None  # uint8 (H, W): the level broadcast, for cv2.absdiff
        self._limit_image: np.ndarray | None = None
        self._frames = 0

    @property
    def ready(self) -> bool:
        return self.level is not None

    def learn(self, grey: np.ndarray) -> bool:
        """Add one start-up frame; True once the model is ready."""
        self._learning.append(grey)
        if len(self._learning) < self.settings.background_frames:
            return False
        stack = np.concatenate(self._learning, axis=1).astype(np.float32)  # rows x (frames * width)
        level = np.median(stack, axis=1)
        mad = np.median(np.abs(stack - level[:, None]), axis=1)
        self.spread = np.maximum(mad * _MAD_TO_SIGMA, 1.0).astype(np.float32)
        self._set_level(level.astype(np.float32), grey.shape[1])
        self._learning.clear()
        return True

    def _set_level(self, level: np.ndarray, width: int) -> None:
        assert self.spread is not None
        self.level = level
        limit = np.maximum(self.settings.threshold_sigma * self.spread, self.settings.min_contrast)
        self._level_image = np.repeat(np.clip(np.rint(level), 0, 255).astype(np.uint8)[:, None], width, axis=1)
        self._limit_image = np.repeat(np.clip(np.floor(limit), 0, 255).astype(np.uint8)[:, None], width, axis=1)

    def foreground(self, grey: np.ndarray) -> np.ndarray:
        """uint8 mask, 1 where a pixel is not belt."""
        assert self._level_image is not None and self._limit_image is not None
        if grey.shape != self._level_image.shape:
            raise ValueError(f"frame is {grey.shape} but the belt model was learned on {self._level_image.shape}")
        diff = cv2.absdiff(grey, self._level_image)
        return cv2.compare(diff, self._limit_image, cv2.CMP_GT) // 255

    def update(self, grey: np.ndarray, parts: list[Detection]) -> None:
        """Move the model slowly towards this frame's belt columns (lighting drift); parts excluded."""
        assert self.level is not None
        self._frames += 1
        if self._frames % _UPDATE_EVERY:
            return  # lighting drifts over minutes: a look every few frames is plenty and keeps the cost down
        width = grey.shape[1]
        sums: np.ndarray = cv2.reduce(grey, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32F).ravel()
        columns = width
        for det in parts:  # row sums minus the part columns (with a margin for shadows)
            x0, x1 = max(0, det.x0 - 4), min(width, det.x1 + 4)
            sums -= cv2.reduce(grey[:, x0:x1], 1, cv2.REDUCE_SUM, dtype=cv2.CV_32F).ravel()
            columns -= x1 - x0
        if columns < max(4, width // 8):
            return
        rate = min(1.0, self.settings.background_rate * _UPDATE_EVERY)
        self._set_level(((1.0 - rate) * self.level + rate * sums / columns).astype(np.float32), width)


def find_parts(mask: np.ndarray, settings: TrackingSettings) -> list[Detection]:
    """Runs of part columns in a 0/1 foreground mask (vectorised), with the rows each run covers."""
    height, width = mask.shape
    counts = cv2.reduce(mask, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
    occupied = counts > settings.column_fill * height
    if not occupied.any():
        return []
    edges = np.diff(np.concatenate(([0], occupied.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    # Close small gaps (a dark defect or a scratch across the part must not split it in two).
    keep = np.concatenate(([True], starts[1:] - ends[:-1] >= settings.merge_gap_px))
    run_starts = starts[keep]
    run_ends = np.maximum.reduceat(ends, np.flatnonzero(keep))
    parts = []
    for x0, x1 in zip(run_starts.tolist(), run_ends.tolist(), strict=True):
        if x1 - x0 < settings.min_part_px and x0 > 0 and x1 < width:
            continue  # short runs at a border are parts entering or leaving, kept
        rows = cv2.reduce(mask[:, x0:x1], 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
        rows = np.flatnonzero(rows > settings.column_fill * (x1 - x0))
        if rows.size == 0:
            continue
        parts.append(Detection(x0, x1, int(rows[0]), int(rows[-1]) + 1, x0 == 0, x1 == width))
    return parts


def profile_shift(previous: np.ndarray, current: np.ndarray, window: np.ndarray) -> tuple[float, float]:
    """Shift (px, current relative to previous) of two column profiles by 1-D phase correlation, and the peak.

    The belt and its parts move rigidly along x, so each frame's column means are the previous frame's
    shifted: phase correlation finds the shift to a small fraction of a pixel (parabolic peak
    refinement) at a fraction of the cost of the 2-D ``cv2.phaseCorrelate``.
    """
    a = (previous - previous.mean()) * window
    b = (current - current.mean()) * window
    cross = np.fft.rfft(b) * np.conj(np.fft.rfft(a))
    cross /= np.abs(cross) + 1e-9
    corr = np.fft.irfft(cross, n=a.size)
    k = int(np.argmax(corr))
    left, peak, right = corr[k - 1], corr[k], corr[(k + 1) % a.size]
    curvature = left - 2.0 * peak + right
    shift = k + (0.5 * (left - right) / curvature if curvature < 0 else 0.0)
    if shift > a.size / 2:
        shift -= a.size
    return float(shift), float(peak)


class BeltMotion:
    """Belt travel per frame in pixels along the direction of travel (>= 0 when the belt runs forward)."""

    def __init__(self, settings: TrackingSettings) -> None:
        self.settings = settings
        self._previous: np.ndarray | None = None
        self._window: np.ndarray | None = None
        self._last_time: float | None = None
        self.last_px = 0.0
        self.last_peak = 0.0

    def step(self, grey: np.ndarray, capture_time: float) -> float:
        """Travel since the previous frame (0 on the first frame)."""
        if self.settings.speed_px_s is not None:
            dt = 0.0 if self._last_time is None else max(0.0, capture_time - self._last_time)
            self._last_time = capture_time
            self.last_px = self.settings.speed_px_s * dt
            return self.last_px
        profile = cv2.reduce(grey, 0, cv2.REDUCE_AVG, dtype=cv2.CV_32F).ravel()
        if self._window is None or self._window.size != profile.size:
            self._window = np.hanning(profile.size).astype(np.float32)
        previous, self._previous = self._previous, profile
        if previous is None or previous.size != profile.size:
            self.last_px = 0.0
            return 0.0
        shift, self.last_peak = profile_shift(previous, profile, self._window)
        travel = -shift if self.settings.direction == "right_to_left" else shift
        # A weak peak (an empty, featureless belt) keeps the last estimate; a belt never runs backwards here.
        if self.last_peak >= 0.1 and math.isfinite(travel):
            self.last_px = max(0.0, travel)
        return self.last_px


@dataclass
class Track:
    """One part followed through the view, in belt coordinates (u) along the direction of travel."""

    part_id: str
    number: int
    u0: float  # leading edge (downstream end) in belt coordinates
    u1: float  # trailing edge
    y0: int
    y1: int
    first_frame: int
    first_capture_time: float
    last_frame: int
    frames: int = 1
    missed: int = 0
    full_view: bool = False  # seen once with both ends in view
    decided: bool = False  # past the decision line: still drawn while in view, never decided again
    sequences: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TrackedPart:
    """A part's place in one frame: where it is, in frame pixels (for evidence and drawing)."""

    track: Track
    x0: int  # frame columns [x0, x1) the part occupies (clipped to the view)
    x1: int
    origin_x: float  # frame x of the part's leading edge: the origin of part coordinates (docs/parts.md)


@dataclass(frozen=True)
class DecidedPart:
    """A part that crossed the decision line (or left the view)."""

    track: Track
    decision_frame: int
    leading_x: float  # frame x of the part's leading edge at the decision (may be outside the view)
    trailing_x: float
    decision_line_x: float


class PartTracker:
    """Frame by frame: belt travel, part detection, matching, entry and decision (single thread)."""

    def __init__(self, settings: TrackingSettings, width: int, id_prefix: str = "", first_number: int = 1) -> None:
        self.settings = settings
        self.width = width
        self.belt = BeltModel(settings)
        self.motion = BeltMotion(settings)
        self.travel = 0.0  # B: belt travel since start, px
        self.tracks: list[Track] = []
        self.retired: list[Track] = []  # decided, still (partly) in view: their detections are not new parts
        self.noise = 0  # tracks dropped for being seen in fewer than min_frames
        self._numbers = first_number - 1
        self._prefix = id_prefix
        self.decision_x = self._decision_x()

    @property
    def next_number(self) -> int:
        """The count the next new part gets (a new tracker continues from it: ids stay unique)."""
        return self._numbers + 1

    def _decision_x(self) -> float:
        offset = self.settings.decision_line * self.width
        return offset if self.settings.direction == "right_to_left" else self.width - offset

    # Frame x <-> belt coordinate u, where u grows upstream (against the travel) for both directions.
    def to_u(self, x: float) -> float:
        return x + self.travel if self.settings.direction == "right_to_left" else (self.width - x) + self.travel

    def to_x(self, u: float) -> float:
        return u - self.travel if self.settings.direction == "right_to_left" else self.width - (u - self.travel)

    def update(
        self, image: np.ndarray, sequence: int, capture_time: float
    ) -> tuple[list[TrackedPart], list[DecidedPart]]:
        """One frame: the parts in view now, and those decided by this frame (in order of travel)."""
        grey = grey_of(image)
        self.travel += self.motion.step(grey, capture_time)
        if not self.belt.ready:
            self.belt.learn(grey)
            return [], []
        mask = self.belt.foreground(grey)
        detections = find_parts(mask, self.settings)
        self.belt.update(grey, detections)
        in_view = self._match(detections, sequence, capture_time)
        return in_view, self._decide(sequence)

    def _match(self, detections: list[Detection], sequence: int, capture_time: float) -> list[TrackedPart]:
        matched: set[int] = set()
        in_view: list[TrackedPart] = []
        self.retired = [t for t in self.retired if self._visible(t)]
        for det in detections:
            ua, ub = sorted((self.to_u(det.x0), self.to_u(det.x1)))
            old = next((t for t in self.retired if min(ub, t.u1) - max(ua, t.u0) > 0), None)
            if old is not None:
                in_view.append(TrackedPart(old, det.x0, det.x1, self.to_x(old.u0)))
                continue
            best, overlap = None, 0.0
            for index, track in enumerate(self.tracks):
                if index in matched:
                    continue
                common = min(ub, track.u1) - max(ua, track.u0)
                if common > overlap:
                    best, overlap = index, common
            if best is None:
                self._numbers += 1
                track = Track(
                    part_id=f"{self._prefix}{self._numbers}",
                    number=self._numbers,
                    u0=ua,
                    u1=ub,
                    y0=det.y0,
                    y1=det.y1,
                    first_frame=sequence,
                    first_capture_time=capture_time,
                    last_frame=sequence,
                )
                self.tracks.append(track)
                best = len(self.tracks) - 1
            else:
                track = self.tracks[best]
                track.frames += 1
                track.missed = 0
                track.last_frame = sequence
                # A border-clipped detection only says the part is at least this long.
                upstream_clipped = det.clipped_high if self.settings.direction == "right_to_left" else det.clipped_low
                downstream_clipped = det.clipped_low if self.settings.direction == "right_to_left" else det.clipped_high
                if not downstream_clipped and not track.full_view:
                    track.u0 = ua
                if upstream_clipped:
                    track.u1 = max(track.u1, ub)
                else:
                    if not downstream_clipped:
                        track.full_view = True
                    track.u1 = ub if track.full_view else max(track.u1, ub)
                track.y0, track.y1 = min(track.y0, det.y0), max(track.y1, det.y1)
            track.sequences.append(sequence)
            matched.add(best)
            in_view.append(TrackedPart(track, det.x0, det.x1, self.to_x(track.u0)))
        for index, track in enumerate(self.tracks):
            if index not in matched:
                track.missed += 1
        return in_view

    def _decide(self, sequence: int) -> list[DecidedPart]:
        decided, kept = [], []
        for track in self.tracks:
            trailing_x = self.to_x(track.u1)
            passed = (
                trailing_x <= self.decision_x
                if self.settings.direction == "right_to_left"
                else trailing_x >= self.decision_x
            )
            lost = track.missed > 3
            if passed or lost:
                track.decided = True
                self.retired.append(track)
                if track.frames >= self.settings.min_frames:
                    decided.append(DecidedPart(track, sequence, self.to_x(track.u0), trailing_x, self.decision_x))
                else:
                    self.noise += 1
            else:
                kept.append(track)
        self.tracks = kept
        return sorted(decided, key=lambda d: d.track.number)

    def _visible(self, track: Track) -> bool:
        a, b = sorted((self.to_x(track.u0), self.to_x(track.u1)))
        return b > 0 and a < self.width

    def flush(self, sequence: int) -> list[DecidedPart]:
        """At the end of the stream: decide every part still in view (enough frames) now."""
        decided = [
            DecidedPart(t, sequence, self.to_x(t.u0), self.to_x(t.u1), self.decision_x)
            for t in self.tracks
            if t.frames >= self.settings.min_frames
        ]
        self.noise += len(self.tracks) - len(decided)
        self.tracks = []
        return decided
