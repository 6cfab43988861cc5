"""What the agent publishes: inspection and part messages (QoS 1, through the outbox), command results and stats.

The transport under it (sessions, reconnects, the outbox window, the final status) is
``edge_agent.publish.session``; the topics and payloads are ``edge_agent.messages``.
"""

from __future__ import annotations

import time
import uuid

from edge_agent.messages import CommandResult, InspectionMessage, PartMessage, StatsMessage
from edge_agent.publish.outbox import OutgoingMessage
from edge_agent.publish.session import MqttSession


class MqttPublisher(MqttSession):
    """The agent's publisher: one per device, ``start()`` then ``publish_*`` then ``stop()``.

    It turns messages into ``OutgoingMessage`` records and uses only the session's public API
    (``enqueue``, ``send_control``, ``publish_if_connected``); the session's locks stay in session.py.
    """

    def publish_inspection(self, message: InspectionMessage) -> bool:
        """Queue one inspection message at QoS 1 (unless policy skips good frames); True when queued."""
        if self.config.publish == "none" or (self.config.publish == "anomalous" and not message.anomalous):
            self.counters.inspections_skipped += 1
            return False
        self._queue(message.message_id, "inspection", message.to_json())
        self.counters.inspections_published += 1
        return True

    def publish_part(self, message: PartMessage) -> None:
        """Queue one part message at QoS 1, through the same spool and expiry as inspections (every part)."""
        self._queue(message.message_id, "part", message.to_json())
        self.counters.parts_published += 1

    def _queue(self, key: str, leaf: str, payload: str) -> None:
        expiry = self.config.message_expiry_s
        outgoing = OutgoingMessage(
            key=key,
            topic=self.topic(leaf),
            payload=payload.encode("utf-8"),
            qos=1,
            expires_at=time.time() + expiry if expiry > 0 else None,
        )
        self.enqueue(outgoing)

    def publish_result(self, result: CommandResult) -> None:
        """A command's reply on ``cmd/<name>/result`` (QoS 1, kept in memory until acknowledged)."""
        self.send_control(
            OutgoingMessage(
                key=f"result-{uuid.uuid4().hex}",
                topic=self.topic(f"cmd/{result.command}/result"),
                payload=result.model_dump_json().encode("utf-8"),
                qos=1,
            )
        )

    def publish_stats(self, stats: StatsMessage) -> bool:
        """Periodic numbers at QoS 0 while connected (a lost sample is replaced by the next); True if sent."""
        return self.publish_if_connected("stats", stats.model_dump_json(), qos=0)
