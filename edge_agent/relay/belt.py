"""The belt for part rejects: a pending reject's distance to go, and the PLC's encoder counts.

Shared by the part decisions (relay/parts.py) and the scheduler (relay/firing.py).

Nothing the PLC sends is believed as sent (issue 24): a reading that would move the belt faster than
``belt.max_speed_m_s`` since the last one is refused (one forged ``{"count": 10**15}`` must not fire every
pending reject at once), and a smaller count is refused too, until ``belt.encoder_reset_readings`` readings
in a row agree with each other: that is a genuine counter reset (a PLC restart), accepted so that the relay
is not locked out. The position stays continuous across a reset (the belt did not jump), so the targets of
pending rejects keep their meaning.
"""

from __future__ import annotations

import enum
import itertools
import math
import threading
from collections import deque
from dataclasses import dataclass

# A reading may run ahead of max_speed x elapsed by this much time's worth of travel: the PLC's own
# sampling and the network add jitter to the arrival times the step is measured against.
STEP_SLACK_S = 0.05


@dataclass
class BeltTravel:
    """A pending part reject: the distance still to go, as of a monotonic time."""

    remaining_m: float
    as_of: float  # monotonic
    tolerance_s: float
    target_m: float | None = None  # encoder mode: the belt position (metres) at which the part is at the actuator
    held_since: float | None = None  # monotonic: since when a stopped belt holds it (belt.max_hold_s bounds it)


def due_in(remaining_m: float, speed: float) -> float:
    """Seconds until the belt has moved ``remaining_m`` at ``speed`` (inf while stopped).

    Negative when the distance is already behind (``remaining_m < 0``) at a known speed: the part passed
    the actuator that long ago, which makes the reject late, never "due now".
    """
    if speed > 0:
        return remaining_m / speed
    return 0.0 if remaining_m == 0 else (-math.inf if remaining_m < 0 else math.inf)


class Reading(enum.Enum):
    """What :meth:`Encoder.add` did with a reading."""

    ACCEPTED = "accepted"
    REFUSED = "refused"  # older, smaller, or a step faster than max_speed_m_s
    RESET = "reset"  # the last readings agree among themselves: the counter was reset, now followed


class Encoder:
    """The belt's position from a PLC's encoder counts (thread-safe): where it was at a time, how fast it runs."""

    def __init__(
        self, counts_per_m: float, max_speed_m_s: float = math.inf, reset_readings: int = 5, samples: int = 256
    ) -> None:
        self.counts_per_m = counts_per_m
        self.max_speed_m_s = max_speed_m_s
        self.reset_readings = reset_readings
        self._samples: deque[tuple[float, float]] = deque(maxlen=samples)  # (relay wall time, metres)
        self._last_raw: float | None = None  # metres as counted, before the reset offset
        self._offset_m = 0.0  # added to the counted metres: keeps the position continuous across resets
        self._candidates: list[tuple[float, float]] = []  # refused readings that may be a counter reset
        self.resets = 0
        self._lock = threading.Lock()

    def _plausible(self, earlier: tuple[float, float], later: tuple[float, float]) -> bool:
        """``later`` can follow ``earlier`` (wall, counted metres) on a belt no faster than max_speed_m_s."""
        elapsed = later[0] - earlier[0]
        step = later[1] - earlier[1]
        return elapsed > 0 and 0 <= step <= self.max_speed_m_s * (elapsed + STEP_SLACK_S)

    def add(self, wall: float, count: int) -> Reading:
        """One reading taken at ``wall`` (relay clock)."""
        raw = count / self.counts_per_m
        with self._lock:
            if self._last_raw is None or self._plausible((self._samples[-1][0], self._last_raw), (wall, raw)):
                self._samples.append((wall, raw + self._offset_m))
                self._last_raw = raw
                self._candidates.clear()
                return Reading.ACCEPTED
            if self._candidates and not self._plausible(self._candidates[-1], (wall, raw)):
                self._candidates.clear()
            self._candidates.append((wall, raw))
            if len(self._candidates) < self.reset_readings:
                return Reading.REFUSED
            # A counter reset: continue from where the belt was (extrapolated to the first new reading).
            first_wall, first_raw = self._candidates[0]
            continued = self._extrapolate(first_wall)
            self._offset_m = continued - first_raw
            for candidate_wall, candidate_raw in self._candidates:
                self._samples.append((candidate_wall, candidate_raw + self._offset_m))
            self._last_raw = self._candidates[-1][1]
            self._candidates.clear()
            self.resets += 1
            return Reading.RESET

    @property
    def ready(self) -> bool:
        """Two readings: a position and a speed."""
        with self._lock:
            return len(self._samples) >= 2

    def speed(self) -> float:
        """m/s over the last readings (at least 0.1 s apart when there are such)."""
        with self._lock:
            return self._speed()

    def _speed(self) -> float:
        last = self._samples[-1]
        first = next((s for s in reversed(self._samples) if last[0] - s[0] >= 0.1), self._samples[0])
        span = last[0] - first[0]
        return (last[1] - first[1]) / span if span > 0 else 0.0

    def _extrapolate(self, wall: float) -> float:
        last = self._samples[-1]
        return last[1] + self._speed() * max(0.0, wall - last[0])

    def position_at(self, wall: float) -> float:
        """Belt position (metres) at ``wall``: interpolated between readings, extrapolated at the last speed."""
        with self._lock:
            samples = list(self._samples)
            speed = self._speed()
        if wall >= samples[-1][0] or len(samples) < 2:
            return samples[-1][1] + speed * max(0.0, wall - samples[-1][0])
        if wall <= samples[0][0]:
            return samples[0][1]
        for (t0, p0), (t1, p1) in itertools.pairwise(samples):
            if t0 <= wall <= t1:
                return p0 + (p1 - p0) * (wall - t0) / (t1 - t0)
        return samples[-1][1]

    def time_at(self, position: float) -> float:
        """When (relay wall clock) the belt was or will be at ``position``: interpolated between readings,
        extrapolated at the last speed ahead (inf while stopped), the first reading's time before them."""
        with self._lock:
            samples = list(self._samples)
            speed = self._speed()
        last_wall, last_position = samples[-1]
        if position > last_position:
            return last_wall + (position - last_position) / speed if speed > 0 else math.inf
        if position <= samples[0][1]:
            return samples[0][0]
        for (t0, p0), (t1, p1) in itertools.pairwise(samples):
            if p0 < position <= p1:
                return t0 + (t1 - t0) * (position - p0) / (p1 - p0)
        return last_wall
