"""What reaches the relay's intake cannot make it fire late, fire for a stranger, or lose its connection
(issue 24, findings 4, 5 and 6). A real mosquitto, the relay in-process, a loopback HTTP or MQTT actuator.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable

import paho.mqtt.client as paho
import pytest
from mqtt_broker import MosquittoBroker, Subscriber
from paho.mqtt.enums import CallbackAPIVersion
from relay_helpers import RecordingHttpServer, http_actuator, inspection, logged, raw_publish, wait_until
from test_relay_parts import part

from edge_agent.publish.mqtt import MqttPublisher
from edge_agent.relay.relay import RejectRelay

TRAVEL_S = 4.0  # generous: the flood must be read by a relay on a shared 2-core machine
PARTS = f"[timing]\ndecision_distance_m = {TRAVEL_S}\nspeed_m_s = 1.0\ntolerance_s = 0.3\n"


def brackets(size: int) -> bytes:
    """A JSON object of at least ``size`` bytes (at most 2 more) made of brackets: what the old depth check walked
    one by one."""
    head, tail = b'{"a":[', b"[]]}"
    return head + b"[]," * -(-(size - len(head) - len(tail)) // 3) + tail


def flooder(broker: MosquittoBroker) -> paho.Client:
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def test_one_camera_flooding_does_not_delay_another_cameras_rejects(
    broker: MosquittoBroker,
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
    http: RecordingHttpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding 4: 1 MiB payloads on a part topic are refused unread, small ones beyond the budget are dropped
    unparsed, their warnings are rate limited, and another camera's rejects fire as planned from their decision."""
    caplog.set_level(logging.INFO, logger="edge_agent.relay")
    relay = relay_factory(
        http_actuator(http),
        extra=PARTS,  # [limits] by default: 200 messages a second per camera, 400 at once
        topics=("uflow/+/part", "uflow/+/inspection"),
        cameras=("cam1", "cam7"),
    )
    flood = flooder(broker)
    try:
        big = brackets((1 << 20) - 1)  # under the old 1 MiB limit: parsed, 0.3 s each in a Python loop
        for _ in range(40):
            flood.publish("uflow/cam7/part", big, qos=1).wait_for_publish(30)
        # Under the inspection limit in bytes, far over it in values: json.loads would take 0.1 s each.
        wide = brackets(200 * 1024)
        for _ in range(40):
            flood.publish("uflow/cam7/inspection", wide, qos=1).wait_for_publish(30)
        # And small ones, faster than any camera sends. Fewer than mosquitto's max_queued_messages (1000) in all:
        # beyond that the broker itself drops messages for the relay, other cameras' too (its config's business).
        for _ in range(600):
            flood.publish("uflow/cam7/part", b"{}", qos=0)
        cam = camera("cam1")
        sent = []
        for number in range(3):
            message = part("cam1", f"31-{number}")
            cam.publish_part(message)
            sent.append(message)
            time.sleep(0.1)
        assert http.wait_for(lambda arrivals: len(arrivals) == 3, timeout=TRAVEL_S + 10), relay.stats()
        assert wait_until(lambda: relay.stats().fired == 3)
    finally:
        flood.disconnect()
        flood.loop_stop()
    stats = relay.stats()
    assert stats.missed == 0
    assert stats.malformed >= 80 and stats.rate_limited > 0 and stats.devices["cam7"].rate_limited == stats.rate_limited
    # The relay's own record: each reject planned from its decision, fired inside its tolerance.
    fired = {r.part_id: r for r in logged(caplog, "fired")}  # type: ignore[attr-defined]
    for message in sent:
        record = fired[message.part_id]
        assert math.isclose(record.planned_time, message.decision_time + TRAVEL_S, abs_tol=0.01)  # type: ignore[attr-defined]
        assert 0.0 <= record.lateness_ms <= 300.0  # type: ignore[attr-defined]
    # Every refusal counted; the warnings about them rate limited (one line per sender and log_interval_s).
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and getattr(r, "topic", "").startswith("uflow/cam7")
    ]
    assert 1 <= len(warnings) <= 4


def test_the_depth_check_is_bounded_by_size_first_and_cheap() -> None:
    """Finding 4: the size limit of a kind of message is checked before anything is parsed."""
    from edge_agent.messages import PayloadError, parse_json_object
    from edge_agent.relay.limits import MESSAGE_LIMITS

    assert MESSAGE_LIMITS["part"] <= 16 * 1024 and MESSAGE_LIMITS["speed"] <= 256 >= MESSAGE_LIMITS["encoder"]
    with pytest.raises(PayloadError, match="bytes"):
        parse_json_object(brackets(MESSAGE_LIMITS["part"] + 1), MESSAGE_LIMITS["part"])
    assert parse_json_object(brackets(1 << 20), 1 << 21)["a"][0] == []  # deep only 3 levels: accepted
    from edge_agent.relay.limits import too_costly

    assert too_costly("inspection", brackets(200 * 1024)) is not None  # 68,000 values: refused unread
    assert too_costly("part", brackets(MESSAGE_LIMITS["part"] + 1)) is not None
    assert too_costly("speed", b'{"speed_m_s": 0.42}') is None
    with pytest.raises(PayloadError, match="20 levels"):
        parse_json_object(b'{"s": "[[[[\\"{{", "a":' + b"[" * 19 + b"]" * 19 + b"}", 4096)


def test_the_largest_part_message_the_agent_sends_fits_the_relays_limit() -> None:
    from edge_agent.inspection.triggers import Trigger, triggered_message
    from edge_agent.messages import MAX_PART_REGIONS, Region
    from edge_agent.relay.limits import MESSAGE_LIMITS, too_costly

    regions = tuple(
        Region(bbox=(123456, 123456, 123456, 123456), area=10**9, log_nfa=-1000.0 - i / 7, max_score=1e9)
        for i in range(200)
    )
    message = triggered_message(
        "d" * 64, Trigger(time.time(), "mqtt"), 10**12, time.time(), True, -0.5, regions, -1200.0, 123456.789
    )
    assert len(message.regions) == MAX_PART_REGIONS
    assert message.regions[0].log_nfa == min(r.log_nfa for r in regions)  # the most significant kept
    assert len(message.to_json().encode()) < MESSAGE_LIMITS["part"] // 2
    assert too_costly("part", message.to_json().encode()) is None
    # The same for the largest inspection message (MAX_INSPECTION_REGIONS regions of one frame).
    from edge_agent.messages import MAX_INSPECTION_REGIONS

    frame = inspection("d" * 64, 10**12).model_copy(update={"regions": list(regions[:1]) * MAX_INSPECTION_REGIONS})
    assert too_costly("inspection", frame.to_json().encode()) is None


@pytest.mark.parametrize("part_id", ["p1\n", ".", "..", "-rf", "a\x00b"])
def test_an_id_with_a_newline_or_dots_is_refused_and_the_mqtt_actuator_stays_connected(
    broker: MosquittoBroker,
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
    caplog: pytest.LogCaptureFixture,
    part_id: str,
) -> None:
    """Finding 5: ids match in full and start with a letter or digit; one bad id cut the relay off its broker."""
    caplog.set_level(logging.INFO, logger="edge_agent.relay")
    plc = Subscriber(broker, "plc/#")
    try:
        relay = relay_factory(
            'kind = "mqtt"\ntopic = "plc/line1/{part_id}/reject"',
            extra="[timing]\ndecision_distance_m = 0.3\nspeed_m_s = 1.0\ntolerance_s = 0.3\n",
            topics=("uflow/+/part",),
        )
        data = json.loads(part("cam1", "1-1").to_json())
        raw_publish(broker, "uflow/cam1/part", json.dumps({**data, "part_id": part_id}).encode())
        assert wait_until(lambda: relay.stats().malformed == 1)
        good = part("cam2", "9-1")
        camera("cam2").publish_part(good)
        assert plc.wait_for(lambda ms: len(ms) >= 1, timeout=30)
        time.sleep(0.5)
        assert [m.topic for m in plc.messages] == ["plc/line1/9-1/reject"]
        assert relay.connected and relay.stats().fired == 1
        assert not [r for r in caplog.records if getattr(r, "event", "") == "relay_mqtt_disconnected"]
    finally:
        plc.close()


def test_a_formatted_actuator_topic_is_checked_before_publishing() -> None:
    from edge_agent.relay.actuators import ActuatorError, FireOrder, MqttActuator
    from edge_agent.relay.config import ActuatorConfig

    published: list[str] = []

    class Sink:
        connected = True

        def publish_order(self, topic: str, payload: bytes, expiry_s: int, timeout_s: float) -> None:
            published.append(topic)

    actuator = MqttActuator(ActuatorConfig(kind="mqtt", topic="plc/{part_id}/reject"), Sink())
    now = time.time()
    for bad in ("a+b", "#", "p1\n", "x\x00"):
        order = FireOrder(bad, "cam1", 1, now, 0.9, 1, now, now + 1, "r1", part_id=bad)
        with pytest.raises(ActuatorError) as caught:
            actuator.fire(order, now)
        assert not caught.value.retryable
    actuator.fire(FireOrder("m", "cam1", 1, now, 0.9, 1, now, now + 1, "r1", part_id="7-1"), now)
    assert published == ["plc/7-1/reject"]


def test_the_relay_acts_only_for_cameras_it_knows(
    broker: MosquittoBroker,
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
    http: RecordingHttpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding 6: with the PLC gateway's credentials a client published uflow/plc-gateway/part and the relay fired."""
    caplog.set_level(logging.INFO, logger="edge_agent.relay")
    relay = relay_factory(
        http_actuator(http),
        extra="[timing]\ndecision_distance_m = 0.3\nspeed_m_s = 1.0\ntolerance_s = 0.3\n",
        topics=("uflow/+/part", "uflow/+/inspection"),
        cameras=("cam1",),
    )
    stranger = camera("plc-gateway")
    stranger.publish_part(part("plc-gateway", "66-1"))
    stranger.publish_inspection(inspection("plc-gateway", 3))
    assert wait_until(lambda: relay.stats().unknown_devices == 2)
    camera("cam1").publish_part(part("cam1", "66-2"))
    assert http.wait_for(lambda arrivals: len(arrivals) >= 1, timeout=30)
    time.sleep(0.5)
    assert [a.body["part_id"] for a in http.arrivals] == ["66-2"]
    stats = relay.stats()
    assert "plc-gateway" not in stats.devices and stats.fired == 1  # no per-camera state for a stranger
    assert len(logged(caplog, "unknown-device")) == 1  # counted twice, logged once (rate limited)
