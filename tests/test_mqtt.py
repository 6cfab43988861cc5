"""The MQTT publisher against a real mosquitto: status and Will, QoS 1 with expiry, outages, 3.1.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mqtt_broker import MosquittoBroker, Subscriber, free_port
from paho.mqtt.enums import MQTTProtocolVersion

from edge_agent.config import MqttConfig
from edge_agent.messages import InspectionMessage, ModelRef
from edge_agent.publish.mqtt import MqttPublisher

MODEL = ModelRef(name="m", version="1", sha256="0" * 64, backend="onnxruntime", precision="fp32")


def message(sequence: int, anomalous: bool = False) -> InspectionMessage:
    return InspectionMessage(
        device_id="cam1",
        sequence=sequence,
        capture_time=time.time(),
        model=MODEL,
        image_score=0.9 if anomalous else 0.1,
        anomalous=anomalous,
        log10_epsilon=0.0,
        frame_size=(64, 64),
    )


def publisher_for(port: int, **fields: object) -> MqttPublisher:
    config = MqttConfig(port=port, reconnect_initial_s=1, reconnect_max_s=2, drain_timeout_s=10, **fields)
    return MqttPublisher(config, device_id="cam1")


def test_clean_stop_publishes_stopped_after_the_whole_backlog(broker: MosquittoBroker) -> None:
    # A retained "stopped" must not be followed by more inspections: it is queued only once the outbox
    # drained (here a backlog made before the first connection, which is sent oldest first).
    subscriber = Subscriber(broker, "uflow/cam1/#")
    config = MqttConfig(port=broker.port, reconnect_initial_s=1, reconnect_max_s=2, drain_timeout_s=120)
    publisher = MqttPublisher(config, device_id="cam1")
    count = 3 * 100  # three send windows
    for sequence in range(count):
        assert publisher.publish_inspection(message(sequence))
    publisher.start()
    assert publisher.stop() is True
    assert subscriber.wait_for(lambda ms: len(ms) >= count + 1, timeout=60)
    subscriber.close()
    assert subscriber.messages[-1].payload == b"stopped"
    assert [m.json()["sequence"] for m in subscriber.on("/inspection")] == list(range(count))


def test_status_inspection_expiry_and_clean_stop(broker: MosquittoBroker) -> None:
    subscriber = Subscriber(broker, "uflow/cam1/#")
    publisher = publisher_for(broker.port, message_expiry_s=45)
    publisher.start()
    assert publisher.wait_connected(10)
    for sequence in range(5):
        assert publisher.publish_inspection(message(sequence, anomalous=sequence == 3))
    assert publisher.stop() is True
    assert subscriber.wait_for(lambda ms: any(m.payload == b"stopped" for m in ms))
    subscriber.close()

    statuses = subscriber.on("/status")
    assert [m.payload for m in statuses] == [b"online", b"stopped"]
    inspections = subscriber.on("/inspection")
    assert [m.json()["sequence"] for m in inspections] == [0, 1, 2, 3, 4]
    assert [m.json()["anomalous"] for m in inspections] == [False, False, False, True, False]
    assert all(m.qos == 1 for m in inspections)
    assert all(0 < int(m.properties["MessageExpiryInterval"]) <= 45 for m in inspections)
    assert publisher.counters.acked == 7 and len(publisher.outbox) == 0
    # The final status is retained: a reject relay that connects later still learns the agent stopped.
    late = Subscriber(broker, "uflow/cam1/status")
    assert late.wait_for(lambda ms: len(ms) == 1, timeout=30)
    assert late.messages[0].payload == b"stopped" and late.messages[0].retain
    late.close()


def test_publish_only_anomalous(broker: MosquittoBroker) -> None:
    subscriber = Subscriber(broker, "uflow/cam1/inspection")
    publisher = publisher_for(broker.port, publish="anomalous")
    publisher.start()
    results = [publisher.publish_inspection(message(i, anomalous=i in (1, 4))) for i in range(6)]
    assert publisher.stop()
    assert results == [False, True, False, False, True, False]
    assert subscriber.wait_for(lambda ms: len(ms) == 2, timeout=30)
    assert [m.json()["sequence"] for m in subscriber.messages] == [1, 4]
    assert publisher.counters.inspections_skipped == 4
    subscriber.close()


def test_broker_down_at_start_then_up_loses_nothing(broker_factory, caplog) -> None:
    port = free_port()
    publisher = publisher_for(port)
    with caplog.at_level("WARNING", logger="edge_agent.publish.mqtt"):
        publisher.start()  # must not raise
        for sequence in range(4):
            publisher.publish_inspection(message(sequence))
        time.sleep(1.5)
    assert not publisher.connected
    assert any(getattr(r, "event", "") == "mqtt_unreachable" for r in caplog.records)
    assert len(publisher.outbox) == 4

    broker = broker_factory(port=port)
    subscriber = Subscriber(broker, "uflow/cam1/#")
    assert publisher.wait_connected(15)
    assert publisher.wait_until_delivered(15)
    publisher.publish_inspection(message(4))
    assert publisher.stop()
    assert subscriber.wait_for(lambda ms: any(m.payload == b"stopped" for m in ms))
    assert [m.json()["sequence"] for m in subscriber.on("/inspection")] == [0, 1, 2, 3, 4]
    subscriber.close()


def test_broker_restart_mid_stream_reconnects_and_republishes_online(broker_factory) -> None:
    broker = broker_factory()
    publisher = publisher_for(broker.port)
    publisher.start()
    assert publisher.wait_connected(10)
    publisher.publish_inspection(message(0))
    assert publisher.wait_until_delivered(5)
    broker.stop()
    time.sleep(0.5)
    publisher.publish_inspection(message(1))  # queued while the broker is away
    broker.start()
    subscriber = Subscriber(broker, "uflow/cam1/#")
    assert publisher.wait_until_delivered(20)
    assert publisher.stop()
    assert subscriber.wait_for(lambda ms: any(m.payload == b"stopped" for m in ms))
    assert [m.json()["sequence"] for m in subscriber.on("/inspection")] == [1]
    assert publisher.counters.connects == 2
    subscriber.close()


def test_order_is_kept_across_an_outage(broker_factory) -> None:
    broker = broker_factory()
    publisher = publisher_for(broker.port)
    publisher.start()
    assert publisher.wait_connected(10)
    for sequence in range(5):
        publisher.publish_inspection(message(sequence))
    assert publisher.wait_until_delivered(5)
    broker.stop()
    for sequence in range(5, 10):  # made while the broker is away
        publisher.publish_inspection(message(sequence))
    broker.start()
    subscriber = Subscriber(broker, "uflow/cam1/#")
    assert publisher.wait_connected(20)
    for sequence in range(10, 15):  # made right after the reconnect, racing the backlog
        publisher.publish_inspection(message(sequence))
    assert publisher.stop()
    assert subscriber.wait_for(lambda ms: any(m.payload == b"stopped" for m in ms))
    subscriber.close()
    assert [m.json()["sequence"] for m in subscriber.on("/inspection")] == list(range(5, 15))
    assert [m.payload for m in subscriber.on("/status")] == [b"online", b"stopped"]


def test_will_marks_a_killed_agent_offline(broker: MosquittoBroker, tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text(
        "import sys, time\n"
        "from edge_agent.config import MqttConfig\n"
        "from edge_agent.publish.mqtt import MqttPublisher\n"
        f"p = MqttPublisher(MqttConfig(port={broker.port}), device_id='cam1')\n"
        "p.start()\n"
        "assert p.wait_connected(10)\n"
        "print('connected', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "connected"
        subscriber = Subscriber(broker, "uflow/cam1/status")
        assert subscriber.wait_for(lambda ms: [m.payload for m in ms] == [b"online"], timeout=30)
        os.kill(process.pid, signal.SIGKILL)
        assert subscriber.wait_for(lambda ms: ms[-1].payload == b"offline", timeout=10)
        subscriber.close()
        late = Subscriber(broker, "uflow/cam1/status")  # the Will is retained
        assert late.wait_for(lambda ms: len(ms) == 1, timeout=30)
        assert late.messages[0].payload == b"offline" and late.messages[0].retain
        late.close()
    finally:
        process.kill()
        process.wait()


def test_mqtt_311_has_no_expiry_but_delivers(broker: MosquittoBroker) -> None:
    subscriber = Subscriber(broker, "uflow/cam1/inspection")
    publisher = publisher_for(broker.port, protocol="3.1.1")
    publisher.start()
    publisher.publish_inspection(message(0))
    assert publisher.stop()
    assert subscriber.wait_for(lambda ms: len(ms) == 1, timeout=30)
    assert publisher.protocol_name == "3.1.1"
    assert "MessageExpiryInterval" not in subscriber.messages[0].properties
    subscriber.close()


class V311OnlyFront:
    """A TCP front for mosquitto that behaves like an MQTT 3.1.1-only broker.

    A CONNECT for protocol level 5 is refused the way a 3.1.1 broker refuses it (CONNACK return code 1,
    "unacceptable protocol version", then close); any other connection is piped to the real broker.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refused_v5 = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        first = client.recv(4096)
        # CONNECT: fixed header (1 byte + remaining length, 1 byte here), then "\x00\x04MQTT", then the level.
        level = first[first.index(b"MQTT") + 4] if b"MQTT" in first else None
        if level == 5:
            self.refused_v5 += 1
            client.sendall(b"\x20\x02\x00\x01")
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        upstream.sendall(first)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._server.close()


def test_auto_protocol_falls_back_to_311_when_v5_is_refused(broker: MosquittoBroker, caplog) -> None:
    front = V311OnlyFront(broker.port)
    subscriber = Subscriber(broker, "uflow/cam1/#", protocol=MQTTProtocolVersion.MQTTv311)
    publisher = publisher_for(front.port, protocol="auto")
    with caplog.at_level("INFO", logger="edge_agent.publish.mqtt"):
        publisher.start()
        publisher.publish_inspection(message(0))  # queued before the refusal: must not be lost
        assert publisher.wait_connected(15)
        publisher.publish_inspection(message(1))
        assert publisher.stop()
    assert front.refused_v5 >= 1
    assert publisher.protocol_name == "3.1.1"
    assert any(getattr(r, "event", "") == "mqtt_protocol_fallback" for r in caplog.records)
    assert subscriber.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/inspection")]) == 2)
    # Nothing lost, and the message queued before the refusal still arrives first.
    assert [json.loads(m.payload)["sequence"] for m in subscriber.on("/inspection")] == [0, 1]
    subscriber.close()
    front.close()


def test_explicit_v5_does_not_fall_back(broker: MosquittoBroker) -> None:
    front = V311OnlyFront(broker.port)
    publisher = publisher_for(front.port, protocol="5")
    publisher.start()
    assert not publisher.wait_connected(2.5)
    assert publisher.protocol_name == "5"
    assert publisher.stop(timeout=0.5) is False  # the final status could not be delivered, and it says so
    front.close()


@pytest.mark.parametrize("bad", [0, 70000])
def test_bad_port_is_a_config_error(bad: int) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="port"):
        MqttConfig(port=bad)
