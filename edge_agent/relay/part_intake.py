"""Intake of part and belt messages at the relay: parsed with bounds, checked before anything is believed.

``<prefix>/<device_id>/part`` (``uflow.part/1``; fields a newer agent adds are ignored) and the PLC's belt speed
``{"speed_m_s": v}``. ``PartMalformed`` says what is wrong, in words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edge_agent.messages import (
    PART_SCHEMA,
    PartMessage,
    PayloadError,
    StageLatency,
    is_valid_id,
    parse_json_object,
)
from edge_agent.relay.intake import parse_versioned
from edge_agent.relay.limits import MESSAGE_LIMITS

PART_LEAF = "part"
MAX_PART_BYTES = MESSAGE_LIMITS["part"]  # a few KiB: the agent sends at most MAX_PART_REGIONS regions
MAX_SPEED_BYTES = MESSAGE_LIMITS["speed"]  # {"speed_m_s": 0.42} or {"count": 123456}


class PartMalformed(ValueError):
    """Not a part message (or not a speed message); the text says why."""


def parse_part(payload: bytes) -> PartMessage:
    """A part message from a payload (fields a newer agent adds are ignored); PartMalformed says why not."""
    return parse_versioned(
        payload, PartMessage, PART_SCHEMA, MAX_PART_BYTES, ("device_id", "message_id", "part_id"), PartMalformed
    )


def parse_speed(payload: bytes, max_speed: float) -> float:
    """``{"speed_m_s": v}`` -> v (finite, 0 <= v <= max_speed); PartMalformed otherwise."""
    try:
        data = parse_json_object(payload, MAX_SPEED_BYTES, max_depth=2)
    except PayloadError as exc:
        raise PartMalformed(str(exc)) from exc
    value = data.get("speed_m_s")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PartMalformed('a speed message is {"speed_m_s": <number>}')
    if not 0.0 <= value <= max_speed:
        raise PartMalformed(f"speed_m_s {value} is outside [0, {max_speed}] (belt.max_speed_m_s)")
    return float(value)


def part_key(message: PartMessage) -> str:
    """The journal key: one decision per part id of a camera."""
    return f"part:{message.device_id}:{message.part_id}"


@dataclass(frozen=True)
class ClockView:
    """A part message as the clock estimator reads a message: the decision frame's time and latency."""

    device_id: str
    capture_time: float
    latency_ms: StageLatency
    replayed: bool

    @classmethod
    def of(cls, message: PartMessage) -> ClockView:
        return cls(message.device_id, message.decision_time, StageLatency(total=message.latency_ms), message.replayed)


def device_of_part_topic(topic: str) -> str:
    """The camera of ``<prefix>/<device_id>/part``; PartMalformed otherwise."""
    levels = topic.split("/")
    if len(levels) < 2 or levels[-1] != PART_LEAF or not is_valid_id(levels[-2]):
        raise PartMalformed(f"topic {topic[:200]!r} is not <prefix>/<device_id>/{PART_LEAF}")
    return levels[-2]
