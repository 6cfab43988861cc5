"""A reject is never fired past its deadline, whatever the broker or the PLC carries (issue 24, findings 1, 7, 12).

Real mosquitto, the real ``edge-agent reject-relay`` process where the finding is about it, the agent's own
publisher, a loopback HTTP actuator that records every pulse.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
from mqtt_broker import MosquittoBroker
from paho.mqtt.enums import CallbackAPIVersion
from relay_helpers import (
    RecordingHttpServer,
    RelayProcess,
    http_actuator,
    inspection,
    raw_publish,
    relay_toml,
    wait_until,
)
from test_relay_parts import part

from edge_agent.publish.mqtt import MqttPublisher
from edge_agent.relay.relay import RejectRelay


def relay_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}


def test_a_part_message_that_arrives_after_its_deadline_is_missed_not_fired(
    tmp_path: Path, broker: MosquittoBroker, http: RecordingHttpServer, camera: Callable[[str], MqttPublisher]
) -> None:
    """Finding 1: the order waited in the relay's session during a restart; the part has passed the actuator."""
    travel = 1.0
    config = relay_toml(
        tmp_path / "relay.toml",
        broker.port,
        tmp_path / "state",
        http_actuator(http),
        topics=("uflow/+/part", "uflow/+/inspection"),
        extra=f"[timing]\ndecision_distance_m = {travel}\ndistance_m = {travel}\nspeed_m_s = 1.0\ntolerance_s = 0.2\n",
    )
    log = tmp_path / "relay.log"
    first = RelayProcess(config, log, env=relay_env()).start()
    second = None
    try:
        assert first.wait_for_event("relay_subscribed", timeout=60), log.read_text()[-3000:]
        assert first.terminate() == 0  # the persistent session keeps what comes meanwhile
        parts_camera, frames_camera = camera("cam1"), camera("cam2")
        late_part = part("cam1", "77-1")
        late_frame = inspection("cam2", 5)
        parts_camera.publish_part(late_part)  # tracked mode: timed from the decision
        frames_camera.publish_inspection(late_frame)  # frame mode: timed from the capture
        time.sleep(travel + 0.2 + 1.5)  # both parts are past the actuator when the relay is back
        second = RelayProcess(config, log, env=relay_env()).start()
        assert second.wait_for_event("relay_subscribed", timeout=60, count=2)
        assert wait_until(lambda: len(second.decisions("missed")) >= 2, timeout=20), log.read_text()[-3000:]
        time.sleep(0.5)
        assert http.arrivals == []  # 0 pulses: the actuator would hit whatever part is there now
        missed = {r.get("part_id") or r["message_id"]: r for r in second.decisions("missed")}
        assert set(missed) == {"77-1", late_frame.message_id}
        assert second.decisions("fired") == []
        # Planned from the decision (camera clock, no estimate yet: offset 0), not from the arrival.
        assert math.isclose(missed["77-1"]["planned_time"], late_part.decision_time + travel, abs_tol=0.01)
        assert missed["77-1"]["late_by_ms"] > 1000.0
        assert second.terminate() == 0
        stops = [r for r in second.records() if r.get("event") == "relay_stopped"]
        assert stops[-1]["missed"] == 2 and stops[-1]["fired"] == 0
    finally:
        first.stop_if_running()
        if second is not None:
            second.stop_if_running()


def test_a_delayed_part_message_is_missed_by_the_running_relay(
    relay_factory: Callable[..., RejectRelay], camera: Callable[[str], MqttPublisher], http: RecordingHttpServer
) -> None:
    """Finding 1: the same when the message itself was delayed (a broker hiccup, a flood ahead of it)."""
    relay = relay_factory(
        http_actuator(http),
        extra="[timing]\ndecision_distance_m = 0.5\nspeed_m_s = 1.0\ntolerance_s = 0.1\n",
        topics=("uflow/+/part",),
    )
    message = part("cam1", "8-1")
    delayed = message.model_copy(update={"decision_time": message.decision_time - 2.0})
    camera("cam1").publish_part(delayed)
    assert wait_until(lambda: relay.stats().missed == 1)
    time.sleep(0.3)
    assert http.arrivals == [] and relay.stats().fired == 0


def test_a_forged_encoder_jump_is_refused_and_a_genuine_counter_reset_is_followed(
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
    http: RecordingHttpServer,
    broker: MosquittoBroker,
) -> None:
    """Finding 7: one {"count": 10**15} neither fires pending rejects early nor locks out later readings."""
    relay = relay_factory(
        http_actuator(http),
        extra="[timing]\ndecision_distance_m = 0.5\ntolerance_s = 0.2\n"
        '[belt]\nencoder_topic = "plc/enc"\ncounts_per_m = 1000\nmax_speed_m_s = 3.0\n',
        topics=("uflow/+/part",),
    )
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    started = time.time()
    speed = 0.5
    try:

        def reading(count: int) -> None:
            client.publish("plc/enc", json.dumps({"count": count}), qos=1).wait_for_publish(5)

        for _ in range(6):  # 0.5 m/s
            reading(round((time.time() - started) * speed * 1000))
            time.sleep(0.05)
        assert wait_until(lambda: relay.parts.encoder is not None and relay.parts.encoder.ready)
        message = part("cam1", "5-1")
        camera("cam1").publish_part(message)  # due 1 s after its decision at 0.5 m/s
        assert wait_until(lambda: relay.pending == 1)
        reading(10**15)  # forged: the belt would have moved 10**12 m
        time.sleep(0.3)
        assert http.arrivals == []  # not fired early
        while time.time() < message.decision_time + 1.3:
            reading(round((time.time() - started) * speed * 1000))
            time.sleep(0.05)
        assert http.wait_for(lambda arrivals: len(arrivals) == 1, timeout=30)
        assert abs(http.arrivals[0].wall - (message.decision_time + 1.0)) < 0.2
        assert relay.parts.encoder_refused == 1
        # A PLC restart: the counter starts again from 0; after a few agreeing readings the relay follows it.
        restarted = time.time()
        for _ in range(12):
            reading(round((time.time() - restarted) * speed * 1000))
            time.sleep(0.05)
        assert wait_until(lambda: relay.parts.encoder is not None and relay.parts.encoder.resets == 1)
        second = part("cam1", "5-2")
        camera("cam1").publish_part(second)
        while time.time() < second.decision_time + 1.3:
            reading(round((time.time() - restarted) * speed * 1000))
            time.sleep(0.05)
        assert http.wait_for(lambda arrivals: len(arrivals) == 2, timeout=30)
        assert abs(http.arrivals[1].wall - (second.decision_time + 1.0)) < 0.2
    finally:
        client.disconnect()
        client.loop_stop()


def test_encoder_bounds() -> None:
    from edge_agent.relay.belt import Encoder, Reading

    encoder = Encoder(counts_per_m=1000, max_speed_m_s=2.0, reset_readings=3)
    assert encoder.add(10.0, 0) is Reading.ACCEPTED
    assert encoder.add(10.1, 100) is Reading.ACCEPTED  # 1 m/s
    assert encoder.add(10.2, 10**15) is Reading.REFUSED  # faster than 2 m/s
    assert encoder.add(10.3, 300) is Reading.ACCEPTED  # the real ones go on
    assert encoder.add(10.4, 5) is Reading.REFUSED  # smaller: a reset, or a reordered message?
    assert encoder.add(10.5, 105) is Reading.REFUSED
    assert encoder.add(10.6, 205) is Reading.RESET  # three readings agree: a reset
    # The position continued from 0.3 m at 1 m/s: 0.4 m at the first new reading, then 0.1 m per 0.1 s.
    assert math.isclose(encoder.position_at(10.6), 0.6, abs_tol=1e-6)
    assert math.isclose(encoder.time_at(0.7), 10.7, abs_tol=1e-6)
    assert math.isclose(encoder.time_at(0.25), 10.25, abs_tol=1e-6)  # passed: when it was there
    assert encoder.add(10.7, 305) is Reading.ACCEPTED


def test_a_stopped_belt_holds_a_reject_only_for_max_hold_s_then_it_is_missed(
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
    http: RecordingHttpServer,
    broker: MosquittoBroker,
) -> None:
    """Finding 12: {"speed_m_s": 0} must not hold a reject forever, nor let a later speed fire it seconds late."""
    relay = relay_factory(
        http_actuator(http),
        extra="[timing]\ndecision_distance_m = 0.5\ntolerance_s = 0.1\n"
        '[belt]\nspeed_topic = "plc/speed"\nmax_hold_s = 1.0\nmax_speed_m_s = 5.0\n',
        topics=("uflow/+/part",),
    )
    raw_publish(broker, "plc/speed", b'{"speed_m_s": 0.5}')
    assert wait_until(lambda: relay.parts.belt.value == 0.5)
    cam = camera("cam1")
    held = part("cam1", "4-1")
    cam.publish_part(held)
    assert wait_until(lambda: relay.pending == 1)
    raw_publish(broker, "plc/speed", b'{"speed_m_s": 0}')
    assert wait_until(lambda: relay.stats().missed == 1, timeout=30)
    raw_publish(broker, "plc/speed", b'{"speed_m_s": 5.0}')
    time.sleep(0.5)
    assert http.arrivals == [] and relay.pending == 0
    # A part that arrives while the belt is stopped is held too, and fires once the belt moves the rest.
    raw_publish(broker, "plc/speed", b'{"speed_m_s": 0}')
    assert wait_until(lambda: relay.parts.belt.value == 0)
    moving = part("cam1", "4-2")
    cam.publish_part(moving)
    assert wait_until(lambda: relay.pending == 1)
    time.sleep(0.3)
    raw_publish(broker, "plc/speed", b'{"speed_m_s": 1.0}')
    assert http.wait_for(lambda arrivals: len(arrivals) == 1, timeout=30)
    assert http.arrivals[0].body["part_id"] == "4-2"
    assert wait_until(lambda: relay.stats().fired == 1) and relay.stats().missed == 1
