"""Is the agent doing its job? One verdict, shared by ``/healthz``, the ``stats`` topic and ``systemctl status``.

``ok`` means: frames arrive, the pipeline runs, the broker acknowledges and the spool can write.
Anything else is ``degraded`` with one plain sentence per problem. The agent keeps inspecting while
degraded (a broker outage is spooled, a lost camera is reconnected); the report is for the people and
monitors watching it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from edge_agent.messages import ModelRef
from edge_agent.service.agent_snapshot import AgentSnapshot

SPOOL_WARN_FRACTION = 0.9


class SourceHealth(BaseModel):
    kind: str
    state: str
    last_frame_age_s: float | None
    reconnects: int
    error: str = ""


class BrokerHealth(BaseModel):
    connected: bool
    spool_depth: int
    spool_max: int


class CommandsHealth(BaseModel):
    """The command worker: a dead one is restarted by the supervisor, and the restarts stay visible."""

    alive: bool
    restarts: int = 0
    last_crash: str = ""


class HealthReport(BaseModel):
    """The body of ``/healthz`` (HTTP 200 when ok, 503 when degraded)."""

    status: Literal["ok", "degraded"]
    problems: list[str] = Field(default_factory=list)
    device_id: str
    time: float
    uptime_s: float
    fps: float
    source: SourceHealth
    broker: BrokerHealth
    model: ModelRef
    commands: CommandsHealth | None = None


def assess(facts: AgentSnapshot) -> HealthReport:
    """The verdict on one snapshot, with one sentence per problem."""
    problems = _pipeline_problems(facts) + _source_problems(facts) + _broker_problems(facts)
    if not facts.commands_alive:
        problems.append("command worker is not running (commands are not answered)")
    problems.extend(facts.loop_problems)
    source = facts.source
    return HealthReport(
        status="degraded" if problems else "ok",
        problems=problems,
        device_id=facts.device_id,
        time=round(facts.time, 3),
        uptime_s=round(facts.uptime_s, 1),
        fps=round(facts.fps, 2),
        source=SourceHealth(
            kind=source.kind,
            state=source.state,
            last_frame_age_s=None if source.last_frame_age_s is None else round(source.last_frame_age_s, 2),
            reconnects=source.reconnects,
            error=source.error if source.state != "open" else "",
        ),
        broker=BrokerHealth(connected=facts.broker_connected, spool_depth=facts.spool_depth, spool_max=facts.spool_max),
        model=facts.model,
        commands=CommandsHealth(
            alive=facts.commands_alive, restarts=facts.commands_restarts, last_crash=facts.commands_last_crash
        ),
    )


def _pipeline_problems(facts: AgentSnapshot) -> list[str]:
    if facts.pipeline_error:
        return [f"pipeline stopped: {facts.pipeline_error}"]
    return []


def _source_problems(facts: AgentSnapshot) -> list[str]:
    source = facts.source
    if source.state not in ("open", "ended"):
        detail = f": {source.error}" if source.error else ""
        return [f"source is {source.state}{detail}"]
    age = source.last_frame_age_s
    if age is None and facts.uptime_s > facts.stall_timeout_s and source.state == "open":
        return [f"no frame since the start {facts.uptime_s:.0f} s ago"]
    if age is not None and age > facts.stall_timeout_s and source.state == "open":
        return [f"no frame for {age:.0f} s"]
    return []


def _broker_problems(facts: AgentSnapshot) -> list[str]:
    problems = []
    if not facts.broker_connected:
        problems.append(f"MQTT broker not connected ({facts.spool_depth} messages waiting in the spool)")
    if facts.spool_max and facts.spool_depth >= SPOOL_WARN_FRACTION * facts.spool_max:
        problems.append(
            f"spool {100 * facts.spool_depth / facts.spool_max:.0f}% full ({facts.spool_depth} of "
            f"{facts.spool_max}); when full, the oldest messages are dropped"
        )
    if facts.spool_error:
        problems.append(f"spool cannot write to disk ({facts.spool_error}); messages are held in memory")
    return problems
