"""Triggers and commands the broker or a local tool carries cannot blind a triggered line or run twice
(issue 24, findings 2 and 14): the real ``edge-agent run`` process, a real mosquitto, real HTTP.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.publish as mqtt_publish
import pytest
from agent_harness import AgentProcess, agent_config, http_get, write_frames, write_toml
from mqtt_broker import MosquittoBroker, Subscriber

from edge_agent.config import MqttConfig
from edge_agent.demo.local_broker import free_port
from edge_agent.publish.commands import CommandProcessor, Done
from edge_agent.publish.mqtt import MqttPublisher

DELAY_S, TIMEOUT_S = 0.05, 0.3


def post_trigger(port: int, body: dict[str, object]) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/trigger", data=json.dumps(body).encode(), method="POST", headers={"X-Edge-Agent": "t"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_a_future_or_retained_trigger_cannot_blind_a_triggered_line(
    tmp_path: Path, broker: MosquittoBroker, contract_bundle: Path
) -> None:
    """Finding 2: one trigger dated now + 4.9 s made every later real trigger wait, then be served seconds late by
    other parts' frames; finding 14: a retained trigger inspected again at every reconnect."""
    frames = write_frames(tmp_path / "frames", 20)
    http_port = free_port()
    values = agent_config(
        tmp_path / "state",
        contract_bundle,
        str(frames),
        broker.port,
        http_port,
        source={"loop": True, "fps_limit": 20.0},
        parts={"mode": "triggered", "trigger_delay_s": DELAY_S, "trigger_timeout_s": TIMEOUT_S},
    )
    mqtt_publish.single(
        "uflow/cam1/trigger",
        json.dumps({"trigger_id": "stale"}),
        qos=1,
        retain=True,
        hostname=broker.host,
        port=broker.port,
    )
    watcher = Subscriber(broker, "uflow/cam1/#")
    agent = AgentProcess(write_toml(tmp_path / "agent.toml", values), tmp_path / "agent.log")
    try:
        assert agent.wait_for_event("agent_ready", 180), agent.tail()
        assert watcher.wait_for(lambda ms: any(m.topic.endswith("/stats") for m in ms), 10)
        assert post_trigger(http_port, {"time": time.time() + 4.9, "trigger_id": "future"}) == 400
        mqtt_publish.single(
            "uflow/cam1/trigger", json.dumps({"time": time.time() + 4.9}), qos=1, hostname=broker.host, port=broker.port
        )
        sent = []
        for index in range(4):
            sent.append(time.time())
            assert post_trigger(http_port, {"trigger_id": f"real{index}"}) == 202
            time.sleep(0.4)

        def parts(ms: list) -> list[dict]:
            return [m.json() for m in ms if m.topic.endswith("/part")]

        assert watcher.wait_for(lambda ms: len(parts(ms)) >= 4, 15), agent.tail()
        time.sleep(1.0)  # anything late would show by now
        found = sorted(parts(watcher.messages), key=lambda p: p["trigger_time"])
        assert [p["status"] for p in found] == ["inspected"] * 4  # no stale, no future, no no_frame
        for part, trigger_time in zip(found, sent, strict=True):
            assert abs(part["trigger_time"] - trigger_time) < 0.2
            # Served by a frame inside the trigger's window, never by a later part's frame.
            assert DELAY_S <= part["decision_time"] - part["trigger_time"] <= DELAY_S + TIMEOUT_S
        _, _, metrics = http_get(http_port, "/metrics")
        assert 'edge_agent_triggers_total{outcome="refused"} 3.0' in metrics  # future (HTTP, MQTT), retained
        assert agent.terminate() == 0
    finally:
        if agent.process.poll() is None:
            agent.kill()
        watcher.close()
        mqtt_publish.single("uflow/cam1/trigger", b"", qos=1, retain=True, hostname=broker.host, port=broker.port)


def test_a_retained_command_is_refused_answered_and_counted(broker: MosquittoBroker) -> None:
    """Finding 14: one retained cmd/threshold ran again at every reconnect."""
    ran: list[str] = []
    done = threading.Event()

    def threshold(command: object) -> Done:
        ran.append(getattr(command, "request_id", None) or "")
        done.set()
        return Done("set", {})

    mqtt_publish.single(
        "uflow/box1/cmd/threshold",
        json.dumps({"request_id": "retained", "log10_epsilon": -1.0}),
        qos=1,
        retain=True,
        hostname=broker.host,
        port=broker.port,
    )
    replies = Subscriber(broker, "uflow/box1/cmd/+/result")
    publisher = MqttPublisher(MqttConfig(port=broker.port, drain_timeout_s=2), "box1")
    processor = CommandProcessor(publisher.publish_result)
    processor.register("threshold", threshold)
    publisher.subscribe("cmd/+", processor.submit)
    publisher.start()
    processor.start()
    try:
        assert publisher.wait_connected(10)
        assert replies.wait_for(lambda ms: any(m.json().get("request_id") == "retained" for m in ms), 10)
        [reply] = [m.json() for m in replies.messages if m.json().get("request_id") == "retained"]
        assert reply["ok"] is False and "retained" in reply["message"]
        assert processor.retained_refused == 1 and ran == []
        mqtt_publish.single(
            "uflow/box1/cmd/threshold",
            json.dumps({"request_id": "live", "log10_epsilon": -1.0}),
            qos=1,
            hostname=broker.host,
            port=broker.port,
        )
        assert done.wait(10) and ran == ["live"]
    finally:
        processor.stop()
        publisher.stop()
        replies.close()
        mqtt_publish.single("uflow/box1/cmd/threshold", b"", qos=1, retain=True, hostname=broker.host, port=broker.port)
