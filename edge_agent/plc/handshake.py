"""The smart-camera handshake, independent of the protocol that carries it (docs/plc.md, "The cycle").

The pattern of Cognex In-Sight, Landing AI's LandingEdge and Keyence IV I/O maps:

- **Trigger**: the PLC writes a TriggerId and sets Trigger. Accepted only when TriggerReady (online and
  not Busy); otherwise refused with a reason and counted as a trigger error. An accepted trigger goes to
  the agent's trigger book like any other trigger (source ``opcua`` or ``modbus``) and the agent is Busy
  until that trigger's part is decided, or reported missed (no frame in time).
- **Results**: the part of every PLC trigger (or its miss, status no_frame) becomes a result; parts
  triggered over MQTT, HTTP or GPIO are not the PLC's business (they go to MQTT only).
  ResultsValid rises when a result is presented. The PLC reads it, then sets ResultsAck; ResultsValid
  falls; the PLC clears ResultsAck; the next queued result (if any) is then presented. Because the PLC
  sees ResultsValid fall before it clears the ack, a subscription never misses a result (no polling).
- **No ack never blocks**: results wait in a queue of ``results_queue``; beyond that the oldest waiting
  result is dropped and ResultsOverflow counts it. Inspection goes on regardless.

Thread-safe: triggers and acks come from the servers' threads, results from the pipeline's publish
thread, missed triggers from the supervisor. Listeners get a consistent :class:`PlcState` after every
change, in order (they are called under the lock, so they must only hand the state on).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import IntEnum

from edge_agent.inspection.triggers import Trigger, TriggerBook
from edge_agent.messages import PartMessage

log = logging.getLogger(__name__)

UINT32_MAX = 0xFFFF_FFFF
PLC_SOURCES = ("opcua", "modbus")


class RefusalCode(IntEnum):
    """LastErrorCode values (docs/plc.md)."""

    NONE = 0
    OFFLINE = 1
    BUSY = 2
    BAD_TRIGGER_ID = 3
    BAD_RECIPE = 4


class ResultStatus(IntEnum):
    """The Status of a result (docs/plc.md)."""

    NONE = 0
    INSPECTED = 1
    NO_FRAME = 2


class PlcRefused(ValueError):
    """A PLC request the handshake refuses; ``code`` is the LastErrorCode, the text says why."""

    def __init__(self, code: RefusalCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class PlcResult:
    """One result as the PLC reads it."""

    sequence: int  # 1, 2, ...: results presented or queued so far (ResultSequence)
    trigger_id: int  # the PLC's TriggerId echoed
    part_id: str
    status: ResultStatus
    passed: bool  # inspected and not anomalous
    log_nfa: float
    regions: int
    processing_ms: float  # the deciding frame's capture to the result (the part message's latency_ms)


@dataclass(frozen=True)
class PlcCounters:
    """Keyence-style counters, all since the agent started (UInt32, wrapping)."""

    triggers: int = 0  # accepted PLC triggers
    ok: int = 0
    ng: int = 0
    trigger_errors: int = 0  # refused PLC triggers (busy, offline, bad id)
    missed: int = 0  # accepted PLC triggers that got no frame in time
    overflow: int = 0  # results dropped because the PLC did not ack (results_queue)


@dataclass(frozen=True)
class PlcState:
    """Everything a server shows, consistent at one instant."""

    online: bool
    busy: bool
    results_valid: bool
    results_ack: bool
    result: PlcResult | None
    queued: int
    counters: PlcCounters
    last_error: str
    last_error_code: RefusalCode
    recipe_active: int = 0  # the active recipe's index in [[recipes]] (0: the one bundle without recipes)

    @property
    def trigger_ready(self) -> bool:
        """A trigger now would be accepted."""
        return self.online and not self.busy


Listener = Callable[[PlcState], None]
# RecipeSelect: switch to the recipe at this index (edge_agent/service/recipes.py); ValueError with the reason
# when there is none. Without [[recipes]] the handshake keeps recipe 0, the box's one bundle.
RecipeSelector = Callable[[int], None]


@dataclass
class PlcHandshake:
    """The handshake's state machine (module docstring); ``book`` is the agent's trigger book."""

    book: TriggerBook
    queue_bound: int
    clock: Callable[[], float] = time.time
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _listeners: list[Listener] = field(default_factory=list)
    _online: bool = False
    _busy: Trigger | None = None
    _valid: bool = False
    _ack: bool = False
    _result: PlcResult | None = None
    _queue: deque[PlcResult] = field(default_factory=deque)
    _counters: PlcCounters = field(default_factory=PlcCounters)
    _sequence: int = 0
    _last_error: str = ""
    _last_code: RefusalCode = RefusalCode.NONE
    _recipe_active: int = 0
    selector: RecipeSelector | None = None

    def listen(self, listener: Listener) -> None:
        """Call ``listener`` with the state now and after every change."""
        with self._lock:
            self._listeners.append(listener)
            listener(self._state())

    def state(self) -> PlcState:
        """The state now."""
        with self._lock:
            return self._state()

    def set_online(self, online: bool) -> None:
        """Online: the agent inspects (set at start, cleared at stop)."""
        with self._lock:
            self._online = online
            self._changed()

    def trigger(self, trigger_id: int, source: str) -> Trigger:
        """A PLC trigger; PlcRefused (counted as a trigger error) when not TriggerReady or the id is bad."""
        with self._lock:
            try:
                if not 0 <= trigger_id <= UINT32_MAX:
                    raise PlcRefused(RefusalCode.BAD_TRIGGER_ID, f"TriggerId {trigger_id} is not a UInt32")
                if not self._online:
                    raise PlcRefused(RefusalCode.OFFLINE, "offline: the agent is not inspecting")
                if self._busy is not None:
                    raise PlcRefused(
                        RefusalCode.BUSY,
                        f"busy: trigger {self._busy.trigger_id} from {self._busy.source} is still being inspected",
                    )
            except PlcRefused as exc:
                self._counters = replace(self._counters, trigger_errors=_wrap(self._counters.trigger_errors + 1))
                self._last_error, self._last_code = str(exc), exc.code
                log.warning("PLC trigger refused: %s", exc, extra={"event": "plc_trigger_refused", "source": source, "trigger_id": trigger_id, "code": exc.code.name})  # fmt: skip
                self._changed()
                raise
            trigger = Trigger(self.clock(), source, str(trigger_id))
            self._busy = trigger
            self._counters = replace(self._counters, triggers=_wrap(self._counters.triggers + 1))
            self._last_error, self._last_code = "", RefusalCode.NONE
            self._changed()
        self.book.add(trigger)  # outside our lock: the book has its own, and the frame path takes it
        return trigger

    def part_decided(self, trigger: Trigger | None, message: PartMessage) -> None:
        """A part message went out (the pipeline's part observer); its result goes to the PLC."""
        if trigger is None or trigger.source not in PLC_SOURCES:
            return  # the PLC is told about its own triggers only (MQTT/HTTP/GPIO parts go to MQTT)
        with self._lock:
            if trigger is self._busy:
                self._busy = None
            inspected = message.status == "inspected"
            passed = inspected and not message.anomalous
            if inspected:
                counters = self._counters
                self._counters = (
                    replace(counters, ok=_wrap(counters.ok + 1))
                    if passed
                    else replace(counters, ng=_wrap(counters.ng + 1))
                )
            self._post(
                trigger_id=_plc_id(trigger),
                part_id=message.part_id,
                status=ResultStatus.INSPECTED if inspected else ResultStatus.NO_FRAME,
                passed=passed,
                log_nfa=float(message.log_nfa),
                regions=len(message.regions),
                processing_ms=float(message.latency_ms),
            )

    def trigger_missed(self, trigger: Trigger, message: PartMessage) -> None:
        """A trigger got no frame in time (the agent published ``message``, status no_frame)."""
        with self._lock:
            if trigger.source not in PLC_SOURCES:
                return  # the PLC is told about its own triggers only
            if trigger is self._busy:
                self._busy = None
            self._counters = replace(self._counters, missed=_wrap(self._counters.missed + 1))
            self._post(
                trigger_id=_plc_id(trigger),
                part_id=message.part_id,
                status=ResultStatus.NO_FRAME,
                passed=False,
                log_nfa=0.0,
                regions=0,
                processing_ms=0.0,
            )

    def ack(self, value: bool) -> None:
        """ResultsAck written: rising drops ResultsValid, falling presents the next queued result."""
        with self._lock:
            if value == self._ack:
                return
            self._ack = value
            if value:
                self._valid = False
            elif self._queue:
                self._result = self._queue.popleft()
                self._valid = True
            self._changed()

    def select_recipe(self, index: int) -> None:
        """RecipeSelect: switch recipes; PlcRefused (LastErrorCode 4) when there is no recipe ``index``.

        The switch itself (the selector) runs outside this lock: it tells ``recipe_changed`` when done.
        """
        try:
            if self.selector is None:
                if index != 0:
                    raise ValueError(f"recipe {index} does not exist: this box has no [[recipes]], only recipe 0")
            else:
                self.selector(index)
        except ValueError as exc:
            with self._lock:
                self._last_error, self._last_code = str(exc), RefusalCode.BAD_RECIPE
                self._changed()
            raise PlcRefused(RefusalCode.BAD_RECIPE, str(exc)) from exc

    def recipe_changed(self, index: int) -> None:
        """The active recipe is now ``index`` (from any interface): RecipeActive shows it."""
        with self._lock:
            if index != self._recipe_active:
                self._recipe_active = index
                self._changed()

    # -- inside the lock ------------------------------------------------------------------------------

    def _post(self, **values: object) -> None:
        self._sequence = _wrap(self._sequence + 1)
        result = PlcResult(sequence=self._sequence, **values)  # type: ignore[arg-type]
        if self._valid or self._ack:
            self._queue.append(result)
            if len(self._queue) > self.queue_bound:
                dropped = self._queue.popleft()
                self._counters = replace(self._counters, overflow=_wrap(self._counters.overflow + 1))
                if self._counters.overflow in (1, 10, 100) or self._counters.overflow % 1000 == 0:
                    log.warning("PLC results overflow: the PLC does not ack", extra={"event": "plc_results_overflow", "overflow": self._counters.overflow, "dropped_part": dropped.part_id, "queue": self.queue_bound})  # fmt: skip
        else:
            self._result = result
            self._valid = True
        self._changed()

    def _state(self) -> PlcState:
        return PlcState(
            online=self._online,
            busy=self._busy is not None,
            results_valid=self._valid,
            results_ack=self._ack,
            result=self._result,
            queued=len(self._queue),
            counters=self._counters,
            last_error=self._last_error,
            last_error_code=self._last_code,
            recipe_active=self._recipe_active,
        )

    def _changed(self) -> None:
        state = self._state()
        for listener in self._listeners:
            try:
                listener(state)
            except Exception as exc:  # a server's trouble must not fail the pipeline's observer
                log.exception("PLC listener failed", extra={"event": "plc_listener_failed", "error": str(exc)})


def _wrap(value: int) -> int:
    """Counters are UInt32 on the wire: they wrap like a PLC's counters do."""
    return value & UINT32_MAX


def _plc_id(trigger: Trigger | None) -> int:
    """The TriggerId to echo: the PLC's own number, or 0 for triggers from other sources."""
    if trigger is None or trigger.source not in PLC_SOURCES or trigger.trigger_id is None:
        return 0
    try:
        return int(trigger.trigger_id)
    except ValueError:
        return 0
