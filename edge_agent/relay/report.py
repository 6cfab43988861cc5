"""How the relay accounts for its decisions: the ``Decision`` words and one log line per decision
(``event = relay_decision``); ledger.py counts them and renders the ``stats`` message."""

from __future__ import annotations

import enum
import logging
import math
from typing import Any

from edge_agent.messages import InspectionMessage
from edge_agent.relay.actuators import FireOrder
from edge_agent.relay.schedule import Plan

log = logging.getLogger(__name__)


class Decision(str, enum.Enum):
    """A relay decision: the word in its log line (``decision``) and, through ``counter``, the stats field it counts.

    One name for both, so a log line and a counter can never disagree on spelling.
    """

    SCHEDULED = "scheduled"
    FIRED = "fired"
    MISSED = "missed"
    FAILED = "failed"
    DUPLICATE = "duplicate"
    UNCONFIGURED = "unconfigured"
    MALFORMED = "malformed"
    INTERRUPTED = "interrupted"
    SKIPPED_GOOD = "skipped-good"
    SKIPPED_PARTS_MODE = "skipped-parts-mode"
    NO_FRAME = "no-frame"
    UNKNOWN_DEVICE = "unknown-device"
    RATE_LIMITED = "rate-limited"
    SPEED = "speed"  # a belt speed reading taken
    ENCODER = "encoder"  # an encoder reading taken
    ENCODER_REFUSED = "encoder-refused"

    def __str__(self) -> str:
        return self.value

    @property
    def counter(self) -> str | None:
        """The RelayStats / RelayDeviceStats field this decision counts (None: not counted; ``scheduled`` is
        counted once it is fired, missed or failed)."""
        return _COUNTERS.get(self)


_COUNTERS = {
    Decision.FIRED: "fired",
    Decision.MISSED: "missed",
    Decision.FAILED: "actuator_failures",
    Decision.INTERRUPTED: "actuator_failures",
    Decision.DUPLICATE: "duplicates",
    Decision.SKIPPED_GOOD: "skipped_good",
    Decision.SKIPPED_PARTS_MODE: "skipped_parts_mode",
    Decision.UNCONFIGURED: "unconfigured",
    Decision.MALFORMED: "malformed",
    Decision.UNKNOWN_DEVICE: "unknown_devices",
    Decision.RATE_LIMITED: "rate_limited",
}


def log_decision(
    decision: Decision,
    message: InspectionMessage,
    topic: str,
    plan: Plan | None,
    level: int,
    **context: Any,
) -> None:
    extra: dict[str, Any] = {
        "event": "relay_decision",
        "decision": decision,
        "message_id": message.message_id,
        "device_id": message.device_id,
        "sequence": message.sequence,
        "topic": topic,
        "capture_time": message.capture_time,
        "replayed": message.replayed,
    }
    if plan is not None:
        extra.update(plan_fields(plan))
    extra.update(context)
    log.log(level, "%s: %s #%d", decision, message.device_id, message.sequence, extra=extra)


def log_order(decision: Decision, order: FireOrder, plan: Plan, level: int, **context: Any) -> None:
    extra: dict[str, Any] = {
        "event": "relay_decision",
        "decision": decision,
        "message_id": order.message_id,
        "device_id": order.device_id,
        "sequence": order.sequence,
        "capture_time": order.capture_time,
        **({"part_id": order.part_id} if order.part_id else {}),
        **plan_fields(plan),
        **context,
    }
    log.log(level, "%s: %s #%d", decision, order.device_id, order.sequence, extra=extra)


def plan_fields(plan: Plan) -> dict[str, Any]:
    """A plan's fields for a log line (times that are not finite, a belt stopped, as null: valid JSON)."""
    return {
        "planned_time": _finite(plan.planned_time),
        "deadline": _finite(plan.deadline),
        "travel_s": plan.travel_s if math.isfinite(plan.travel_s) else None,
        "clock_offset_s": round(plan.offset_s, 6),
        "clock_source": plan.clock_source,
    }


def _finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def arrived_late(plan: Plan, arrival: float) -> dict[str, float]:
    """The log fields of an order that arrived after its deadline: when, and how far past its planned time."""
    return {"arrival": round(arrival, 6), "late_by_ms": late_by_ms(plan, arrival)}


def late_by_ms(plan: Plan, when: float) -> float:
    """Milliseconds from the plan's firing time to ``when`` (positive: late), rounded for the log."""
    return round((when - plan.planned_time) * 1000.0, 3)


def late_hint(message: InspectionMessage, plan: Plan) -> dict[str, str]:
    """Why a live message can be late: the camera's own latency may exceed the travel time."""
    latency_s = message.latency_ms.total / 1000.0
    if not message.replayed and latency_s > plan.travel_s:
        return {
            "hint": f"the camera took {latency_s:.3f} s to inspect, longer than the travel time "
            f"{plan.travel_s:.3f} s: move the actuator further downstream or speed up the model"
        }
    return {}


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted values (0.0 when empty)."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]
