"""One AgentSnapshot, rendered five ways: /metrics, the stats message, /healthz, the status line, the preview.

A hand-made snapshot with a different value in every counter shows that each rendering reads the field
it names (a swapped pair would show); a real agent run on a folder shows that the snapshot is read from
the running components and that its renderings agree after the run.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from agent_harness import agent_config
from mqtt_broker import MosquittoBroker

from edge_agent.config import load_settings
from edge_agent.inspection.frame_source import FrameSource
from edge_agent.inspection.loaded_model import load_model
from edge_agent.messages import ModelRef
from edge_agent.service.agent import Agent
from edge_agent.service.agent_snapshot import AgentSnapshot, PartFigures, SourceFigures, stats_message, status_line
from edge_agent.service.health import assess
from edge_agent.service.metrics import AgentMetrics
from edge_agent.service.preview import PreviewFacts

MODEL = ModelRef(name="m", version="7.1", sha256="ab" * 32, backend="onnxruntime", precision="fp32")


def _snapshot(**changes: object) -> AgentSnapshot:
    snapshot = AgentSnapshot(
        device_id="cam9",
        time=1_800_000_000.25,
        uptime_s=123.45,
        fps=12.5,
        camera_fps=25.0,
        latency_p50_ms=40.0,
        latency_p99_ms=90.0,
        frames_captured=1001,
        frames_inspected=902,
        anomalous_frames=33,
        frames_dropped=44,
        frames_untriggered=55,
        pipeline_error=None,
        pipeline_ended=False,
        stall_timeout_s=10.0,
        source=SourceFigures("folder", "open", 1_799_999_000.5, "", 3, 4, 5, 6, 7, 0.5),
        model=MODEL,
        broker_connected=True,
        mqtt_acked=880,
        mqtt_connects=2,
        inspections_published=901,
        spool_depth=11,
        spool_max=1000,
        spool_expired=12,
        spool_dropped=13,
        spool_write_errors=14,
        spool_error="",
        commands_alive=True,
        commands_restarts=0,
        commands_last_crash="",
        parts=PartFigures("triggered", None, None, None, 61, 62, 63, 64, 65, 2),
        loop_problems=(),
        loop_figures={"kept": None, "drift": None, "shadow": None, "recording": None},
    )
    return replace(snapshot, **changes)  # type: ignore[arg-type]  # test values for chosen fields


def _exposition(snapshot: AgentSnapshot) -> dict[str, float]:
    metrics = AgentMetrics()
    metrics.watch(lambda: snapshot)
    values = {}
    for line in metrics.exposition()[0].decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_and_the_stats_message_render_the_same_snapshot_with_the_same_numbers() -> None:
    snapshot = _snapshot()
    metrics = _exposition(snapshot)
    stats = stats_message(snapshot, assess(snapshot))
    pairs = {
        "edge_agent_frames_captured_total": stats.frames_captured,
        "edge_agent_frames_inspected_total": stats.frames_inspected,
        "edge_agent_frames_anomalous_total": stats.anomalous_frames,
        'edge_agent_frames_dropped_total{reason="latest_frame"}': stats.frames_dropped,
        "edge_agent_spool_depth": stats.spool_depth,
        "edge_agent_spool_dropped_total": stats.spool_dropped,
        "edge_agent_spool_expired_total": stats.spool_expired,
        "edge_agent_source_reconnects_total": stats.source_reconnects,
        "edge_agent_fps": stats.fps,
        "edge_agent_uptime_seconds": stats.uptime_s,
        'edge_agent_triggers_total{outcome="received"}': stats.triggers_received,
        'edge_agent_triggers_total{outcome="missed"}': stats.triggers_missed,
        'edge_agent_triggers_total{outcome="storm"}': stats.triggers_storm,
    }
    assert {name: metrics[name] for name in pairs} == pairs
    # The figures only /metrics shows come from their own fields, not a neighbour's.
    assert metrics['edge_agent_frames_dropped_total{reason="untriggered"}'] == 55
    assert metrics['edge_agent_frames_dropped_total{reason="fps_limit"}'] == 7
    assert metrics['edge_agent_source_problems_total{reason="read_failed"}'] == 4
    assert metrics['edge_agent_source_problems_total{reason="stalled"}'] == 6
    assert metrics['edge_agent_triggers_total{outcome="served"}'] == 62
    assert metrics['edge_agent_triggers_total{outcome="refused"}'] == 65
    assert metrics["edge_agent_spool_write_errors_total"] == 14
    assert metrics["edge_agent_mqtt_acked_total"] == 880 and metrics["edge_agent_healthy"] == 1.0
    assert stats.status == "ok" and stats.model == MODEL and stats.time == snapshot.time
    assert stats.parts_decided is None  # triggered mode: no tracked counters, and no edge_agent_parts family
    assert not any(name.startswith("edge_agent_parts") for name in metrics)


def test_a_degraded_snapshot_is_degraded_in_health_stats_and_metrics_alike() -> None:
    snapshot = _snapshot(broker_connected=False, spool_error="disk full", loop_problems=("drift (brightness)",))
    health = assess(snapshot)
    stats = stats_message(snapshot, health)
    assert health.status == stats.status == "degraded"
    assert stats.problems == health.problems and "drift (brightness)" in health.problems
    assert any("disk full" in p for p in health.problems)
    assert _exposition(snapshot)["edge_agent_healthy"] == 0.0
    assert "mqtt DISCONNECTED" in status_line(snapshot)


def test_status_line_and_preview_facts_read_the_snapshot() -> None:
    snapshot = _snapshot()
    line = status_line(snapshot)
    assert "12.5 fps" in line and "model m 7.1 (onnxruntime)" in line and "spool 11" in line
    assert "902 frames, 33 anomalous, 44 dropped" in line
    facts = PreviewFacts.of(snapshot)
    assert (facts.fps, facts.camera_fps, facts.latency_p50_ms, facts.latency_p99_ms) == (12.5, 25.0, 40.0, 90.0)
    assert facts.mode == "triggered" and facts.parts_line == ""
    assert facts.trigger_line == "61 triggers, 2 waiting, 62 inspected, 63 missed, 64 in storms"
    tracked = PreviewFacts.of(_snapshot(parts=PartFigures("tracked", 9, 2, 1)))
    assert tracked.parts_line == "9 parts decided, 2 anomalous, 1 noise" and tracked.trigger_line == ""


def test_a_real_agent_is_snapshotted_from_its_components(
    tmp_path: Path, bundles: dict[str, Path], frames: Path, broker: MosquittoBroker
) -> None:
    settings = load_settings(None, **agent_config(tmp_path / "state", bundles["v1"], str(frames), broker.port))
    source = FrameSource(settings.source)
    model = load_model(bundles["v1"], settings.model, settings.nfa, live=source.live)
    source.open()
    agent = Agent(settings, model, source)
    # Built before anything runs: every component the snapshot reads exists already.
    before = agent.take_snapshot()
    assert before.frames_inspected == 0 and before.model.version == "1.0.0" and before.parts.mode == "off"
    assert agent.serve(threading.Event()) == 0  # the folder's 30 frames, then the end
    after = agent.take_snapshot()
    assert after.frames_inspected == after.frames_captured == 30 and after.pipeline_ended
    assert after.inspections_published == 30 and after.source.state == "closed"
    stats = agent.stats_message()
    metrics = {}
    for line in agent.metrics.exposition()[0].decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            metrics[name] = float(value)
    assert stats.frames_inspected == metrics["edge_agent_frames_inspected_total"] == 30
    assert stats.anomalous_frames == metrics["edge_agent_frames_anomalous_total"] == after.anomalous_frames
    assert stats.spool_depth == metrics["edge_agent_spool_depth"] == after.spool_depth
    assert "30 frames" in agent.status_line()
