"""Trust boundaries of the reject relay (issue 13), against a real mosquitto, real HTTP actuator, real SQLite.

Each test reproduces one finding of the security review: on the code before the fix it fails (the relay
stalls, fires for a forged camera, or misses every real reject).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mqtt_broker import MosquittoBroker
from relay_helpers import RecordingHttpServer, http_actuator, inspection, logged, raw_publish, wait_until

from edge_agent.messages import MAX_PAYLOAD_DEPTH, StageLatency, parse_json_object
from edge_agent.publish.mqtt import MqttPublisher
from edge_agent.relay.config import load_relay_settings
from edge_agent.relay.relay import RejectRelay

TIMING = "[timing]\ndelay_s = 0.5\ntolerance_s = 0.3\n"
# More than mosquitto's default in-flight window (max_inflight_messages 20): unacknowledged messages
# beyond it stop every delivery to the relay.
POISON_COUNT = 30


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def test_deeply_nested_messages_are_malformed_acknowledged_and_do_not_stall_the_relay(
    broker: MosquittoBroker,
    relay_factory: Callable[..., RejectRelay],
    http: RecordingHttpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.relay")
    relay = relay_factory(http_actuator(http), extra=TIMING)
    for _ in range(POISON_COUNT):
        raw_publish(broker, "uflow/cam1/inspection", nested(1100))  # RecursionError in a plain json.loads
    good = inspection("cam1", 1)
    raw_publish(broker, "uflow/cam1/inspection", good.to_json().encode())
    assert http.wait_for(lambda arrivals: len(arrivals) >= 1, timeout=15), "the relay stalled"
    assert http.ids() == [good.message_id]
    assert wait_until(lambda: relay.stats().malformed == POISON_COUNT)
    reasons = {r.error for r in logged(caplog, "malformed")}  # type: ignore[attr-defined]
    assert reasons == {f"payload nests 1100 levels deep; the limit is {MAX_PAYLOAD_DEPTH}"}


def test_poison_is_not_redelivered_after_a_restart(
    tmp_path: Path,
    broker: MosquittoBroker,
    http: RecordingHttpServer,
) -> None:
    # The persistent session redelivers what was not acknowledged: a relay that never acks a poison message
    # meets it again after every restart.
    from relay_helpers import relay_toml

    config = relay_toml(tmp_path / "relay.toml", broker.port, tmp_path / "state", http_actuator(http), extra=TIMING)
    first = RejectRelay(load_relay_settings(config))
    first.start()
    assert first.wait_subscribed(10)
    raw_publish(broker, "uflow/cam1/inspection", nested(2000))
    assert wait_until(lambda: first.stats().malformed == 1)
    first.stop(drain_s=0)
    second = RejectRelay(load_relay_settings(config))
    second.start()
    try:
        assert second.wait_subscribed(10)
        good = inspection("cam1", 2)
        raw_publish(broker, "uflow/cam1/inspection", good.to_json().encode())
        assert http.wait_for(lambda arrivals: len(arrivals) >= 1, timeout=10)
        time.sleep(0.3)
        assert second.stats().malformed == 0
    finally:
        second.stop(drain_s=0)


def test_an_unwritable_journal_does_not_stall_the_relay_and_says_so(
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
    http: RecordingHttpServer,
) -> None:
    relay = relay_factory(http_actuator(http), extra="[timing]\ndelay_s = 0.2\ntolerance_s = 0.5\n")
    relay.journal._db.execute("PRAGMA query_only = ON")  # a real SQLite write failure (as on a full disk)
    publisher = camera("cam1")
    messages = [inspection("cam1", sequence) for sequence in range(POISON_COUNT)]
    for message in messages:
        publisher.publish_inspection(message)
    assert http.wait_for(lambda arrivals: len(arrivals) >= POISON_COUNT, timeout=20), (
        f"fired {len(http.arrivals)} of {POISON_COUNT}"
    )
    assert sorted(http.ids()) == sorted(m.message_id for m in messages)
    assert wait_until(lambda: relay.stats().fired == POISON_COUNT)
    stats = relay.stats()
    assert stats.journal_ok is False and stats.journal_errors >= POISON_COUNT
    assert stats.fired == POISON_COUNT and stats.errors == 0
    # A redelivery is still a duplicate (remembered in memory), and the journal recovers when writable.
    publisher.publish_inspection(messages[0])
    assert wait_until(lambda: relay.stats().duplicates == 1)
    relay.journal._db.execute("PRAGMA query_only = OFF")
    later = inspection("cam1", POISON_COUNT)
    publisher.publish_inspection(later)
    assert wait_until(lambda: relay.stats().fired == POISON_COUNT + 1)
    assert relay.stats().journal_ok is True and relay.journal.state_of(later.message_id) == "fired"


def test_forged_clock_samples_cannot_make_every_reject_missed(
    broker: MosquittoBroker,
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
    http: RecordingHttpServer,
) -> None:
    relay = relay_factory(http_actuator(http), extra=TIMING)
    # 20 good messages that claim an hour of agent latency: each a clock sample of -3600 s.
    for sequence in range(20):
        forged = inspection("cam1", 1000 + sequence, anomalous=False)
        forged = forged.model_copy(update={"latency_ms": StageLatency(capture=1.0, total=3.6e6)})
        raw_publish(broker, "uflow/cam1/inspection", forged.to_json().encode())
    assert wait_until(lambda: relay.stats().devices.get("cam1") is not None and relay.stats().received == 20)
    real = inspection("cam1", 1)
    camera("cam1").publish_inspection(real)
    assert wait_until(lambda: relay.stats().fired + relay.stats().missed == 1)
    stats = relay.stats()
    assert (stats.fired, stats.missed) == (1, 0), "the real reject was planned with the forged clock offset"
    assert http.ids() == [real.message_id]
    assert stats.devices["cam1"].clock_samples_refused == 20
    assert abs(stats.devices["cam1"].clock_offset_s or 0.0) < 1.0
    relay.housekeeping()  # nothing forged reaches the journal's kept estimate either
    kept = relay.journal.get_meta("clock_offsets") or {}
    assert all(abs(offset) < 1.0 for offset, _ in kept.values())


def test_the_topic_is_the_camera_identity(
    broker: MosquittoBroker,
    relay_factory: Callable[..., RejectRelay],
    http: RecordingHttpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.relay")
    relay = relay_factory(http_actuator(http), extra=TIMING)
    # A client allowed to publish only under uflow/cam2/ speaks for cam1.
    raw_publish(broker, "uflow/cam2/inspection", inspection("cam1", 1).to_json().encode())
    genuine = inspection("cam2", 1)
    raw_publish(broker, "uflow/cam2/inspection", genuine.to_json().encode())
    assert http.wait_for(lambda arrivals: len(arrivals) >= 1, timeout=10)
    time.sleep(0.3)
    assert http.ids() == [genuine.message_id]
    assert relay.stats().malformed == 1 and "cam1" not in relay.stats().devices
    [record] = logged(caplog, "malformed")
    assert "is not the topic's 'cam2'" in record.error  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("topic", "fields"),
    [
        ("uflow/-rf/inspection", {"device_id": "-rf"}),  # option injection into an actuator's argv
        ("uflow/cam1/inspection", {"message_id": "--help"}),
        ("uflow/cam1/inspection", {"message_id": "a/b/#"}),  # wildcards in an MQTT actuator topic
        ("uflow/cam1/inspection", {"message_id": "x" * 65}),
    ],
)
def test_ids_unusable_in_topics_or_argv_are_refused(
    broker: MosquittoBroker,
    relay_factory: Callable[..., RejectRelay],
    http: RecordingHttpServer,
    topic: str,
    fields: dict[str, str],
) -> None:
    relay = relay_factory(http_actuator(http), extra=TIMING)
    data = json.loads(inspection("cam1", 1).to_json())
    raw_publish(broker, topic, json.dumps({**data, **fields}).encode())
    assert wait_until(lambda: relay.stats().malformed == 1)
    time.sleep(0.3)
    assert http.arrivals == [] and relay.stats().fired == 0


def test_per_camera_state_is_bounded(
    broker: MosquittoBroker,
    relay_factory: Callable[..., RejectRelay],
    http: RecordingHttpServer,
) -> None:
    cameras = tuple(f"cam{index}" for index in range(5))
    relay = relay_factory(http_actuator(http), extra="max_devices = 3\n" + TIMING, cameras=cameras)
    for index in range(5):
        device = f"cam{index}"
        message = inspection(device, 1, anomalous=False)
        raw_publish(broker, f"uflow/{device}/inspection", message.to_json().encode())
    assert wait_until(lambda: relay.stats().malformed == 2)
    assert sorted(relay.stats().devices) == ["cam0", "cam1", "cam2"]


def test_relay_id_and_device_ids_in_the_config_are_checked(tmp_path: Path) -> None:
    from relay_helpers import relay_toml

    from edge_agent.config import ConfigError

    config = relay_toml(tmp_path / "r.toml", 1883, tmp_path, 'kind = "http"\nurl = "http://127.0.0.1:9/"', "a/b")
    with pytest.raises(ConfigError, match=r"must match \[A-Za-z0-9._-\]"):
        load_relay_settings(config)


def test_the_bounded_parser_refuses_without_recursing() -> None:
    from edge_agent.messages import PayloadError

    assert parse_json_object(b"", 10) == {}
    assert parse_json_object(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[["}', 100) == {"a": "[" * 26}  # brackets in strings
    assert parse_json_object(b'{"a": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[["}', 100)["a"].startswith('"[')
    for payload, limit in ((b"[" * 100_000, 1 << 20), (b"{}" + b" " * 11, 12), (b"[1]", 100), (b"\xff", 10)):
        with pytest.raises(PayloadError):
            parse_json_object(payload, limit)
