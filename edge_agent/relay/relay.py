"""The reject relay: subscribe to inspection messages, decide, and fire the actuator at the planned moment.

Threads: paho's network thread parses each message, decides and journals it (before the MQTT
acknowledgement leaves); the scheduler thread waits for the next due reject on the monotonic clock
and hands it to a small pool that calls the actuator (a slow actuator never delays the next reject).

Each message gets exactly one final decision, logged as one line (``event = relay_decision``) and counted:

- ``skipped-good``: not anomalous; nothing to do.
- ``fired``: the actuator succeeded, between the planned time and the deadline.
- ``missed``: anomalous, but the deadline (planned time + tolerance) had passed when it arrived or
  when it came due; never fired late.
- ``failed``: every allowed attempt of the actuator failed (retries only before the deadline).
- ``duplicate``: a message id already decided (broker redelivery, publisher retry, across restarts).
- ``unconfigured``: anomalous, from a camera with no travel time or actuator configured.
- ``malformed``: not a valid inspection message (logged with the topic and the reason): too large,
  nested too deep, not JSON, a ``device_id`` other than the topic's (``<prefix>/<device_id>/inspection``
  is the camera's identity, which the broker's ACL ties to the box's credentials), an id unusable in a
  topic or argv, a camera beyond ``max_devices``. Also any internal error while deciding: every message is
  acknowledged, so no payload can hold the broker's in-flight window and stall the relay.
- ``interrupted``: the relay stopped while the actuator ran; not repeated after the restart.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import socket
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from edge_agent.publish.messages import (
    SCHEMA,
    InspectionMessage,
    PayloadError,
    RelayDeviceStats,
    RelayStats,
    StatusText,
    is_valid_id,
    parse_json_object,
    relay_topic,
)
from edge_agent.relay.actuators import Actuator, ActuatorError, FireOrder, create_actuator
from edge_agent.relay.config import RelaySettings
from edge_agent.relay.dedupe import DecisionJournal
from edge_agent.relay.schedule import ClockOffsets, Plan, plan_fire

log = logging.getLogger(__name__)

ACTUATOR_WORKERS = 4
GOOD_IDS_REMEMBERED = 4096  # good messages are not journaled; this catches their redeliveries for the counts
LATENESS_SAMPLES = 1000
SCHEDULER_TICK_S = 0.5  # the scheduler's heartbeat (watchdog) even when nothing is due
CLOCK_KEY = "clock_offsets"
TOPICS_KEY = "subscribed_topics"
_PAYLOAD_PREVIEW = 200
# An inspection message is about 1 kB plus ~100 bytes per region; 1 MiB leaves room for thousands of regions.
MAX_INSPECTION_BYTES = 1 << 20
INSPECTION_LEAF = "inspection"


class MalformedMessage(ValueError):
    """A payload that is not an inspection message; the text says why."""


@dataclass(order=True)
class Job:
    """A scheduled reject (ordered by due time)."""

    due: float  # monotonic
    order_no: int
    deadline_mono: float = field(compare=False)
    order: FireOrder = field(compare=False)
    plan: Plan = field(compare=False)
    actuator: Actuator = field(compare=False)


@dataclass
class Counters:
    """What the relay decided since it started, in total and per camera."""

    malformed: int = 0
    unconfigured: int = 0
    errors: int = 0  # messages the relay failed to handle (logged, acknowledged as malformed)
    devices: dict[str, RelayDeviceStats] = field(default_factory=dict)

    def device(self, device_id: str) -> RelayDeviceStats:
        return self.devices.setdefault(device_id, RelayDeviceStats())

    def total(self, name: str) -> int:
        return sum(int(getattr(stats, name)) for stats in self.devices.values())


def parse_inspection(payload: bytes) -> InspectionMessage:
    """An inspection message from a payload; MalformedMessage names what is wrong.

    Fields a newer agent adds are ignored (same schema major version), so relays need not be upgraded
    in lock-step with the cameras.
    """
    try:
        data = parse_json_object(payload, MAX_INSPECTION_BYTES)
    except PayloadError as exc:
        raise MalformedMessage(str(exc)) from exc
    schema = data.get("schema", SCHEMA)
    if not isinstance(schema, str) or schema.split("/")[0] != SCHEMA.split("/")[0] or schema.split("/")[-1] != "1":
        raise MalformedMessage(f"schema {schema!r} is not {SCHEMA!r}")
    known = {f.alias or name for name, f in InspectionMessage.model_fields.items()} | set(
        InspectionMessage.model_fields
    )
    try:
        message = InspectionMessage.model_validate({k: v for k, v in data.items() if k in known})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise MalformedMessage(problems) from exc
    for name in ("device_id", "message_id"):
        if not is_valid_id(getattr(message, name)):
            raise MalformedMessage(f"{name} must match [A-Za-z0-9._-]{{1,64}} without a leading '-'")
    return message


def device_of_topic(topic: str) -> str:
    """The camera a topic belongs to: ``<prefix>/<device_id>/inspection``; MalformedMessage otherwise."""
    levels = topic.split("/")
    if len(levels) < 2 or levels[-1] != INSPECTION_LEAF or not is_valid_id(levels[-2]):
        raise MalformedMessage(f"topic {topic[:200]!r} is not <prefix>/<device_id>/{INSPECTION_LEAF}")
    return levels[-2]


class RejectRelay:
    """Subscriber, planner, scheduler and actuator calls; ``start()`` then ``stop()``."""

    def __init__(self, settings: RelaySettings, journal: DecisionJournal | None = None) -> None:
        self.settings = settings
        assert settings.journal is not None
        self.journal = journal or DecisionJournal(settings.journal, settings.retention_h * 3600.0)
        self.counters = Counters()
        self.started_wall = time.time()
        self.clock = ClockOffsets(settings.clock, self._kept_offsets())
        self.protocol = MQTTProtocolVersion.MQTTv5 if settings.mqtt.protocol == "5" else MQTTProtocolVersion.MQTTv311
        self._lock = threading.Lock()  # counters, good ids, lateness
        self._good_ids: OrderedDict[str, None] = OrderedDict()
        self._lateness_ms: deque[float] = deque(maxlen=LATENESS_SAMPLES)
        self._heap: list[Job] = []
        self._cond = threading.Condition()
        self._numbers = itertools.count()
        self._inflight = 0
        self._stopping = threading.Event()  # no new work is refused, but stop() is under way
        self._halt = threading.Event()  # the scheduler leaves what is not yet due in the journal
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._beat = time.monotonic()
        self._executor = ThreadPoolExecutor(ACTUATOR_WORKERS, thread_name_prefix="relay-actuator")
        self._scheduler = threading.Thread(target=self._schedule_loop, name="relay-scheduler", daemon=True)
        self._client = self._new_client()
        self._actuators = self._build_actuators()

    # -- topics and state ---------------------------------------------------------------------------

    def topic(self, leaf: str) -> str:
        """``<prefix>/relay/<relay_id>/<leaf>``."""
        return relay_topic(self.settings.mqtt.prefix, self.settings.relay_id, leaf)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_subscribed(self, timeout: float) -> bool:
        """True once connected and subscribed to every topic."""
        return self._subscribed.wait(timeout)

    @property
    def pending(self) -> int:
        """Rejects scheduled or being fired."""
        with self._cond:
            return len(self._heap) + self._inflight

    def responsive(self, stall_s: float = 10.0) -> bool:
        """True while the scheduler thread is alive and looping (for the systemd watchdog)."""
        return self._scheduler.is_alive() and time.monotonic() - self._beat < stall_s

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Resume what the journal says was scheduled, start the scheduler and connect (in the background)."""
        self._resume_journal()
        self._scheduler.start()
        mqtt = self.settings.mqtt
        log.info(
            "reject relay connecting",
            extra={
                "event": "relay_connecting",
                "host": mqtt.host,
                "port": mqtt.port,
                "client_id": self.settings.client_id,
                "topics": mqtt.topics,
                "session_expiry_s": mqtt.session_expiry_s,
            },
        )
        properties = None
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = mqtt.session_expiry_s
            self._client.connect_async(
                mqtt.host, mqtt.port, keepalive=mqtt.keepalive_s, clean_start=False, properties=properties
            )
        else:
            self._client.connect_async(mqtt.host, mqtt.port, keepalive=mqtt.keepalive_s)
        self._client.loop_start()

    def stop(self, status: StatusText = "stopped", drain_s: float | None = None) -> None:
        """Fire what is due within ``drain_s`` (default: the config's), publish the final status, disconnect.

        Rejects due later stay in the journal and are resumed by the next start; messages that arrive
        meanwhile are journaled as usual (or stay queued in the broker's session).
        """
        drain_s = self.settings.stop_drain_s if drain_s is None else drain_s
        self._stopping.set()
        self._drain(drain_s)
        self._halt.set()
        with self._cond:
            self._cond.notify_all()
        self._scheduler.join(5.0)
        self._executor.shutdown(wait=True)
        self._publish_final_status(status)
        self._client.disconnect()
        self._client.loop_stop()
        self._save_offsets()
        left = len(self.journal.entries("scheduled"))
        self.journal.close()
        for actuator in self._actuators.values():
            actuator.close()
        log.info(
            "reject relay stopped",
            extra={"event": "relay_stopped", "status": status, "left_scheduled": left, **self._totals()},
        )

    def _drain(self, drain_s: float) -> None:
        until = time.monotonic() + drain_s
        while time.monotonic() < until:
            with self._cond:
                due_soon = any(job.due <= until for job in self._heap)
                if not due_soon and self._inflight == 0:
                    return
            time.sleep(0.01)

    # -- MQTT ---------------------------------------------------------------------------------------

    def _new_client(self) -> paho.Client:
        mqtt = self.settings.mqtt
        kwargs: dict[str, Any] = {}
        if self.protocol == MQTTProtocolVersion.MQTTv311:
            kwargs["clean_session"] = False  # 3.1.1's persistent session (kept until the broker expires it)
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.settings.client_id,
            protocol=self.protocol,
            reconnect_on_failure=True,
            # Acknowledged only once the decision is journaled (_on_message).
            manual_ack=True,
            **kwargs,
        )
        client.will_set(self.topic("status"), "offline", qos=1, retain=True)
        client.reconnect_delay_set(mqtt.reconnect_initial_s, mqtt.reconnect_max_s)
        if mqtt.username:
            client.username_pw_set(mqtt.username, mqtt.password.get_secret_value() if mqtt.password else None)
        if mqtt.tls is not None:
            tls = mqtt.tls
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
            )
            client.tls_insecure_set(tls.insecure)
        client.on_socket_open = _no_delay
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _on_connect(
        self, client: paho.Client, userdata: object, flags: Any, reason: object, properties: object
    ) -> None:
        code = int(getattr(reason, "value", reason))  # type: ignore[call-overload]
        if code != 0:
            log.error(
                "MQTT broker refused the relay; retrying",
                extra={"event": "relay_mqtt_refused", "reason": str(reason), "host": self.settings.mqtt.host},
            )
            return
        session_present = bool(getattr(flags, "session_present", False))
        self._connected.set()
        log.info(
            "reject relay connected",
            extra={"event": "relay_connected", "session_present": session_present, "topics": self.settings.mqtt.topics},
        )
        topics = self.settings.mqtt.topics
        dropped = [t for t in (self.journal.get_meta(TOPICS_KEY) or []) if t not in topics]
        if dropped and session_present:
            # The persistent session still holds subscriptions the config no longer lists.
            client.unsubscribe(dropped)
        client.subscribe([(t, 1) for t in topics])
        self.journal.set_meta(TOPICS_KEY, topics)
        client.publish(self.topic("status"), "online", qos=1, retain=True)

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, reasons: list, properties: object) -> None:
        refused = [str(r) for r in reasons if int(getattr(r, "value", r)) >= 0x80]
        if refused:
            log.error(
                "broker refused a subscription",
                extra={"event": "relay_subscribe_refused", "reasons": refused, "topics": self.settings.mqtt.topics},
            )
            return
        log.info("reject relay subscribed", extra={"event": "relay_subscribed", "topics": self.settings.mqtt.topics})
        self._subscribed.set()

    def _on_connect_fail(self, client: paho.Client, userdata: object) -> None:
        log.warning(
            "cannot reach the MQTT broker; retrying with backoff",
            extra={"event": "relay_mqtt_unreachable", "host": self.settings.mqtt.host, "port": self.settings.mqtt.port},
        )

    def _on_disconnect(
        self, client: paho.Client, userdata: object, flags: object, reason: object, properties: object
    ) -> None:
        self._connected.clear()
        self._subscribed.clear()
        if not self._stopping.is_set():
            log.warning(
                "reject relay lost the MQTT broker; reconnecting (queued messages wait in the session)",
                extra={"event": "relay_mqtt_disconnected", "reason": str(reason)},
            )

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        arrival, arrival_mono = time.time(), time.monotonic()
        try:
            self.handle(message.topic, message.payload, arrival, arrival_mono)
        except Exception as exc:  # never let one message stop the relay
            # Acknowledged all the same: a message the relay cannot handle would otherwise come back after every
            # restart, and about 20 of them (the broker's in-flight window) stop all delivery to the relay. The
            # journal never raises (it falls back to memory, counted in journal_errors).
            with self._lock:
                self.counters.errors += 1
                self.counters.malformed += 1
            log.exception(
                "internal error while handling a message; counted malformed and acknowledged",
                extra={
                    "event": "relay_decision",
                    "decision": "malformed",
                    "topic": message.topic[:200],
                    "error": f"internal error: {type(exc).__name__}",
                    "mid": message.mid,
                },
            )
        if message.qos > 0:
            client.ack(message.mid, message.qos)

    # MqttSink for an MQTT actuator
    def publish_order(self, topic: str, payload: bytes, expiry_s: int, timeout_s: float) -> None:
        """Publish a reject order at QoS 1 and wait for the broker's PUBACK."""
        properties = None
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = expiry_s
        info = self._client.publish(topic, payload, qos=1, properties=properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise ActuatorError(
                f"publish to {topic} failed: {paho.error_string(info.rc)} (it may still go out later)", retryable=False
            )
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise ActuatorError(f"publish to {topic} failed: {exc}", retryable=False) from exc
        if not info.is_published():
            raise ActuatorError(f"no PUBACK for {topic} within {timeout_s} s (it may still go out)", retryable=False)

    def publish_stats(self) -> RelayStats:
        """Publish (QoS 0) and return the current numbers."""
        stats = self.stats()
        self._client.publish(self.topic("stats"), stats.model_dump_json(), qos=0)
        return stats

    def _publish_final_status(self, status: StatusText) -> None:
        if not self.connected:
            return
        info = self._client.publish(self.topic("status"), status, qos=1, retain=True)
        try:
            info.wait_for_publish(5.0)
        except (RuntimeError, ValueError):
            log.warning("final status not delivered", extra={"event": "relay_status_undelivered", "status": status})

    # -- decisions ----------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, arrival: float, arrival_mono: float) -> str:
        """Decide one message (journaled before returning); returns the decision name."""
        try:
            device = device_of_topic(topic)
            message = parse_inspection(payload)
            if message.device_id != device:
                raise MalformedMessage(
                    f"device_id {message.device_id!r} is not the topic's {device!r}; a camera publishes only "
                    "under its own id"
                )
            self._admit_device(device)
        except MalformedMessage as exc:
            with self._lock:
                self.counters.malformed += 1
            log.warning(
                "malformed message on %s: %s",
                topic,
                exc,
                extra={
                    "event": "relay_decision",
                    "decision": "malformed",
                    "topic": topic[:200],
                    "error": str(exc),
                    "payload": payload[:_PAYLOAD_PREVIEW].decode("utf-8", "replace"),
                },
            )
            return "malformed"
        timing = self.settings.timing_for(device)
        offset = self.clock.observe(message, arrival, timing.clock_offset_s if timing else 0.0)
        refused = self.clock.refused(device)
        with self._lock:
            stats = self.counters.device(device)
            stats.received += 1
            stats.clock_offset_s, stats.clock_source = round(offset.offset_s, 6), offset.source
            stats.clock_samples_refused = refused
        if not message.anomalous:
            return self._decide_good(message, topic)
        with self._lock:
            stats.anomalous += 1
        actuator = self._actuators.get(device) or self._actuators.get("")
        if timing is None or actuator is None:
            return self._decide_unconfigured(message, topic, timing is None)
        plan = plan_fire(message, arrival, timing, offset)
        if arrival > plan.deadline:
            if not self.journal.claim(
                message.message_id, device, message.sequence, "missed", plan.planned_time, plan.deadline
            ):
                return self._decide_duplicate(message, topic)
            self._count(device, "missed")
            self._log_decision(
                "missed",
                message,
                topic,
                plan,
                logging.ERROR,
                reason="arrived after its deadline",
                arrival=round(arrival, 6),
                late_by_ms=round((arrival - plan.planned_time) * 1000.0, 3),
                **_late_hint(message, plan),
            )
            return "missed"
        if not self.journal.claim(
            message.message_id,
            device,
            message.sequence,
            "scheduled",
            plan.planned_time,
            plan.deadline,
            message.to_json(),
            asdict(plan),
        ):
            return self._decide_duplicate(message, topic)
        self._schedule(message, plan, actuator, arrival, arrival_mono, topic)
        return "scheduled"

    def _admit_device(self, device: str) -> None:
        """Refuse a camera beyond ``max_devices`` (per-camera counters and clock state stay bounded)."""
        with self._lock:
            if device in self.counters.devices or device in self.settings.devices:
                return
            if len(self.counters.devices) >= self.settings.max_devices:
                raise MalformedMessage(
                    f"already {len(self.counters.devices)} cameras (max_devices); list {device!r} under [devices] "
                    "or raise max_devices"
                )
            self.counters.device(device)

    def _decide_good(self, message: InspectionMessage, topic: str) -> str:
        with self._lock:
            seen = message.message_id in self._good_ids
            if not seen:
                self._good_ids[message.message_id] = None
                if len(self._good_ids) > GOOD_IDS_REMEMBERED:
                    self._good_ids.popitem(last=False)
        if seen:
            return self._decide_duplicate(message, topic)
        self._count(message.device_id, "skipped_good")
        if self.settings.log_good_decisions:
            self._log_decision("skipped-good", message, topic, None, logging.INFO)
        return "skipped-good"

    def _decide_unconfigured(self, message: InspectionMessage, topic: str, no_timing: bool) -> str:
        if not self.journal.claim(message.message_id, message.device_id, message.sequence, "unconfigured"):
            return self._decide_duplicate(message, topic)
        with self._lock:
            self.counters.unconfigured += 1
        what = "travel time" if no_timing else "actuator"
        self._log_decision(
            "unconfigured",
            message,
            topic,
            None,
            logging.ERROR,
            reason=f"no {what} configured for device {message.device_id!r}: add [devices.{message.device_id}]",
        )
        return "unconfigured"

    def _decide_duplicate(self, message: InspectionMessage, topic: str) -> str:
        self._count(message.device_id, "duplicates")
        first = self.journal.state_of(message.message_id) if message.anomalous else "skipped-good"
        self._log_decision("duplicate", message, topic, None, logging.INFO, first_decision=first)
        return "duplicate"

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
        # Wall-clock plan -> monotonic due time, so a step of the relay's own clock cannot move a reject.
        due = arrival_mono + (plan.planned_time - arrival)
        job = Job(due, next(self._numbers), arrival_mono + (plan.deadline - arrival), order, plan, actuator)
        with self._cond:
            heapq.heappush(self._heap, job)
            self._cond.notify()
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
            self.journal.finish(entry.message_id, "interrupted")
            self._count(entry.device_id, "actuator_failures")
            log.error(
                "the relay stopped while firing a reject; outcome unknown, not repeated",
                extra={
                    "event": "relay_decision",
                    "decision": "interrupted",
                    "message_id": entry.message_id,
                    "device_id": entry.device_id,
                    "sequence": entry.sequence,
                    "planned_time": entry.planned,
                },
            )
        now, now_mono = time.time(), time.monotonic()
        for entry in self.journal.entries("scheduled"):
            try:
                message = InspectionMessage.model_validate_json(entry.message or "")
                plan = Plan(**(entry.plan or {}))
            except (ValidationError, TypeError) as exc:
                log.error(
                    "unreadable journal entry; counted missed",
                    extra={"event": "relay_journal_bad", "message_id": entry.message_id, "error": str(exc)},
                )
                self.journal.finish(entry.message_id, "missed")
                self._count(entry.device_id, "missed")
                continue
            actuator = self._actuators.get(message.device_id) or self._actuators.get("")
            if now > plan.deadline or actuator is None:
                self.journal.finish(entry.message_id, "missed")
                self._count(message.device_id, "missed")
                self._log_decision(
                    "missed",
                    message,
                    "journal",
                    plan,
                    logging.ERROR,
                    reason="deadline passed while the relay was down" if actuator else "no actuator any more",
                    late_by_ms=round((now - plan.planned_time) * 1000.0, 3),
                )
                continue
            self._schedule(message, plan, actuator, now, now_mono, "journal")
            log.info(
                "resumed a scheduled reject",
                extra={"event": "relay_resumed", "message_id": message.message_id, "device_id": message.device_id},
            )

    # -- scheduler and firing -----------------------------------------------------------------------

    def _schedule_loop(self) -> None:
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

    def _fire_job(self, job: Job) -> None:
        order, plan = job.order, job.plan
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
            lateness_ms = (now_mono - job.due) * 1000.0
            self.journal.finish(order.message_id, "fired", fired_wall)
            with self._lock:
                self.counters.device(order.device_id).fired += 1
                self._lateness_ms.append(lateness_ms)
            self._log_order(
                "fired",
                order,
                plan,
                logging.INFO,
                fired_time=round(fired_wall, 6),
                lateness_ms=round(lateness_ms, 3),
                attempts=attempts,
            )
            return
        if attempts == 0:
            # Came due too late (every actuator worker busy, an overloaded box): never fire after the deadline.
            if self.journal.begin_firing(order.message_id):
                self.journal.finish(order.message_id, "missed")
            self._count(order.device_id, "missed")
            self._log_order(
                "missed",
                order,
                plan,
                logging.ERROR,
                reason="came due after its deadline",
                late_by_ms=round((time.monotonic() - job.due) * 1000.0, 3),
            )
            return
        self.journal.finish(order.message_id, "failed")
        self._count(order.device_id, "actuator_failures")
        self._log_order(
            "failed",
            order,
            plan,
            logging.ERROR,
            reason=str(error),
            attempts=attempts,
            actuator=job.actuator.description,
            retryable=bool(error and error.retryable),
        )

    # -- counting, logging, stats -------------------------------------------------------------------

    def _count(self, device_id: str, name: str) -> None:
        with self._lock:
            stats = self.counters.device(device_id)
            setattr(stats, name, getattr(stats, name) + 1)

    def _log_decision(
        self,
        decision: str,
        message: InspectionMessage,
        topic: str,
        plan: Plan | None,
        level: int,
        **context: Any,
    ) -> None:
        extra: dict[str, Any] = {
            "event": "relay_decision",
            "decision": decision,
            "message_id": message.message_id,
            "device_id": message.device_id,
            "sequence": message.sequence,
            "topic": topic,
            "capture_time": message.capture_time,
            "replayed": message.replayed,
        }
        if plan is not None:
            extra.update(_plan_fields(plan))
        extra.update(context)
        log.log(level, "%s: %s #%d", decision, message.device_id, message.sequence, extra=extra)

    def _log_order(self, decision: str, order: FireOrder, plan: Plan, level: int, **context: Any) -> None:
        extra: dict[str, Any] = {
            "event": "relay_decision",
            "decision": decision,
            "message_id": order.message_id,
            "device_id": order.device_id,
            "sequence": order.sequence,
            "capture_time": order.capture_time,
            **_plan_fields(plan),
            **context,
        }
        log.log(level, "%s: %s #%d", decision, order.device_id, order.sequence, extra=extra)

    def _totals(self) -> dict[str, int]:
        with self._lock:
            names = ("received", "anomalous", "fired", "missed", "duplicates", "skipped_good", "actuator_failures")
            totals = {name: self.counters.total(name) for name in names}
            totals.update(
                malformed=self.counters.malformed,
                unconfigured=self.counters.unconfigured,
                errors=self.counters.errors,
                journal_errors=self.journal.errors,
            )
            return totals

    def stats(self) -> RelayStats:
        """The current numbers (what ``stats`` publishes)."""
        totals = self._totals()
        with self._lock:
            lateness = sorted(self._lateness_ms)
            devices = {name: stats.model_copy() for name, stats in self.counters.devices.items()}
        return RelayStats(
            relay_id=self.settings.relay_id,
            time=time.time(),
            uptime_s=round(time.time() - self.started_wall, 1),
            connected=self.connected,
            pending=self.pending,
            lateness_ms_p50=round(_quantile(lateness, 0.5), 3),
            lateness_ms_p99=round(_quantile(lateness, 0.99), 3),
            lateness_ms_max=round(lateness[-1], 3) if lateness else 0.0,
            devices=devices,
            journal_ok=not self.journal.failing,
            **totals,
        )

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
            actuators[""] = create_actuator(self.settings.actuator, self)
        for device_id, device in self.settings.devices.items():
            if device.actuator is not None:
                actuators[device_id] = create_actuator(device.actuator, self)
        return actuators

    def _kept_offsets(self) -> dict[str, tuple[float, float]]:
        stored = self.journal.get_meta(CLOCK_KEY) or {}
        return {device: (float(value[0]), float(value[1])) for device, value in stored.items()}

    def _save_offsets(self) -> None:
        confirmed = self.clock.confirmed()
        if confirmed:
            self.journal.set_meta(CLOCK_KEY, {device: list(value) for device, value in confirmed.items()})


def _no_delay(client: paho.Client, userdata: object, sock: Any) -> None:
    """Disable Nagle: a PUBACK still waiting for its TCP ACK must not hold back a reject order for ~40 ms."""
    # A socket wrapper without the option (websockets) is slower, still correct.
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _plan_fields(plan: Plan) -> dict[str, Any]:
    return {
        "planned_time": round(plan.planned_time, 6),
        "deadline": round(plan.deadline, 6),
        "travel_s": plan.travel_s,
        "clock_offset_s": round(plan.offset_s, 6),
        "clock_source": plan.clock_source,
    }


def _late_hint(message: InspectionMessage, plan: Plan) -> dict[str, str]:
    """Why a live message can be late: the camera's own latency may exceed the travel time."""
    latency_s = message.latency_ms.total / 1000.0
    if not message.replayed and latency_s > plan.travel_s:
        return {
            "hint": f"the camera took {latency_s:.3f} s to inspect, longer than the travel time "
            f"{plan.travel_s:.3f} s: move the actuator further downstream or speed up the model"
        }
    return {}


def _quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted values (0.0 when empty)."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]
