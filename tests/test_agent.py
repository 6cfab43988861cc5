"""The running agent, talked to as a plant would: commands over a real mosquitto, /healthz and /metrics over
real HTTP, the stats topic; a contract bundle on ONNX Runtime inspects a looping image folder meanwhile.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_harness import AgentThread, Running, agent_config, http_get, on_topic
from mqtt_broker import MosquittoBroker, Subscriber, free_port

from edge_agent.publish.commands import MAX_COMMAND_BYTES

# The bundles and frames fixtures: tests/agent_fixtures.py.


@pytest.fixture
def running(
    tmp_path: Path,
    bundles: dict[str, Path],
    frames: Path,
    broker: MosquittoBroker,
) -> Iterator[Running]:
    current = tmp_path / "current"
    current.symlink_to(bundles["v1"])
    http_port = free_port()
    values = agent_config(
        tmp_path / "state",
        current,
        str(frames),
        broker.port,
        http_port,
        source={"loop": True, "fps_limit": 20.0},
        snapshot_dir=str(tmp_path / "snapshots"),
        # Wide enough for the threshold test's strictest value; the band itself: test_security_agent.py.
        nfa={"command_band": 10_000.0},
    )
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    run = Running(agent, subscriber, broker, http_port)
    run.wait_inspections(3, timeout=60)
    yield run
    assert agent.stop() == 0
    subscriber.close()


def test_bad_commands_get_error_replies_and_inspection_goeson_topic(running: Running) -> None:
    cases = [
        ("threshold", b"{not json", None, "malformed payload: not JSON"),
        ("threshold", json.dumps([1, 2]), None, "malformed payload: not a JSON object but list"),
        (
            "threshold",
            {"request_id": "r1", "log10_epsilon": "low"},
            "r1",
            "log10_epsilon: Input should be a valid number",
        ),
        ("threshold", {"request_id": "r2"}, "r2", "give log10_epsilon and/or min_region_area"),
        ("threshold", {"request_id": "r3", "log10_epsilon": 1, "colour": "red"}, "r3", "unknown key 'colour'"),
        ("snapshot", {"request_id": "r4", "label": "../../etc"}, "r4", "label: String should match pattern"),
        ("selfdestruct", {"request_id": "r5"}, "r5", "unknown command 'selfdestruct'; known: recipe, record, reload"),
        ("reload", b"\xff\xfe\x00garbage", None, "malformed payload: not JSON"),
        ("reload", b"x" * (MAX_COMMAND_BYTES + 1), None, f"commands are limited to {MAX_COMMAND_BYTES}"),
    ]
    for name, payload, request_id, expected in cases:
        before = len(running.inspections())
        reply = running.command(name, payload)
        assert reply["ok"] is False and reply["command"] == name, reply
        assert expected in reply["message"], (expected, reply["message"])
        assert reply["request_id"] == request_id
        running.wait_inspections(before + 2)  # still inspecting after every bad command
    assert running.agent.thread.is_alive()
    sequences = [m["sequence"] for m in running.inspections()]
    assert sequences == list(range(len(sequences)))  # nothing skipped while commands were rejected


def test_threshold_change_shows_in_the_following_messages(running: Running) -> None:
    flagged = [m for m in running.wait_inspections(12) if m["anomalous"]]
    assert flagged, "the planted dark squares (every 10th frame) are rejected at the bundle's threshold"
    strictest = min(r["log_nfa"] for m in flagged for r in m["regions"]) - 1.0
    reply = running.command("threshold", {"request_id": "t1", "log10_epsilon": strictest, "min_region_area": 5})
    assert reply["ok"] and reply["request_id"] == "t1"
    assert reply["data"] == {"log10_epsilon": strictest, "min_region_area": 5}
    seen = len(running.inspections())
    after = running.wait_inspections(seen + 12)[seen:]
    assert all(m["log10_epsilon"] == strictest for m in after)
    # Below the defects' own log10 NFA they are no longer rejected.
    assert not any(m["anomalous"] for m in after)
    running.command("threshold", {"log10_epsilon": 0.0})
    seen = len(running.inspections())
    again = running.wait_inspections(seen + 12)[seen:]
    assert all(m["log10_epsilon"] == 0.0 for m in again) and any(m["anomalous"] for m in again)


def test_snapshot_saves_frame_map_mask_and_overlay(running: Running, tmp_path: Path) -> None:
    reply = running.command("snapshot", {"request_id": "s1", "label": "operator-check"})
    assert reply["ok"], reply
    files = reply["data"]["files"]
    assert set(files) == {"frame", "anomaly_map", "log_nfa", "heat_map", "mask", "overlay", "message"}
    folder = Path(files["frame"]).parent
    assert folder.parent == tmp_path / "snapshots" and folder.name.endswith("-operator-check")
    frame = cv2.imread(files["frame"])
    assert frame is not None and frame.shape == (64, 64, 3)
    mask = cv2.imread(files["mask"], cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    assert np.load(files["anomaly_map"]).dtype == np.float32
    assert cv2.imread(files["overlay"]) is not None
    message = json.loads(Path(files["message"]).read_text())
    assert message["sequence"] == reply["data"]["sequence"]
    assert bool(mask.any()) == message["anomalous"]


def test_reload_swaps_only_a_bundle_that_loads_and_runs(running: Running, tmp_path: Path, bundles) -> None:
    current = tmp_path / "current"

    def point_at(target: Path) -> None:
        link = tmp_path / "current.new"
        link.symlink_to(target)
        link.replace(current)

    point_at(bundles["tampered"])
    reply = running.command("reload", {"request_id": "bad1"})
    assert not reply["ok"] and "sha256" in reply["message"] and "still running contract 1.0.0" in reply["message"]
    point_at(bundles["nan"])
    reply = running.command("reload", {"request_id": "bad2"})
    assert not reply["ok"] and "warm-up" in reply["message"] and "NaN or infinity" in reply["message"], reply
    point_at(bundles["v2"])
    reply = running.command("reload", {"request_id": "wrong", "version": "9.9.9"})
    assert not reply["ok"] and "holds version 2.0.0, not the requested 9.9.9" in reply["message"]
    seen = len(running.inspections())
    assert all(m["model"]["version"] == "1.0.0" for m in running.wait_inspections(seen + 5)[: seen + 5])
    reply = running.command("reload", {"request_id": "good", "version": "2.0.0"})
    assert reply["ok"] and reply["data"]["model"]["version"] == "2.0.0", reply
    seen = len(running.inspections())
    after = running.wait_inspections(seen + 5)[seen:]
    assert all(m["model"]["version"] == "2.0.0" for m in after)
    sequences = [m["sequence"] for m in running.inspections()]
    assert sequences == list(range(len(sequences)))  # no frame lost across the swap


def test_update_command_refuses_a_bundle_outside_the_models_directory(running: Running) -> None:
    reply = running.command("update", {"request_id": "u1"})
    assert not reply["ok"] and "fleet updates switch" in reply["message"]


def test_healthz_metrics_and_stats(running: Running) -> None:
    status, content_type, body = http_get(running.http_port, "/healthz")
    assert status == 200 and content_type == "application/json", body
    health = json.loads(body)
    assert health["status"] == "ok" and health["problems"] == []
    assert health["source"]["state"] == "open" and health["source"]["last_frame_age_s"] < 5
    assert health["broker"]["connected"] is True and health["model"]["version"] == "1.0.0"

    status, content_type, text = http_get(running.http_port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    values = _prometheus_values(text)
    assert values["edge_agent_frames_inspected_total"] >= 3
    assert values['edge_agent_source_state{state="open"}'] == 1.0
    assert values["edge_agent_mqtt_connected"] == 1.0 and values["edge_agent_healthy"] == 1.0
    assert values['edge_agent_stage_latency_seconds_count{stage="infer"}'] >= 3
    assert 'edge_agent_model_info{backend="onnxruntime"' in text and 'version="1.0.0"' in text
    assert "edge_agent_spool_depth" in values

    status, _, body = http_get(running.http_port, "/nope")
    assert status == 404 and "/healthz" in body and "/metrics" in body

    assert running.subscriber.wait_for(lambda ms: len(on_topic(ms, "/stats")) >= 2, timeout=10)
    stats = running.subscriber.on("/stats")[-1].json()
    assert stats["source_state"] == "open" and stats["status"] == "ok" and stats["frames_inspected"] >= 3
    assert stats["model"]["version"] == "1.0.0" and stats["spool_depth"] >= 0


def test_healthz_says_degraded_and_why_while_the_broker_is_down(
    tmp_path: Path,
    bundles: dict[str, Path],
    frames: Path,
) -> None:
    http_port = free_port()
    values = agent_config(
        tmp_path / "state", bundles["v1"], str(frames), free_port(), http_port, source={"loop": True, "fps_limit": 20.0}
    )
    agent = AgentThread.from_values(values).start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _, body = http_get(http_port, "/healthz")
                if json.loads(body)["fps"] > 0:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no /healthz"
            time.sleep(0.3)
        health = json.loads(body)
        assert status == 503 and health["status"] == "degraded"
        assert any(p.startswith("MQTT broker not connected (") for p in health["problems"]), health
        assert health["broker"]["spool_depth"] > 0  # inspected frames wait in the spool
    finally:
        agent.stop(timeout=60)


def _prometheus_values(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_a_second_agent_on_the_same_spool_exits_with_a_clear_error(
    running: Running, bundles: dict[str, Path], frames: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = running.agent.settings
    values = agent_config(settings.state_dir, bundles["v1"], str(frames), running.broker.port)
    with caplog.at_level("ERROR"):
        second = AgentThread.from_values(values).start()
        second.thread.join(60)
    assert second.exit_code == 1
    assert any("is in use by another edge-agent process" in r.getMessage() for r in caplog.records)
