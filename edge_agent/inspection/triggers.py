"""Triggered mode: one inspection per trigger (a photo-eye, a PLC), the frame chosen by capture time.

A trigger at time T asks for the first frame captured at or after ``T + trigger_delay_s`` (the part
reaches the camera's view that long after the photo-eye) and no later than ``T + delay + trigger_timeout_s``.
The capture stage offers every frame to :meth:`TriggerBook.take`; frames no trigger asked for are not
inspected. A trigger that gets no frame inside its window is reported missed (a ``part`` message with
``status = "no_frame"`` and a log line), never dropped silently, and never served by a later frame: that
frame shows another part. Triggers are kept in time order whatever order they arrive in (three sources),
each expires on its own, and a trigger dated in the future (beyond ``MAX_FUTURE_SKEW_S`` of clock skew) is
refused: it would otherwise sit in front of the real ones (issue 24, finding 2). Triggers closer together
than the camera's frame interval (more triggers than frames) are counted as a *storm*: each frame serves
one trigger, so some of them will be missed, and the count says why.

Sources, each calling :meth:`TriggerBook.add` from its own thread:

- MQTT ``<prefix>/<device_id>/trigger`` (a PLC gateway): the agent's publisher subscribes;
- HTTP ``POST /trigger`` on the agent's HTTP server (local tools);
- a GPIO line through libgpiod's Python bindings (v2 API: ``gpiod.request_lines`` with edge detection),
  :class:`GpioTrigger`. Where no chip is available (containers, CI: no ``gpio-sim`` in the kernel) the
  same code runs against any object with the request's ``wait_edge_events``/``read_edge_events``/
  ``release`` methods; the tests use such a fake chip.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from edge_agent.messages import (
    MAX_PART_REGIONS,
    PartFrames,
    PartMessage,
    PayloadError,
    Region,
    TriggerMessage,
    parse_json_object,
)

log = logging.getLogger(__name__)

MAX_TRIGGER_BYTES = 2048
MAX_PENDING = 256  # triggers waiting for a frame; beyond this the oldest is reported missed
MAX_PAST_S = 5.0  # a trigger time further back than this is refused (a wrong clock, a message stuck somewhere)
# A trigger time ahead of now by more than this is refused: the PLC gateway's clock may differ from the box's by
# a few ms under NTP, never by more; a future trigger would wait in front of the real ones.
MAX_FUTURE_SKEW_S = 0.005


class TriggerRefused(ValueError):
    """A trigger payload that is not a trigger; the text says why."""


@dataclass(frozen=True)
class Trigger:
    """One trigger: when (unix s), from where, an optional id."""

    time: float
    source: str
    trigger_id: str | None = None


@dataclass
class TriggerCounters:
    received: int = 0
    served: int = 0
    missed: int = 0
    storm: int = 0  # triggers closer to the previous one than a frame interval
    refused: int = 0  # not a trigger, dated too far back or in the future, or retained (cmd/trigger replayed)


@dataclass
class TriggerBook:
    """Pending triggers in time order, each served by the first frame inside its window (thread-safe)."""

    delay_s: float
    timeout_s: float
    counters: TriggerCounters = field(default_factory=TriggerCounters)
    _pending: list[Trigger] = field(default_factory=list)  # sorted by time
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last_trigger: float | None = None
    _frame_interval: float | None = None
    _last_frame: float | None = None
    _missed: list[Trigger] = field(default_factory=list)

    def add(self, trigger: Trigger) -> None:
        """A trigger arrived (any thread)."""
        with self._lock:
            self.counters.received += 1
            interval = self._frame_interval
            gap = None if self._last_trigger is None else abs(trigger.time - self._last_trigger)
            if gap is not None and interval is not None and gap < interval:
                self.counters.storm += 1
                if self.counters.storm in (1, 10, 100) or self.counters.storm % 1000 == 0:
                    log.warning(
                        "trigger storm: triggers come faster than frames",
                        extra={
                            "event": "trigger_storm",
                            "storm": self.counters.storm,
                            "frame_interval_s": round(interval, 4),
                            "gap_s": round(gap, 4),
                        },
                    )
            self._last_trigger = trigger.time
            bisect.insort(self._pending, trigger, key=lambda t: t.time)  # sources race: keep them in time order
            while len(self._pending) > MAX_PENDING:
                self._missed.append(self._pending.pop(0))

    @property
    def waiting(self) -> int:
        """Triggers waiting for their frame."""
        with self._lock:
            return len(self._pending)

    def _closes(self, trigger: Trigger) -> float:
        """The last capture time that may serve ``trigger``."""
        return trigger.time + self.delay_s + self.timeout_s

    def take(self, capture_time: float) -> Trigger | None:
        """The oldest pending trigger whose window holds this frame (captured at or after trigger + delay, at
        most trigger + delay + timeout), if any. Triggers whose window this frame is already past are moved
        to the missed ones (reported by :meth:`expired`): a later frame shows another part."""
        with self._lock:
            if self._last_frame is not None and capture_time > self._last_frame:
                gap = capture_time - self._last_frame
                self._frame_interval = gap if self._frame_interval is None else 0.9 * self._frame_interval + 0.1 * gap
            self._last_frame = capture_time
            late = [t for t in self._pending if capture_time > self._closes(t)]
            if late:
                self._pending = [t for t in self._pending if capture_time <= self._closes(t)]
                self._missed.extend(late)
            if self._pending and capture_time >= self._pending[0].time + self.delay_s:
                self.counters.served += 1
                return self._pending.pop(0)
            return None

    def expired(self, now: float | None = None) -> list[Trigger]:
        """Triggers whose frame did not come in time, each on its own (each reported once)."""
        now = time.time() if now is None else now
        with self._lock:
            late = self._missed
            self._missed = []
            expired = [t for t in self._pending if now > self._closes(t)]
            if expired:
                self._pending = [t for t in self._pending if now <= self._closes(t)]
                late.extend(expired)
            self.counters.missed += len(late)
        return late

    def refuse(self) -> None:
        """Count a refused trigger (a payload that is not one, or a retained one)."""
        with self._lock:
            self.counters.refused += 1

    def parse_and_add(self, payload: bytes, source: str, now: float | None = None) -> Trigger:
        """A trigger from an MQTT or HTTP payload (empty: now); TriggerRefused says why not."""
        now = time.time() if now is None else now
        try:
            data = parse_json_object(payload, MAX_TRIGGER_BYTES, max_depth=2)
            message = TriggerMessage.model_validate(data)
        except (PayloadError, ValidationError) as exc:
            self.refuse()
            raise TriggerRefused(f"not a trigger: {exc}") from exc
        at = now if message.time is None else message.time
        if not math.isfinite(at) or at - now > MAX_FUTURE_SKEW_S or now - at > MAX_PAST_S:
            self.refuse()
            raise TriggerRefused(
                f"trigger time is {at - now:+.3f} s from now (allowed: {MAX_PAST_S} s back, "
                f"{MAX_FUTURE_SKEW_S * 1000:.0f} ms ahead for clock skew)"
            )
        trigger = Trigger(at, source, message.trigger_id)
        self.add(trigger)
        return trigger


def triggered_message(
    device_id: str,
    trigger: Trigger,
    sequence: int,
    capture_time: float,
    anomalous: bool,
    log10_epsilon: float,
    regions: tuple[Region, ...],
    log_nfa: float,
    latency_ms: float,
    **fields: Any,
) -> PartMessage:
    """The part message of a triggered inspection (its one frame; regions in frame coordinates)."""
    from edge_agent.messages import PartRegion

    return PartMessage(
        device_id=device_id,
        part_id=f"{int(trigger.time * 1000)}-{sequence}",
        mode="triggered",
        anomalous=anomalous,
        log_nfa=log_nfa,
        log10_epsilon=log10_epsilon,
        first_capture_time=capture_time,
        decision_time=capture_time,
        frames=PartFrames(count=1, first_sequence=sequence, last_sequence=sequence),
        regions=[
            PartRegion(
                bbox=r.bbox,
                log_nfa=r.log_nfa,
                frames=1,
                best_sequence=sequence,
                best_bbox=r.bbox,
                best_frame_log_nfa=r.log_nfa,
            )
            for r in sorted(regions, key=lambda r: r.log_nfa)[:MAX_PART_REGIONS]  # under the relay's size limit
        ],
        trigger_time=trigger.time,
        trigger_id=trigger.trigger_id,
        latency_ms=latency_ms,
        **fields,
    )


def missed_message(device_id: str, trigger: Trigger) -> PartMessage:
    """A trigger that got no frame in time, as a part message (``status = "no_frame"``)."""
    return PartMessage(
        device_id=device_id,
        part_id=f"{int(trigger.time * 1000)}-none",
        mode="triggered",
        status="no_frame",
        anomalous=False,
        log_nfa=0.0,
        log10_epsilon=0.0,
        first_capture_time=trigger.time,
        decision_time=time.time(),
        frames=PartFrames(count=0),
        trigger_time=trigger.time,
        trigger_id=trigger.trigger_id,
    )


class EdgeRequest(Protocol):
    """What :class:`GpioTrigger` needs of a libgpiod v2 line request (``gpiod.request_lines(...)``)."""

    def wait_edge_events(self, timeout: float | None = None) -> bool: ...

    def read_edge_events(self) -> list[Any]:  # events with ``timestamp_ns`` (CLOCK_MONOTONIC)
        ...

    def release(self) -> None: ...


def open_gpio(chip: str, line: int, edge: str) -> EdgeRequest:
    """Request one input line with edge detection through libgpiod v2; OSError/ImportError say why not."""
    import gpiod  # optional: only boxes with a photo-eye install it (python3-libgpiod or pip install gpiod)
    from gpiod.line import Edge

    settings = gpiod.LineSettings(edge_detection=Edge.RISING if edge == "rising" else Edge.FALLING)
    request: EdgeRequest = gpiod.request_lines(chip, consumer="edge-agent-trigger", config={line: settings})
    return request


class GpioTrigger:
    """A thread turning edge events of one GPIO line into triggers."""

    def __init__(self, request: EdgeRequest, book: TriggerBook, description: str) -> None:
        self.request = request
        self.book = book
        self.description = description
        self._stop = threading.Event()
        self._edges = 0
        self._thread = threading.Thread(target=self._loop, name="gpio-trigger", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.request.release()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.request.wait_edge_events(0.2):
                continue
            now_wall, now_ns = time.time(), time.monotonic_ns()
            for event in self.request.read_edge_events():
                # Edge timestamps are CLOCK_MONOTONIC: the edge's own time, not when this thread woke up.
                at = now_wall - max(0, now_ns - int(event.timestamp_ns)) / 1e9
                # An edge carries no id: a count (since start) lets the line tie verdicts to its own edges.
                self._edges += 1
                self.book.add(Trigger(at, "gpio", f"gpio-{self._edges}"))
