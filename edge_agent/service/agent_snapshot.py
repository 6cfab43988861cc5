"""One typed, frozen ``AgentSnapshot`` of a running agent, and its renderings.

The agent's counters live in its components (the pipeline's stats, the source, the publisher, the outbox,
the command worker, the ``[parts]`` inputs and the line-to-model loop). ``take_snapshot`` reads each of them
once into one ``AgentSnapshot``; every view renders a snapshot and reads nothing else, so the numbers one
output shows agree with each other and with any other output rendered from the same snapshot:

- ``/healthz``: ``health.assess(snapshot)``;
- the ``stats`` topic: ``stats_message(snapshot)``;
- ``systemctl status``: ``status_line(snapshot)``;
- the preview's facts: ``preview_facts(snapshot)``;
- ``/metrics``: metrics.py's collector.

The supervisor takes one snapshot per round that reports (the status line and the stats message of that
round render the same one); an HTTP request (``/healthz``, ``/metrics``, ``/preview.json``) takes its own, so
it answers with the figures of the moment it was asked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from edge_agent.messages import ModelRef, StatsMessage
from edge_agent.service.agent_part import AgentPart

if TYPE_CHECKING:
    from edge_agent.inspection.pipeline import Pipeline
    from edge_agent.publish.commands import CommandProcessor
    from edge_agent.publish.mqtt import MqttPublisher
    from edge_agent.publish.outbox import Outbox


@dataclass(frozen=True)
class SourceFigures:
    """The frame source at snapshot time."""

    kind: str
    state: str
    state_since: float  # unix time of the last state change
    error: str  # the last problem, if any (redacted)
    reconnects: int
    read_failures: int
    read_timeouts: int
    stalls: int
    rate_limited: int  # live frames skipped by source.fps_limit
    last_frame_age_s: float | None  # None before the first frame


@dataclass(frozen=True)
class PartFigures:
    """``[parts]`` counters: the tracked ones are None unless mode is tracked, the trigger ones unless triggered."""

    mode: str  # off | tracked | triggered
    decided: int | None = None
    anomalous: int | None = None
    noise: int | None = None
    triggers_received: int | None = None
    triggers_served: int | None = None
    triggers_missed: int | None = None
    triggers_storm: int | None = None
    triggers_refused: int | None = None
    triggers_waiting: int | None = None


@dataclass(frozen=True)
class AgentSnapshot:
    """Every figure the agent reports, read once (see the module docstring)."""

    device_id: str
    time: float  # unix time the snapshot was taken
    uptime_s: float
    fps: float  # inspected frames per second, last 10 s
    camera_fps: float  # frames read from the source per second, last 10 s (inspected or not)
    latency_p50_ms: float
    latency_p99_ms: float
    frames_captured: int
    frames_inspected: int
    anomalous_frames: int
    frames_dropped: int  # live frames replaced by a newer one
    frames_untriggered: int | None  # triggered mode: frames no trigger asked for
    pipeline_error: str | None
    pipeline_ended: bool
    stall_timeout_s: float  # source.stall_timeout_s (what "no frame for too long" means)
    source: SourceFigures
    model: ModelRef
    broker_connected: bool
    mqtt_acked: int
    mqtt_connects: int
    inspections_published: int
    spool_depth: int
    spool_max: int
    spool_expired: int
    spool_dropped: int
    spool_write_errors: int
    spool_error: str  # the spool's last write error; "" while it writes
    commands_alive: bool
    commands_restarts: int
    commands_last_crash: str
    parts: PartFigures
    loop_problems: tuple[str, ...]  # /healthz sentences of the line-to-model loop
    loop_figures: Mapping[str, Any]  # the stats message's kept, drift, shadow and recording figures


@dataclass(frozen=True)
class SnapshotSources:
    """The components a snapshot is read from; built after all of them exist, never before."""

    device_id: str
    started: float  # time.monotonic() when the agent started
    stall_timeout_s: float
    spool_max: int
    pipeline: Pipeline
    publisher: MqttPublisher
    outbox: Outbox
    commands: CommandProcessor
    parts: AgentPart[PartFigures]  # service/part_inputs.py's PartInputs
    loop: AgentPart[Mapping[str, Any]]  # service/loop.py's LineLoop


def take_snapshot(sources: SnapshotSources) -> AgentSnapshot:
    """Read every component once."""
    pipeline, source = sources.pipeline, sources.pipeline.source
    stats = pipeline.stats
    p50, p99 = stats.latency_percentiles()
    spool = sources.outbox.counters
    counters = source.counters
    commands = sources.commands
    publisher = sources.publisher.counters
    return AgentSnapshot(
        device_id=sources.device_id,
        time=time.time(),
        uptime_s=time.monotonic() - sources.started,
        fps=stats.fps(),
        camera_fps=stats.capture_fps(),
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        frames_captured=stats.frames_captured,
        frames_inspected=stats.frames_inspected,
        anomalous_frames=stats.anomalous_frames,
        frames_dropped=pipeline.frames_dropped,
        frames_untriggered=pipeline.frames_untriggered if pipeline.triggers is not None else None,
        pipeline_error=None if pipeline.error is None else str(pipeline.error),
        pipeline_ended=pipeline.ended,
        stall_timeout_s=sources.stall_timeout_s,
        source=SourceFigures(
            kind=source.kind,
            state=source.state,
            state_since=source.state_since,
            error=source.last_error,
            reconnects=counters.reconnects,
            read_failures=counters.read_failures,
            read_timeouts=counters.read_timeouts,
            stalls=counters.stalls,
            rate_limited=counters.rate_limited,
            last_frame_age_s=source.last_frame_age(),
        ),
        model=pipeline.model.ref,
        broker_connected=sources.publisher.connected,
        mqtt_acked=publisher.acked,
        mqtt_connects=publisher.connects,
        inspections_published=publisher.inspections_published,
        spool_depth=len(sources.outbox),
        spool_max=sources.spool_max,
        spool_expired=spool.expired,
        spool_dropped=spool.dropped,
        # Only the SQLite spool writes to disk; an in-memory outbox has no write errors.
        spool_write_errors=getattr(spool, "write_errors", 0),
        spool_error=getattr(spool, "last_error", ""),
        commands_alive=commands.alive,
        commands_restarts=commands.restarts,
        commands_last_crash=commands.last_crash,
        parts=sources.parts.figures(),
        loop_problems=tuple(sources.loop.problems()),
        loop_figures=sources.loop.figures(),
    )


def snapshot_taker(sources: SnapshotSources) -> Callable[[], AgentSnapshot]:
    """``take_snapshot`` bound to ``sources``: what the views are given."""
    return lambda: take_snapshot(sources)


# -- renderings -------------------------------------------------------------------------------------


class HealthVerdict(Protocol):
    """What the stats message repeats of ``health.assess(snapshot)`` (a ``HealthReport``)."""

    @property
    def status(self) -> Literal["ok", "degraded"]: ...

    @property
    def problems(self) -> list[str]: ...


def stats_message(snapshot: AgentSnapshot, health: HealthVerdict, source_state: str | None = None) -> StatsMessage:
    """The ``stats`` payload (``source_state`` overrides the snapshot's: a change being reported)."""
    source, parts = snapshot.source, snapshot.parts
    age = source.last_frame_age_s
    return StatsMessage(
        device_id=snapshot.device_id,
        time=snapshot.time,
        uptime_s=round(snapshot.uptime_s, 1),
        fps=round(snapshot.fps, 2),
        frames_inspected=snapshot.frames_inspected,
        frames_dropped=snapshot.frames_dropped,
        anomalous_frames=snapshot.anomalous_frames,
        latency_ms_p50=round(snapshot.latency_p50_ms, 2),
        latency_ms_p99=round(snapshot.latency_p99_ms, 2),
        spool_depth=snapshot.spool_depth,
        spool_expired=snapshot.spool_expired,
        spool_dropped=snapshot.spool_dropped,
        source_state=source_state or source.state,
        source_state_since=round(source.state_since, 3),
        source_reconnects=source.reconnects,
        source_error=source.error,
        last_frame_age_s=None if age is None else round(age, 2),
        frames_captured=snapshot.frames_captured,
        status=health.status,
        problems=health.problems,
        model=snapshot.model,
        parts_decided=parts.decided,
        parts_anomalous=parts.anomalous,
        parts_noise=parts.noise,
        triggers_received=parts.triggers_received,
        triggers_missed=parts.triggers_missed,
        triggers_storm=parts.triggers_storm,
        **snapshot.loop_figures,
    )


def status_line(snapshot: AgentSnapshot) -> str:
    """One line for `systemctl status`: fps, model, source and broker state."""
    ref, source = snapshot.model, snapshot.source
    broker = "mqtt connected" if snapshot.broker_connected else "mqtt DISCONNECTED"
    return (
        f"{snapshot.fps:.1f} fps | model {ref.name} {ref.version} ({ref.backend}) | "
        f"source {source.kind} {source.state} | {broker}, spool {snapshot.spool_depth} | "
        f"{snapshot.frames_inspected} frames, {snapshot.anomalous_frames} anomalous, {snapshot.frames_dropped} dropped"
    )


def part_lines(parts: PartFigures) -> tuple[str, str]:
    """One line about parts and one about triggers, for people (the preview); "" when that mode is off."""
    parts_line = trigger_line = ""
    if parts.decided is not None:
        parts_line = f"{parts.decided} parts decided, {parts.anomalous} anomalous, {parts.noise} noise"
    if parts.triggers_received is not None:
        trigger_line = (
            f"{parts.triggers_received} triggers, {parts.triggers_waiting} waiting, {parts.triggers_served} inspected, "
            f"{parts.triggers_missed} missed, {parts.triggers_storm} in storms"
        )
    return parts_line, trigger_line
