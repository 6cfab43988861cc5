"""The reject relay against a real mosquitto, a real loopback HTTP actuator and a real SQLite journal.

The relay runs in this process here (its counters and log records are checked directly); the restart
tests with the real ``edge-agent reject-relay`` process are in test_relay_process.py.

Stated fire-time tolerance for these tests: every reject reaches the actuator between 2 ms before and
FIRE_TOLERANCE_MS after capture_time + travel delay (all on this host's clock). The relay itself
never fires after planned + tolerance_s; bench/relay_timing.py measures the real distribution
(a few ms at p99 on an idle machine, docs/reject_relay.md).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mqtt_broker import MosquittoBroker, Subscriber
from relay_helpers import RecordingHttpServer, http_actuator, inspection, logged, raw_publish, wait_until

from edge_agent.messages import InspectionMessage, RelayStats
from edge_agent.publish.mqtt import MqttPublisher
from edge_agent.relay.relay import RejectRelay

FIRE_TOLERANCE_MS = 100.0  # generous: this 2-core machine is shared; the bench measures the real numbers
EARLY_MS = 2.0


# The http, relay_factory and camera fixtures: tests/relay_fixtures.py.


@pytest.mark.parametrize("clock", ["fixed", "estimate"])
def test_fires_exactly_once_per_anomalous_message_at_the_planned_time(
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
    http: RecordingHttpServer,
    clock: str,
) -> None:
    relay = relay_factory(
        http_actuator(http),
        extra=f'[clock]\nmode = "{clock}"\n[timing]\ndelay_s = 0.3\ntolerance_s = 0.2\n[devices.cam2]\ndelay_s = 0.6\n',
    )
    cam1, cam2 = camera("cam1"), camera("cam2")
    planned: dict[str, float] = {}
    for sequence in range(40):
        for publisher, delay in ((cam1, 0.3), (cam2, 0.6)):
            message = inspection(publisher.device_id, sequence, anomalous=sequence % 4 == 1)
            if message.anomalous:
                planned[message.message_id] = message.capture_time + delay
            publisher.publish_inspection(message)
        time.sleep(0.02)
    assert http.wait_for(lambda arrivals: len(arrivals) >= len(planned), timeout=20)
    time.sleep(0.3)  # nothing more may come
    assert sorted(http.ids()) == sorted(planned), "each anomalous message fired exactly once"
    lateness = {a.body["message_id"]: (a.wall - planned[a.body["message_id"]]) * 1000.0 for a in http.arrivals}
    assert all(-EARLY_MS <= ms <= FIRE_TOLERANCE_MS for ms in lateness.values()), lateness
    assert wait_until(lambda: relay.stats().fired == 20)
    stats = relay.stats()
    assert (stats.received, stats.anomalous, stats.skipped_good, stats.missed, stats.duplicates) == (80, 20, 60, 0, 0)
    assert stats.devices["cam1"].fired == stats.devices["cam2"].fired == 10
    if clock == "estimate":
        # Live traffic on one host: the estimate confirms, and it is the transit time (never negative).
        assert stats.devices["cam1"].clock_source == "estimated"
        assert 0.0 <= (stats.devices["cam1"].clock_offset_s or 0.0) < 0.05


def test_expired_messages_are_counted_missed_and_never_fired(
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
    http: RecordingHttpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.relay")
    relay = relay_factory(
        http_actuator(http), extra='[clock]\nmode = "fixed"\n[timing]\ndelay_s = 0.4\ntolerance_s = 0.1\n'
    )
    cam1 = camera("cam1")
    expired = inspection("cam1", 1, capture_time=time.time() - 2.0)  # deadline passed 1.5 s ago
    just_in_time = inspection("cam1", 2, capture_time=time.time() - 0.43)  # 30 ms late: inside the window
    cam1.publish_inspection(expired)
    cam1.publish_inspection(just_in_time)
    assert http.wait_for(lambda arrivals: len(arrivals) >= 1, timeout=10)
    time.sleep(0.3)
    assert http.ids() == [just_in_time.message_id]
    stats = relay.stats()
    assert (stats.missed, stats.fired) == (1, 1)
    [missed] = logged(caplog, "missed")
    assert missed.levelno == logging.ERROR and missed.message_id == expired.message_id  # type: ignore[attr-defined]
    assert missed.late_by_ms > 1400 and missed.planned_time == pytest.approx(expired.capture_time + 0.4)  # type: ignore[attr-defined]
    # A duplicate of the missed message is a duplicate, not a second miss.
    cam1.publish_inspection(expired)
    assert wait_until(lambda: relay.stats().duplicates == 1)
    assert relay.stats().missed == 1


def test_duplicate_deliveries_fire_once(
    broker: MosquittoBroker,
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
    http: RecordingHttpServer,
) -> None:
    relay = relay_factory(http_actuator(http), extra="[timing]\ndelay_s = 0.3\ntolerance_s = 0.2\n")
    cam1 = camera("cam1")
    message = inspection("cam1", 5)
    good = inspection("cam1", 6, anomalous=False)
    for _ in range(3):
        cam1.publish_inspection(message)
        cam1.publish_inspection(good)
    # The same payload from another client (e.g. an agent that replays its spool after a restart).
    raw_publish(broker, "uflow/cam1/inspection", message.to_json().encode())
    assert http.wait_for(lambda arrivals: len(arrivals) >= 1, timeout=10)
    assert wait_until(lambda: relay.stats().duplicates == 5)
    time.sleep(0.5)  # a second fire would have come by now
    assert http.ids() == [message.message_id]
    stats = relay.stats()
    assert (stats.fired, stats.skipped_good, stats.duplicates, stats.received) == (1, 1, 5, 7)


def test_malformed_messages_are_logged_counted_and_do_not_stop_the_relay(
    broker: MosquittoBroker,
    relay_factory: Callable[..., RejectRelay],
    http: RecordingHttpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.relay")
    # Every malformed message is logged here (by default at most one line per sender and 10 s: test_security_relay_intake).
    relay = relay_factory(
        http_actuator(http), extra="[limits]\nlog_interval_s = 1e-9\n[timing]\ndelay_s = 0.2\ntolerance_s = 0.2\n"
    )
    valid = inspection("cam1", 1)
    data = json.loads(valid.to_json())
    no_capture_time = {k: v for k, v in data.items() if k != "capture_time"}
    bad_payloads = {
        b"not json": "not JSON",
        b"\xff\xfe": "not JSON",
        b"[1, 2]": "not a JSON object but list",
        json.dumps({**data, "schema": "uflow.inspection/2"}).encode(): "schema 'uflow.inspection/2'",
        json.dumps(no_capture_time).encode(): "capture_time: Field required",
        json.dumps({**data, "sequence": -3}).encode(): "sequence: Input should be greater than or equal to 0",
    }
    for payload in bad_payloads:
        raw_publish(broker, "uflow/cam1/inspection", payload)
    # A newer agent's extra field is ignored, not malformed.
    raw_publish(broker, "uflow/cam1/inspection", json.dumps({**data, "new_field": 1}).encode())
    assert http.wait_for(lambda arrivals: len(arrivals) >= 1, timeout=10)
    assert http.ids() == [valid.message_id]
    assert relay.stats().malformed == len(bad_payloads)
    records = logged(caplog, "malformed")
    assert len(records) == len(bad_payloads)
    for record, reason in zip(records, bad_payloads.values(), strict=True):
        assert reason in record.error and record.topic == "uflow/cam1/inspection"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("status", "attempts"), [(503, 2), (400, 1)])
def test_actuator_failures_are_counted_and_retried_only_when_safe(
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
    caplog: pytest.LogCaptureFixture,
    status: int,
    attempts: int,
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.relay")
    failing = RecordingHttpServer(status=status)
    try:
        relay = relay_factory(
            f'kind = "http"\nurl = "{failing.url}"\nretries = 3\nretry_delay_s = 0.01',
            extra="[timing]\ndelay_s = 0.2\ntolerance_s = 0.2\n",
        )
        message = inspection("cam1", 1)
        camera("cam1").publish_inspection(message)
        assert wait_until(lambda: relay.stats().actuator_failures == 1)
        time.sleep(0.3)
        # 5xx: the receiver says it did not act, so retrying is safe (here: every try fails, 4 allowed, but only
        # while before the deadline; at least 2). 4xx will not get better: one attempt.
        assert len(failing.arrivals) >= attempts if status >= 500 else len(failing.arrivals) == 1
        [failed] = logged(caplog, "failed")
        assert f"HTTP {status}" in failed.reason and failed.message_id == message.message_id  # type: ignore[attr-defined]
        assert relay.stats().fired == 0
    finally:
        failing.close()


def test_unreachable_http_actuator_fails_before_the_deadline(
    relay_factory: Callable[..., RejectRelay], camera: Callable[[str], MqttPublisher]
) -> None:
    from edge_agent.demo.local_broker import free_port

    relay = relay_factory(
        f'kind = "http"\nurl = "http://127.0.0.1:{free_port()}/reject"\nretries = 2',
        extra="[timing]\ndelay_s = 0.2\ntolerance_s = 0.2\n",
    )
    camera("cam1").publish_inspection(inspection("cam1", 1))
    assert wait_until(lambda: relay.stats().actuator_failures == 1)
    assert relay.stats().fired == 0 and relay.responsive()


def test_mqtt_actuator_publishes_the_order_with_an_expiry(
    broker: MosquittoBroker,
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
) -> None:
    plc = Subscriber(broker, "plc/line1/#")
    try:
        relay_factory(
            'kind = "mqtt"\ntopic = "plc/line1/{device_id}/reject"',
            extra="[timing]\ndelay_s = 0.3\ntolerance_s = 2.0\n",
        )
        message = inspection("cam1", 3)
        camera("cam1").publish_inspection(message)
        assert plc.wait_for(lambda ms: len(ms) >= 1, timeout=10)
        time.sleep(0.3)
        [order] = plc.messages
        assert order.topic == "plc/line1/cam1/reject" and order.qos == 1
        body = order.json()
        assert body["message_id"] == message.message_id and body["sequence"] == 3 and body["regions"] == 1
        assert body["deadline"] == pytest.approx(body["planned_time"] + 2.0)
        assert 1 <= int(order.properties["MessageExpiryInterval"]) <= 3  # type: ignore[call-overload]
    finally:
        plc.close()


def test_command_actuator_passes_fields_as_arguments_never_as_shell(
    tmp_path: Path, relay_factory: Callable[..., RejectRelay], camera: Callable[[str], MqttPublisher]
) -> None:
    out = tmp_path / "fired.txt"
    relay = relay_factory(
        'kind = "command"\n'
        f'command = ["/bin/sh", "-c", "printf \'%s|%s|%s\\\\n\' \\"$0\\" \\"$1\\" \\"$2\\" >> {out}", '
        '"{message_id}", "{device_id}", "{sequence}"]',
        extra="[timing]\ndelay_s = 0.2\ntolerance_s = 0.5\n",
        cameras=("cam1.line-3",),
    )
    # An id with shell syntax is refused before any actuator sees it (ids match [A-Za-z0-9._-]{1,64}) ...
    hostile = "cam1;touch${IFS}pwned"
    raw = camera("x")
    raw.device_id = hostile  # the topic level: the camera's identity
    raw.publish_inspection(inspection(hostile, 9))
    assert wait_until(lambda: relay.stats().malformed == 1)
    # ... and a valid one reaches the command as one argument each, never through a shell.
    message = inspection("cam1.line-3", 9)
    raw.device_id = "cam1.line-3"
    raw.publish_inspection(message)
    assert wait_until(lambda: relay.stats().fired == 1)
    assert out.read_text().splitlines() == [f"{message.message_id}|cam1.line-3|9"]
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_unconfigured_camera_is_counted_and_named(
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
    http: RecordingHttpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.relay")
    relay = relay_factory(http_actuator(http), extra="[devices.cam1]\ndelay_s = 0.2\n", cameras=("cam9",))
    camera("cam9").publish_inspection(inspection("cam9", 1))
    camera("cam1").publish_inspection(inspection("cam1", 1))
    assert http.wait_for(lambda arrivals: len(arrivals) >= 1, timeout=10)
    assert wait_until(lambda: relay.stats().unconfigured == 1)
    [record] = logged(caplog, "unconfigured")
    assert "[devices.cam9]" in record.reason  # type: ignore[attr-defined]


def test_status_and_stats_are_published(
    broker: MosquittoBroker,
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
    http: RecordingHttpServer,
) -> None:
    watcher = Subscriber(broker, "uflow/relay/r1/#")
    try:
        relay = relay_factory(http_actuator(http), extra="[timing]\ndelay_s = 0.2\ntolerance_s = 0.3\n")
        camera("cam1").publish_inspection(inspection("cam1", 1))
        assert http.wait_for(lambda arrivals: len(arrivals) >= 1, timeout=10)
        assert wait_until(lambda: relay.stats().fired == 1)
        published = relay.publish_stats()
        assert watcher.wait_for(lambda ms: any(m.topic.endswith("/stats") for m in ms))
        stats = RelayStats.model_validate_json(watcher.on("/stats")[-1].payload)
        assert stats == published and stats.fired == 1 and stats.connected
        assert stats.lateness_ms_max >= stats.lateness_ms_p99 >= stats.lateness_ms_p50 >= 0.0
        relay.stop()
        assert watcher.wait_for(lambda ms: [m.payload for m in ms if m.topic.endswith("/status")][-1:] == [b"stopped"])
        assert [m.payload for m in watcher.on("/status")] == [b"online", b"stopped"]
    finally:
        watcher.close()


def test_wildcard_and_several_topics(
    broker: MosquittoBroker,
    relay_factory: Callable[..., RejectRelay],
    http: RecordingHttpServer,
) -> None:
    relay_factory(
        http_actuator(http),
        extra="[timing]\ndelay_s = 0.1\ntolerance_s = 0.5\n",
        topics=("line1/+/inspection", "line2/cam5/inspection"),
        cameras=("a", "cam5", "cam6"),
    )
    wanted: list[InspectionMessage] = []
    for topic, device in (
        ("line1/a/inspection", "a"),
        ("line2/cam5/inspection", "cam5"),
        ("line2/cam6/inspection", "cam6"),
    ):
        message = inspection(device, 1)
        if device != "cam6":
            wanted.append(message)
        raw_publish(broker, topic, message.to_json().encode())
    assert http.wait_for(lambda arrivals: len(arrivals) >= 2, timeout=10)
    time.sleep(0.3)
    assert sorted(http.ids()) == sorted(m.message_id for m in wanted)


def test_relay_survives_a_broker_restart(
    broker: MosquittoBroker,
    relay_factory: Callable[..., RejectRelay],
    http: RecordingHttpServer,
) -> None:
    # This broker keeps no sessions across its own restart (persistence false): the relay must subscribe again.
    relay = relay_factory(http_actuator(http), extra="[timing]\ndelay_s = 0.1\ntolerance_s = 0.5\n")
    broker.stop()
    assert wait_until(lambda: not relay.connected, 10)
    broker.start()
    assert relay.wait_subscribed(20)
    message = inspection("cam1", 1)
    raw_publish(broker, "uflow/cam1/inspection", message.to_json().encode())
    assert http.wait_for(lambda arrivals: len(arrivals) >= 1, timeout=10)
    assert http.ids() == [message.message_id]


def test_rejects_that_come_due_while_every_actuator_worker_is_busy_are_missed_not_late(
    relay_factory: Callable[..., RejectRelay],
    camera: Callable[[str], MqttPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from edge_agent.relay.firing import ACTUATOR_WORKERS

    caplog.set_level(logging.INFO, logger="edge_agent.relay")
    slow = RecordingHttpServer(delay_s=1.0)  # each call takes 1 s: the pool is full until then
    try:
        relay = relay_factory(
            f'kind = "http"\nurl = "{slow.url}"\ntimeout_s = 3.0',
            extra='[clock]\nmode = "fixed"\n[timing]\ndelay_s = 0.3\ntolerance_s = 0.1\n',
        )
        publisher = camera("cam1")
        captured = time.time() - 0.04
        for sequence in range(ACTUATOR_WORKERS + 2):
            publisher.publish_inspection(inspection("cam1", sequence, capture_time=captured))
        assert wait_until(lambda: relay.stats().fired + relay.stats().missed == ACTUATOR_WORKERS + 2, 15)
        stats = relay.stats()
        assert (stats.fired, stats.missed) == (ACTUATOR_WORKERS, 2)
        assert len(slow.arrivals) == ACTUATOR_WORKERS
        assert all(a.wall <= captured + 0.3 + 0.1 + 0.05 for a in slow.arrivals)
        assert {r.reason for r in logged(caplog, "missed")} == {"came due after its deadline"}  # type: ignore[attr-defined]
    finally:
        slow.close()
