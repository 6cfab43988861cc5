"""Firing: a scheduler thread that waits for the next due reject on the monotonic clock, and a small pool
that calls the actuators (a slow actuator never delays the next reject).

A job's outcome is final and journaled: ``fired`` (between the planned time and the deadline),
``missed`` (came due after its deadline: every actuator worker was busy, the box overloaded, or the belt
re-timed it into the past; or a stopped belt held it longer than ``belt.max_hold_s``; never fired late) or
``failed`` (every allowed attempt failed; retries only before the deadline). The relay
learns each outcome as a ``FireOutcome`` record through ``report`` and counts and logs it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from edge_agent.relay.actuators import Actuator, ActuatorError, FireOrder
from edge_agent.relay.belt import BeltTravel, due_in
from edge_agent.relay.config import RelaySettings
from edge_agent.relay.dedupe import DecisionJournal
from edge_agent.relay.report import Decision
from edge_agent.relay.schedule import Plan

log = logging.getLogger(__name__)

ACTUATOR_WORKERS = 4
SCHEDULER_TICK_S = 0.5  # the scheduler's heartbeat (watchdog) even when nothing is due


@dataclass(order=True)
class Job:
    """One scheduled reject; ordered by due time (monotonic), then arrival order."""

    due: float
    number: int
    deadline_mono: float = field(compare=False)
    order: FireOrder = field(compare=False)
    plan: Plan = field(compare=False)
    actuator: Actuator = field(compare=False)
    held: bool = field(default=False, compare=False)  # a stopped belt holds it: due = when the hold expires


@dataclass(frozen=True)
class FireOutcome:
    """What firing did with one job (its journal entry already final): the decision and the facts of its log line."""

    decision: Decision  # FIRED, MISSED or FAILED
    job: Job
    attempts: int = 0
    fired_time: float | None = None  # FIRED: when the actuator was called (relay wall clock)
    lateness_ms: float | None = None  # FIRED: after the planned time
    late_by_ms: float | None = None  # MISSED: came due that long after its planned time
    held_s: float | None = None  # MISSED: a stopped belt held it longer than this (belt.max_hold_s)
    error: str = ""  # FAILED: the last attempt's error
    retryable: bool = False  # FAILED: whether that error allowed a retry

    def log_fields(self) -> dict[str, Any]:
        """The fields of the outcome's ``relay_decision`` line."""
        if self.decision is Decision.FIRED:
            assert self.fired_time is not None and self.lateness_ms is not None
            return {
                "fired_time": round(self.fired_time, 6),
                "lateness_ms": round(self.lateness_ms, 3),
                "attempts": self.attempts,
            }
        if self.decision is Decision.MISSED:
            if self.held_s is not None:
                return {"reason": "held by a stopped belt longer than belt.max_hold_s", "held_s": self.held_s}
            assert self.late_by_ms is not None
            return {"reason": "came due after its deadline", "late_by_ms": round(self.late_by_ms, 3)}
        return {
            "reason": self.error,
            "attempts": self.attempts,
            "actuator": self.job.actuator.description,
            "retryable": self.retryable,
        }


Report = Callable[[FireOutcome], None]


class Firing:
    """The scheduler thread and the actuator pool; ``start()``, ``submit()``, then ``drain()`` and ``stop()``."""

    def __init__(self, settings: RelaySettings, journal: DecisionJournal, report: Report) -> None:
        self.settings = settings
        self.journal = journal
        self._report = report
        self._heap: list[Job] = []
        self._cond = threading.Condition()
        self._numbers = itertools.count()
        self._inflight = 0
        self._belt: dict[int, BeltTravel] = {}  # job number -> distance still to go (part rejects)
        self._halt = threading.Event()  # the scheduler leaves what is not yet due in the journal
        self._beat = time.monotonic()
        self._executor = ThreadPoolExecutor(ACTUATOR_WORKERS, thread_name_prefix="relay-actuator")
        self._thread = threading.Thread(target=self._loop, name="relay-scheduler", daemon=True)

    @property
    def pending(self) -> int:
        """Rejects scheduled or being fired."""
        with self._cond:
            return len(self._heap) + self._inflight

    @property
    def halted(self) -> bool:
        """True once ``stop()`` began."""
        return self._halt.is_set()

    def responsive(self, stall_s: float = 10.0) -> bool:
        """True while the scheduler thread is alive and looping (for the systemd watchdog)."""
        return self._thread.is_alive() and time.monotonic() - self._beat < stall_s

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread.start()

    def submit(
        self,
        order: FireOrder,
        plan: Plan,
        actuator: Actuator,
        arrival: float,
        arrival_mono: float,
        travel: BeltTravel | None = None,
    ) -> None:
        """Schedule a reject planned on the wall clock, due on the monotonic one.

        ``travel``: a part reject's distance still to go, so that ``retime`` can follow belt speed changes.
        A plan with no finite time (the belt is stopped) is held: it fires once the belt moves the rest, or is
        counted missed after ``belt.max_hold_s``.
        """
        # Wall-clock plan -> monotonic due time, so a step of the relay's own clock cannot move a reject.
        due = arrival_mono + (plan.planned_time - arrival)
        job = Job(due, next(self._numbers), arrival_mono + (plan.deadline - arrival), order, plan, actuator)
        if not math.isfinite(plan.planned_time):
            if travel is not None:
                travel.held_since = arrival_mono
            self._hold(job, arrival_mono)
        with self._cond:
            if travel is not None:
                self._belt[job.number] = travel
            heapq.heappush(self._heap, job)
            self._cond.notify()

    def _hold(self, job: Job, since_mono: float) -> None:
        """A stopped belt holds ``job``: due when the hold expires (then it is missed, never fired)."""
        job.held = True
        job.due = since_mono + self.settings.belt.max_hold_s
        job.deadline_mono = job.due

    def _place(self, job: Job, travel: BeltTravel, planned_wall: float, now_mono: float, now_wall: float) -> None:
        """Re-time ``job`` to ``planned_wall`` (relay wall clock; inf while the belt is stopped, in the past when the
        part already passed the actuator: then it is missed when it pops, never fired late)."""
        if not math.isfinite(planned_wall) and planned_wall > 0:
            if travel.held_since is None:
                travel.held_since = now_mono
            self._hold(job, travel.held_since)
            return
        travel.held_since = None
        job.held = False
        wait = planned_wall - now_wall
        job.due = now_mono + wait
        job.deadline_mono = job.due + travel.tolerance_s
        job.plan = replace(job.plan, planned_time=planned_wall, deadline=planned_wall + travel.tolerance_s)

    def retime(self, old_speed: float | None, new_speed: float) -> int:
        """Re-time every pending part reject after a belt speed change; returns how many moved.

        Each keeps the distance it still had to go at the old speed; a stopped belt (0) holds it (for at most
        ``belt.max_hold_s``); one whose distance is already behind it is due in the past, so missed.
        """
        now_mono, now_wall = time.monotonic(), time.time()
        moved = 0
        with self._cond:
            for job in self._heap:
                travel = self._belt.get(job.number)
                if travel is None or travel.target_m is not None:  # encoder mode follows the encoder instead
                    continue
                if old_speed is not None:
                    travel.remaining_m -= old_speed * max(0.0, now_mono - travel.as_of)
                travel.as_of = now_mono
                if travel.remaining_m < 0 and old_speed:
                    wait = travel.remaining_m / old_speed  # passed the actuator that long ago, at the old speed
                else:
                    wait = due_in(travel.remaining_m, new_speed)
                self._place(job, travel, now_wall + wait, now_mono, now_wall)
                moved += 1
            heapq.heapify(self._heap)
            self._cond.notify_all()
        return moved

    def reposition(self, time_at: Callable[[float], float], position: float) -> int:
        """Encoder mode: re-time each pending part reject to when the belt is at its target position
        (``time_at(metres)``: relay wall clock, inf while stopped, in the past once passed); ``position``: the
        belt's position now."""
        now_mono, now_wall = time.monotonic(), time.time()
        moved = 0
        with self._cond:
            for job in self._heap:
                travel = self._belt.get(job.number)
                if travel is None or travel.target_m is None:
                    continue
                travel.remaining_m, travel.as_of = travel.target_m - position, now_mono
                self._place(job, travel, time_at(travel.target_m), now_mono, now_wall)
                moved += 1
            heapq.heapify(self._heap)
            self._cond.notify_all()
        return moved

    def drain(self, drain_s: float) -> None:
        """Wait (at most ``drain_s``) until nothing due within ``drain_s`` is left or in flight."""
        until = time.monotonic() + drain_s
        while time.monotonic() < until:
            with self._cond:
                due_soon = any(job.due <= until for job in self._heap)
                if not due_soon and self._inflight == 0:
                    return
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the scheduler (what is not due stays in the journal) and wait for the actuator calls."""
        self._halt.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(5.0)
        self._executor.shutdown(wait=True)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._beat = time.monotonic()
                if self._halt.is_set():
                    return
                if not self._heap:
                    self._cond.wait(SCHEDULER_TICK_S)
                    continue
                wait = self._heap[0].due - time.monotonic()
                if wait > 0:
                    self._cond.wait(min(wait, SCHEDULER_TICK_S))
                    continue
                job = heapq.heappop(self._heap)
                self._inflight += 1
            self._executor.submit(self._fire, job)

    def _fire(self, job: Job) -> None:
        try:
            self._fire_job(job)
        except Exception:  # an actuator bug must not leak the in-flight count or kill the pool
            log.exception(
                "internal error while firing", extra={"event": "relay_internal_error", "id": job.order.message_id}
            )
        finally:
            with self._cond:
                self._inflight -= 1
                self._belt.pop(job.number, None)

    def _fire_job(self, job: Job) -> None:
        order, plan = job.order, job.plan
        if job.held:  # the belt never moved the rest within belt.max_hold_s: missed, never fired
            if self.journal.begin_firing(order.message_id):
                self.journal.finish(order.message_id, Decision.MISSED)
            self._report(FireOutcome(Decision.MISSED, job, held_s=self.settings.belt.max_hold_s))
            return
        config = self.settings.actuator_for(order.device_id)
        assert config is not None
        attempts, error = 0, None
        while True:
            now_mono = time.monotonic()
            if now_mono > job.deadline_mono:
                break
            if attempts == 0 and not self.journal.begin_firing(order.message_id):
                return  # decided elsewhere (cannot happen unless two relays share a journal)
            attempts += 1
            fired_wall = plan.planned_time + (now_mono - job.due)
            try:
                job.actuator.fire(order, fired_wall)
            except ActuatorError as exc:
                error = exc
                if not exc.retryable or attempts > config.retries:
                    break
                time.sleep(config.retry_delay_s)
                continue
            self.journal.finish(order.message_id, Decision.FIRED, fired_wall)
            lateness_ms = (now_mono - job.due) * 1000.0
            self._report(FireOutcome(Decision.FIRED, job, attempts, fired_time=fired_wall, lateness_ms=lateness_ms))
            return
        if attempts == 0:
            if self.journal.begin_firing(order.message_id):
                self.journal.finish(order.message_id, Decision.MISSED)
            self._report(FireOutcome(Decision.MISSED, job, late_by_ms=(time.monotonic() - job.due) * 1000.0))
            return
        self.journal.finish(order.message_id, Decision.FAILED)
        self._report(
            FireOutcome(Decision.FAILED, job, attempts, error=str(error), retryable=bool(error and error.retryable))
        )
