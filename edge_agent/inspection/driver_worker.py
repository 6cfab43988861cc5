"""A raw source's driver calls on their own thread, so a call that blocks in a driver can be abandoned.

OpenCV cannot interrupt a V4L2, GStreamer or file read that hangs; the only way out is to stop waiting for
it. ``edge_agent.inspection.frame_source`` gives every open and read a timeout this way.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from edge_agent.inspection.drivers import RawSource

SLICE_S = 0.2  # waits are cut into slices to notice a stop and to show the pipeline a sign of life

T = TypeVar("T")


class Cancelled(Exception):
    """The pipeline is stopping."""


class CallTimedOut(Exception):
    """A driver call did not return in time (it is abandoned, still blocked on its own thread)."""


class DriverWorker:
    """Runs one raw source's calls on its own thread, so a call that blocks in a driver can be abandoned.

    OpenCV cannot interrupt a V4L2, GStreamer or file read that hangs; the only way out is to stop waiting
    for it. An abandoned worker closes its raw source if the call ever returns, then ends.
    """

    def __init__(self, raw: RawSource) -> None:
        self.raw = raw
        self.abandoned = False
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], threading.Event, list[Any]] | None] = (
            queue.SimpleQueue()
        )
        self.thread = threading.Thread(target=self._loop, name=f"source-{raw.kind}", daemon=True)
        self.thread.start()

    def call(self, fn: Callable[[], T], timeout: float, cancel: threading.Event, on_wait: Callable[[], None]) -> T:
        """``fn()`` on the worker thread; raises its exception, CallTimedOut or Cancelled."""
        done = threading.Event()
        box: list[Any] = []
        self._requests.put((fn, done, box))
        deadline = time.monotonic() + timeout
        while not done.wait(min(SLICE_S, max(0.0, deadline - time.monotonic()))):
            on_wait()
            if cancel.is_set():
                raise Cancelled
            if time.monotonic() >= deadline:
                raise CallTimedOut
        ok, value = box
        if not ok:
            raise value
        return cast(T, value)

    def abandon(self) -> None:
        """Stop using this worker; its blocked call may return later (the raw source is then closed)."""
        self.abandoned = True
        self._requests.put(None)

    def close(self, timeout: float = 5.0) -> None:
        """Close the raw source on the worker thread and end it (abandoned if the close hangs)."""
        if self.abandoned:
            return
        done = threading.Event()
        self._requests.put((self.raw.close, done, []))
        self._requests.put(None)
        if not done.wait(timeout):
            self.abandoned = True

    def _loop(self) -> None:
        while (request := self._requests.get()) is not None:
            fn, done, box = request
            try:
                box[:] = [True, fn()]
            except BaseException as exc:
                box[:] = [False, exc]
            done.set()
            if self.abandoned:
                break
        if self.abandoned:
            with contextlib.suppress(Exception):
                self.raw.close()
