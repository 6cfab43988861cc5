"""MQTT payloads and topics: the contract with subscribers (reject relays, dashboards, the updater).

Topics live under ``<prefix>/<device_id>/``:
``status`` (retained text: online | offline | stopped), ``inspection`` (QoS 1, InspectionMessage),
``part`` (QoS 1, PartMessage: one per part with ``[parts] mode`` on), ``trigger`` in (TriggerMessage),
``stats`` (StatsMessage), ``cmd/<name>`` in (COMMANDS: ReloadCommand, SnapshotCommand, RecordCommand,
ThresholdCommand, UpdateCommand, RecipeCommand), ``cmd/<name>/result`` out (CommandResult),
``update`` (UpdateEvent, fleet update progress).

A reject relay (``edge-agent reject-relay``) publishes under ``<prefix>/relay/<relay_id>/``:
``status`` (retained text, as the agent's) and ``stats`` (RelayStats).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_agent.config import ID_PATTERN

SCHEMA = "uflow.inspection/1"
PART_SCHEMA = "uflow.part/1"

# Ids that end up in MQTT topics, file names or an actuator's argv: no '/', '+', '#', no leading '-'
# (option injection) or '.' ("." and ".."), no newline, bounded length. Device, relay and message ids all follow it.
_ID_RE = re.compile(ID_PATTERN)
# A part message carries at most this many regions (the most significant first): it stays a few KiB, under
# the relay's size limit for part messages (relay/part_intake.py MAX_PART_BYTES), however noisy the part.
MAX_PART_REGIONS = 16
# The same for an inspection message (regions of one frame, most significant first): about 25 KiB at most.
MAX_INSPECTION_REGIONS = 256

# The bounded parser's defaults: every message the agent and the relay accept is a flat object or
# nests a few levels (an inspection: message -> regions -> region -> bbox), so 16 is generous, and far
# below the depth at which json's recursive decoder raises RecursionError (about 1,000).
MAX_PAYLOAD_DEPTH = 16
# A JSON string literal (escapes included), and every byte that is not a bracket: the depth check removes
# both with C-speed calls and looks only at the brackets left.
_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = np.zeros(256, dtype=np.int8)
_DEPTH_STEP[list(b"[{")] = 1
_DEPTH_STEP[list(b"]}")] = -1

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
    """The model that judged: the bundle's name and version, its file's hash, the backend and precision, and
    the recipe it serves (every inspection and part message carries it)."""

    name: str
    version: str
    sha256: str
    backend: str
    precision: str
    recipe: str | None = Field(
        default=None, description="the [[recipes]] entry this model serves; None: the box's one bundle (no recipes)"
    )


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


class PartFrames(_Payload):
    """The frames a part's verdict combines."""

    count: int = Field(ge=0, description="frames of the part that were inspected (0: a trigger with no frame)")
    first_sequence: int | None = Field(default=None, description="frame sequence numbers, first and last")
    last_sequence: int | None = None


class PartRegion(_Payload):
    """A place on the part with its combined evidence."""

    bbox: tuple[int, int, int, int] = Field(
        description="x, y, w, h in part coordinates: x from the part's leading edge along the travel, y the frame row"
    )
    log_nfa: float = Field(description="the place's log10 NFA over the part's frames (docs/parts.md)")
    frames: int = Field(ge=0, description="frames in the run of observations that gave that evidence")
    best_sequence: int = Field(description="the frame where the place was most significant")
    best_bbox: tuple[int, int, int, int] = Field(description="its region in that frame, source-frame pixels")
    best_frame_log_nfa: float = Field(description="log10 NFA in that frame alone")


class PartPosition(_Payload):
    """Where the part was in the frame that decided it (frame pixels along the belt axis)."""

    leading_x: float = Field(description="frame x of the part's leading (downstream) edge")
    trailing_x: float = Field(description="frame x of its trailing edge")
    decision_line_x: float = Field(description="frame x of the decision line")
    beyond_line_px: float = Field(description="how far the part's centre is past the decision line, along the travel")
    beyond_line_m: float | None = Field(default=None, description="the same in metres, when [parts] px_per_m is set")
    belt_px_s: float | None = Field(default=None, description="the belt speed the agent saw, pixels per second")


class PartMessage(_Payload):
    """One part: the verdict over all of its frames (tracked) or its triggered frame."""

    schema_: str = Field(default=PART_SCHEMA, alias="schema")
    message_id: str = Field(default_factory=lambda: uuid.uuid4().hex, description="deduplicate on this")
    device_id: str
    part_id: str = Field(description="unique per device across restarts: <agent start, unix s>-<count>")
    mode: Literal["tracked", "triggered"]
    status: Literal["inspected", "no_frame"] = Field(
        default="inspected", description="no_frame: a trigger that got no frame in time (never silently dropped)"
    )
    anomalous: bool
    log_nfa: float = Field(description="the part's log10 NFA (anomalous when below log10_epsilon)")
    log10_epsilon: float
    first_capture_time: float = Field(description="unix seconds (camera clock): the part's first frame")
    decision_time: float = Field(description="unix seconds (camera clock): capture time of the deciding frame")
    frames: PartFrames
    regions: list[PartRegion] = Field(default_factory=list)
    position_at_decision: PartPosition | None = Field(default=None, description="tracked mode only")
    trigger_time: float | None = Field(default=None, description="triggered mode: when the trigger came (unix s)")
    trigger_id: str | None = Field(
        default=None,
        max_length=64,
        description="triggered mode: the trigger's id as the PLC sent it (MQTT/HTTP), or gpio-<n> for a GPIO edge",
    )
    model: ModelRef | None = None
    latency_ms: float = Field(default=0.0, description="deciding frame's capture to this message being queued")
    replayed: bool = False

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


class TriggerMessage(_Payload):
    """A trigger on ``<prefix>/<device_id>/trigger`` (or POSTed to /trigger): a part is at the camera."""

    time: float | None = Field(default=None, description="unix seconds of the trigger; default: when it arrived")
    trigger_id: str | None = Field(default=None, max_length=64, description="echoed in logs")


class StatsMessage(_Payload):
    """Periodic health numbers (every mqtt.stats_interval_s, and at once when the source changes state)."""

    device_id: str
    time: float
    uptime_s: float
    fps: float
    frames_inspected: int
    frames_dropped: int = Field(description="live frames replaced by a newer one (latest-frame policy)")
    anomalous_frames: int
    latency_ms_p50: float = Field(description="capture-to-publish, recent frames")
    latency_ms_p99: float
    spool_depth: int = Field(description="messages not yet acknowledged by the broker")
    spool_expired: int = 0
    spool_dropped: int = Field(default=0, description="dropped because the spool was full (oldest first)")
    source_state: str
    source_state_since: float | None = Field(default=None, description="unix time of the last state change")
    source_reconnects: int = 0
    source_error: str = Field(default="", description="the last source problem, if any")
    last_frame_age_s: float | None = None
    frames_captured: int = 0
    status: Literal["ok", "degraded"] = "ok"
    problems: list[str] = Field(default_factory=list, description="why the status is degraded (as /healthz)")
    model: ModelRef | None = None
    parts_decided: int | None = Field(default=None, description="[parts] mode on: part messages since start")
    parts_anomalous: int | None = None
    parts_noise: int | None = Field(default=None, description="tracked: blobs seen too briefly to be parts")
    triggers_received: int | None = Field(default=None, description="triggered: triggers since start")
    triggers_missed: int | None = Field(default=None, description="triggered: triggers that got no frame in time")
    triggers_storm: int | None = Field(
        default=None, description="triggered: triggers that came while the previous one still waited for its frame"
    )
    kept: dict[str, Any] | None = Field(default=None, description="frames kept for review ([keep]); None when off")
    drift: dict[str, Any] | None = Field(
        default=None, description="drift statistics vs the training images, per statistic (docs/agent.md)"
    )
    shadow: dict[str, Any] | None = Field(
        default=None, description="shadow model agreement ([model] shadow); None when off"
    )
    recording: dict[str, Any] | None = Field(default=None, description="the last cmd/record recording's counts")


class RelayDeviceStats(_Payload):
    """A reject relay's counts for one camera (device id) since the relay started."""

    received: int = 0
    anomalous: int = 0
    fired: int = 0
    missed: int = 0
    duplicates: int = 0
    skipped_good: int = 0
    skipped_parts_mode: int = Field(
        default=0, description="anomalous inspections of a camera whose part messages decide its rejects"
    )
    actuator_failures: int = 0
    rate_limited: int = Field(default=0, description="messages dropped unparsed beyond [limits] messages_per_s")
    clock_offset_s: float | None = Field(default=None, description="relay clock - agent clock, as used now")
    clock_source: str = Field(default="", description="configured | estimated | last-estimate")
    clock_samples_refused: int = Field(
        default=0, description="clock samples beyond clock.max_sample_offset_s, not used for the estimate"
    )
    recipe: str | None = Field(default=None, description="the camera's active recipe: its latest live message's")
    model_version: str | None = Field(default=None, description="the model version of that message")


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
    skipped_parts_mode: int = Field(
        default=0, description="anomalous inspections of a camera whose part messages decide its rejects"
    )
    malformed: int
    unconfigured: int = Field(description="anomalous messages from a device with no travel time configured")
    unknown_devices: int = Field(
        default=0, description="messages from device ids the relay does not act for (not in cameras or [devices])"
    )
    rate_limited: int = Field(default=0, description="messages dropped unparsed beyond [limits] messages_per_s")
    errors: int = Field(default=0, description="messages the relay failed to handle (logged, acknowledged)")
    journal_errors: int = Field(
        default=0, description="journal writes that failed (disk full?); decisions were kept in memory meanwhile"
    )
    journal_ok: bool = Field(default=True, description="false while the journal cannot be written")
    actuator_failures: int
    pending: int = Field(description="rejects scheduled, not yet due")
    lateness_ms_p50: float = Field(description="actual - planned fire time over recent fires")
    lateness_ms_p99: float
    lateness_ms_max: float
    devices: dict[str, RelayDeviceStats] = Field(default_factory=dict)


class _Command(_Payload):
    """A command payload on ``cmd/<name>``; every command may carry a request id echoed in its reply."""

    request_id: str | None = Field(default=None, max_length=200)


class ReloadCommand(_Command):
    """Load model.bundle (e.g. models/current) again, fully (engine + warm-up) before swapping it in."""

    version: str | None = Field(default=None, description="fail unless the bundle found has this version")
    recipe: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="with [[recipes]]: reload this recipe's bundle (default the active)",
    )


class SnapshotCommand(_Command):
    """Save the last inspected frame, its anomaly map, NFA mask and overlay under snapshot_dir."""

    label: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,40}$", description="added to the folder name")


class RecordCommand(_Command):
    """Record good images from the frames the agent inspects into <keep.training_dir>/good/record-<time>/."""

    count: int = Field(default=100, ge=1, le=100_000, description="stop after this many images")
    every_s: float = Field(default=0.0, ge=0, le=86_400, description="at least this many seconds between images")
    only_good: bool = Field(default=True, description="only frames the live model passes")
    min_difference: float = Field(
        default=2.0, ge=0, le=255, description="near-duplicate threshold: mean grey difference to the last image"
    )
    max_s: float = Field(default=3600.0, gt=0, le=7 * 86_400, description="stop after this many seconds")
    stop: bool = Field(default=False, description="stop the running recording instead")


class ThresholdCommand(_Command):
    """Change the decision at run time (until restart): log10 epsilon and/or the minimum region area."""

    log10_epsilon: float | None = Field(default=None, allow_inf_nan=False)
    min_region_area: int | None = Field(default=None, ge=0, description="source pixels")

    @model_validator(mode="after")
    def _something_to_change(self) -> ThresholdCommand:
        if self.log10_epsilon is None and self.min_region_area is None:
            raise ValueError("give log10_epsilon and/or min_region_area")
        return self


class UpdateCommand(_Command):
    """Run a fleet update now (edge-agent update); progress is published on ``update``.

    Deliberately empty: the fleet source, the rollout group, ``--force`` and ``--allow-downgrade`` come only
    from the box's own config and command line. A broker client must not choose where a box gets its
    model or make it retry or go back to an older one (docs/security.md).
    """


class RecipeCommand(_Command):
    """Switch to another preloaded recipe ([[recipes]], docs/recipes.md) from the next frame on: by name or index."""

    name: str | None = Field(default=None, pattern=ID_PATTERN, description="the recipe's name")
    index: int | None = Field(default=None, ge=0, le=65_535, description="its position in [[recipes]] (from 0)")

    @model_validator(mode="after")
    def _one_key(self) -> RecipeCommand:
        if (self.name is None) == (self.index is None):
            raise ValueError("give the recipe's name or its index, one of the two")
        return self


COMMANDS: dict[str, type[_Command]] = {
    "reload": ReloadCommand,
    "snapshot": SnapshotCommand,
    "record": RecordCommand,
    "threshold": ThresholdCommand,
    "update": UpdateCommand,
    "recipe": RecipeCommand,
}


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


class PayloadError(ValueError):
    """A payload the bounded parser refuses; the text says why (never echoes the payload)."""


def is_valid_id(value: object) -> bool:
    """True for a string usable as a device, relay or message id in topics and argv (ID_PATTERN)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def parse_json_object(payload: bytes, max_bytes: int, max_depth: int = MAX_PAYLOAD_DEPTH) -> dict[str, Any]:
    """The JSON object in ``payload``, parsed under size and nesting limits; PayloadError otherwise.

    The one parser for everything that arrives over MQTT (commands, inspection messages at the relay):
    the size is checked before anything is read and the nesting depth before json builds anything,
    so no payload can make the decoder recurse until RecursionError or allocate without bound. An
    empty payload is ``{}``. Any other failure of the decoder also becomes a PayloadError.
    """
    if len(payload) > max_bytes:
        raise PayloadError(f"payload is {len(payload)} bytes; the limit is {max_bytes}")
    if not payload.strip():
        return {}
    depth = _nesting_depth(payload)
    if depth > max_depth:
        raise PayloadError(f"payload nests {depth} levels deep; the limit is {max_depth}")
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError(f"not JSON: {exc}") from exc
    except Exception as exc:  # e.g. RecursionError or MemoryError: refused, never propagated
        raise PayloadError(f"not parseable: {type(exc).__name__}") from exc
    if not isinstance(document, dict):
        raise PayloadError(f"not a JSON object but {type(document).__name__}")
    return document


def _nesting_depth(payload: bytes) -> int:
    """The deepest nesting of [ and { outside string literals.

    No Python loop over the payload (issue 24: a loop over every bracket of a 1 MiB payload took 0.27 s, and a
    flood of them starved the relay): string literals are cut out by one regular expression, every other byte
    but the brackets by ``bytes.translate``, and the depth is the maximum of a cumulative sum (numpy).
    A malformed payload (an unterminated string) may be measured deeper than it is, never shallower than
    what the JSON decoder would recurse into before it fails.
    """
    brackets = _STRING_RE.sub(b"", payload).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    depth = np.cumsum(_DEPTH_STEP[np.frombuffer(brackets, dtype=np.uint8)], dtype=np.int64)
    return max(0, int(depth.max()))
