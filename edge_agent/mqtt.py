"""MQTT publishing: retained status with a Will, QoS 1 inspection messages, reconnect with backoff.

Every QoS 1 message goes into an *outbox* first and leaves it only when the broker acknowledges it
(PUBACK). The outbox, not paho's internal queue, is the truth: a connection thread opens one fresh
paho-mqtt 2.x client (callback API version 2) per broker session and, on each successful connect, sends
``online`` and then the whole outbox oldest first before new messages may pass ("the gate"). So a
broker that is down at start or goes away later never stops the agent, nothing unacknowledged is
lost while the agent runs, and messages reach the broker in the order they were made (a message whose
PUBACK was lost with the connection is sent again: subscribers deduplicate on ``message_id``). The
outbox is also where a persistent spool plugs in (same interface).

Reconnects back off exponentially (``reconnect_initial_s`` doubling up to ``reconnect_max_s``). With
``protocol = "auto"`` a session starts as MQTT 5 and falls back to 3.1.1 when the broker refuses
version 5 at the protocol level (CONNACK "unsupported protocol version").
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import MqttConfig
from edge_agent.messages import InspectionMessage, StatsMessage, StatusText, topic

log = logging.getLogger(__name__)

_PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}
_UNSUPPORTED_PROTOCOL = 0x84  # MQTT 5 CONNACK reason; paho maps a 3.1.1 broker's "refused: version" to it


@dataclass(frozen=True)
class OutgoingMessage:
    """A QoS 1 message from creation until the broker acknowledges it."""

    key: str  # unique, e.g. the inspection message id
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    expires_at: float | None = None  # unix seconds; None = never


class Outbox(Protocol):
    """Unacknowledged QoS 1 messages, oldest first."""

    def add(self, message: OutgoingMessage) -> None: ...

    def ack(self, key: str) -> None: ...

    def pending(self) -> list[OutgoingMessage]: ...

    def __len__(self) -> int: ...


class MemoryOutbox:
    """An outbox in memory: survives broker outages, not agent restarts."""

    def __init__(self) -> None:
        self._messages: OrderedDict[str, OutgoingMessage] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, message: OutgoingMessage) -> None:
        with self._lock:
            self._messages[message.key] = message

    def ack(self, key: str) -> None:
        with self._lock:
            self._messages.pop(key, None)

    def pending(self) -> list[OutgoingMessage]:
        with self._lock:
            return list(self._messages.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._messages)


@dataclass
class PublisherCounters:
    """What the publisher has done since start."""

    connects: int = 0
    inspections_published: int = 0
    inspections_skipped: int = 0  # not anomalous under publish = "anomalous"
    acked: int = 0
    refused: int = 0  # PUBACK with a failure reason (MQTT 5)


class MqttPublisher:
    """The agent's connection to its broker."""

    def __init__(self, config: MqttConfig, device_id: str, outbox: Outbox | None = None) -> None:
        self.config = config
        self.device_id = device_id
        self.client_id = config.client_id or f"edge-agent-{device_id}"
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self.counters = PublisherCounters()
        self.protocol = _PROTOCOLS.get(config.protocol, MQTTProtocolVersion.MQTTv5)
        self._lock = threading.Lock()  # mids and acknowledgements (taken inside paho callbacks)
        self._client_lock = threading.RLock()  # the current client and the gate (never taken under paho's locks)
        self._delivered = threading.Condition(self._lock)
        self._client: paho.Client | None = None
        self._gate_open = False
        self._mids: dict[int, str] = {}
        self._early_acks: set[int] = set()
        self._connected = threading.Event()
        self._session_ended = threading.Event()
        self._stop_event = threading.Event()
        self._stopping = False
        self._session_was_connected = False
        self._retry_now = False
        self._thread: threading.Thread | None = None

    # -- topics -------------------------------------------------------------------------------------

    def topic(self, leaf: str) -> str:
        """``<prefix>/<device_id>/<leaf>``."""
        return topic(self.config.prefix, self.device_id, leaf)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def protocol_name(self) -> str:
        return "5" if self.protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1"

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background; an unreachable broker is logged and retried, never raised."""
        log.info(
            "connecting to MQTT broker",
            extra={
                "event": "mqtt_connecting",
                "host": self.config.host,
                "port": self.config.port,
                "client_id": self.client_id,
                "protocol": self.config.protocol,
            },
        )
        self._thread = threading.Thread(target=self._maintain_connection, name="mqtt-connection", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected (CONNACK success), False after ``timeout`` seconds."""
        return self._connected.wait(timeout)

    def stop(self, status: StatusText = "stopped", timeout: float | None = None) -> bool:
        """Publish the final status, wait (bounded) for every acknowledgement, disconnect.

        Returns True when nothing was left unacknowledged.
        """
        timeout = self.config.drain_timeout_s if timeout is None else timeout
        self._stopping = True
        self._publish_status(status)
        delivered = self.wait_until_delivered(timeout)
        left = len(self.outbox)
        if not delivered:
            log.error(
                "broker did not acknowledge every message before exit",
                extra={"event": "mqtt_undelivered", "messages": left, "connected": self.connected},
            )
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        with self._client_lock:
            client, self._client, self._gate_open = self._client, None, False
        if client is not None:
            client.disconnect()  # a clean DISCONNECT: the broker does not publish the Will
            client.loop_stop()
        self._connected.clear()
        log.info(
            "MQTT publisher stopped",
            extra={"event": "mqtt_stopped", "status": status, "acked": self.counters.acked, "undelivered": left},
        )
        return delivered

    def wait_until_delivered(self, timeout: float) -> bool:
        """Block until the outbox is empty or ``timeout`` seconds passed; True when empty."""
        deadline = time.monotonic() + timeout
        with self._delivered:
            while len(self.outbox):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._delivered.wait(min(remaining, 0.5))
        return True

    # -- the connection thread ----------------------------------------------------------------------

    def _maintain_connection(self) -> None:
        """One broker session after another, with exponential backoff between failed ones."""
        delay = float(self.config.reconnect_initial_s)
        while not self._stop_event.is_set():
            client = self._new_client(self.protocol)
            with self._client_lock:
                self._client, self._gate_open = client, False
            with self._lock:
                self._mids.clear()
                self._early_acks.clear()
            self._session_ended.clear()
            self._session_was_connected = False
            self._retry_now = False
            try:
                client.connect(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
            except (OSError, ValueError) as exc:
                log.warning(
                    "cannot reach MQTT broker; will retry with backoff",
                    extra={"event": "mqtt_unreachable", "host": self.config.host, "port": self.config.port,
                           "error": str(exc), "retry_in_s": delay, "pending": len(self.outbox)},
                )  # fmt: skip
            else:
                client.loop_start()
                while not self._session_ended.wait(0.5):
                    if self._stop_event.is_set():
                        return  # stop() disconnects this client
                client.loop_stop()
            if self._session_was_connected:
                delay = float(self.config.reconnect_initial_s)
            if self._retry_now:
                continue
            if self._stop_event.wait(delay):
                return
            delay = min(delay * 2, float(self.config.reconnect_max_s))

    # -- publishing ---------------------------------------------------------------------------------

    def publish_inspection(self, message: InspectionMessage) -> bool:
        """Queue one inspection message at QoS 1 (unless policy skips good frames); True when queued."""
        if self.config.publish == "anomalous" and not message.anomalous:
            self.counters.inspections_skipped += 1
            return False
        expiry = self.config.message_expiry_s
        outgoing = OutgoingMessage(
            key=message.message_id,
            topic=self.topic("inspection"),
            payload=message.to_json().encode("utf-8"),
            qos=1,
            expires_at=time.time() + expiry if expiry > 0 else None,
        )
        self._enqueue(outgoing)
        self.counters.inspections_published += 1
        return True

    def publish_stats(self, stats: StatsMessage) -> None:
        """Periodic numbers at QoS 0 while connected: a lost sample is replaced by the next."""
        with self._client_lock:
            if self._gate_open and self._client is not None:
                self._client.publish(self.topic("stats"), stats.model_dump_json(), qos=0)

    def _publish_status(self, status: StatusText) -> None:
        self._enqueue(self._status_message(status))

    def _status_message(self, status: StatusText) -> OutgoingMessage:
        return OutgoingMessage(
            key=f"status-{status}-{time.monotonic_ns()}",
            topic=self.topic("status"),
            payload=status.encode(),
            qos=1,
            retain=True,
        )

    def _enqueue(self, message: OutgoingMessage) -> None:
        """Into the outbox; straight on to the broker when the gate is open (else at the next connect)."""
        with self._client_lock:
            self.outbox.add(message)
            if self._gate_open and self._client is not None:
                self._send(self._client, message)

    def _send(self, client: paho.Client, message: OutgoingMessage) -> None:
        """Hand one message to paho. Called with self._client_lock held, never with self._lock."""
        properties = None
        if message.expires_at is not None and self.protocol == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = max(1, round(message.expires_at - time.time()))
        # paho's on_publish runs under paho's own lock: never hold self._lock while calling into paho.
        info = client.publish(
            message.topic, message.payload, qos=message.qos, retain=message.retain, properties=properties
        )
        with self._lock:
            if info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
                self._acknowledge(message.key)
            else:
                self._mids[info.mid] = message.key

    def _acknowledge(self, key: str) -> None:
        """Called with self._lock held."""
        self.outbox.ack(key)
        self.counters.acked += 1
        if not len(self.outbox):
            self._delivered.notify_all()

    # -- paho client and callbacks ------------------------------------------------------------------

    def _new_client(self, protocol: MQTTProtocolVersion) -> paho.Client:
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            reconnect_on_failure=False,  # the connection thread reconnects, with a fresh client
        )
        client.will_set(self.topic("status"), "offline", qos=1, retain=True)
        client.max_inflight_messages_set(100)
        if self.config.username:
            client.username_pw_set(self.config.username, self.config.password)
        if self.config.tls is not None:
            tls = self.config.tls
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
            )
            client.tls_insecure_set(tls.insecure)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _on_connect(
        self, client: paho.Client, userdata: object, flags: object, reason: object, properties: object
    ) -> None:
        code = int(getattr(reason, "value", reason))  # type: ignore[call-overload]
        if code == 0:
            self._on_session_start(client)
            return
        if (
            code == _UNSUPPORTED_PROTOCOL
            and self.config.protocol == "auto"
            and self.protocol == MQTTProtocolVersion.MQTTv5
        ):
            log.warning(
                "broker refused MQTT 5, falling back to MQTT 3.1.1",
                extra={"event": "mqtt_protocol_fallback", "host": self.config.host, "port": self.config.port},
            )
            self.protocol = MQTTProtocolVersion.MQTTv311
            self._retry_now = True
        else:
            log.error(
                "MQTT broker refused the connection; retrying",
                extra={"event": "mqtt_refused", "reason": str(reason), "code": code, "host": self.config.host},
            )
        self._session_ended.set()

    def _on_session_start(self, client: paho.Client) -> None:
        """Connected: ``online`` first, then the outbox oldest first, then open the gate for new messages."""
        with self._client_lock:
            if client is not self._client:
                return
            pending = self.outbox.pending()
            self._connected.set()
            self._session_was_connected = True
            self.counters.connects += 1
            log.info(
                "connected to MQTT broker",
                extra={"event": "mqtt_connected", "host": self.config.host, "port": self.config.port,
                       "protocol": self.protocol_name, "pending": len(pending)},
            )  # fmt: skip
            if self.protocol != MQTTProtocolVersion.MQTTv5 and self.config.message_expiry_s:
                log.warning(
                    "MQTT 3.1.1 has no message expiry: late inspection messages are not dropped by the broker",
                    extra={"event": "mqtt_no_expiry"},
                )
            if not self._stopping:
                online = self._status_message("online")
                self.outbox.add(online)
                self._send(client, online)
            for message in pending:
                self._send(client, message)
            self._gate_open = True

    def _on_disconnect(
        self, client: paho.Client, userdata: object, flags: object, reason: object, properties: object
    ) -> None:
        with self._client_lock:
            if client is not self._client:
                return
            self._gate_open = False
        self._connected.clear()
        self._session_ended.set()
        if self._session_was_connected and not self._stopping:
            log.warning(
                "lost connection to MQTT broker; reconnecting with backoff",
                extra={"event": "mqtt_disconnected", "reason": str(reason), "pending": len(self.outbox)},
            )

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, reason: object, properties: object) -> None:
        code = int(getattr(reason, "value", 0) or 0)
        with self._lock:
            if client is not self._client:
                return
            key = self._mids.pop(mid, None)
            if key is None:
                self._early_acks.add(mid)
                return
            if code >= 0x80:
                self.counters.refused += 1
                log.error(
                    "broker refused a message",
                    extra={"event": "mqtt_publish_refused", "key": key, "reason": str(reason), "code": code},
                )
            self._acknowledge(key)
