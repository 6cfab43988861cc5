"""The reject relay: subscribe to inspection messages, decide, and fire the actuator at the planned moment.

Threads: paho's network thread (``connection``) hands each message to ``handle``, which parses it
(``intake``), decides and journals it before the MQTT acknowledgement leaves; ``firing``'s scheduler
thread waits for the next due reject and a small pool calls the actuator.

Each message gets exactly one final decision, logged as one line (``event = relay_decision``) and counted:

- ``skipped-good``: not anomalous; nothing to do.
- ``fired``: the actuator succeeded, between the planned time and the deadline.
- ``missed``: anomalous, but the deadline (planned time + tolerance) had passed when it arrived or
  when it came due; never fired late. The planned time counts from the capture or decision, never from the
  arrival, so a message delayed in the broker is missed, not fired at whatever part is at the actuator now.
- ``failed``: every allowed attempt of the actuator failed (retries only before the deadline).
- ``duplicate``: a message id already decided (broker redelivery, publisher retry, across restarts).
- ``unconfigured``: anomalous, from a camera with no travel time or actuator configured.
- ``malformed``: not a valid inspection message (logged with the topic and the reason): too large,
  nested too deep, not JSON, a ``device_id`` other than the topic's (``<prefix>/<device_id>/inspection``
  is the camera's identity, which the broker's ACL ties to the box's credentials), an id unusable in a
  topic or argv, a camera beyond ``max_devices``. Also any internal error while deciding: every message is
  acknowledged, so no payload can hold the broker's in-flight window and stall the relay.
- ``interrupted``: the relay stopped while the actuator ran; not repeated after the restart.
- ``unknown-device``: from a camera not in ``cameras`` nor under ``[devices]``: counted, never fired.
- ``rate-limited``: beyond the sender's ``[limits]`` budget: dropped unparsed, counted.
- ``skipped-parts-mode``: anomalous, from a camera that sends part messages (they decide its rejects).

The words are ``report.Decision``; its ``counter`` names the stats field each one counts, and ``ledger.py``
counts them (one ledger for the gate, the inspection path here, the part path and firing's ``FireOutcome``).
What a message may cost before it is parsed (size, known camera, budget) is ``gate.py``'s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import paho.mqtt.client as paho
from pydantic import ValidationError

from edge_agent.messages import InspectionMessage, RelayStats, StatusText
from edge_agent.relay.actuators import Actuator, FireOrder, create_actuator
from edge_agent.relay.config import RelaySettings
from edge_agent.relay.connection import RelayConnection
from edge_agent.relay.dedupe import DecisionJournal
from edge_agent.relay.firing import FireOutcome, Firing
from edge_agent.relay.gate import IntakeGate
from edge_agent.relay.intake import MalformedMessage, parse_inspection
from edge_agent.relay.ledger import Ledger
from edge_agent.relay.parts import PartDecisions
from edge_agent.relay.report import (
    Decision,
    arrived_late,
    late_by_ms,
    late_hint,
    log_decision,
    log_order,
)
from edge_agent.relay.schedule import ClockOffsets, Plan, plan_fire

log = logging.getLogger(__name__)

CLOCK_KEY = "clock_offsets"


class RejectRelay:
    """Intake, decisions, journal, scheduling and counts; ``start()`` then ``stop()``."""

    def __init__(self, settings: RelaySettings, journal: DecisionJournal | None = None) -> None:
        self.settings = settings
        assert settings.journal is not None
        self.journal = journal or DecisionJournal(settings.journal, settings.retention_h * 3600.0)
        # What was decided, shared by the gate, the inspection path (here), the part path and firing's outcomes.
        self.ledger = Ledger(settings.max_devices, settings.devices)
        self.started_wall = time.time()
        self.clock = ClockOffsets(settings.clock, self._kept_offsets())
        self.connection = RelayConnection(settings, self.journal, self._on_message)
        self.firing = Firing(settings, self.journal, self._on_outcome)
        self._actuators = self._build_actuators()
        self.gate = IntakeGate(settings, self.ledger, lambda: self.parts.encoder is not None)
        # Part and belt messages (relay/parts.py): the same ledger, journal, clock and firing.
        self.parts = PartDecisions(
            settings, self.ledger, self.journal, self.clock, self.firing, self.actuator_of, self.gate.refuse
        )

    # -- topics and state ---------------------------------------------------------------------------

    def topic(self, leaf: str) -> str:
        """``<prefix>/relay/<relay_id>/<leaf>``."""
        return self.connection.topic(leaf)

    @property
    def connected(self) -> bool:
        return self.connection.connected

    @property
    def stopped(self) -> bool:
        """True once ``stop()`` began."""
        return self.firing.halted

    def wait_subscribed(self, timeout: float) -> bool:
        """True once connected and subscribed to every topic."""
        return self.connection.wait_subscribed(timeout)

    @property
    def pending(self) -> int:
        """Rejects scheduled or being fired."""
        return self.firing.pending

    def responsive(self, stall_s: float = 10.0) -> bool:
        """True while the scheduler thread is alive and looping (for the systemd watchdog)."""
        return self.firing.responsive(stall_s)

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Resume what the journal says was scheduled, start the scheduler and connect (in the background)."""
        self._resume_journal()
        self.firing.start()
        self.connection.start()

    def stop(self, status: StatusText = "stopped", drain_s: float | None = None) -> None:
        """Fire what is due within ``drain_s`` (default: the config's), publish the final status, disconnect.

        Rejects due later stay in the journal and are resumed by the next start; messages that arrive
        meanwhile are journaled as usual (or stay queued in the broker's session).
        """
        drain_s = self.settings.stop_drain_s if drain_s is None else drain_s
        self.connection.stopping()
        self.firing.drain(drain_s)
        self.firing.stop()
        self.connection.stop(status)
        self._save_offsets()
        left = len(self.journal.entries("scheduled"))
        self.journal.close()
        for actuator in self._actuators.values():
            actuator.close()
        log.info(
            "reject relay stopped",
            extra={"event": "relay_stopped", "status": status, "left_scheduled": left, **self._totals()},
        )

    def _on_message(self, message: paho.MQTTMessage) -> None:
        arrival, arrival_mono = time.time(), time.monotonic()
        try:
            self.handle(message.topic, bytes(message.payload), arrival, arrival_mono)
        except Exception as exc:  # never let one message stop the relay
            # Acknowledged all the same (connection.py says why). The journal never raises (it falls back to
            # memory, counted in journal_errors).
            self.ledger.internal_error()
            log.exception(
                "internal error while handling a message; counted malformed and acknowledged",
                extra={
                    "event": "relay_decision",
                    "decision": Decision.MALFORMED,
                    "topic": message.topic[:200],
                    "error": f"internal error: {type(exc).__name__}",
                    "mid": message.mid,
                },
            )

    def publish_stats(self) -> RelayStats:
        """Publish (QoS 0) and return the current numbers."""
        stats = self.stats()
        self.connection.publish("stats", stats.model_dump_json())
        return stats

    # -- decisions ----------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, arrival: float, arrival_mono: float) -> Decision:
        """Decide one message (journaled before returning); returns the decision.

        What one sender may cost comes first (relay/gate.py), before any parse: the size and values for the topic's
        kind of message, that the camera is one this relay acts for, and the sender's message budget.
        """
        kind = self.gate.kind(topic)
        refusal, device = self.gate.admit(kind, topic, payload)
        if refusal is not None:
            return refusal
        if kind == "speed":
            return self.parts.handle_speed(topic, payload)
        if kind == "encoder":
            return self.parts.handle_encoder(topic, payload, arrival)
        assert device is not None
        if kind == "part":
            return self.parts.handle_part(topic, payload, arrival, arrival_mono)
        try:
            message = parse_inspection(payload)
            if message.device_id != device:
                raise MalformedMessage(
                    f"device_id {message.device_id!r} is not the topic's {device!r}; a camera publishes only "
                    "under its own id"
                )
            self.ledger.admit(device)
        except MalformedMessage as exc:
            self.gate.refuse(topic, exc, payload)
            return Decision.MALFORMED
        timing = self.settings.timing_for(device)
        offset = self.clock.observe(message, arrival, timing.clock_offset_s if timing else 0.0)
        refused = self.clock.refused(device)
        self.ledger.received(
            device, offset.offset_s, offset.source, refused, None if message.replayed else message.model
        )
        if not message.anomalous:
            return self._decide_good(message, topic)
        self.ledger.anomalous(device)
        if self.ledger.sends_parts(device):
            # This camera sends part messages: they decide its rejects; its inspections are for dashboards.
            self.ledger.count(Decision.SKIPPED_PARTS_MODE, device)
            log_decision(Decision.SKIPPED_PARTS_MODE, message, topic, None, logging.INFO)
            return Decision.SKIPPED_PARTS_MODE
        actuator = self.actuator_of(device)
        if timing is None or actuator is None:
            return self._decide_unconfigured(message, topic, timing is None)
        plan = plan_fire(message, arrival, timing, offset)
        if arrival > plan.deadline:
            if not self.journal.claim(
                message.message_id, device, message.sequence, Decision.MISSED, plan.planned_time, plan.deadline
            ):
                return self._decide_duplicate(message, topic)
            self.ledger.count(Decision.MISSED, device)
            log_decision(
                Decision.MISSED,
                message,
                topic,
                plan,
                logging.ERROR,
                reason="arrived after its deadline",
                **arrived_late(plan, arrival),
                **late_hint(message, plan),
            )
            return Decision.MISSED
        if not self.journal.claim(
            message.message_id,
            device,
            message.sequence,
            Decision.SCHEDULED,
            plan.planned_time,
            plan.deadline,
            message.to_json(),
            asdict(plan),
        ):
            return self._decide_duplicate(message, topic)
        self._schedule(message, plan, actuator, arrival, arrival_mono, topic)
        return Decision.SCHEDULED

    def actuator_of(self, device: str) -> Actuator | None:
        """The camera's own actuator, else the default one."""
        return self._actuators.get(device) or self._actuators.get("")

    def _decide_good(self, message: InspectionMessage, topic: str) -> Decision:
        if not self.ledger.first_good(message.message_id):
            return self._decide_duplicate(message, topic)
        self.ledger.count(Decision.SKIPPED_GOOD, message.device_id)
        if self.settings.log_good_decisions:
            log_decision(Decision.SKIPPED_GOOD, message, topic, None, logging.INFO)
        return Decision.SKIPPED_GOOD

    def _decide_unconfigured(self, message: InspectionMessage, topic: str, no_timing: bool) -> Decision:
        if not self.journal.claim(message.message_id, message.device_id, message.sequence, Decision.UNCONFIGURED):
            return self._decide_duplicate(message, topic)
        self.ledger.count(Decision.UNCONFIGURED, message.device_id)
        what = "travel time" if no_timing else "actuator"
        log_decision(
            Decision.UNCONFIGURED,
            message,
            topic,
            None,
            logging.ERROR,
            reason=f"no {what} configured for device {message.device_id!r}: add [devices.{message.device_id}]",
        )
        return Decision.UNCONFIGURED

    def _decide_duplicate(self, message: InspectionMessage, topic: str) -> Decision:
        self.ledger.count(Decision.DUPLICATE, message.device_id)
        first = self.journal.state_of(message.message_id) if message.anomalous else Decision.SKIPPED_GOOD.value
        log_decision(Decision.DUPLICATE, message, topic, None, logging.INFO, first_decision=first)
        return Decision.DUPLICATE

    def _schedule(
        self,
        message: InspectionMessage,
        plan: Plan,
        actuator: Actuator,
        arrival: float,
        arrival_mono: float,
        topic: str,
    ) -> None:
        order = FireOrder(
            message_id=message.message_id,
            device_id=message.device_id,
            sequence=message.sequence,
            capture_time=message.capture_time,
            image_score=message.image_score,
            regions=len(message.regions),
            planned_time=plan.planned_time,
            deadline=plan.deadline,
            relay_id=self.settings.relay_id,
        )
        self.firing.submit(order, plan, actuator, arrival, arrival_mono)
        log.debug(
            "reject scheduled",
            extra={
                "event": "relay_scheduled",
                "message_id": message.message_id,
                "device_id": message.device_id,
                "sequence": message.sequence,
                "topic": topic,
                "planned_time": round(plan.planned_time, 6),
                "in_s": round(plan.planned_time - arrival, 4),
            },
        )

    def _resume_journal(self) -> None:
        """Rejects a previous run scheduled: fire them if still in time, else count them missed."""
        for entry in self.journal.entries("firing"):
            self.journal.finish(entry.message_id, Decision.INTERRUPTED)
            self.ledger.count(Decision.INTERRUPTED, entry.device_id)
            log.error(
                "the relay stopped while firing a reject; outcome unknown, not repeated",
                extra={
                    "event": "relay_decision",
                    "decision": Decision.INTERRUPTED,
                    "message_id": entry.message_id,
                    "device_id": entry.device_id,
                    "sequence": entry.sequence,
                    "planned_time": entry.planned,
                },
            )
        now, now_mono = time.time(), time.monotonic()
        for entry in self.journal.entries("scheduled"):
            if entry.message_id.startswith("part:"):
                self.parts.resume(entry, now, now_mono)
                continue
            try:
                message = InspectionMessage.model_validate_json(entry.message or "")
                plan = Plan(**(entry.plan or {}))
            except (ValidationError, TypeError) as exc:
                log.error(
                    "unreadable journal entry; counted missed",
                    extra={"event": "relay_journal_bad", "message_id": entry.message_id, "error": str(exc)},
                )
                self.journal.finish(entry.message_id, Decision.MISSED)
                self.ledger.count(Decision.MISSED, entry.device_id)
                continue
            actuator = self.actuator_of(message.device_id)
            if now > plan.deadline or actuator is None:
                self.journal.finish(entry.message_id, Decision.MISSED)
                self.ledger.count(Decision.MISSED, message.device_id)
                log_decision(
                    Decision.MISSED,
                    message,
                    "journal",
                    plan,
                    logging.ERROR,
                    reason="deadline passed while the relay was down" if actuator else "no actuator any more",
                    late_by_ms=late_by_ms(plan, now),
                )
                continue
            self._schedule(message, plan, actuator, now, now_mono, "journal")
            log.info(
                "resumed a scheduled reject",
                extra={"event": "relay_resumed", "message_id": message.message_id, "device_id": message.device_id},
            )

    # -- outcomes of firing ---------------------------------------------------------------------------

    def _on_outcome(self, outcome: FireOutcome) -> None:
        """Count and log what ``firing`` did with a job (its journal entry is already final)."""
        order, plan = outcome.job.order, outcome.job.plan
        if outcome.decision is Decision.FIRED:
            assert outcome.lateness_ms is not None
            self.ledger.fired(order.device_id, outcome.lateness_ms)
        else:
            # MISSED: came due too late (every actuator worker busy, an overloaded box, a belt stopped too long):
            # never fired after the deadline. FAILED: every allowed attempt failed.
            self.ledger.count(outcome.decision, order.device_id)
        level = logging.INFO if outcome.decision is Decision.FIRED else logging.ERROR
        log_order(outcome.decision, order, plan, level, **outcome.log_fields())

    # -- counting, logging, stats -------------------------------------------------------------------

    def _totals(self) -> dict[str, int]:
        return self.ledger.totals(self.journal.errors)

    def stats(self) -> RelayStats:
        """The current numbers (what ``stats`` publishes)."""
        snapshot = self.ledger.snapshot(self.journal.errors)
        uptime_s = time.time() - self.started_wall
        return snapshot.stats(self.settings.relay_id, uptime_s, self.connected, self.pending, not self.journal.failing)

    def housekeeping(self) -> None:
        """Prune old journal rows and keep the clock estimates (called now and then by the supervisor)."""
        pruned = self.journal.prune()
        if pruned:
            log.info("journal pruned", extra={"event": "relay_journal_pruned", "rows": pruned})
        self._save_offsets()

    # -- helpers ------------------------------------------------------------------------------------

    def _build_actuators(self) -> dict[str, Actuator]:
        """ "" -> the default actuator, device id -> a device's own."""
        actuators: dict[str, Actuator] = {}
        if self.settings.actuator is not None:
            actuators[""] = create_actuator(self.settings.actuator, self.connection)
        for device_id, device in self.settings.devices.items():
            if device.actuator is not None:
                actuators[device_id] = create_actuator(device.actuator, self.connection)
        return actuators

    def _kept_offsets(self) -> dict[str, tuple[float, float]]:
        stored = self.journal.get_meta(CLOCK_KEY) or {}
        return {device: (float(value[0]), float(value[1])) for device, value in stored.items()}

    def _save_offsets(self) -> None:
        confirmed = self.clock.confirmed()
        if confirmed:
            self.journal.set_meta(CLOCK_KEY, {device: list(value) for device, value in confirmed.items()})
