"""The relay's broker connection: a persistent session, so nothing queued for the relay is lost while it is
away, and manual acknowledgements, so a message is acknowledged only once its decision is journaled.

paho's network thread calls ``handle`` for each message; the acknowledgement leaves after it returns
(also when it raised: a message the relay cannot handle would otherwise come back after every restart,
and about 20 of them, the broker's in-flight window, would stop all delivery). On every connect the
relay subscribes to its topics (dropping those the config no longer lists from a kept session) and
announces ``online`` (retained; the Will says ``offline``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.messages import StatusText, relay_topic
from edge_agent.publish.client import PROTOCOLS, new_client, reason_code
from edge_agent.relay.actuators import ActuatorError
from edge_agent.relay.config import RelaySettings
from edge_agent.relay.dedupe import DecisionJournal

log = logging.getLogger(__name__)

TOPICS_KEY = "subscribed_topics"


class RelayConnection:
    """One paho client for the relay's life; ``start()`` connects in the background, ``stop()`` says goodbye."""

    def __init__(
        self, settings: RelaySettings, journal: DecisionJournal, handle: Callable[[paho.MQTTMessage], None]
    ) -> None:
        self.settings = settings
        self.journal = journal
        self._handle = handle
        self.protocol = PROTOCOLS[settings.mqtt.protocol]
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        # Acknowledged only once the decision is journaled (_on_message).
        client = new_client(
            settings.mqtt,
            settings.client_id,
            self.protocol,
            will_topic=self.topic("status"),
            persistent_session=True,
            manual_ack=True,
        )
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client

    def topic(self, leaf: str) -> str:
        """``<prefix>/relay/<relay_id>/<leaf>``."""
        return relay_topic(self.settings.mqtt.prefix, self.settings.relay_id, leaf)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_subscribed(self, timeout: float) -> bool:
        """True once connected and subscribed to every topic."""
        return self._subscribed.wait(timeout)

    def start(self) -> None:
        """Connect (and keep reconnecting with backoff) on paho's own thread."""
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
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = mqtt.session_expiry_s
            self._client.connect_async(
                mqtt.host, mqtt.port, keepalive=mqtt.keepalive_s, clean_start=False, properties=properties
            )
        else:
            self._client.connect_async(mqtt.host, mqtt.port, keepalive=mqtt.keepalive_s)
        self._client.loop_start()

    def stopping(self) -> None:
        """A stop is under way: a lost connection from now on is expected, not a warning."""
        self._stopping.set()

    def stop(self, status: StatusText) -> None:
        """Publish the final status (retained, when connected) and disconnect."""
        self._stopping.set()
        if self.connected:
            info = self._client.publish(self.topic("status"), status, qos=1, retain=True)
            try:
                info.wait_for_publish(5.0)
            except (RuntimeError, ValueError):
                log.warning("final status not delivered", extra={"event": "relay_status_undelivered", "status": status})
        self._client.disconnect()
        self._client.loop_stop()

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

    def publish(self, leaf: str, payload: str) -> None:
        """Publish one of the relay's own messages (QoS 0, not retained): stats."""
        self._client.publish(self.topic(leaf), payload, qos=0)

    def _on_connect(
        self, client: paho.Client, userdata: object, flags: Any, reason: object, properties: object
    ) -> None:
        code = reason_code(reason)
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
        topics = list(self.settings.mqtt.topics)
        for belt_topic in (self.settings.belt.speed_topic, self.settings.belt.encoder_topic):
            if belt_topic and belt_topic not in topics:
                topics.append(belt_topic)  # the live belt speed or position for part rejects
        dropped = [t for t in (self.journal.get_meta(TOPICS_KEY) or []) if t not in topics]
        if dropped and session_present:
            # The persistent session still holds subscriptions the config no longer lists.
            client.unsubscribe(dropped)
        client.subscribe([(t, 1) for t in topics])
        self.journal.set_meta(TOPICS_KEY, topics)
        client.publish(self.topic("status"), "online", qos=1, retain=True)

    def _on_subscribe(
        self, client: paho.Client, userdata: object, mid: int, reasons: list[Any], properties: object
    ) -> None:
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
        try:
            self._handle(message)
        finally:
            if message.qos > 0:
                client.ack(message.mid, message.qos)
