"""MQTT payloads and topics: the contract with subscribers (reject relays, dashboards, the updater).

Topics live under ``<prefix>/<device_id>/``:
``status`` (retained text: online | offline | stopped), ``inspection`` (QoS 1, InspectionMessage),
``stats`` (StatsMessage), ``cmd/<name>`` in, ``cmd/<name>/result`` out (CommandResult),
``update`` (UpdateEvent, fleet update progress).

A reject relay (``edge-agent reject-relay``) publishes under ``<prefix>/relay/<relay_id>/``:
``status`` (retained text, as the agent's) and ``stats`` (RelayStats).
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA = "uflow.inspection/1"

StatusText = Literal["online", "offline", "stopped"]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Region(_Payload):
    """One connected region with log10 NFA below the decision threshold."""

    bbox: tuple[int, int, int, int] = Field(description="x, y, w, h in source-frame pixels")
    area: int = Field(ge=1, description="pixels, in source-frame pixels")
    log_nfa: float = Field(description="min log10 NFA inside the region")
    max_score: float = Field(description="max anomaly-map value inside the region")


class ModelRef(_Payload):
    name: str
    version: str
    sha256: str
    backend: str
    precision: str


class StageLatency(_Payload):
    """Milliseconds spent in each stage for this frame (queue waits included in ``total``)."""

    capture: float = 0.0
    preprocess: float = 0.0
    infer: float = 0.0
    nfa: float = 0.0
    publish: float = 0.0
    total: float = 0.0


class InspectionMessage(_Payload):
    """One inspected frame."""

    schema_: str = Field(default=SCHEMA, alias="schema")
    message_id: str = Field(default_factory=lambda: uuid.uuid4().hex, description="deduplicate on this")
    device_id: str
    sequence: int = Field(ge=0, description="frame sequence number since the source opened")
    capture_time: float = Field(description="unix seconds, when the frame was grabbed")
    source: str = ""
    model: ModelRef
    image_score: float
    anomalous: bool
    log10_epsilon: float
    regions: list[Region] = Field(default_factory=list)
    frame_size: tuple[int, int] = Field(description="width, height of the source frame")
    latency_ms: StageLatency = Field(default_factory=StageLatency)
    replayed: bool = False

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


class StatsMessage(_Payload):
    """Periodic health numbers."""

    device_id: str
    time: float
    uptime_s: float
    fps: float
    frames_inspected: int
    frames_dropped: int
    anomalous_frames: int
    latency_ms_p50: float
    latency_ms_p99: float
    spool_depth: int
    spool_expired: int = 0
    source_state: str
    model: ModelRef | None = None


class RelayDeviceStats(_Payload):
    """A reject relay's counts for one camera (device id) since the relay started."""

    received: int = 0
    anomalous: int = 0
    fired: int = 0
    missed: int = 0
    duplicates: int = 0
    skipped_good: int = 0
    actuator_failures: int = 0
    clock_offset_s: float | None = Field(default=None, description="relay clock - agent clock, as used now")
    clock_source: str = Field(default="", description="configured | estimated | last-estimate")


class RelayStats(_Payload):
    """Periodic numbers of a reject relay, on ``<prefix>/relay/<relay_id>/stats``."""

    relay_id: str
    time: float
    uptime_s: float
    connected: bool
    received: int = Field(description="inspection messages that parsed")
    anomalous: int
    fired: int = Field(description="actuator calls that succeeded")
    missed: int = Field(description="anomalous parts not rejected because their deadline had passed")
    duplicates: int
    skipped_good: int
    malformed: int
    unconfigured: int = Field(description="anomalous messages from a device with no travel time configured")
    errors: int = Field(default=0, description="messages the relay failed to handle (not acknowledged; redelivered)")
    actuator_failures: int
    pending: int = Field(description="rejects scheduled, not yet due")
    lateness_ms_p50: float = Field(description="actual - planned fire time over recent fires")
    lateness_ms_p99: float
    lateness_ms_max: float
    devices: dict[str, RelayDeviceStats] = Field(default_factory=dict)


class CommandResult(_Payload):
    """Reply on ``cmd/<name>/result``."""

    command: str
    ok: bool
    request_id: str | None = None
    message: str = ""
    data: dict[str, object] = Field(default_factory=dict)


class UpdateEvent(_Payload):
    """One step of a fleet update, published on ``update``."""

    device_id: str
    time: float
    step: str
    ok: bool
    version: str | None = None
    message: str = ""


def topic(prefix: str, device_id: str, leaf: str) -> str:
    """Full topic name for a device."""
    return f"{prefix.rstrip('/')}/{device_id}/{leaf}"


def relay_topic(prefix: str, relay_id: str, leaf: str) -> str:
    """Full topic name for a reject relay: ``<prefix>/relay/<relay_id>/<leaf>``."""
    return f"{prefix.rstrip('/')}/relay/{relay_id}/{leaf}"
