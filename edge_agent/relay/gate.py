"""The relay's intake gate: what a message may cost before the relay parses it (issue 24, findings 4 and 6).

For every message, in this order and before any parse (limits.py holds the numbers):

1. its kind from the topic (belt speed, encoder, part, inspection), and its size and number of values for
   that kind: too large is ``malformed``, refused unread;
2. for a camera's message, the camera from the topic: one this relay does not act for (not in ``cameras``
   nor under ``[devices]``) is ``unknown-device``, counted in one counter (no per-camera state) and never fired;
3. the sender's budget (the camera, or the belt topic): beyond it ``rate-limited``, dropped unparsed.

Every refusal is counted; the WARNING lines about them are limited per sender (``[limits] log_interval_s``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from edge_agent.messages import PayloadError
from edge_agent.relay.config import RelaySettings
from edge_agent.relay.intake import device_of_topic
from edge_agent.relay.ledger import Ledger
from edge_agent.relay.limits import BYTES_PER_TOKEN, LogLimiter, RateLimiter, too_costly
from edge_agent.relay.part_intake import PART_LEAF, device_of_part_topic
from edge_agent.relay.report import Decision

log = logging.getLogger(__name__)

_PAYLOAD_PREVIEW = 200


class IntakeGate:
    """Sizes, known cameras and budgets; counts its refusals in the relay's ledger."""

    def __init__(self, settings: RelaySettings, ledger: Ledger, encoder_on: Callable[[], bool]) -> None:
        self.settings = settings
        self.ledger = ledger
        self._encoder_on = encoder_on
        self._rate = RateLimiter(settings.limits.messages_per_s, settings.limits.burst)
        self._log_limit = LogLimiter(settings.limits.log_interval_s)

    def kind(self, topic: str) -> str:
        """Which kind of message a topic carries: speed, encoder, part or inspection."""
        if topic == self.settings.belt.speed_topic:
            return "speed"
        if topic == self.settings.belt.encoder_topic and self._encoder_on():
            return "encoder"
        return "part" if topic.rsplit("/", 1)[-1] == PART_LEAF else "inspection"

    def admit(self, kind: str, topic: str, payload: bytes) -> tuple[Decision | None, str | None]:
        """(the refusal, None) or (None, the camera: None for a belt topic) for one message of ``kind``."""
        problem = too_costly(kind, payload)
        if problem is not None:
            self.refuse(topic, PayloadError(problem))
            return Decision.MALFORMED, None
        cost = 1.0 + len(payload) / BYTES_PER_TOKEN
        if kind in ("speed", "encoder"):
            return (None, None) if self._within_budget(topic, None, topic, cost) else (Decision.RATE_LIMITED, None)
        try:
            device = device_of_part_topic(topic) if kind == "part" else device_of_topic(topic)
        except ValueError as exc:
            self.refuse(topic, exc, payload)
            return Decision.MALFORMED, None
        if not self.settings.knows(device):
            self._unknown(topic, device)
            return Decision.UNKNOWN_DEVICE, None
        if not self._within_budget(device, device, topic, cost):
            return Decision.RATE_LIMITED, None
        return None, device

    def refuse(self, topic: str, exc: Exception, payload: bytes = b"") -> None:
        """Count and log a message that is not what its topic says (inspection, part or belt message).

        Every one is counted; the WARNING lines are limited per sender ([limits] log_interval_s), so a flood of
        malformed input cannot flood the log too.
        """
        self.ledger.count(Decision.MALFORMED)
        held = self._log_limit.allow(f"malformed:{self._sender(topic)}")
        if held is None:
            return
        log.warning(
            "malformed message on %s: %s",
            topic[:200],
            exc,
            extra={
                "event": "relay_decision",
                "decision": Decision.MALFORMED,
                "topic": topic[:200],
                "error": str(exc),
                "payload": payload[:_PAYLOAD_PREVIEW].decode("utf-8", "replace"),
                "not_logged": held,
            },
        )

    def _sender(self, topic: str) -> str:
        """The key a sender's log lines are limited under: a known camera, a belt topic, or "other" (bounded)."""
        levels = topic.split("/")
        if len(levels) >= 2 and self.settings.knows(levels[-2]):
            return levels[-2]
        return topic if topic in (self.settings.belt.speed_topic, self.settings.belt.encoder_topic) else "other"

    def _within_budget(self, key: str, device: str | None, topic: str, cost: float) -> bool:
        """Take one message (``cost`` tokens) of ``key``'s budget; count and (rarely) log when over it."""
        if self._rate.allow(key, cost):
            return True
        total = self.ledger.count(Decision.RATE_LIMITED, device)
        held = self._log_limit.allow(f"rate:{key}")
        if held is not None:
            log.warning(
                "%s sends more than [limits] messages_per_s: dropped unparsed",
                key,
                extra={
                    "event": "relay_decision",
                    "decision": Decision.RATE_LIMITED,
                    "topic": topic[:200],
                    "sender": key,
                    "rate_limited": total,
                    "not_logged": held,
                },
            )
        return False

    def _unknown(self, topic: str, device: str) -> None:
        """Count (and rarely log) a message from a camera this relay does not act for."""
        total = self.ledger.count(Decision.UNKNOWN_DEVICE)
        held = self._log_limit.allow("unknown")
        if held is not None:
            log.warning(
                "message from device %r, which this relay does not act for: counted, never fired "
                "(list it in cameras or under [devices] if it is one of this line's cameras)",
                device[:64],
                extra={
                    "event": "relay_decision",
                    "decision": Decision.UNKNOWN_DEVICE,
                    "topic": topic[:200],
                    "device_id": device[:64],
                    "unknown_devices": total,
                    "not_logged": held,
                },
            )
