"""Part messages at the relay: one reject per part id, timed by the belt's travel from the decision line.

A ``part`` message (``uflow.part/1``) says when a part was decided (``decision_time``, camera clock) and
how far it already was past the camera's decision line (``position_at_decision.beyond_line_m``). The
actuator is ``decision_distance_m`` down the belt from that line, so the reject is due once the belt
has moved ``decision_distance_m - beyond_line_m`` since the decision::

    due = decision time (relay clock) + remaining distance / belt speed

The belt speed is the configured ``speed_m_s`` or, when ``[belt] speed_topic`` is set, the PLC's live
value: every change re-plans the pending part rejects from the distance still to go (a stopped belt
holds them, a faster one brings them forward). The journal key is ``part:<device>:<part id>``, so a
part is never fired twice, whatever its message ids and across restarts.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from edge_agent.messages import (
    PartMessage,
    PayloadError,
    parse_json_object,
)
from edge_agent.relay.actuators import FireOrder
from edge_agent.relay.belt import BeltTravel, Encoder, Reading
from edge_agent.relay.part_intake import (
    MAX_SPEED_BYTES,
    ClockView,
    PartMalformed,
    device_of_part_topic,
    parse_part,
    parse_speed,
    part_key,
)
from edge_agent.relay.report import Decision, arrived_late, plan_fields
from edge_agent.relay.schedule import Plan

if TYPE_CHECKING:
    from edge_agent.relay.actuators import Actuator
    from edge_agent.relay.config import RelaySettings
    from edge_agent.relay.dedupe import DecisionJournal
    from edge_agent.relay.firing import Firing
    from edge_agent.relay.ledger import Ledger
    from edge_agent.relay.schedule import ClockOffsets

log = logging.getLogger(__name__)


class BeltSpeed:
    """The live belt speed (None until the PLC said), thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value: float | None = None
        self.updates = 0

    def set(self, speed: float) -> float | None:
        """Store a new speed; returns the previous one."""
        with self._lock:
            old, self.value = self.value, speed
            self.updates += 1
            return old


def plan_part(
    message: PartMessage,
    arrival: float,
    distance_m: float,
    speed: float,
    tolerance_s: float,
    offset_s: float,
    source: str,
) -> tuple[Plan, float]:
    """(the plan, the distance still to go at ``arrival``) for an anomalous part message.

    The reject is due when the belt has moved the distance *since the decision*: ``decided + distance / speed``,
    never counted from the arrival. A message that arrives after that deadline (a relay restart, a broker
    hiccup, a flood ahead of it) is therefore late and missed, not fired at whatever part is at the actuator
    now. A stopped belt (speed 0) gives no finite time: the reject is held (firing.py).
    """
    decided = message.decision_time + offset_s
    bound = arrival - message.latency_ms / 1000.0
    if decided > bound:  # a camera clock running ahead cannot push the reject later than the arrival allows
        decided, source = bound, f"{source}+arrival-bound"
    total = max(0.0, distance_m - beyond_line_m(message))
    remaining = total - speed * max(0.0, arrival - decided)
    travel_s = total / speed if speed > 0 else math.inf
    planned = decided + travel_s
    plan = Plan(decided, planned, planned + tolerance_s, travel_s, offset_s, source)
    return plan, remaining


def beyond_line_m(message: PartMessage) -> float:
    """How far the part already was past the decision line when it was decided (0 when unknown)."""
    position = message.position_at_decision
    return (position.beyond_line_m or 0.0) if position is not None else 0.0


def plan_record(plan: Plan, remaining_m: float) -> dict[str, Any]:
    """What the journal keeps of a part plan (resumed after a restart at its last planned time)."""
    return {**asdict(plan), "remaining_m": remaining_m}


def plan_from_record(record: dict[str, Any]) -> Plan:
    """The Plan part of a journal record."""
    return Plan(**{k: record[k] for k in Plan.__dataclass_fields__})


# Count and log a message that is not what its topic says (the relay's IntakeGate.refuse).
Refuse = Callable[[str, Exception, bytes], None]


class PartDecisions:
    """The relay's decisions on part, belt speed and encoder messages.

    It shares the relay's ledger (counts, good keys, which cameras send parts), journal, clock offsets and
    firing; ``actuator_of`` and ``refuse`` are the relay's actuator lookup and its intake gate's refusal.
    """

    def __init__(
        self,
        settings: RelaySettings,
        ledger: Ledger,
        journal: DecisionJournal,
        clock: ClockOffsets,
        firing: Firing,
        actuator_of: Callable[[str], Actuator | None],
        refuse: Refuse,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.journal = journal
        self.clock = clock
        self.firing = firing
        self.actuator_of = actuator_of
        self.refuse = refuse
        self.belt = BeltSpeed()
        belt = settings.belt
        self.encoder = (
            Encoder(belt.counts_per_m, belt.max_speed_m_s, belt.encoder_reset_readings)
            if belt.encoder_topic and belt.counts_per_m
            else None
        )
        self.encoder_refused = 0

    def handle_encoder(self, topic: str, payload: bytes, arrival: float) -> Decision:
        """An encoder reading: re-time the pending part rejects from where the belt is now."""
        assert self.encoder is not None
        try:
            data = parse_json_object(payload, MAX_SPEED_BYTES, max_depth=2)
        except PayloadError as exc:
            self.refuse(topic, exc, payload)
            return Decision.MALFORMED
        count = data.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            self.refuse(topic, PartMalformed('an encoder message is {"count": <non-negative integer>}'), payload)
            return Decision.MALFORMED
        reading = self.encoder.add(arrival, count)
        if reading is Reading.REFUSED:
            self.encoder_refused += 1  # reordered, implausible (faster than max_speed_m_s), or a reset not yet sure
            if self.encoder_refused in (1, 10) or self.encoder_refused % 100 == 0:
                log.warning(
                    "encoder reading refused: smaller than the last, or a step faster than belt.max_speed_m_s",
                    extra={"event": "relay_encoder_refused", "count": count, "refused": self.encoder_refused},
                )
            return Decision.ENCODER_REFUSED
        if reading is Reading.RESET:
            log.warning(
                "encoder counter reset: %d readings in a row agree; followed from here, the position kept continuous",
                self.settings.belt.encoder_reset_readings,
                extra={"event": "relay_encoder_reset", "count": count, "resets": self.encoder.resets},
            )
        if self.encoder.ready:
            self.firing.reposition(self.encoder.time_at, self.encoder.position_at(arrival))
        return Decision.ENCODER

    def handle_speed(self, topic: str, payload: bytes) -> Decision:
        """A live belt speed: store it and re-time the pending part rejects."""
        try:
            speed = parse_speed(payload, self.settings.belt.max_speed_m_s)
        except PartMalformed as exc:
            self.refuse(topic, exc, payload)
            return Decision.MALFORMED
        old = self.belt.set(speed)
        if old != speed:
            moved = self.firing.retime(old, speed)
            log.info(
                "belt speed %.3f m/s",
                speed,
                extra={"event": "relay_belt_speed", "speed_m_s": speed, "previous_m_s": old, "replanned": moved},
            )
        return Decision.SPEED

    def handle_part(self, topic: str, payload: bytes, arrival: float, arrival_mono: float) -> Decision:
        """Decide one part message (journaled under the part's key before returning)."""
        ledger = self.ledger
        try:
            device = device_of_part_topic(topic)
            message = parse_part(payload)
            if message.device_id != device:
                raise PartMalformed(f"device_id {message.device_id!r} is not the topic's {device!r}")
            ledger.admit(device)
        except ValueError as exc:  # PartMalformed, and the ledger's MalformedMessage for a camera too many
            self.refuse(topic, exc, payload)
            return Decision.MALFORMED
        ledger.note_part_camera(device)
        timing = self.settings.part_timing_for(device)
        offset = self.clock.observe(ClockView.of(message), arrival, timing.clock_offset_s if timing else 0.0)
        ledger.received(device, offset.offset_s, offset.source, model=None if message.replayed else message.model)
        key = part_key(message)
        if message.status == "no_frame":
            log_part(Decision.NO_FRAME, message, topic, None, logging.ERROR, reason="a trigger got no frame in time")
            return Decision.NO_FRAME
        if not message.anomalous:
            decision = Decision.SKIPPED_GOOD if ledger.first_good(key) else Decision.DUPLICATE
            ledger.count(decision, device)
            if decision is Decision.DUPLICATE or self.settings.log_good_decisions:
                log_part(decision, message, topic, None, logging.INFO)
            return decision
        ledger.anomalous(device)
        actuator = self.actuator_of(device)
        encoder = self.encoder if self.encoder is not None and self.encoder.ready else None
        speed = self.belt.value if self.belt.value is not None else (timing.speed_m_s if timing else None)
        if encoder is not None:
            speed = encoder.speed()
        sequence = message.frames.last_sequence or 0
        if timing is None or actuator is None or speed is None:
            if not self.journal.claim(key, device, sequence, Decision.UNCONFIGURED):
                return self._duplicate(message, topic, key)
            ledger.count(Decision.UNCONFIGURED, device)
            what = "decision_distance_m" if timing is None else "actuator" if actuator is None else "belt speed"
            log_part(
                Decision.UNCONFIGURED,
                message,
                topic,
                None,
                logging.ERROR,
                reason=f"no {what} for device {device!r}: add it under [devices.{device}] or [timing]",
            )
            return Decision.UNCONFIGURED
        source = offset.source + ("+encoder" if encoder else "+live-speed" if self.belt.value is not None else "")
        plan, remaining = plan_part(
            message, arrival, timing.distance_m, speed, timing.tolerance_s, offset.offset_s, source
        )
        target = None
        if encoder is not None:  # by the belt's position: where it was at the decision, plus the distance
            target = encoder.position_at(plan.capture_time) + max(0.0, timing.distance_m - beyond_line_m(message))
            remaining = target - encoder.position_at(arrival)
            planned = encoder.time_at(target)  # when the belt got or gets there: in the past once it passed
            plan = replace(plan, planned_time=planned, deadline=planned + timing.tolerance_s)
        if arrival > plan.deadline:
            if not self.journal.claim(key, device, sequence, Decision.MISSED, plan.planned_time, plan.deadline):
                return self._duplicate(message, topic, key)
            ledger.count(Decision.MISSED, device)
            log_part(
                Decision.MISSED,
                message,
                topic,
                plan,
                logging.ERROR,
                reason="arrived after its deadline",
                **arrived_late(plan, arrival),
            )
            return Decision.MISSED
        record = plan_record(plan, remaining)
        if not self.journal.claim(
            key, device, sequence, Decision.SCHEDULED, plan.planned_time, plan.deadline, message.to_json(), record
        ):
            return self._duplicate(message, topic, key)
        self.firing.submit(
            order_of(message, key, plan, self.settings.relay_id),
            plan,
            actuator,
            arrival,
            arrival_mono,
            BeltTravel(remaining, arrival_mono, timing.tolerance_s, target),
        )
        return Decision.SCHEDULED

    def resume(self, entry: Any, now: float, now_mono: float) -> None:
        """A part reject a previous run scheduled: fire it at its last planned time if still in time."""
        try:
            message = PartMessage.model_validate_json(entry.message or "")
            plan = plan_from_record(entry.plan or {})
        except (ValidationError, TypeError, KeyError) as exc:
            log.error(
                "unreadable journal entry; counted missed",
                extra={"event": "relay_journal_bad", "message_id": entry.message_id, "error": str(exc)},
            )
            self.journal.finish(entry.message_id, Decision.MISSED)
            self.ledger.count(Decision.MISSED, entry.device_id)
            return
        actuator = self.actuator_of(message.device_id)
        if now > plan.deadline or actuator is None:
            self.journal.finish(entry.message_id, Decision.MISSED)
            self.ledger.count(Decision.MISSED, message.device_id)
            reason = "deadline passed while the relay was down" if actuator else "no actuator any more"
            log_part(Decision.MISSED, message, "journal", plan, logging.ERROR, reason=reason)
            return
        self.firing.submit(
            order_of(message, entry.message_id, plan, self.settings.relay_id), plan, actuator, now, now_mono
        )
        log.info(
            "resumed a scheduled part reject",
            extra={"event": "relay_resumed", "message_id": entry.message_id, "part_id": message.part_id},
        )

    def _duplicate(self, message: PartMessage, topic: str, key: str) -> Decision:
        self.ledger.count(Decision.DUPLICATE, message.device_id)
        log_part(Decision.DUPLICATE, message, topic, None, logging.INFO, first_decision=self.journal.state_of(key))
        return Decision.DUPLICATE


def order_of(message: PartMessage, key: str, plan: Plan, relay_id: str) -> FireOrder:
    """The fire order of a part (its journal key is the order's message id)."""
    return FireOrder(
        message_id=key,
        device_id=message.device_id,
        sequence=message.frames.last_sequence or 0,
        capture_time=message.decision_time,
        image_score=message.log_nfa,
        regions=len(message.regions),
        planned_time=plan.planned_time,
        deadline=plan.deadline,
        relay_id=relay_id,
        part_id=message.part_id,
    )


def log_part(
    decision: Decision, message: PartMessage, topic: str, plan: Plan | None, level: int, **context: Any
) -> None:
    """One decision line about a part message."""
    extra: dict[str, Any] = {
        "event": "relay_decision",
        "decision": decision,
        "message_id": message.message_id,
        "device_id": message.device_id,
        "part_id": message.part_id,
        "trigger_id": message.trigger_id,
        "topic": topic,
        "decision_time": message.decision_time,
        "replayed": message.replayed,
    }
    if plan is not None:
        extra.update(plan_fields(plan))
    extra.update(context)
    log.log(level, "%s: %s part %s", decision, message.device_id, message.part_id, extra=extra)
