"""A pending part reject's distance to go on the belt (shared by the part decisions and the scheduler)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class BeltTravel:
    """A pending part reject: the distance still to go, as of a monotonic time."""

    remaining_m: float
    as_of: float  # monotonic
    tolerance_s: float


def due_in(remaining_m: float, speed: float) -> float:
    """Seconds until the belt has moved ``remaining_m`` at ``speed`` (inf while stopped)."""
    if remaining_m <= 0:
        return 0.0
    return math.inf if speed <= 0 else remaining_m / speed
