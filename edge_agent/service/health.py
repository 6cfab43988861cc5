"""Is the agent doing its job? One verdict, shared by ``/healthz``, the ``stats`` topic and ``systemctl status``.

``ok`` means: frames arrive, the pipeline runs, the broker acknowledges and the spool can write.
Anything else is ``degraded`` with one plain sentence per problem. The agent keeps inspecting while
degraded (a broker outage is spooled, a lost camera is reconnected); the report is for the people and
monitors watching it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from edge_agent.messages import ModelRef

SPOOL_WARN_FRACTION = 0.9


@dataclass(frozen=True)
class HealthInputs:
    """The facts the verdict is made from (gathered by the agent)."""

    device_id: str
    uptime_s: float
    fps: float
    source_kind: str
    source_state: str
    source_error: str
    source_reconnects: int
    last_frame_age_s: float | None
    stall_timeout_s: float
    broker_connected: bool
    spool_depth: int
    spool_max: int
    spool_writing_ok: bool
    spool_error: str
    pipeline_error: str | None
    model: ModelRef
    commands_alive: bool = True
    commands_restarts: int = 0
    commands_last_crash: str = ""
    loop_problems: tuple[str, ...] = ()  # kept frames that cannot be written, drift (edge_agent/service/loop.py)


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


def assess(facts: HealthInputs) -> HealthReport:
    """The verdict, with one sentence per problem."""
    problems = _pipeline_problems(facts) + _source_problems(facts) + _broker_problems(facts)
    if not facts.commands_alive:
        problems.append("command worker is not running (commands are not answered)")
    problems.extend(facts.loop_problems)
    return HealthReport(
        status="degraded" if problems else "ok",
        problems=problems,
        device_id=facts.device_id,
        time=round(time.time(), 3),
        uptime_s=round(facts.uptime_s, 1),
        fps=round(facts.fps, 2),
        source=SourceHealth(
            kind=facts.source_kind,
            state=facts.source_state,
            last_frame_age_s=None if facts.last_frame_age_s is None else round(facts.last_frame_age_s, 2),
            reconnects=facts.source_reconnects,
            error=facts.source_error if facts.source_state != "open" else "",
        ),
        broker=BrokerHealth(connected=facts.broker_connected, spool_depth=facts.spool_depth, spool_max=facts.spool_max),
        model=facts.model,
        commands=CommandsHealth(
            alive=facts.commands_alive, restarts=facts.commands_restarts, last_crash=facts.commands_last_crash
        ),
    )


def _pipeline_problems(facts: HealthInputs) -> list[str]:
    if facts.pipeline_error:
        return [f"pipeline stopped: {facts.pipeline_error}"]
    return []


def _source_problems(facts: HealthInputs) -> list[str]:
    if facts.source_state not in ("open", "ended"):
        detail = f": {facts.source_error}" if facts.source_error else ""
        return [f"source is {facts.source_state}{detail}"]
    age = facts.last_frame_age_s
    if age is None and facts.uptime_s > facts.stall_timeout_s and facts.source_state == "open":
        return [f"no frame since the start {facts.uptime_s:.0f} s ago"]
    if age is not None and age > facts.stall_timeout_s and facts.source_state == "open":
        return [f"no frame for {age:.0f} s"]
    return []


def _broker_problems(facts: HealthInputs) -> list[str]:
    problems = []
    if not facts.broker_connected:
        problems.append(f"MQTT broker not connected ({facts.spool_depth} messages waiting in the spool)")
    if facts.spool_max and facts.spool_depth >= SPOOL_WARN_FRACTION * facts.spool_max:
        problems.append(
            f"spool {100 * facts.spool_depth / facts.spool_max:.0f}% full ({facts.spool_depth} of "
            f"{facts.spool_max}); when full, the oldest messages are dropped"
        )
    if not facts.spool_writing_ok:
        problems.append(f"spool cannot write to disk ({facts.spool_error}); messages are held in memory")
    return problems
