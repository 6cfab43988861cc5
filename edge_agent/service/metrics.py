"""Prometheus metrics of a running agent (prometheus-client, its own registry, no global state).

Counters and gauges are read from the agent's parts when Prometheus scrapes (nothing extra per frame);
the per-stage latency histograms are observed once per published frame. The metrics see the agent only
through ``MetricsView`` (its pipeline, publisher, outbox and health), never the ``Agent`` itself, so this
module does not depend on edge_agent/service/agent.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.inspection.frame_source import SOURCE_STATES

if TYPE_CHECKING:
    from edge_agent.inspection.pipeline import FrameJob, Pipeline
    from edge_agent.publish.mqtt import MqttPublisher
    from edge_agent.publish.outbox import Outbox
    from edge_agent.service.health import HealthReport

STAGES = ("capture", "preprocess", "infer", "nfa", "publish", "total")
# Seconds: from sub-millisecond NFA on a small map to seconds for a heavy model on a small CPU.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class MetricsView:
    """What ``/metrics`` reads at scrape time: the running agent's parts, and nothing else of it."""

    pipeline: Pipeline
    publisher: MqttPublisher
    outbox: Outbox
    spool_max: int  # spool.max_messages
    health: Callable[[], HealthReport]


class AgentMetrics:
    """The registry behind ``/metrics``."""

    def __init__(self, agent: MetricsView) -> None:
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
        self.registry.register(_AgentCollector(agent))

    def observe_frame(self, job: FrameJob) -> None:
        """Pipeline observer: one published frame's stage latencies."""
        if job.message is None:
            return
        latency = job.message.latency_ms
        for stage, histogram in self._stage_histograms.items():
            histogram.observe(getattr(latency, stage) / 1000.0)

    def count_command(self, name: str, ok: bool) -> None:
        self.commands.labels(name, "true" if ok else "false").inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _AgentCollector(Collector):
    """Reads the agent's counters at scrape time."""

    def __init__(self, agent: MetricsView) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        pipeline, source, publisher, outbox = agent.pipeline, agent.pipeline.source, agent.publisher, agent.outbox
        stats = pipeline.stats
        yield _counter("edge_agent_frames_captured", "Frames taken from the source.", stats.frames_captured)
        yield _counter("edge_agent_frames_inspected", "Frames inspected and published.", stats.frames_inspected)
        yield _counter("edge_agent_frames_anomalous", "Inspected frames judged anomalous.", stats.anomalous_frames)
        dropped = CounterMetricFamily(
            "edge_agent_frames_dropped", "Frames not inspected, by reason.", labels=["reason"]
        )
        dropped.add_metric(["latest_frame"], pipeline.frames_dropped)
        dropped.add_metric(["fps_limit"], source.counters.rate_limited)
        if pipeline.triggers is not None:
            dropped.add_metric(["untriggered"], pipeline.frames_untriggered)
        yield dropped
        yield from _parts_metrics(pipeline)
        yield _gauge("edge_agent_fps", "Inspected frames per second over the last 10 s.", stats.fps())
        state = GaugeMetricFamily("edge_agent_source_state", "1 for the source's current state.", labels=["state"])
        for name in SOURCE_STATES:
            state.add_metric([name], 1.0 if source.state == name else 0.0)
        yield state
        age = source.last_frame_age()
        yield _gauge(
            "edge_agent_source_last_frame_age_seconds",
            "Seconds since the source delivered a frame (-1 before the first).",
            -1.0 if age is None else age,
        )
        yield _counter(
            "edge_agent_source_reconnects", "Successful reopenings of a lost source.", source.counters.reconnects
        )
        problems = CounterMetricFamily(
            "edge_agent_source_problems", "Why a live source was reopened, by reason.", labels=["reason"]
        )
        problems.add_metric(["read_failed"], source.counters.read_failures)
        problems.add_metric(["read_timeout"], source.counters.read_timeouts)
        problems.add_metric(["stalled"], source.counters.stalls)
        yield problems
        yield _gauge("edge_agent_mqtt_connected", "1 while connected to the broker.", float(publisher.connected))
        yield _counter("edge_agent_mqtt_acked", "Messages acknowledged by the broker.", publisher.counters.acked)
        yield _counter("edge_agent_mqtt_connects", "Successful broker connections.", publisher.counters.connects)
        yield _gauge("edge_agent_spool_depth", "Messages waiting for the broker's acknowledgement.", len(outbox))
        yield _gauge("edge_agent_spool_max", "spool.max_messages.", agent.spool_max)
        yield _counter(
            "edge_agent_spool_dropped", "Messages dropped because the spool was full.", outbox.counters.dropped
        )
        yield _counter(
            "edge_agent_spool_expired", "Messages dropped because they expired unsent.", outbox.counters.expired
        )
        write_errors = getattr(outbox.counters, "write_errors", 0)
        yield _counter("edge_agent_spool_write_errors", "Failed spool commits (disk full, I/O).", write_errors)
        ref = pipeline.model.ref
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
        health = agent.health()
        yield _gauge("edge_agent_healthy", "1 when /healthz says ok, 0 when degraded.", float(health.status == "ok"))
        yield _gauge("edge_agent_uptime_seconds", "Seconds since the agent started.", health.uptime_s)


def _parts_metrics(pipeline: Pipeline) -> Iterator[Metric]:
    """Parts decided (tracked mode) and triggers by outcome (triggered mode), when that mode is on."""
    counters = getattr(pipeline.parts, "counters", None)
    if counters is not None:
        parts = CounterMetricFamily("edge_agent_parts", "Parts decided, by verdict.", labels=["verdict"])
        parts.add_metric(["anomalous"], counters.anomalous)
        parts.add_metric(["good"], counters.decided - counters.anomalous)
        yield parts
        yield _counter("edge_agent_parts_noise", "Blobs seen in too few frames to be parts.", counters.noise)
    if pipeline.triggers is not None:
        book = pipeline.triggers.counters
        triggers = CounterMetricFamily("edge_agent_triggers", "Triggers, by outcome.", labels=["outcome"])
        for outcome in ("received", "served", "missed", "storm", "refused"):
            triggers.add_metric([outcome], getattr(book, outcome))
        yield triggers


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
