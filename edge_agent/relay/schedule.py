"""When to fire: the camera's capture time on the relay's clock, plus the part's travel time.

Two clocks meet here. ``capture_time`` in a message is the camera box's wall clock; the relay fires by
its own. ``offset = relay clock - camera clock``. Each message gives one *sample* of it::

    sample = arrival (relay clock) - capture_time (camera clock) - agent latency (camera's monotonic clock)
           = offset + transit

where the agent latency is the message's own capture-to-publish time (``latency_ms.total - capture``:
the capture stage's read happens before the timestamp) and ``transit`` (network + broker, plus any time
the message waited in a queue) is never negative. So the *smallest* recent sample is the best estimate
of the offset (as in NTP's minimum filter), and a sample that waited in a queue only ever reads too high.

The estimate is used only once ``confirm_samples`` samples lie within ``confirm_spread_s`` of the floor:
live traffic clusters at the floor, while a burst of messages that waited in the broker during a relay
restart is spread out (each waited a different time) and does not confirm a wrong floor. Until then the
last confirmed estimate (kept across restarts for ``keep_s``) or the configured ``clock_offset_s`` is used.

Whatever the offset, a part cannot have been captured later than ``arrival - agent latency``: the
corrected capture time is capped there, so a camera clock that runs ahead can delay a reject by at
most the transit time, never by the size of the clock error.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from edge_agent.messages import InspectionMessage
from edge_agent.relay.config import ClockConfig, DeviceTiming

log = logging.getLogger(__name__)

# A clock warning for one camera is repeated at most this often.
_WARN_EVERY_S = 600.0


@dataclass(frozen=True)
class Plan:
    """When one reject fires, on the relay's wall clock."""

    capture_time: float  # the part passed the camera (relay clock)
    planned_time: float  # fire then
    deadline: float  # not after this: later is a missed reject
    travel_s: float
    offset_s: float  # relay clock - camera clock, as used
    clock_source: str  # configured | estimated | last-estimate, "+arrival-bound" when capped


@dataclass(frozen=True)
class OffsetChoice:
    """The offset a plan uses, and where it came from."""

    offset_s: float
    source: str


class _Latency(Protocol):
    @property
    def total(self) -> float: ...
    @property
    def capture(self) -> float: ...


class ClockSample(Protocol):
    """What the clock estimator reads of a message: an InspectionMessage, or a part's ClockView."""

    @property
    def device_id(self) -> str: ...
    @property
    def capture_time(self) -> float: ...
    @property
    def latency_ms(self) -> _Latency: ...
    @property
    def replayed(self) -> bool: ...


def agent_latency_s(message: ClockSample) -> float:
    """Seconds from the capture timestamp to publishing, measured by the agent on its monotonic clock."""
    latency = message.latency_ms
    return max(0.0, latency.total - latency.capture) / 1000.0


def offset_sample(message: ClockSample, arrival: float) -> float:
    """One sample of (relay clock - camera clock) + transit, from a message that arrived at ``arrival``."""
    return arrival - message.capture_time - agent_latency_s(message)


def plan_fire(message: InspectionMessage, arrival: float, timing: DeviceTiming, offset: OffsetChoice) -> Plan:
    """The fire time and deadline of an anomalous message that arrived at ``arrival`` (relay wall clock)."""
    capture = message.capture_time + offset.offset_s
    bound = arrival - agent_latency_s(message)
    source = offset.source
    if capture > bound:
        capture, source = bound, f"{source}+arrival-bound"
    planned = capture + timing.travel_s
    return Plan(
        capture_time=capture,
        planned_time=planned,
        deadline=planned + timing.tolerance_s,
        travel_s=timing.travel_s,
        offset_s=offset.offset_s,
        clock_source=source,
    )


class ClockEstimator:
    """Minimum-filter estimate of one camera's clock offset, used only when confirmed."""

    def __init__(self, config: ClockConfig) -> None:
        self.config = config
        self._samples: deque[tuple[float, float]] = deque(maxlen=config.window)  # (relay monotonic time, sample)

    def add(self, sample: float, now: float | None = None) -> None:
        """Record one sample taken at monotonic time ``now``."""
        self._samples.append((time.monotonic() if now is None else now, sample))

    def estimate(self, now: float | None = None) -> float | None:
        """The floor of recent samples when enough of them agree with it, else None."""
        now = time.monotonic() if now is None else now
        while self._samples and now - self._samples[0][0] > self.config.max_age_s:
            self._samples.popleft()
        if len(self._samples) < self.config.confirm_samples:
            return None
        values = [sample for _, sample in self._samples]
        floor = min(values)
        agreeing = sum(1 for value in values if value - floor <= self.config.confirm_spread_s)
        return floor if agreeing >= self.config.confirm_samples else None


class ClockOffsets:
    """Per-camera offsets for the planner; thread-safe (the MQTT thread adds, the supervisor reads)."""

    def __init__(self, config: ClockConfig, kept: dict[str, tuple[float, float]] | None = None) -> None:
        """``kept``: device -> (offset, unix time it was confirmed), from the journal of a previous run."""
        self.config = config
        self._lock = threading.Lock()
        self._estimators: dict[str, ClockEstimator] = {}
        horizon = time.time() - config.keep_s
        self._confirmed: dict[str, tuple[float, float]] = {
            device: (offset, at) for device, (offset, at) in (kept or {}).items() if at >= horizon
        }
        self._warned: dict[str, float] = {}
        self._refused: dict[str, int] = {}

    def observe(self, message: ClockSample, arrival: float, configured_s: float) -> OffsetChoice:
        """Take this message's sample (unless replayed) and return the offset to plan it with."""
        device = message.device_id
        if self.config.mode == "fixed":
            return OffsetChoice(configured_s, "configured")
        return self._estimated(device, message, arrival, configured_s)

    def _estimated(self, device: str, message: ClockSample, arrival: float, configured_s: float) -> OffsetChoice:
        with self._lock:
            estimator = self._estimators.setdefault(device, ClockEstimator(self.config))
            # A replayed message sat in the agent's spool: its sample says nothing about the clocks.
            if not message.replayed:
                sample = offset_sample(message, arrival)
                # A sample far from the configured offset is a broken or forged message (latency_ms.total of
                # an hour, a capture_time in the future): one such sample would become the floor.
                if math.isfinite(sample) and abs(sample - configured_s) <= self.config.max_sample_offset_s:
                    estimator.add(sample)
                else:
                    count = self._refused[device] = self._refused.get(device, 0) + 1
                    if count == 1 or count % 1000 == 0:  # a flood of forgeries must not flood the log
                        self._warn_refused(device, sample, configured_s)
            floor = estimator.estimate()
            if floor is not None:
                self._confirmed[device] = (floor, time.time())
                choice = OffsetChoice(floor, "estimated")
            elif device in self._confirmed:
                choice = OffsetChoice(self._confirmed[device][0], "last-estimate")
            else:
                choice = OffsetChoice(configured_s, "configured")
        if floor is not None and abs(floor - configured_s) > self.config.warn_offset_s:
            self._warn_skew(device, floor, configured_s)
        return choice

    def _warn_skew(self, device: str, estimate: float, configured_s: float) -> None:
        now = time.monotonic()
        if now - self._warned.get(device, float("-inf")) < _WARN_EVERY_S:
            return
        self._warned[device] = now
        log.warning(
            "camera %s's clock differs from the relay's by %.3f s (configured %.3f s): corrected by the estimate; "
            "run NTP/chrony on both",
            device,
            estimate,
            configured_s,
            extra={
                "event": "relay_clock_skew",
                "device_id": device,
                "estimated_offset_s": round(estimate, 4),
                "configured_offset_s": configured_s,
            },
        )

    def _warn_refused(self, device: str, sample: float, configured_s: float) -> None:
        log.warning(
            "clock sample from %s refused: %.3f s from the configured offset (limit clock.max_sample_offset_s)",
            device,
            sample - configured_s,
            extra={
                "event": "relay_clock_sample_refused",
                "device_id": device,
                "sample_s": sample if math.isfinite(sample) else str(sample),
                "configured_offset_s": configured_s,
                "limit_s": self.config.max_sample_offset_s,
            },
        )

    def refused(self, device: str) -> int:
        """Clock samples of one camera refused so far (clock.max_sample_offset_s)."""
        with self._lock:
            return self._refused.get(device, 0)

    def confirmed(self) -> dict[str, tuple[float, float]]:
        """device -> (confirmed offset, unix time), to keep across a restart."""
        with self._lock:
            return dict(self._confirmed)
