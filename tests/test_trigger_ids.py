"""A trigger's id (MQTT, HTTP, GPIO) reaches the part message and the relay's decision line (issue 21).

The agent in a thread with a contract bundle on ONNX Runtime, a real mosquitto and real HTTP; GPIO through the
fake line request of tests/test_triggers.py (this machine has no GPIO chip).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from pathlib import Path

import paho.mqtt.publish as mqtt_publish
import pytest
from agent_harness import AgentThread, agent_config, write_frames
from mqtt_broker import MosquittoBroker, Subscriber
from test_triggers import FakeLineRequest

from edge_agent.demo.local_broker import free_port
from edge_agent.inspection.triggers import GpioTrigger, TriggerBook, triggered_message
from edge_agent.relay.parts import log_part


def test_mqtt_and_http_trigger_ids_are_in_the_part_messages(
    tmp_path: Path, broker: MosquittoBroker, contract_bundle: Path
) -> None:
    http_port = free_port()
    values = agent_config(tmp_path / "state", contract_bundle, str(write_frames(tmp_path / "frames", 20)),
                          broker.port, http_port, source={"loop": True, "fps_limit": 20.0},
                          parts={"mode": "triggered", "trigger_delay_s": 0.05, "trigger_timeout_s": 2.0})  # fmt: skip
    watcher = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    try:
        assert watcher.wait_for(lambda ms: any(m.topic.endswith("/stats") for m in ms), 60)
        mqtt_publish.single("uflow/cam1/trigger", json.dumps({"trigger_id": "t-42"}), qos=1,
                            hostname=broker.host, port=broker.port)  # fmt: skip
        assert watcher.wait_for(lambda ms: any(m.topic.endswith("/part") for m in ms), 15)
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/trigger", data=b'{"trigger_id": "h-7"}',
                                         method="POST", headers={"X-Edge-Agent": "plc"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 202 and json.loads(response.read())["trigger_id"] == "h-7"
        assert watcher.wait_for(lambda ms: sum(m.topic.endswith("/part") for m in ms) >= 2, 15)
    finally:
        assert agent.stop() == 0
        watcher.close()
    parts = [m.json() for m in watcher.on("/part")]
    assert [p["trigger_id"] for p in parts] == ["t-42", "h-7"]
    assert all(p["status"] == "inspected" and p["mode"] == "triggered" for p in parts)


def test_gpio_edges_get_ids_that_reach_the_part_message() -> None:
    book = TriggerBook(delay_s=0.0, timeout_s=1.0)
    request = FakeLineRequest()
    gpio = GpioTrigger(request, book, "fake chip line 4")
    gpio.start()
    try:
        request.edge()
        request.edge()
        deadline = time.monotonic() + 5
        while book.counters.received < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gpio.stop()
    first, second = book.take(time.time()), book.take(time.time())
    assert first is not None and second is not None
    assert (first.trigger_id, second.trigger_id) == ("gpio-1", "gpio-2")
    message = triggered_message("cam1", second, 7, time.time(), False, 0.0, (), 0.0, 1.0)
    assert json.loads(message.to_json())["trigger_id"] == "gpio-2"


def test_the_relay_decision_line_repeats_the_trigger_id(caplog: pytest.LogCaptureFixture) -> None:
    message = triggered_message("cam1", TriggerBook(0.0, 1.0).parse_and_add(b'{"trigger_id": "t-42"}', "mqtt"), 3,
                                time.time(), True, 0.0, (), -3.0, 1.0)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="edge_agent.relay.parts"):
        log_part("fired", message, "uflow/cam1/part", None, logging.INFO)
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "relay_decision"]
    assert record.trigger_id == "t-42"  # type: ignore[attr-defined]
