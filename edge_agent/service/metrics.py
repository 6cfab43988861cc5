"""Prometheus metrics of a running agent (prometheus-client, its own registry, no global state).

Counters and gauges are rendered from one ``AgentSnapshot`` (edge_agent/service/agent_snapshot.py) taken
when Prometheus scrapes (nothing extra per frame); the per-stage latency histograms are observed once per
published frame, and the command counter once per command. ``AgentMetrics`` is built before the command
worker that counts into it; the snapshot collector is added by ``watch`` once every component it reads
exists. The metrics never see the ``Agent`` itself, so this module does not depend on
edge_agent/service/agent.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.inspection.frame_source import SOURCE_STATES
from edge_agent.service.agent_snapshot import AgentSnapshot, PartFigures
from edge_agent.service.health import assess

if TYPE_CHECKING:
    from edge_agent.inspection.pipeline import FrameJob

STAGES = ("capture", "preprocess", "infer", "nfa", "publish", "total")
# Seconds: from sub-millisecond NFA on a small map to seconds for a heavy model on a small CPU.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AgentMetrics:
    """The registry behind ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "edge_agent_stage_latency_seconds",
            "Time each inspected frame spent in each pipeline stage (total: frame in memory to MQTT client).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._stage_histograms = {stage: self.latency.labels(stage) for stage in STAGES}
        self.commands = Counter(
            "edge_agent_commands",
            "Commands received on cmd/<name>, by name and outcome.",
            ["command", "ok"],
            registry=self.registry,
        )

    def watch(self, snapshot: Callable[[], AgentSnapshot]) -> None:
        """Render ``snapshot()`` at every scrape (call once, when every component it reads exists)."""
        self.registry.register(_SnapshotCollector(snapshot))

    def observe_frame(self, job: FrameJob) -> None:
        """Pipeline observer: one published frame's stage latencies."""
        latency = job.message.latency_ms
        for stage, histogram in self._stage_histograms.items():
            histogram.observe(getattr(latency, stage) / 1000.0)

    def count_command(self, name: str, ok: bool) -> None:
        self.commands.labels(name, "true" if ok else "false").inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _SnapshotCollector(Collector):
    """Renders one snapshot per scrape."""

    def __init__(self, snapshot: Callable[[], AgentSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        source = snap.source
        yield _counter("edge_agent_frames_captured", "Frames taken from the source.", snap.frames_captured)
        yield _counter("edge_agent_frames_inspected", "Frames inspected and published.", snap.frames_inspected)
        yield _counter("edge_agent_frames_anomalous", "Inspected frames judged anomalous.", snap.anomalous_frames)
        dropped = CounterMetricFamily(
            "edge_agent_frames_dropped", "Frames not inspected, by reason.", labels=["reason"]
        )
        dropped.add_metric(["latest_frame"], snap.frames_dropped)
        dropped.add_metric(["fps_limit"], source.rate_limited)
        if snap.frames_untriggered is not None:
            dropped.add_metric(["untriggered"], snap.frames_untriggered)
        yield dropped
        yield from _parts_metrics(snap.parts)
        yield _gauge("edge_agent_fps", "Inspected frames per second over the last 10 s.", snap.fps)
        state = GaugeMetricFamily("edge_agent_source_state", "1 for the source's current state.", labels=["state"])
        for name in SOURCE_STATES:
            state.add_metric([name], 1.0 if source.state == name else 0.0)
        yield state
        age = source.last_frame_age_s
        yield _gauge(
            "edge_agent_source_last_frame_age_seconds",
            "Seconds since the source delivered a frame (-1 before the first).",
            -1.0 if age is None else age,
        )
        yield _counter("edge_agent_source_reconnects", "Successful reopenings of a lost source.", source.reconnects)
        problems = CounterMetricFamily(
            "edge_agent_source_problems", "Why a live source was reopened, by reason.", labels=["reason"]
        )
        problems.add_metric(["read_failed"], source.read_failures)
        problems.add_metric(["read_timeout"], source.read_timeouts)
        problems.add_metric(["stalled"], source.stalls)
        yield problems
        yield _gauge("edge_agent_mqtt_connected", "1 while connected to the broker.", float(snap.broker_connected))
        yield _counter("edge_agent_mqtt_acked", "Messages acknowledged by the broker.", snap.mqtt_acked)
        yield _counter("edge_agent_mqtt_connects", "Successful broker connections.", snap.mqtt_connects)
        yield _gauge("edge_agent_spool_depth", "Messages waiting for the broker's acknowledgement.", snap.spool_depth)
        yield _gauge("edge_agent_spool_max", "spool.max_messages.", snap.spool_max)
        yield _counter("edge_agent_spool_dropped", "Messages dropped because the spool was full.", snap.spool_dropped)
        yield _counter("edge_agent_spool_expired", "Messages dropped because they expired unsent.", snap.spool_expired)
        yield _counter(
            "edge_agent_spool_write_errors", "Failed spool commits (disk full, I/O).", snap.spool_write_errors
        )
        ref = snap.model
        info = InfoMetricFamily("edge_agent_model", "The model being served.")
        info.add_metric(
            [],
            {
                "name": ref.name,
                "version": ref.version,
                "sha256": ref.sha256,
                "backend": ref.backend,
                "precision": ref.precision,
            },
        )
        yield info
        health = assess(snap)
        yield _gauge("edge_agent_healthy", "1 when /healthz says ok, 0 when degraded.", float(health.status == "ok"))
        yield _gauge("edge_agent_uptime_seconds", "Seconds since the agent started.", health.uptime_s)


def _parts_metrics(parts: PartFigures) -> Iterator[Metric]:
    """Parts decided (tracked mode) and triggers by outcome (triggered mode), when that mode is on."""
    if parts.decided is not None and parts.anomalous is not None:
        family = CounterMetricFamily("edge_agent_parts", "Parts decided, by verdict.", labels=["verdict"])
        family.add_metric(["anomalous"], parts.anomalous)
        family.add_metric(["good"], parts.decided - parts.anomalous)
        yield family
        yield _counter("edge_agent_parts_noise", "Blobs seen in too few frames to be parts.", parts.noise or 0)
    if parts.triggers_received is not None:
        triggers = CounterMetricFamily("edge_agent_triggers", "Triggers, by outcome.", labels=["outcome"])
        outcomes = {
            "received": parts.triggers_received,
            "served": parts.triggers_served,
            "missed": parts.triggers_missed,
            "storm": parts.triggers_storm,
            "refused": parts.triggers_refused,
        }
        for outcome, count in outcomes.items():
            triggers.add_metric([outcome], count or 0)
        yield triggers


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
