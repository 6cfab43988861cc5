"""The bounded queues between the pipeline's stage threads (edge_agent/inspection/pipeline.py).

A full queue either blocks its producer (files and folders: every frame is inspected) or, with
``drop_oldest``, discards its oldest frame (live sources: the newest frame wins, the drop is counted). The
end sentinel ``END`` follows the last frame and is never dropped.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")
POLL_S = 0.2  # how often a waiting stage looks at the stop flag and refreshes its heartbeat


class End:
    """Sentinel: no more frames will follow."""


END = End()


class StageQueue(Generic[T]):
    """A bounded FIFO between two stages; with ``drop_oldest`` a full queue discards its oldest item."""

    def __init__(self, maxsize: int, drop_oldest: bool = False) -> None:
        if maxsize < 1:
            raise ValueError("queue size must be at least 1")
        self.maxsize = maxsize
        self.drop_oldest = drop_oldest
        self.dropped = 0
        self._items: deque[T | End] = deque()
        self._cond = threading.Condition()

    def put(self, item: T | End, timeout: float = POLL_S) -> bool:
        """Enqueue; False when the queue stayed full for ``timeout`` (blocking mode only).

        The end sentinel is never dropped and never drops a frame: it waits for room like a file frame.
        """
        with self._cond:
            if len(self._items) >= self.maxsize:
                if self.drop_oldest and not isinstance(item, End) and not isinstance(self._items[0], End):
                    self._items.popleft()
                    self.dropped += 1
                elif not self._cond.wait_for(lambda: len(self._items) < self.maxsize, timeout):
                    return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float = POLL_S) -> T | End | None:
        """The oldest item, or None when nothing arrived within ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout):
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
