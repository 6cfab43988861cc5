"""Frame sources: camera index or V4L2 device, rtsp/http URL, GStreamer pipeline, video file, image folder.

A *raw source* only grabs BGR frames. ``FrameSource`` wraps one with what every source shares: rotation,
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

import contextlib
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import cv2
import numpy as np

from edge_agent.config import SourceConfig
from edge_agent.publish.messages import redact_uri

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
LIVE_KINDS = frozenset({"camera", "stream", "gstreamer"})


class SourceError(RuntimeError):
    """A source that cannot be opened or read; the message names the source and the reason."""


class SourceTimeout(SourceError):
    """A read that the backend itself gave up on after source.read_timeout_s."""


@dataclass(frozen=True)
class Frame:
    """One grabbed frame, after rotation and region-of-interest crop.

    Source-frame pixels are those of the rotated full frame; ``image`` is the ROI inside it, whose
    top-left corner is ``roi_offset``. Regions found in ``image`` map to the source frame by adding it.
    """

    sequence: int
    capture_time: float  # unix seconds (time.time()) when the frame was grabbed
    image: np.ndarray  # uint8 HxWx3, BGR
    source_id: str
    frame_size: tuple[int, int]  # width, height of the rotated full frame
    roi_offset: tuple[int, int] = (0, 0)  # x, y of image[0, 0] in the source frame
    monotonic: float = field(default_factory=time.monotonic)  # for latency, immune to clock steps


class RawSource(Protocol):
    """Grabs BGR frames from one device, stream, file or folder."""

    kind: str
    description: str

    def open(self) -> None:
        """Open the device; raise SourceError saying why it cannot be opened."""
        ...

    def grab(self) -> np.ndarray | None:
        """The next BGR frame, or None at the end of a file or folder; raise SourceError on a read failure."""
        ...

    def close(self) -> None: ...


def detect_kind(uri: str) -> str:
    """camera | stream | gstreamer | folder | file, from the look of a source URI."""
    text = uri.strip()
    if re.fullmatch(r"\d+", text) or re.fullmatch(r"/dev/video\d+", text):
        return "camera"
    if "!" in text:
        return "gstreamer"
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in STREAM_SCHEMES:
        return "stream"
    if Path(text).is_dir():
        return "folder"
    return "file"


def video_backends() -> dict[str, list[str]]:
    """Which OpenCV video I/O backends this cv2 can really use, by role (camera, stream, writer)."""
    from cv2 import videoio_registry as registry

    def usable(ids: Sequence[int]) -> list[str]:
        return sorted({registry.getBackendName(b) for b in ids if registry.hasBackend(b)})

    return {
        "camera": usable(registry.getCameraBackends()),
        "stream": usable(registry.getStreamBackends()),
        "writer": usable(registry.getWriterBackends()),
    }


def has_gstreamer() -> bool:
    """True when this cv2 was built with (or can load) the GStreamer backend."""
    from cv2 import videoio_registry as registry

    return bool(registry.hasBackend(cv2.CAP_GSTREAMER))


def describe_video_io() -> dict[str, object]:
    """OpenCV version and usable video backends, for the start-up log and doctor."""
    backends = video_backends()
    return {
        "opencv": cv2.__version__,
        "gstreamer": has_gstreamer(),
        **{f"{k}_backends": v for k, v in backends.items()},
    }


class CaptureSource:
    """cv2.VideoCapture over a camera index, V4L2 device, URL, GStreamer pipeline or video file."""

    def __init__(
        self,
        uri: str,
        kind: str,
        width: int | None = None,
        height: int | None = None,
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 5.0,
    ) -> None:
        self.uri = uri
        self.shown_uri = redact_uri(uri)  # for logs, messages and errors: never the credentials
        self.kind = kind
        self.description = f"{kind} {self.shown_uri}"
        self._width = width
        self._height = height
        self._open_timeout_ms = int(open_timeout_s * 1000)
        self._read_timeout_ms = int(read_timeout_s * 1000)
        self._capture: cv2.VideoCapture | None = None
        self._opened_before = False

    def open(self) -> None:
        self._check_openable()
        capture = self._new_capture()
        if not capture.isOpened():
            capture.release()
            raise SourceError(self._open_failure())
        if self.kind == "camera":
            if self._width:
                capture.set(cv2.CAP_PROP_FRAME_WIDTH, self._width)
            if self._height:
                capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self._height)
            # A deep driver buffer makes every frame old; one buffered frame keeps latency flat.
            capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        self._capture = capture
        # A looping file reopens at every end: say so once, not every few seconds.
        log.log(
            logging.DEBUG if self._opened_before else logging.INFO,
            "source opened",
            extra={
                "event": "source_opened",
                "source": self.description,
                "backend": _backend_name(capture),
                "width": int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                "height": int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                "fps": round(float(capture.get(cv2.CAP_PROP_FPS) or 0.0), 2),
            },
        )
        self._opened_before = True

    def grab(self) -> np.ndarray | None:
        if self._capture is None:
            raise SourceError(f"{self.description} is not open")
        started = time.monotonic()
        ok, image = self._capture.read()
        if ok and image is not None:
            return _as_bgr(image)
        if self.kind == "file":
            return None
        waited = time.monotonic() - started
        if self.kind == "stream" and waited >= self._read_timeout_ms / 1000 * 0.9:
            # FFmpeg gave up on its own read timeout: the server is up but sends nothing.
            raise SourceTimeout(f"{self.description}: no data for {waited:.1f} s (source.read_timeout_s)")
        raise SourceError(f"{self.description}: no frame could be read (device unplugged or stream ended?)")

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    @property
    def frame_count(self) -> int | None:
        """Frames in a video file as reported by the container (None for live sources or when unknown)."""
        if self._capture is None or self.kind != "file":
            return None
        count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT))
        return count if count > 0 else None

    def _check_openable(self) -> None:
        if self.kind == "file":
            path = Path(self.uri)
            if not path.exists():
                raise SourceError(f"video file {path} does not exist")
            if not path.is_file():
                raise SourceError(f"video file {path} is not a regular file")
        if self.kind == "camera" and self.uri.startswith("/dev/") and not Path(self.uri).exists():
            raise SourceError(f"camera {self.shown_uri} does not exist (is it plugged in? `v4l2-ctl --list-devices`)")
        if self.kind == "gstreamer" and not has_gstreamer():
            raise SourceError(
                f"source {self.shown_uri!r} is a GStreamer pipeline but this OpenCV ({cv2.__version__}) has no GStreamer "
                "backend (PyPI wheels never do); use the system OpenCV (e.g. python3-opencv on JetPack) "
                "in a venv with --system-site-packages"
            )

    def _new_capture(self) -> cv2.VideoCapture:
        if self.kind == "camera":
            index = int(self.uri) if self.uri.isdigit() else int(self.uri.removeprefix("/dev/video"))
            return cv2.VideoCapture(index)
        if self.kind == "gstreamer":
            return cv2.VideoCapture(self.uri, cv2.CAP_GSTREAMER)
        if self.kind == "stream":
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                self._open_timeout_ms,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                self._read_timeout_ms,
            ]
            return cv2.VideoCapture(self.uri, cv2.CAP_FFMPEG, params)
        return cv2.VideoCapture(self.uri)

    def _open_failure(self) -> str:
        if self.kind == "camera":
            return (
                f"camera {self.shown_uri} could not be opened: no such device, or it is busy or not readable by this "
                f"user (camera backends in this OpenCV: {video_backends()['camera']})"
            )
        if self.kind == "stream":
            return f"stream {self.shown_uri} could not be opened within {self._open_timeout_ms / 1000:.0f} s (is the server up?)"
        if self.kind == "gstreamer":
            return f"GStreamer pipeline {self.shown_uri!r} could not be started (run it with gst-launch-1.0 to see why)"
        return f"video file {self.shown_uri} cannot be decoded by OpenCV (backends: {video_backends()['stream']})"


class FolderSource:
    """Every image in a folder, in sorted file-name order. Unreadable files are logged and skipped."""

    kind = "folder"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.description = f"folder {self.folder}"
        self._paths: list[Path] = []
        self._next = 0
        self.skipped: list[Path] = []
        self.current: Path | None = None  # the image being read (named when a read hangs)
        self._opened_before = False

    def open(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"image folder {self.folder} does not exist or is not a directory")
        self._paths = list_images(self.folder)
        if not self._paths:
            raise SourceError(f"image folder {self.folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
        self._next = 0
        log.log(
            logging.DEBUG if self._opened_before else logging.INFO,
            "source opened",
            extra={"event": "source_opened", "source": self.description, "images": len(self._paths)},
        )
        self._opened_before = True

    def grab(self) -> np.ndarray | None:
        while self._next < len(self._paths):
            path = self._paths[self._next]
            self._next += 1
            self.current = path
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                return image
            self.skipped.append(path)
            log.error("unreadable image skipped", extra={"event": "image_unreadable", "path": str(path)})
        return None

    def close(self) -> None:
        self._paths = []

    @property
    def frame_count(self) -> int | None:
        return len(self._paths) or None


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside a folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def make_raw_source(config: SourceConfig) -> RawSource:
    """The raw source a SourceConfig names (kind 'auto' is detected from the URI)."""
    kind = detect_kind(config.uri) if config.kind == "auto" else config.kind
    if kind == "folder":
        return FolderSource(config.uri)
    return CaptureSource(
        config.uri,
        kind,
        width=config.width,
        height=config.height,
        open_timeout_s=config.open_timeout_s,
        read_timeout_s=config.read_timeout_s,
    )


SOURCE_STATES = ("opening", "open", "reconnecting", "ended", "failed", "closed")
MAX_STUCK_READS = 3  # abandoned driver calls still blocked; beyond this the agent exits (systemd restarts it)
_STREAM_TIMEOUT_GRACE_S = 2.0  # FFmpeg enforces read_timeout_s itself; let it answer before abandoning the call
_SLICE_S = 0.2  # waits are cut into slices to notice a stop and to show the pipeline a sign of life

T = TypeVar("T")


class _Cancelled(Exception):
    """The pipeline is stopping."""


class _CallTimedOut(Exception):
    """A driver call did not return in time (it is abandoned, still blocked on its own thread)."""


class _Problem(Exception):
    """Why a live source lost its frames: ``reason`` (read_failed | read_timeout | stalled) and a message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Worker:
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
        """``fn()`` on the worker thread; raises its exception, _CallTimedOut or _Cancelled."""
        done = threading.Event()
        box: list[Any] = []
        self._requests.put((fn, done, box))
        deadline = time.monotonic() + timeout
        while not done.wait(min(_SLICE_S, max(0.0, deadline - time.monotonic()))):
            on_wait()
            if cancel.is_set():
                raise _Cancelled
            if time.monotonic() >= deadline:
                raise _CallTimedOut
        ok, value = box
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

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
        self._worker: _Worker | None = None
        self._stuck: list[_Worker] = []
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
        except _Cancelled:
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
                raise _Cancelled
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
        except _CallTimedOut:
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
            extra={"event": "source_lost", "source": self.raw.description, "reason": problem.reason,
                   "error": str(problem)},
        )  # fmt: skip
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
                extra={"event": "source_reconnecting", "source": self.raw.description, "retry_in_s": round(delay, 2),
                       "attempt": self._attempt, "last_error": self.last_error},
            )  # fmt: skip
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
                    extra={"event": "source_reopen_failed", "source": self.raw.description, "error": str(exc),
                           "attempt": self._attempt},
                )  # fmt: skip
                self._set_state("reconnecting", "reopen failed")
                continue
            self.counters.reconnects += 1
            log.info(
                "source reconnected",
                extra={"event": "source_reconnected", "source": self.raw.description, "attempts": self._attempt,
                       "down_s": round(time.monotonic() - self._lost_at, 2)},
            )  # fmt: skip
            self._set_state("open", "reconnected")
            return

    def _open_raw(self) -> None:
        """Open ``self.raw`` on a fresh worker within open_timeout_s (the worker is kept on success)."""
        self._check_stuck()
        worker = _Worker(self.raw)
        timeout = self.config.open_timeout_s + (_STREAM_TIMEOUT_GRACE_S if self.raw.kind == "stream" else 0.0)
        try:
            worker.call(self.raw.open, timeout, self._cancel, self.on_wait)
        except _CallTimedOut:
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
                raise _Cancelled

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
        except _CallTimedOut:
            self._abandon_worker()
            raise SourceError(f"{self.raw.description}: reopening for the next loop took too long") from None

    def _make_frame(self, image: np.ndarray) -> Frame:
        capture_time = time.time()
        image = rotate(image, self.config.rotate)
        height, width = image.shape[:2]
        offset = (0, 0)
        if self.config.roi is not None:
            image, offset = crop(image, self.config.roi, self.raw.description)
        frame = Frame(
            sequence=self._sequence,
            capture_time=capture_time,
            image=image,
            source_id=self.source_id,
            frame_size=(width, height),
            roi_offset=offset,
        )
        self._sequence += 1
        return frame


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


def _as_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def _backend_name(capture: cv2.VideoCapture) -> str:
    try:
        return capture.getBackendName()
    except cv2.error:
        return "unknown"
