"""Triggered mode: one inspection per trigger, over MQTT and HTTP to the real agent process; GPIO via a fake chip.

GPIO: this machine has no gpio-sim (no configfs) and no libgpiod bindings, so the GPIO path
(``GpioTrigger``: edge events -> triggers, timestamps from the event) runs against a fake line request
with the libgpiod v2 request's methods. ``open_gpio`` itself (``gpiod.request_lines``) is not exercised here.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.publish as mqtt_publish
import pytest
from agent_harness import AgentProcess, agent_config, write_frames, write_toml
from mqtt_broker import MosquittoBroker, Subscriber

from edge_agent.demo.local_broker import free_port
from edge_agent.inspection.triggers import GpioTrigger, Trigger, TriggerBook, TriggerRefused


def test_a_trigger_takes_the_first_frame_captured_after_its_delay() -> None:
    book = TriggerBook(delay_s=0.1, timeout_s=0.5)
    book.add(Trigger(10.0, "mqtt"))
    assert book.take(10.05) is None  # the part is not in view yet
    served = book.take(10.12)
    assert served is not None and served.time == 10.0
    assert book.take(10.16) is None  # one frame per trigger
    assert book.counters.served == 1


def test_a_trigger_with_no_frame_in_time_is_reported_once() -> None:
    book = TriggerBook(delay_s=0.05, timeout_s=0.2)
    book.add(Trigger(100.0, "http", "t1"))
    assert book.expired(now=100.2) == []
    late = book.expired(now=100.3)
    assert [t.trigger_id for t in late] == ["t1"]
    assert book.expired(now=101.0) == [] and book.counters.missed == 1


def test_more_triggers_than_frames_is_a_counted_storm() -> None:
    book = TriggerBook(delay_s=0.0, timeout_s=0.1)
    for index in range(5):
        book.take(index * 0.04)  # 25 fps
    for index in range(6):
        book.add(Trigger(1.0 + index * 0.01, "mqtt"))  # 100 triggers a second
    assert book.counters.storm == 5
    served = [book.take(1.05 + i * 0.04) for i in range(3)]
    assert all(s is not None for s in served)
    assert len(book.expired(now=1.5)) == 3


def test_trigger_payloads_are_bounded_and_checked() -> None:
    book = TriggerBook(delay_s=0.0, timeout_s=1.0)
    now = time.time()
    assert book.parse_and_add(b"", "http", now).time == now
    assert (
        book.parse_and_add(json.dumps({"time": now - 0.5, "trigger_id": "a"}).encode(), "mqtt", now).time == now - 0.5
    )
    for payload in (b"[]", b'{"time": "soon"}', json.dumps({"time": now + 3600}).encode(), b"{" * 50, b" " * 5000):
        with pytest.raises(TriggerRefused):
            book.parse_and_add(payload, "mqtt", now)
    assert book.counters.refused == 5 and book.counters.received == 2


def test_a_trigger_dated_in_the_future_is_refused_beyond_a_few_ms_of_skew() -> None:
    """Issue 24, finding 2: one trigger dated now + 4.9 s sat in front of every real one."""
    book = TriggerBook(delay_s=0.05, timeout_s=0.3)
    now = time.time()
    with pytest.raises(TriggerRefused, match="ahead"):
        book.parse_and_add(json.dumps({"time": now + 4.9}).encode(), "http", now)
    with pytest.raises(TriggerRefused):
        book.parse_and_add(json.dumps({"time": now + 0.05}).encode(), "mqtt", now)
    assert book.parse_and_add(json.dumps({"time": now + 0.002}).encode(), "mqtt", now).time == now + 0.002
    assert book.counters.refused == 2 and book.waiting == 1


def test_triggers_are_ordered_and_expire_one_by_one() -> None:
    book = TriggerBook(delay_s=0.1, timeout_s=0.2)
    book.add(Trigger(10.0, "mqtt", "late-sent"))
    book.add(Trigger(9.5, "gpio", "early"))  # arrives second, happened first
    assert [t.trigger_id for t in book.expired(now=9.85)] == ["early"]  # not stuck behind the other one
    assert book.waiting == 1
    assert [t.trigger_id for t in book.expired(now=10.31)] == ["late-sent"]
    assert book.counters.missed == 2


def test_no_trigger_is_served_by_a_frame_past_its_window() -> None:
    """A frame later than trigger + delay + timeout shows another part: the trigger is no_frame instead."""
    book = TriggerBook(delay_s=0.1, timeout_s=0.2)
    book.add(Trigger(10.0, "http", "a"))
    book.add(Trigger(10.6, "http", "b"))
    served = book.take(10.75)  # inside b's window, 0.45 s past a's
    assert served is not None and served.trigger_id == "b"
    assert [t.trigger_id for t in book.expired(now=10.75)] == ["a"]
    assert book.counters.served == 1 and book.counters.missed == 1


class FakeLineRequest:
    """A libgpiod v2 line request with edge detection, driven by the test (no GPIO chip needed)."""

    def __init__(self) -> None:
        self._events: list[SimpleNamespace] = []
        self._cond = threading.Condition()
        self.released = False

    def edge(self, ago_s: float = 0.0) -> None:
        with self._cond:
            self._events.append(SimpleNamespace(timestamp_ns=time.monotonic_ns() - int(ago_s * 1e9)))
            self._cond.notify_all()

    def wait_edge_events(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._events), timeout)

    def read_edge_events(self) -> list[SimpleNamespace]:
        with self._cond:
            events, self._events = self._events, []
            return events

    def release(self) -> None:
        self.released = True


def test_gpio_edges_become_triggers_at_the_edge_time() -> None:
    book = TriggerBook(delay_s=0.0, timeout_s=1.0)
    request = FakeLineRequest()
    gpio = GpioTrigger(request, book, "fake chip line 4")
    gpio.start()
    try:
        before = time.time()
        request.edge(ago_s=0.25)  # the edge happened 250 ms before the thread saw it
        request.edge()
        deadline = time.monotonic() + 5
        while book.counters.received < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert book.counters.received == 2
        first = book.take(time.time())
        assert first is not None and first.source == "gpio"
        assert abs(first.time - (before - 0.25)) < 0.05
    finally:
        gpio.stop()
    assert request.released


@pytest.mark.slow
def test_triggered_agent_inspects_one_frame_per_mqtt_and_http_trigger_and_reports_a_storm(
    tmp_path: Path, broker: MosquittoBroker, contract_bundle: Path
) -> None:
    frames = write_frames(tmp_path / "frames", 20)
    http_port = free_port()
    values = agent_config(
        tmp_path / "state",
        contract_bundle,
        str(frames),
        broker.port,
        http_port,
        source={"loop": True, "fps_limit": 20.0},
        parts={"mode": "triggered", "trigger_delay_s": 0.05, "trigger_timeout_s": 0.3},
    )
    watcher = Subscriber(broker, "uflow/cam1/#")
    agent = AgentProcess(write_toml(tmp_path / "agent.toml", values), tmp_path / "agent.log")
    try:
        assert agent.wait_for_event("agent_ready", 60), agent.tail()
        assert watcher.wait_for(lambda ms: any(m.topic.endswith("/stats") for m in ms), 10)
        sent = []
        for index in range(4):
            sent.append(time.time())
            mqtt_publish.single(
                "uflow/cam1/trigger",
                json.dumps({"trigger_id": f"m{index}"}),
                qos=1,
                hostname=broker.host,
                port=broker.port,
            )
            time.sleep(0.3)
            sent.append(time.time())
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/trigger", data=b"{}", method="POST", headers={"X-Edge-Agent": "plc"}
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.status == 202
            time.sleep(0.3)

        def inspected(ms: list) -> list[dict]:
            return [m.json() for m in ms if m.topic.endswith("/part") and m.json()["status"] == "inspected"]

        assert watcher.wait_for(lambda ms: len(inspected(ms)) >= 8, 15), agent.tail()
        parts = inspected(watcher.messages)
        assert len(parts) == 8 and len({p["part_id"] for p in parts}) == 8
        inspections = {m.json()["sequence"]: m.json() for m in watcher.on("/inspection")}
        assert len(inspections) == 8  # frames no trigger asked for are not inspected
        for part, trigger_time in zip(sorted(parts, key=lambda p: p["trigger_time"]), sent, strict=True):
            assert part["mode"] == "triggered" and part["frames"]["count"] == 1
            assert abs(part["trigger_time"] - trigger_time) < 0.2
            assert part["decision_time"] >= part["trigger_time"] + 0.05  # the first frame after trigger + delay
            assert part["decision_time"] - part["trigger_time"] < 0.05 + 0.2  # ... not a later one
            frame = inspections[part["frames"]["first_sequence"]]
            assert part["anomalous"] == frame["anomalous"]

        # A storm: 40 triggers at once, at 20 fps; each frame serves one, the rest are reported missed.
        for _ in range(40):
            mqtt_publish.single("uflow/cam1/trigger", "{}", qos=1, hostname=broker.host, port=broker.port)
        assert watcher.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/part")]) >= 48, 20)
        missed = [m.json() for m in watcher.on("/part") if m.json()["status"] == "no_frame"]
        assert len(missed) >= 20 and all(not p["anomalous"] and p["frames"]["count"] == 0 for p in missed)
        assert agent.wait_for_event("trigger_missed", 5, count=len(missed))

        def stats_storm(ms: list) -> bool:
            stats = [m.json() for m in ms if m.topic.endswith("/stats")]
            return bool(stats) and (stats[-1].get("triggers_storm") or 0) >= 30

        assert watcher.wait_for(stats_storm, 10)
        last = [m.json() for m in watcher.on("/stats")][-1]
        assert last["triggers_received"] == 48 and last["triggers_missed"] == len(missed)
        assert agent.events("trigger_storm")
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert 'edge_agent_triggers_total{outcome="received"} 48.0' in metrics
        assert f'edge_agent_triggers_total{{outcome="missed"}} {float(len(missed))}' in metrics
        assert 'edge_agent_frames_dropped_total{reason="untriggered"}' in metrics
        assert agent.terminate() == 0
    finally:
        if agent.process.poll() is None:
            agent.kill()
        watcher.close()


def test_http_triggers_without_the_http_server_are_a_config_error() -> None:
    from edge_agent.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"http\.enabled"):
        load_settings(None, parts={"mode": "triggered", "triggers": ["http"]}, http={"enabled": False})
    assert load_settings(None, parts={"mode": "triggered", "triggers": ["mqtt"]}, http={"enabled": False})
