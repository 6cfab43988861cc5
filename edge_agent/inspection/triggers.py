"""Triggered mode: one inspection per trigger (a photo-eye, a PLC), the frame chosen by capture time.

A trigger at time T asks for the first frame captured at or after ``T + trigger_delay_s`` (the part
reaches the camera's view that long after the photo-eye). The capture stage offers every frame to
:meth:`TriggerBook.take`; frames no trigger asked for are not inspected. A trigger that gets no frame
by ``T + delay + trigger_timeout_s`` is reported missed (a ``part`` message with ``status = "no_frame"``
and a log line), never dropped silently. Triggers closer together than the camera's frame interval
(more triggers than frames) are counted as a *storm*: each frame serves one trigger, so some of them
will be missed, and the count says why.

Sources, each calling :meth:`TriggerBook.add` from its own thread:

- MQTT ``<prefix>/<device_id>/trigger`` (a PLC gateway): the agent's publisher subscribes;
- HTTP ``POST /trigger`` on the agent's HTTP server (local tools);
- a GPIO line through libgpiod's Python bindings (v2 API: ``gpiod.request_lines`` with edge detection),
  :class:`GpioTrigger`. Where no chip is available (containers, CI: no ``gpio-sim`` in the kernel) the
  same code runs against any object with the request's ``wait_edge_events``/``read_edge_events``/
  ``release`` methods; the tests use such a fake chip.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from edge_agent.logs import log_event
from edge_agent.publish.messages import PartFrames, PartMessage, PayloadError, Region, TriggerMessage, parse_json_object

log = logging.getLogger(__name__)

MAX_TRIGGER_BYTES = 2048
MAX_PENDING = 256  # triggers waiting for a frame; beyond this the oldest is reported missed
MAX_CLOCK_SKEW_S = 5.0  # a trigger time further than this from now is refused (a wrong or forged clock)


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
    refused: int = 0


@dataclass
class TriggerBook:
    """Pending triggers, served oldest first by frames captured late enough (thread-safe)."""

    delay_s: float
    timeout_s: float
    counters: TriggerCounters = field(default_factory=TriggerCounters)
    _pending: deque[Trigger] = field(default_factory=deque)
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
            if self._last_trigger is not None and interval is not None and trigger.time - self._last_trigger < interval:
                self.counters.storm += 1
                if self.counters.storm in (1, 10, 100) or self.counters.storm % 1000 == 0:
                    log_event(
                        log,
                        logging.WARNING,
                        "trigger storm: triggers come faster than frames",
                        "trigger_storm",
                        storm=self.counters.storm,
                        frame_interval_s=round(interval, 4),
                        gap_s=round(trigger.time - self._last_trigger, 4),
                    )
            self._last_trigger = trigger.time
            self._pending.append(trigger)
            while len(self._pending) > MAX_PENDING:
                self._missed.append(self._pending.popleft())

    @property
    def waiting(self) -> int:
        """Triggers waiting for their frame."""
        with self._lock:
            return len(self._pending)

    def take(self, capture_time: float) -> Trigger | None:
        """The oldest pending trigger this frame serves (captured at or after trigger + delay), if any."""
        with self._lock:
            if self._last_frame is not None and capture_time > self._last_frame:
                gap = capture_time - self._last_frame
                self._frame_interval = gap if self._frame_interval is None else 0.9 * self._frame_interval + 0.1 * gap
            self._last_frame = capture_time
            if self._pending and capture_time >= self._pending[0].time + self.delay_s:
                self.counters.served += 1
                return self._pending.popleft()
            return None

    def expired(self, now: float | None = None) -> list[Trigger]:
        """Triggers whose frame did not come in time (each reported once)."""
        now = time.time() if now is None else now
        with self._lock:
            late = self._missed
            self._missed = []
            while self._pending and now > self._pending[0].time + self.delay_s + self.timeout_s:
                late.append(self._pending.popleft())
            self.counters.missed += len(late)
        return late

    def parse_and_add(self, payload: bytes, source: str, now: float | None = None) -> Trigger:
        """A trigger from an MQTT or HTTP payload (empty: now); TriggerRefused says why not."""
        now = time.time() if now is None else now
        try:
            data = parse_json_object(payload, MAX_TRIGGER_BYTES, max_depth=2)
            message = TriggerMessage.model_validate(data)
        except (PayloadError, ValidationError) as exc:
            with self._lock:
                self.counters.refused += 1
            raise TriggerRefused(f"not a trigger: {exc}") from exc
        at = now if message.time is None else message.time
        if not math.isfinite(at) or abs(at - now) > MAX_CLOCK_SKEW_S:
            with self._lock:
                self.counters.refused += 1
            raise TriggerRefused(f"trigger time is {at - now:+.3f} s from now (limit {MAX_CLOCK_SKEW_S} s)")
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
    from edge_agent.publish.messages import PartRegion

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
            for r in regions
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
