"""The outbox: QoS 1 messages from the moment they are made until the broker acknowledges them.

The MQTT publisher (edge_agent/publish/mqtt.py) reads it, never the other way round. Messages get a sequence
number when added (their creation order); the publisher hands them to the broker oldest first, a
bounded window at a time (``after(cursor, limit)``), and acknowledges each one by that number. Two
implementations: ``MemoryOutbox`` (survives broker outages, not agent restarts) and
``edge_agent.publish.spool.Spool`` (SQLite, survives both).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class OutgoingMessage:
    """A QoS 1 message from creation until the broker acknowledges it."""

    key: str  # unique, e.g. the inspection message id (for logs; the outbox acknowledges by ``seq``)
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    expires_at: float | None = None  # unix seconds; None = never
    seq: int = 0  # creation order, set by the outbox
    replayed: bool = False  # loaded from disk after a restart

    def expired(self, now: float | None = None) -> bool:
        """True when the message's time to live has passed."""
        return self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at


@dataclass
class OutboxCounters:
    """What an outbox threw away, and why."""

    expired: int = 0  # time to live passed before the broker acknowledged them
    dropped: int = 0  # the outbox was full: the oldest were dropped to make room


class Outbox(Protocol):
    """Unacknowledged QoS 1 messages in creation order."""

    @property
    def counters(self) -> OutboxCounters:
        """Running totals (read-only here: an implementation may keep a subclass, e.g. SpoolCounters)."""
        ...

    def add(self, message: OutgoingMessage) -> int:
        """Keep a message until ``ack``; returns its sequence number."""
        ...

    def ack(self, seq: int) -> None:
        """The broker has the message: forget it (unknown numbers are ignored)."""
        ...

    def after(self, seq: int, limit: int) -> list[OutgoingMessage]:
        """Up to ``limit`` pending, unexpired messages with a sequence number above ``seq``, oldest first.

        Expired messages met on the way are dropped and counted.
        """
        ...

    def __len__(self) -> int: ...

    def close(self) -> None:
        """Release resources; pending messages are kept where the outbox keeps them."""
        ...


class MemoryOutbox:
    """An outbox in memory, bounded: survives broker outages, not agent restarts."""

    def __init__(self, max_messages: int = 100_000) -> None:
        self.max_messages = max_messages
        self.counters = OutboxCounters()
        self._messages: OrderedDict[int, OutgoingMessage] = OrderedDict()
        self._next_seq = 1
        self._lock = threading.Lock()

    def add(self, message: OutgoingMessage) -> int:
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            self._messages[seq] = dataclasses.replace(message, seq=seq)
            while len(self._messages) > self.max_messages:
                self._messages.popitem(last=False)
                self.counters.dropped += 1
            return seq

    def ack(self, seq: int) -> None:
        with self._lock:
            self._messages.pop(seq, None)

    def after(self, seq: int, limit: int) -> list[OutgoingMessage]:
        now = time.time()
        found: list[OutgoingMessage] = []
        expired: list[int] = []
        with self._lock:
            # Pending messages at or below the cursor are the ones in flight: at most the send window.
            for message in self._messages.values():
                if message.seq <= seq:
                    continue
                if message.expired(now):
                    expired.append(message.seq)
                    continue
                found.append(message)
                if len(found) >= limit:
                    break
            for number in expired:
                del self._messages[number]
            self.counters.expired += len(expired)
        return found

    def __len__(self) -> int:
        with self._lock:
            return len(self._messages)

    def close(self) -> None:
        """Nothing to release."""
