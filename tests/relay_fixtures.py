"""Fixtures for the in-process reject relay tests (registered in conftest.py's pytest_plugins)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mqtt_broker import MosquittoBroker
from relay_helpers import CAMERAS, RecordingHttpServer, relay_toml

from edge_agent.config import MqttConfig
from edge_agent.publish.mqtt import MqttPublisher
from edge_agent.relay.config import load_relay_settings
from edge_agent.relay.relay import RejectRelay


@pytest.fixture
def http() -> Iterator[RecordingHttpServer]:
    """A loopback HTTP actuator that records what it is sent."""
    server = RecordingHttpServer()
    yield server
    server.close()


@pytest.fixture
def relay_factory(tmp_path: Path, broker: MosquittoBroker) -> Iterator[Callable[..., RejectRelay]]:
    """Start an in-process relay from a TOML config (actuator body + extra top-level TOML)."""
    made: list[RejectRelay] = []

    def make(
        actuator: str,
        extra: str = "",
        topics: tuple[str, ...] = ("uflow/+/inspection",),
        cameras: tuple[str, ...] = CAMERAS,
    ) -> RejectRelay:
        config = relay_toml(
            tmp_path / f"relay{len(made)}.toml",
            broker.port,
            tmp_path / "state",
            actuator,
            topics=topics,
            extra=extra,
            cameras=cameras,
        )
        relay = RejectRelay(load_relay_settings(config))
        made.append(relay)
        relay.start()
        assert relay.wait_subscribed(10), "relay did not subscribe"
        return relay

    yield make
    for relay in made:
        if not relay.stopped:
            relay.stop(drain_s=0)


@pytest.fixture
def camera(broker: MosquittoBroker) -> Iterator[Callable[[str], MqttPublisher]]:
    """The agent's own MQTT publisher, one per device id."""
    made: list[MqttPublisher] = []

    def make(device_id: str) -> MqttPublisher:
        publisher = MqttPublisher(MqttConfig(port=broker.port, message_expiry_s=30, drain_timeout_s=5), device_id)
        publisher.start()
        assert publisher.wait_connected(10)
        made.append(publisher)
        return publisher

    yield make
    for publisher in made:
        publisher.stop()
