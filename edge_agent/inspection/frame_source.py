"""The resilient frame source around a raw driver (``edge_agent.inspection.drivers``).

``FrameSource`` wraps a raw source with what every source shares: rotation,
region of interest, frame-rate limit, looping of files, sequence numbers and capture times, and the
field behaviour: every driver call (open, read) runs on a worker thread and is given up after
``open_timeout_s`` / ``read_timeout_s`` (OpenCV cannot interrupt a hung V4L2, GStreamer or file read;
FFmpeg streams get the same timeouts natively), a stall watchdog reopens a live source that delivered
no frame for ``stall_timeout_s``, and a lost live source is reopened with exponential backoff and
jitter, forever. Every state change (``SOURCE_STATES``) is logged and reported to the pipeline.

The pipeline asks ``FrameSource.read()`` for the next ``Frame`` and learns from ``live`` whether frames
may be dropped (cameras, streams: the latest frame wins) or must all be inspected (files, folders).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from edge_agent.config import SourceConfig
from edge_agent.inspection.driver_worker import CallTimedOut, Cancelled, DriverWorker
from edge_agent.inspection.drivers import (
    LIVE_KINDS,
    Frame,
    FrameGeometry,
    RawSource,
    SourceError,
    SourceTimeout,
    make_raw_source,
)
from edge_agent.redact import redact_uri

log = logging.getLogger(__name__)

SOURCE_STATES = ("opening", "open", "reconnecting", "ended", "failed", "closed")
MAX_STUCK_READS = 3  # abandoned driver calls still blocked; beyond this the agent exits (systemd restarts it)
_STREAM_TIMEOUT_GRACE_S = 2.0  # FFmpeg enforces read_timeout_s itself; let it answer before abandoning the call
_SLICE_S = 0.2  # waits are cut into slices to notice a stop and to show the pipeline a sign of life


class _Problem(Exception):
    """Why a live source lost its frames: ``reason`` (read_failed | read_timeout | stalled) and a message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class SourceCounters:
    """What happened to a source since the agent started."""

    frames: int = 0  # grabbed (before the frame-rate limit)
    rate_limited: int = 0  # live frames skipped by source.fps_limit
    reconnects: int = 0  # successful reopenings after a loss
    reconnect_attempts: int = 0
    read_failures: int = 0  # reads that returned no frame (device unplugged, stream closed)
    read_timeouts: int = 0  # reads blocked for longer than source.read_timeout_s
    stalls: int = 0  # no frame for source.stall_timeout_s


class FrameSource:
    """A raw source plus rotation, ROI, frame-rate limit, looping, timeouts, reconnects and a stall watchdog.

    Live sources (cameras, streams, GStreamer) never end: a failed or timed-out read, or no frame for
    ``stall_timeout_s``, closes the device and reopens it with exponential backoff and jitter, forever
    (``state`` is ``reconnecting`` meanwhile). Files and folders are read once (or looped) and a read that
    blocks past the timeout is an error: frames must not be skipped there.
    """

    def __init__(
        self,
        config: SourceConfig,
        raw: RawSource | None = None,
        raw_factory: Callable[[], RawSource] | None = None,
    ) -> None:
        self.config = config
        # Rotation and ROI of the next frame: replaced whole by a recipe switch (any thread; read once per frame).
        self.geometry = FrameGeometry(config.roi, config.rotate)
        self._factory = raw_factory if raw_factory is not None else (lambda: make_raw_source(config))
        self.raw = raw if raw is not None else self._factory()
        self.live = self.raw.kind in LIVE_KINDS
        self.drop_frames = config.drop_policy == "latest" or (config.drop_policy == "auto" and self.live)
        self.state = "closed"
        self.state_since = time.time()
        self.last_error = ""
        self.counters = SourceCounters()
        self.last_frame_monotonic: float | None = None
        # Set by the pipeline: called while waiting (heartbeat), and on every state change (old, new, reason).
        self.on_wait: Callable[[], None] = lambda: None
        self.on_state: Callable[[str, str, str], None] = lambda old, new, reason: None
        self._cancel = threading.Event()
        self._worker: DriverWorker | None = None
        self._stuck: list[DriverWorker] = []
        self._attempt = 0  # reconnect attempts since the last frame (backoff exponent)
        self._lost_at = time.monotonic()  # when the frames stopped (or construction)
        self._clock_start = time.monotonic()  # stall clock: read() entry, the last frame or the last (re)open
        self._sequence = 0
        self._next_due = 0.0
        self._min_interval = 1.0 / config.fps_limit if config.fps_limit > 0 else 0.0
        self._random = random.Random()

    @property
    def source_id(self) -> str:
        """The source as reported (inspection messages, spool, logs): its URI without credentials."""
        return redact_uri(self.config.uri)

    @property
    def kind(self) -> str:
        return self.raw.kind

    def last_frame_age(self) -> float | None:
        """Seconds since the last grabbed frame (None before the first)."""
        if self.last_frame_monotonic is None:
            return None
        return time.monotonic() - self.last_frame_monotonic

    def open(self) -> None:
        """Open the raw source within ``open_timeout_s``; raise SourceError with the reason.

        A live source that fails here is retried by ``read()`` (state ``failed`` until then).
        """
        self._set_state("opening", "open")
        try:
            self._open_raw()
        except SourceError as exc:
            self.last_error = redact_uri(str(exc))
            # Down since start: the reconnect that brings it up reports how long it was away.
            self._lost_at = time.monotonic()
            self._set_state("failed", str(exc))
            raise
        self._set_state("open", "opened")

    def read(self) -> Frame | None:
        """The next frame; None when a file or folder has ended (``loop`` off) or ``cancel()`` was called."""
        try:
            return self._read()
        except Cancelled:
            return None

    def cancel(self) -> None:
        """Make a waiting or reconnecting ``read()`` return None soon (the pipeline is stopping)."""
        self._cancel.set()

    def close(self) -> None:
        """Close the device (a raw source whose call is stuck is left to close itself if it ever returns)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        self._set_state("closed", "closed")

    # -- reading ------------------------------------------------------------------------------------

    def _read(self) -> Frame | None:
        # The stall clock runs only while the pipeline waits for a frame: time a file source spends blocked
        # behind a slow model (backpressure) between two reads is not the source's fault.
        self._clock_start = time.monotonic()
        while True:
            if self._cancel.is_set():
                raise Cancelled
            if self.state != "open":
                if not self.live or self.state in ("ended", "closed"):
                    raise SourceError(f"{self.raw.description} is not open")
                self._reconnect()
            try:
                image = self._grab()
            except _Problem as problem:
                if not self.live:
                    raise SourceError(str(problem)) from None
                self._lose(problem)
                continue
            if image is None:
                if not self.config.loop:
                    self._set_state("ended", "end of file")
                    return None
                self._restart()
                continue
            now = time.monotonic()
            self.last_frame_monotonic = self._clock_start = now
            self.counters.frames += 1
            if self._attempt:
                self._attempt = 0
            if self._min_interval and not self._slot_due(now):
                self.counters.rate_limited += 1
                continue
            return self._make_frame(image)

    def _grab(self) -> np.ndarray | None:
        """One frame from the worker, within the read timeout and the stall watchdog; _Problem when not."""
        cfg = self.config
        read_limit = cfg.read_timeout_s + (_STREAM_TIMEOUT_GRACE_S if self.raw.kind == "stream" else 0.0)
        stall_left = self._clock_start + cfg.stall_timeout_s - time.monotonic()
        timeout = max(0.0, min(read_limit, stall_left))
        assert self._worker is not None
        try:
            return self._worker.call(self.raw.grab, timeout, self._cancel, self.on_wait)
        except CallTimedOut:
            self._abandon_worker()
            where = self._where()
            if stall_left <= read_limit:
                self.counters.stalls += 1
                raise _Problem("stalled", f"{where}: no frame for {cfg.stall_timeout_s:g} s (stall watchdog)") from None
            self.counters.read_timeouts += 1
            raise _Problem("read_timeout", f"{where}: a read blocked for more than {read_limit:g} s") from None
        except SourceTimeout as exc:
            self.counters.read_timeouts += 1
            raise _Problem("read_timeout", str(exc)) from None
        except SourceError as exc:
            self.counters.read_failures += 1
            raise _Problem("read_failed", str(exc)) from None

    def _lose(self, problem: _Problem) -> None:
        """A live source lost its frames: close it and switch to reconnecting."""
        self.last_error = redact_uri(str(problem))
        self._lost_at = time.monotonic()
        log.warning(
            "source lost: %s",
            problem,
            extra={
                "event": "source_lost",
                "source": self.raw.description,
                "reason": problem.reason,
                "error": str(problem),
            },
        )
        if self._worker is not None:
            self._worker.close(timeout=self.config.read_timeout_s)
            if self._worker.abandoned:
                self._stuck.append(self._worker)
            self._worker = None
        self._set_state("reconnecting", problem.reason)

    def _reconnect(self) -> None:
        """Reopen with exponential backoff and jitter until it works (or the pipeline stops)."""
        cfg = self.config
        while True:
            base = min(cfg.reconnect_max_s, cfg.reconnect_initial_s * 2.0**self._attempt)
            # Equal jitter: cameras that lost the same switch or NVR do not come back in lock step.
            delay = base / 2 + self._random.uniform(0.0, base / 2)
            self._attempt += 1
            log.info(
                "reopening source in %.1f s",
                delay,
                extra={
                    "event": "source_reconnecting",
                    "source": self.raw.description,
                    "retry_in_s": round(delay, 2),
                    "attempt": self._attempt,
                    "last_error": self.last_error,
                },
            )
            self._sleep(delay)
            self.counters.reconnect_attempts += 1
            self._set_state("opening", "reconnect")
            try:
                self.raw = self._factory()
                self._open_raw()
            except SourceError as exc:
                self.last_error = redact_uri(str(exc))
                log.warning(
                    "source could not be reopened: %s",
                    exc,
                    extra={
                        "event": "source_reopen_failed",
                        "source": self.raw.description,
                        "error": str(exc),
                        "attempt": self._attempt,
                    },
                )
                self._set_state("reconnecting", "reopen failed")
                continue
            self.counters.reconnects += 1
            log.info(
                "source reconnected",
                extra={
                    "event": "source_reconnected",
                    "source": self.raw.description,
                    "attempts": self._attempt,
                    "down_s": round(time.monotonic() - self._lost_at, 2),
                },
            )
            self._set_state("open", "reconnected")
            return

    def _open_raw(self) -> None:
        """Open ``self.raw`` on a fresh worker within open_timeout_s (the worker is kept on success)."""
        self._check_stuck()
        worker = DriverWorker(self.raw)
        timeout = self.config.open_timeout_s + (_STREAM_TIMEOUT_GRACE_S if self.raw.kind == "stream" else 0.0)
        try:
            worker.call(self.raw.open, timeout, self._cancel, self.on_wait)
        except CallTimedOut:
            worker.abandon()
            self._stuck.append(worker)
            raise SourceError(
                f"{self.raw.description} did not open within {timeout:g} s (source.open_timeout_s)"
            ) from None
        except BaseException:
            worker.close()
            raise
        self._worker = worker
        self._clock_start = time.monotonic()

    def _abandon_worker(self) -> None:
        if self._worker is not None:
            self._worker.abandon()
            self._stuck.append(self._worker)
            self._worker = None

    def _check_stuck(self) -> None:
        """Too many driver calls blocked for good: exit so that systemd restarts the process afresh."""
        self._stuck = [w for w in self._stuck if w.thread.is_alive()]
        if len(self._stuck) >= MAX_STUCK_READS:
            raise SourceError(
                f"{self.raw.description}: {len(self._stuck)} driver calls are blocked and cannot be interrupted; "
                "giving up so that the service restarts (check the camera, cable and driver)"
            )

    def _where(self) -> str:
        current = getattr(self._worker.raw if self._worker else self.raw, "current", None)
        return f"{self.raw.description}" + (f" ({current})" if current else "")

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.on_wait()
            if self._cancel.wait(min(_SLICE_S, left)):
                raise Cancelled

    def _set_state(self, new: str, reason: str) -> None:
        old = self.state
        if new == old:
            return
        self.state = new
        self.state_since = time.time()
        level = logging.WARNING if new in ("reconnecting", "failed") else logging.INFO
        log.log(
            level,
            "source %s -> %s (%s)",
            old,
            new,
            reason,
            extra={"event": "source_state", "source": self.raw.description, "from": old, "to": new, "reason": reason},
        )
        self.on_state(old, new, reason)

    def _slot_due(self, now: float) -> bool:
        """Frame-rate limit: live sources skip early frames (no stale backlog); files wait their turn."""
        if now >= self._next_due:
            # Keep the cadence when a little late; after a longer gap start afresh instead of bursting.
            base = self._next_due if now - self._next_due < self._min_interval else now
            self._next_due = base + self._min_interval
            return True
        if self.live:
            return False
        time.sleep(self._next_due - now)
        self._next_due += self._min_interval
        return True

    def _restart(self) -> None:
        log.debug("source looped", extra={"event": "source_looped", "source": self.raw.description})
        assert self._worker is not None
        try:
            self._worker.call(self.raw.close, self.config.open_timeout_s, self._cancel, self.on_wait)
            self._worker.call(self.raw.open, self.config.open_timeout_s, self._cancel, self.on_wait)
        except CallTimedOut:
            self._abandon_worker()
            raise SourceError(f"{self.raw.description}: reopening for the next loop took too long") from None

    def _make_frame(self, image: np.ndarray) -> Frame:
        capture_time = time.time()
        geometry = self.geometry  # once: a switch between the rotation and the crop must not mix two recipes
        image = rotate(image, geometry.rotate)
        height, width = image.shape[:2]
        offset = (0, 0)
        full = None
        if geometry.roi is not None:
            full = image
            image, offset = crop(image, geometry.roi, self.raw.description)
        frame = Frame(
            sequence=self._sequence,
            capture_time=capture_time,
            image=image,
            source_id=self.source_id,
            frame_size=(width, height),
            roi_offset=offset,
            full=full,
            media_time=self._media_time(),
            recipe=geometry.recipe,
        )
        self._sequence += 1
        return frame

    def _media_time(self) -> float | None:
        """Seconds into a file (frames read / its frame rate; loops continue the count), None when live."""
        if self.live:
            return None
        fps = getattr(self.raw, "fps", None) or (self.config.fps_limit if self.config.fps_limit > 0 else None)
        return None if fps is None else self._sequence / fps


_ROTATIONS = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}


def rotate(image: np.ndarray, degrees: int) -> np.ndarray:
    """The image turned clockwise by 0/90/180/270 degrees."""
    return image if degrees == 0 else cv2.rotate(image, _ROTATIONS[degrees])


def crop(
    image: np.ndarray, roi: tuple[int, int, int, int], where: str = "source"
) -> tuple[np.ndarray, tuple[int, int]]:
    """The ROI (x, y, w, h) of an image and its offset; a ROI outside the frame is an error naming both."""
    x, y, w, h = roi
    height, width = image.shape[:2]
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise SourceError(f"{where}: source.roi {list(roi)} does not fit inside the {width}x{height} frame")
    return image[y : y + h, x : x + w], (x, y)
