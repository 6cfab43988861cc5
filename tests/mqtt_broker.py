"""A real mosquitto broker on a free loopback port, and a subscriber that records what it receives.

Import the fixtures into a test module (``from mqtt_broker import broker, broker_factory``) or use
``MosquittoBroker`` (edge_agent.demo.local_broker.LocalMosquitto) directly. Tests that need it are skipped with a clear reason when mosquitto is not
installed (``apt-get install mosquitto``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.demo.local_broker import LocalMosquitto, find_mosquitto, free_port, wait_for_port

__all__ = ["MosquittoBroker", "Subscriber", "broker", "broker_factory", "free_port", "wait_for_port"]


# The tests use the same broker launcher as `edge-agent demo`.
MosquittoBroker = LocalMosquitto


@dataclass
class Received:
    """One message a Subscriber got."""

    topic: str
    payload: bytes
    retain: bool
    qos: int
    properties: dict[str, object] = field(default_factory=dict)

    def json(self) -> dict[str, object]:
        return json.loads(self.payload)


class Subscriber:
    """A paho client that subscribes (QoS 1) and keeps every message, as a reject relay would."""

    def __init__(
        self,
        broker: MosquittoBroker,
        topic: str,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
        setup: Callable[[paho.Client], None] | None = None,
        client_id: str = "",
        session_expiry_s: int = 0,
    ):
        """``setup`` configures the client before it connects (TLS, password). With ``session_expiry_s``
        (MQTT 5) the session is persistent: a reconnect with the same ``client_id`` gets what the broker
        queued meanwhile, as a reject relay must be configured.
        """
        self.messages: list[Received] = []
        self.connects = 0
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=protocol, client_id=client_id
        )
        self.client.reconnect_delay_set(0.2, 1)
        if setup is not None:
            setup(self.client)
        self.client.on_connect = lambda c, u, f, rc, p: self._on_connect(c, topic)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._on_message
        if session_expiry_s:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry_s
            self.client.connect(broker.host, broker.port, clean_start=False, properties=properties)
        else:
            self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError(f"could not subscribe to {topic} on port {broker.port}")

    def _on_connect(self, client: paho.Client, topic: str) -> None:
        self.connects += 1
        client.subscribe(topic, qos=1)

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        props = {}
        if message.properties is not None and hasattr(message.properties, "MessageExpiryInterval"):
            props["MessageExpiryInterval"] = message.properties.MessageExpiryInterval
        with self._cond:
            self.messages.append(Received(message.topic, message.payload, bool(message.retain), message.qos, props))
            self._cond.notify_all()

    def on(self, suffix: str) -> list[Received]:
        """Messages whose topic ends with ``suffix``, in arrival order."""
        with self._cond:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 20.0) -> bool:
        """Block until ``predicate(messages)`` holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """Make brokers (started) that are all stopped after the test; skips without mosquitto."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    made: list[MosquittoBroker] = []

    def make(port: int | None = None, start: bool = True, **options: object) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path / f"mosquitto{len(made)}", port, **options)  # type: ignore[arg-type]
        made.append(broker)
        return broker.start() if start else broker

    yield make
    for broker in made:
        broker.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """One running mosquitto on a free loopback port."""
    return broker_factory()
