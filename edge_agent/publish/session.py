"""The agent's MQTT session: retained status with a Will, QoS 1 inspection messages, commands in, reconnect with backoff.

Every inspection message goes into an *outbox* first (edge_agent/publish/outbox.py; on the device the SQLite
spool, edge_agent/publish/spool.py) and leaves it only when the broker acknowledges it (PUBACK). The outbox,
not paho's internal queue, is the truth: a connection thread opens one fresh paho-mqtt 2.x client
(callback API version 2) per broker session and, on each successful connect, sends ``online``, then
the outbox oldest first, a window of ``SEND_WINDOW`` unacknowledged messages at a time (so a backlog
of 100k messages after a long outage never sits in paho's memory), and new messages behind them. So a
broker that is down at start or goes away later never stops the agent, nothing unacknowledged is
lost, and messages reach the broker in the order they were made (a message whose PUBACK was lost with
the connection is sent again: subscribers deduplicate on ``message_id``). Messages whose time to live
passed while waiting are dropped by the outbox and counted, also under MQTT 3.1.1, which has no
broker-side expiry.

Status and command results are *control* messages: QoS 1, kept in memory until acknowledged, never
spooled (a ``stopped`` or a reply replayed after a restart would be wrong). On a clean stop the final
status is the last message: it is queued after the outbox drained or ``drain_timeout_s`` passed, and
no outbox message is handed to paho after it.

Reconnects back off exponentially (``reconnect_initial_s`` doubling up to ``reconnect_max_s``). With
``protocol = "auto"`` a session starts as MQTT 5 and falls back to 3.1.1 when the broker refuses
version 5 at the protocol level (CONNACK "unsupported protocol version").

Locks: paho calls ``on_publish`` holding its own out-message lock, so nothing here that holds
``_client_lock`` (taken around every call into paho) may be taken from ``on_publish``; acknowledgements
only take ``_lock`` and wake the connection thread, which sends the next window.

Public API for what rides on the session (``edge_agent.publish.mqtt.MqttPublisher`` uses only this):
``enqueue(message)`` puts a message into the outbox and sends it when the window has room;
``send_control(message)`` queues a control message (kept in memory until acknowledged);
``publish_if_connected(leaf, payload)`` sends one QoS 0 message now, or nothing while the gate is shut.
Each takes the locks itself, so no other module touches them.

Why one module of about 500 lines: the session, the outbox window, the control queue and the final status
share those two locks and one ordering promise (nothing after ``stopped``); split over modules, the lock
rule above could no longer be checked by reading one file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import MqttConfig
from edge_agent.messages import StatusText, topic
from edge_agent.publish.client import PROTOCOLS, check_tls_files, describe_connect_error, new_client, reason_code
from edge_agent.publish.outbox import MemoryOutbox, Outbox, OutgoingMessage

log = logging.getLogger(__name__)

_UNSUPPORTED_PROTOCOL = 0x84  # MQTT 5 CONNACK reason; paho maps a 3.1.1 broker's "refused: version" to it
SEND_WINDOW = 100  # outbox messages handed to paho and not yet acknowledged, at most
STATUS_GRACE_S = 2.0  # on stop, the final status waits at least this long (or the whole timeout if shorter)
# (topic leaf under <prefix>/<device_id>/, payload, retained): a retained message is one the broker replays at
# every (re)connect; a handler of commands or triggers refuses it (it would run again and again).
MessageHandler = Callable[[str, bytes, bool], None]


@dataclass
class PublisherCounters:
    """What the publisher has done since start."""

    connects: int = 0
    inspections_published: int = 0
    inspections_skipped: int = 0  # not anomalous under publish = "anomalous", or every one under "none"
    parts_published: int = 0
    acked: int = 0
    refused: int = 0  # PUBACK with a failure reason (MQTT 5)
    messages_received: int = 0  # on subscribed topics (commands)


class MqttSession:
    """The agent's connection to its broker: sessions, the outbox window, control messages, acknowledgements."""

    def __init__(self, config: MqttConfig, device_id: str, outbox: Outbox | None = None) -> None:
        self.config = config
        self.device_id = device_id
        self.client_id = config.client_id or f"edge-agent-{device_id}"
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self.counters = PublisherCounters()
        self.protocol = PROTOCOLS.get(config.protocol, MQTTProtocolVersion.MQTTv5)
        self._lock = threading.Lock()  # mids, acknowledgements, control messages (taken inside paho callbacks)
        self._client_lock = threading.RLock()  # the current client, gate, cursor (never taken under paho's locks)
        self._delivered = threading.Condition(self._lock)
        self._client: paho.Client | None = None
        self._gate_open = False
        self._cursor = 0  # highest outbox sequence number handed to the current client
        self._inflight = 0  # outbox messages handed to the current client and not yet acknowledged
        self._mids: dict[int, tuple[str, int | str]] = {}  # mid -> ("outbox", seq) | ("control", key)
        self._early_acks: set[int] = set()
        self._control: OrderedDict[str, OutgoingMessage] = OrderedDict()
        self._subscriptions: dict[str, MessageHandler] = {}
        self._connected = threading.Event()
        self._session_ended = threading.Event()
        self._wake = threading.Event()
        self._stop_event = threading.Event()
        self._stopping = False
        self._outbox_closed = False  # set by stop() once the final status is queued: nothing may follow it
        self._session_was_connected = False
        self._session_refused = False
        self._retry_now = False
        self._transport_error = ""
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

    def pending(self) -> int:
        """Messages not yet acknowledged by the broker (outbox and control)."""
        with self._lock:
            control = len(self._control)
        return len(self.outbox) + control

    # -- life cycle ---------------------------------------------------------------------------------

    def subscribe(self, leaf_filter: str, handler: MessageHandler) -> None:
        """Subscribe (QoS 1) to ``<prefix>/<device_id>/<leaf_filter>`` on every connect; call before start().

        ``handler(leaf, payload, retained)`` runs on paho's network thread: it must return quickly and not raise.
        """
        self._subscriptions[leaf_filter] = handler

    def start(self) -> None:
        """Start connecting in the background; an unreachable broker is logged and retried, never raised.

        Raises ConfigError when a configured TLS file is missing or unreadable.
        """
        check_tls_files(self.config)
        log.info(
            "connecting to MQTT broker",
            extra={
                "event": "mqtt_connecting",
                "host": self.config.host,
                "port": self.config.port,
                "client_id": self.client_id,
                "protocol": self.config.protocol,
                "tls": self.config.tls is not None,
                "username": self.config.username,
            },
        )
        self._thread = threading.Thread(target=self._maintain_connection, name="mqtt-connection", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected (CONNACK success), False after ``timeout`` seconds."""
        return self._connected.wait(timeout)

    def stop(self, status: StatusText = "stopped", timeout: float | None = None) -> bool:
        """Drain the outbox (bounded), then publish the final status as the last message, disconnect.

        The retained status must not say ``stopped`` while inspections are still arriving, so the
        status is queued only once the outbox is empty or ``timeout`` (``mqtt.drain_timeout_s``) has
        passed; from then on no further outbox message is handed to the broker, and the status gets
        what is left of ``timeout``, at least ``min(timeout, STATUS_GRACE_S)``.

        Returns True when nothing was left unacknowledged. What is left stays in the outbox (on disk
        with a spool, sent at the next start).
        """
        timeout = self.config.drain_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._stopping = True
        self._wake.set()  # the connection thread sends the next window now
        drained = self._wait_until(lambda: not len(self.outbox), timeout)
        with self._client_lock:
            # Messages already with paho go out before the status (one connection, in order); no more after it.
            self._outbox_closed = True
        self.send_control(self._status_message(status))
        status_wait = max(deadline - time.monotonic(), min(timeout, STATUS_GRACE_S))
        delivered = self._wait_until(lambda: not self._control, status_wait) and drained and not len(self.outbox)
        left = len(self.outbox)
        if not delivered:
            log.warning(
                "broker did not acknowledge every message before exit",
                extra={"event": "mqtt_undelivered", "messages": left, "connected": self.connected},
            )
        self._stop_event.set()
        self._wake.set()
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
        """Block until the outbox and control messages are all acknowledged or ``timeout`` passed."""
        return self._wait_until(lambda: not len(self.outbox) and not self._control, timeout)

    def _wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Block until ``done()`` (checked under ``_lock``, on every acknowledgement) or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        with self._delivered:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._delivered.wait(min(remaining, 0.2))
        return True

    # -- the connection thread ----------------------------------------------------------------------

    def _maintain_connection(self) -> None:
        """One broker session after another, with exponential backoff between failed ones."""
        delay = float(self.config.reconnect_initial_s)
        while not self._stop_event.is_set():
            try:
                ended_cleanly = self._one_session(delay)
            except Exception as exc:  # the connection thread must never die: log, back off, retry
                log.exception("MQTT session failed", extra={"event": "mqtt_session_error", "error": str(exc)})
                ended_cleanly = False
            if ended_cleanly:
                return
            if self._session_was_connected:
                delay = float(self.config.reconnect_initial_s)
            if self._retry_now:
                continue
            if self._stop_event.wait(delay):
                return
            delay = min(delay * 2, float(self.config.reconnect_max_s))

    def _one_session(self, delay: float) -> bool:
        """Connect and serve one session; True when it ended because the publisher stops."""
        client = self._new_client(self.protocol)
        with self._client_lock:
            self._client, self._gate_open = client, False
        with self._lock:
            self._mids.clear()
            self._early_acks.clear()
            self._inflight = 0
        self._session_ended.clear()
        self._session_was_connected = False
        self._session_refused = False
        self._transport_error = ""
        self._retry_now = False
        try:
            client.connect(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        except (OSError, ValueError) as exc:
            log.warning(
                "cannot reach MQTT broker; will retry with backoff",
                extra={
                    "event": "mqtt_unreachable",
                    "host": self.config.host,
                    "port": self.config.port,
                    "error": describe_connect_error(exc, self.config),
                    "retry_in_s": delay,
                    "pending": len(self.outbox),
                },
            )
            return False
        client.loop_start()
        while not self._session_ended.is_set():
            if self._stop_event.is_set():
                return True  # stop() disconnects this client
            self._wake.wait(0.5)
            self._wake.clear()
            self._pump()
        client.loop_stop()
        if not self._session_was_connected and not self._session_refused:
            log.warning(
                "MQTT broker closed the connection before accepting it; will retry with backoff",
                extra={
                    "event": "mqtt_unreachable",
                    "host": self.config.host,
                    "port": self.config.port,
                    "error": f"closed during CONNECT: {self._transport_error or 'no reason given'} (does the broker require "
                    "a client certificate (mqtt.tls.cert_file/key_file)? is it an MQTT listener?)",
                    "retry_in_s": delay,
                    "pending": len(self.outbox),
                },
            )
        return False

    # -- publishing ---------------------------------------------------------------------------------

    def _status_message(self, status: StatusText) -> OutgoingMessage:
        return OutgoingMessage(
            key=f"status-{status}-{time.monotonic_ns()}",
            topic=self.topic("status"),
            payload=status.encode(),
            qos=1,
            retain=True,
        )

    def enqueue(self, message: OutgoingMessage) -> None:
        """Into the outbox (the spool on the device); handed to paho now when the window has room.

        Thread-safe; never blocks on the broker. The message leaves the outbox only on its PUBACK.
        """
        self.outbox.add(message)
        self._pump()

    def publish_if_connected(self, leaf: str, payload: str | bytes, qos: int = 0) -> bool:
        """Send ``payload`` on ``<prefix>/<device_id>/<leaf>`` now if the session is open; True if handed to paho.

        Not queued and not retried: for samples the next one replaces (stats at QoS 0).
        """
        with self._client_lock:
            if self._gate_open and self._client is not None:
                self._client.publish(self.topic(leaf), payload, qos=qos)
                return True
        return False

    def send_control(self, message: OutgoingMessage) -> None:
        """Into the control queue; straight on to the broker when the gate is open (else at the next connect).

        Control messages (status, command results) are kept in memory until acknowledged, never spooled;
        a newer status replaces an older one still waiting.
        """
        with self._client_lock:
            with self._lock:
                if message.topic == self.topic("status"):
                    # Only the newest status matters; an older one still waiting would arrive after it.
                    for key in [k for k, m in self._control.items() if m.topic == message.topic]:
                        del self._control[key]
                self._control[message.key] = message
            if self._gate_open and self._client is not None:
                self._send(self._client, message, ("control", message.key))

    def _pump(self) -> None:
        """Hand the next outbox messages to paho, oldest first, up to SEND_WINDOW unacknowledged."""
        with self._client_lock:
            client = self._client
            if client is None or not self._gate_open or self._outbox_closed:
                return
            while True:
                with self._lock:
                    room = SEND_WINDOW - self._inflight
                if room <= 0:
                    return
                batch = self.outbox.after(self._cursor, room)
                if not batch:
                    return
                for message in batch:
                    with self._lock:
                        self._inflight += 1
                    self._send(client, message, ("outbox", message.seq))
                    self._cursor = message.seq

    def _send(self, client: paho.Client, message: OutgoingMessage, ref: tuple[str, int | str]) -> None:
        """Hand one message to paho. Called with self._client_lock held, never with self._lock."""
        properties = None
        if message.expires_at is not None and self.protocol == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = max(1, round(message.expires_at - time.time()))
        info = client.publish(
            message.topic, message.payload, qos=message.qos, retain=message.retain, properties=properties
        )
        with self._lock:
            if info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
                self._acknowledge(ref)
            else:
                self._mids[info.mid] = ref

    def _acknowledge(self, ref: tuple[str, int | str]) -> None:
        """Called with self._lock held."""
        kind, ident = ref
        if kind == "outbox":
            self.outbox.ack(int(ident))
            self._inflight -= 1
            if self._inflight <= SEND_WINDOW // 2:
                self._wake.set()  # the connection thread sends the next window
        else:
            self._control.pop(str(ident), None)
        self.counters.acked += 1
        self._delivered.notify_all()  # waiters check their own condition (stop() waits for the outbox first)

    # -- paho client and callbacks ------------------------------------------------------------------

    def _new_client(self, protocol: MQTTProtocolVersion) -> paho.Client:
        # The connection thread reconnects, with a fresh client per session (paho_reconnects=False).
        client = new_client(
            self.config, self.client_id, protocol, will_topic=self.topic("status"), paho_reconnects=False
        )
        client.max_inflight_messages_set(SEND_WINDOW)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_log = self._on_log
        return client

    def _on_log(self, client: paho.Client, userdata: object, level: int, text: str) -> None:
        # paho reports socket and TLS failures (e.g. "tlsv13 alert certificate required") only here.
        if level == paho.MQTT_LOG_ERR and client is self._client:
            self._transport_error = text

    def _on_connect(
        self, client: paho.Client, userdata: object, flags: object, reason: object, properties: object
    ) -> None:
        code = reason_code(reason)
        if code == 0:
            self._on_session_start(client)
            return
        self._session_refused = True
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
                extra={
                    "event": "mqtt_refused",
                    "reason": str(reason),
                    "code": code,
                    "host": self.config.host,
                    "username": self.config.username,
                },
            )
        self._session_ended.set()
        self._wake.set()

    def _on_session_start(self, client: paho.Client) -> None:
        """Connected: subscriptions, ``online`` first, then control messages, then the outbox oldest first."""
        with self._client_lock:
            if client is not self._client:
                return
            self._connected.set()
            self._session_was_connected = True
            self._cursor = 0
            self.counters.connects += 1
            log.info(
                "connected to MQTT broker",
                extra={
                    "event": "mqtt_connected",
                    "host": self.config.host,
                    "port": self.config.port,
                    "protocol": self.protocol_name,
                    "pending": len(self.outbox),
                },
            )
            if self.protocol != MQTTProtocolVersion.MQTTv5 and self.config.message_expiry_s:
                log.warning(
                    "MQTT 3.1.1 has no message expiry: the agent drops expired messages itself, the broker cannot",
                    extra={"event": "mqtt_no_expiry"},
                )
            for leaf_filter in self._subscriptions:
                client.subscribe(self.topic(leaf_filter), qos=1)
            if not self._stopping:
                online = self._status_message("online")
                with self._lock:
                    for key in [k for k, m in self._control.items() if m.topic == online.topic]:
                        del self._control[key]
                    self._control[online.key] = online
                self._send(client, online, ("control", online.key))
            with self._lock:
                control = [m for m in self._control.values() if not m.key.startswith("status-online")]
            for message in control:
                self._send(client, message, ("control", message.key))
            self._gate_open = True
        self._wake.set()

    def _on_disconnect(
        self, client: paho.Client, userdata: object, flags: object, reason: object, properties: object
    ) -> None:
        with self._client_lock:
            if client is not self._client:
                return
            self._gate_open = False
        self._connected.clear()
        self._session_ended.set()
        self._wake.set()
        if self._session_was_connected and not self._stopping:
            log.warning(
                "lost connection to MQTT broker; reconnecting with backoff",
                extra={
                    "event": "mqtt_disconnected",
                    "reason": str(reason),
                    "error": self._transport_error,
                    "pending": len(self.outbox),
                },
            )

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, reason: object, properties: object) -> None:
        code = int(getattr(reason, "value", 0) or 0)
        with self._lock:
            if client is not self._client:
                return
            ref = self._mids.pop(mid, None)
            if ref is None:
                self._early_acks.add(mid)
                return
            if code >= 0x80:
                self.counters.refused += 1
                log.error(
                    "broker refused a message",
                    extra={"event": "mqtt_publish_refused", "ref": str(ref), "reason": str(reason), "code": code},
                )
            self._acknowledge(ref)

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        prefix = self.topic("")
        leaf = message.topic[len(prefix) :] if message.topic.startswith(prefix) else message.topic
        self.counters.messages_received += 1
        for leaf_filter, handler in self._subscriptions.items():
            if paho.topic_matches_sub(leaf_filter, leaf):
                try:
                    handler(leaf, bytes(message.payload), bool(message.retain))
                except Exception as exc:  # paho would stop its network loop on an exception
                    log.error(
                        "message handler failed",
                        exc_info=True,
                        extra={"event": "mqtt_handler_failed", "topic": message.topic, "error": str(exc)},
                    )
                return
