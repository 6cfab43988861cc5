"""bench/mqtt_observer.py, the MQTT client bench/recipe.py and bench/plc.py watch the agent with, on real mosquitto.

Its constructor returns only after the broker's SUBACK, so a message published right after it is seen; a broker
that refuses the client or never answers is a clear SystemExit, not a bench that waits forever.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.demo.local_broker import LocalMosquitto, find_mosquitto


def _load_observer() -> Any:
    # bench/ is not a package, and putting it on sys.path would let its script names shadow other modules.
    path = Path(__file__).resolve().parents[1] / "bench" / "mqtt_observer.py"
    spec = importlib.util.spec_from_file_location("bench_mqtt_observer_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


MqttObserver: Any = _load_observer().MqttObserver
pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


class Recorder(MqttObserver):
    def __init__(self, host: str, port: int, topics: list[tuple[str, int]], **kwargs: Any) -> None:
        self.messages: list[tuple[str, Any]] = []
        super().__init__(host, port, "test-observer", topics, **kwargs)

    def handle(self, topic: str, body: Any, arrived: float) -> None:
        self.messages.append((topic, body))


def test_a_message_published_right_after_the_constructor_is_seen(tmp_path: Path) -> None:
    with LocalMosquitto(tmp_path / "broker") as broker:
        observer = Recorder(broker.host, broker.port, [("bench/a", 1), ("bench/b", 1)])
        sender = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-sender")
        sender.connect(broker.host, broker.port)
        sender.loop_start()
        try:
            # Not retained: a subscription the broker had not taken yet would lose these.
            sender.publish("bench/a", '{"n": 1}', qos=1).wait_for_publish(10)
            sender.publish("bench/b", '{"n": 2}', qos=1).wait_for_publish(10)
            with observer.cond:
                assert observer.cond.wait_for(lambda: len(observer.messages) == 2, 10)
            assert observer.messages == [("bench/a", {"n": 1}), ("bench/b", {"n": 2})]
        finally:
            sender.loop_stop()
            sender.disconnect()
            observer.client.loop_stop()
            observer.client.disconnect()


def test_a_broker_that_refuses_the_connection_is_named(tmp_path: Path) -> None:
    # mosquitto 2.0 grants every subscription (its ACL applies on delivery), so its refusal here is the CONNACK's.
    with (
        LocalMosquitto(tmp_path / "broker", options="allow_anonymous false\n") as broker,
        pytest.raises(SystemExit) as refused,
    ):
        Recorder(broker.host, broker.port, [("bench/a", 1)], timeout_s=60)
    assert "refused the connection" in str(refused.value)


def test_a_broker_that_never_answers_is_a_timeout_not_a_hang(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts the TCP connection, never sends a CONNACK
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        accepted: list[socket.socket] = []
        threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
        with pytest.raises(SystemExit) as timed_out:
            Recorder("127.0.0.1", silent.getsockname()[1], [("bench/a", 1)], timeout_s=0.5)
        for conn in accepted:
            conn.close()
    assert "bench/a" in str(timed_out.value) and "SUBACK" in str(timed_out.value)
