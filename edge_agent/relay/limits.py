"""Flood limits at the relay's intake (issue 24, finding 4): what one sender may cost the relay.

One camera (or one forged client with its credentials) must not keep the relay's single MQTT thread busy
while another camera's rejects wait behind it. So, before anything is parsed:

- each kind of message has a size limit (``MESSAGE_LIMITS``: a part message is a few KiB, a belt reading a
  few dozen bytes) and a limit on its number of values (``MESSAGE_VALUES``, commas counted in C): what the
  decoder's time grows with; a larger one is refused unread;
- each camera, and each belt topic, has a message budget (``[limits] messages_per_s`` with a burst; a message
  costs one more token per ``BYTES_PER_TOKEN``): beyond it messages are dropped unparsed and counted
  (``rate_limited``);
- the warnings about refused input are rate limited per sender (``LogLimiter``): one line, then at most one
  per ``[limits] log_interval_s`` carrying how many were not logged meanwhile. Every refusal is counted.

Keys are the cameras the relay knows and its belt topics (unknown cameras share one key), so the state
here is bounded by the config, not by what the broker carries.
"""

from __future__ import annotations

import threading
import time

# Bytes, checked before any parse. A part message with MAX_PART_REGIONS regions and 64-character ids is about
# 4 KiB (tests/test_security_relay_intake.py builds the largest), an inspection message with
# MAX_INSPECTION_REGIONS regions about 25 KiB; the limits leave room for fields a newer agent adds.
MESSAGE_LIMITS = {
    "inspection": 256 * 1024,
    "part": 16 * 1024,
    "speed": 256,
    "encoder": 256,
}
# Values (commas, counted in C before any parse): what decoding and validation cost grows with. A region of
# either kind has at most 12; 256 KiB of "[]," would be 87,000 values and take the decoder 100 ms.
MESSAGE_VALUES = {
    "inspection": 8192,
    "part": 1024,
    "speed": 16,
    "encoder": 16,
}
# A message costs 1 token of its sender's budget, plus one per this many bytes: a sender of large payloads
# runs out sooner than a camera's messages of 1-2 KiB ever do.
BYTES_PER_TOKEN = 16 * 1024


def too_costly(kind: str, payload: bytes) -> str | None:
    """Why a payload of this kind is refused unread (too many bytes or values), or None."""
    limit = MESSAGE_LIMITS[kind]
    if len(payload) > limit:
        return f"payload is {len(payload)} bytes; a {kind} message is limited to {limit}"
    values = payload.count(b",") + 1
    if values > MESSAGE_VALUES[kind]:
        return f"payload has {values} values; a {kind} message is limited to {MESSAGE_VALUES[kind]}"
    return None


class RateLimiter:
    """A token bucket per key: ``rate`` messages a second, up to ``burst`` at once (thread-safe)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, monotonic time)
        self._lock = threading.Lock()

    def allow(self, key: str, cost: float = 1.0, now: float | None = None) -> bool:
        """Take ``cost`` tokens of ``key``'s bucket; False when it has fewer."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            allowed = tokens >= cost
            self._buckets[key] = (tokens - cost if allowed else tokens, now)
            return allowed


class LogLimiter:
    """At most one log line per key and interval; says how many were held back (thread-safe)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: str, now: float | None = None) -> int | None:
        """None: do not log this one (counted); else log it, with the number not logged since the last line."""
        now = time.monotonic() if now is None else now
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)
