"""Which inspected frames a good-only recording may write: none that shows a defective or undecided part.

A recording with ``only_good`` fills the training set of the next model: one defective part in it teaches
the model that the defect is normal. In frame mode (``[parts] mode = "off"``) and triggered mode a frame's
own verdict is the verdict of what it shows. In tracked mode a part is decided only after it crossed the
decision line, many frames after it entered: a frame is good only when its own verdict passed *and*
every part in it was decided good. So the gate holds a frame until the parts in it are decided:

- a part decided anomalous rejects every held frame it is in (counted ``flagged``);
- a frame whose parts are all decided good is released to the writer (in capture order);
- a part the tracker dropped without a decision (noise, seen in too few frames), or a part whose decision
  this gate never saw (decided before the recording began), rejects its frames (counted ``undecided``);
- at most ``MAX_HELD`` frames are held (a slow belt or long parts): the oldest is then given up (``undecided``).

Spacing (``every_s``) is by the frame's own clock (``frame_clock``: capture time of a live camera, the
time in the file of a video file), applied when a frame is offered, so held frames are already spaced.
Single-threaded: the agent calls it on the publish thread (bookkeeping only: no pixels are touched);
writing happens elsewhere (``release`` hands the frames on).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from edge_agent.inspection.drivers import Frame

MAX_HELD = 64  # frames waiting for their parts' decisions (references, not copies)
MAX_DECISIONS = 1024  # part verdicts remembered (a decided part may stay in view a while)


def frame_clock(frame: Frame) -> float:
    """The time a recording spaces frames by: the time in the file for files, else the capture time."""
    return frame.media_time if frame.media_time is not None else frame.capture_time


@dataclass
class HeldFrame:
    """A frame that passed its own inspection and waits for its parts' decisions."""

    image: np.ndarray
    sequence: int
    clock: float
    parts: frozenset[str]


Release = Callable[[HeldFrame], None]  # a frame that may be written
Skip = Callable[[str], None]  # a frame that may not, and why ("flagged", "undecided", "too_soon")


@dataclass
class RecordGate:
    """Holds frames until their parts are decided; see the module docstring."""

    release: Release
    skip: Skip
    every_s: float = 0.0
    _held: list[HeldFrame] = field(default_factory=list)
    _decided: OrderedDict[str, bool] = field(default_factory=OrderedDict)  # part id -> anomalous
    _alive: frozenset[str] = frozenset()  # undecided parts of the tracker at the last frame
    _alive_before: frozenset[str] = frozenset()  # ... and at the frame before it
    _last_clock: float | None = None

    @property
    def held(self) -> int:
        """Frames waiting for a decision now."""
        return len(self._held)

    def offer(
        self,
        image: np.ndarray,
        sequence: int,
        clock: float,
        passed: bool,
        parts: Iterable[str] = (),
        alive: Iterable[str] | None = None,
    ) -> None:
        """One inspected frame: its verdict, the part ids in it, and the tracker's undecided parts.

        ``alive`` is None outside tracked mode: the frame's own verdict then decides at once.
        """
        if alive is not None:
            self._alive_before, self._alive = self._alive, frozenset(alive)
        if not passed:
            self.skip("flagged")
        elif self._last_clock is not None and clock - self._last_clock < self.every_s:
            self.skip("too_soon")
        else:
            self._last_clock = clock
            held = HeldFrame(image, sequence, clock, frozenset(parts) if alive is not None else frozenset())
            self._held.append(held)
            if len(self._held) > MAX_HELD:
                self._held.pop(0)
                self.skip("undecided")
        self._resolve()

    def part_decided(self, part_id: str, anomalous: bool) -> None:
        """A part's verdict (tracked mode): releases or rejects the frames that wait for it."""
        self._decided[part_id] = anomalous
        self._decided.move_to_end(part_id)
        while len(self._decided) > MAX_DECISIONS:
            self._decided.popitem(last=False)
        self._resolve()

    def abandon(self) -> None:
        """The recording ends: frames still waiting are not written (their parts are undecided)."""
        for _ in self._held:
            self.skip("undecided")
        self._held.clear()

    def _state(self, part_id: str) -> str:
        if part_id in self._decided:
            return "anomalous" if self._decided[part_id] else "good"
        # A part decided by the last frame is announced right after it: it must be gone for two frames.
        if part_id in self._alive or part_id in self._alive_before:
            return "waiting"
        return "lost"

    def _resolve(self) -> None:
        # In capture order: a frame is written only once every earlier held frame is settled, so spacing
        # and the near-duplicate test see frames in the order they were taken.
        while self._held:
            states = {self._state(p) for p in self._held[0].parts}
            if "anomalous" in states:
                self.skip("flagged")
            elif "lost" in states:
                self.skip("undecided")
            elif "waiting" in states:
                self._reject_decided_later()
                return
            else:
                self.release(self._held[0])
            self._held.pop(0)

    def _reject_decided_later(self) -> None:
        """Frames behind a waiting one that already show an anomalous part are dropped now (less memory)."""
        keep = [self._held[0]]
        for held in self._held[1:]:
            states = {self._state(p) for p in held.parts}
            if "anomalous" in states or "lost" in states:
                self.skip("flagged" if "anomalous" in states else "undecided")
            else:
                keep.append(held)
        self._held = keep
