"""The belt for part rejects: a pending reject's distance to go, and the PLC's encoder counts.

Shared by the part decisions (relay/parts.py) and the scheduler (relay/firing.py).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from dataclasses import dataclass


@dataclass
class BeltTravel:
    """A pending part reject: the distance still to go, as of a monotonic time."""

    remaining_m: float
    as_of: float  # monotonic
    tolerance_s: float
    target_m: float | None = None  # encoder mode: the belt position (metres) at which the part is at the actuator


def due_in(remaining_m: float, speed: float) -> float:
    """Seconds until the belt has moved ``remaining_m`` at ``speed`` (inf while stopped)."""
    if remaining_m <= 0:
        return 0.0
    return math.inf if speed <= 0 else remaining_m / speed


class Encoder:
    """The belt's position from a PLC's encoder counts (thread-safe): where it was at a time, how fast it runs.

    Counts are assumed to only grow (a 64-bit counter); a smaller count than the last is a reset or a
    reordered message and is refused by :meth:`add`.
    """

    def __init__(self, counts_per_m: float, samples: int = 256) -> None:
        self.counts_per_m = counts_per_m
        self._samples: deque[tuple[float, float]] = deque(maxlen=samples)  # (relay wall time, metres)
        self._lock = threading.Lock()

    def add(self, wall: float, count: int) -> bool:
        """One reading taken at ``wall`` (relay clock); False when refused (older or smaller than the last)."""
        metres = count / self.counts_per_m
        with self._lock:
            if self._samples and (wall <= self._samples[-1][0] or metres < self._samples[-1][1]):
                return False
            self._samples.append((wall, metres))
            return True

    @property
    def ready(self) -> bool:
        """Two readings: a position and a speed."""
        with self._lock:
            return len(self._samples) >= 2

    def speed(self) -> float:
        """m/s over the last readings (at least 0.1 s apart when there are such)."""
        with self._lock:
            last = self._samples[-1]
            first = next((s for s in reversed(self._samples) if last[0] - s[0] >= 0.1), self._samples[0])
        span = last[0] - first[0]
        return (last[1] - first[1]) / span if span > 0 else 0.0

    def position_at(self, wall: float) -> float:
        """Belt position (metres) at ``wall``: interpolated between readings, extrapolated at the last speed."""
        with self._lock:
            samples = list(self._samples)
        if wall >= samples[-1][0] or len(samples) < 2:
            return samples[-1][1] + self.speed() * max(0.0, wall - samples[-1][0])
        if wall <= samples[0][0]:
            return samples[0][1]
        for (t0, p0), (t1, p1) in itertools.pairwise(samples):
            if t0 <= wall <= t1:
                return p0 + (p1 - p0) * (wall - t0) / (t1 - t0)
        return samples[-1][1]
