"""The raw camera drivers: camera index or V4L2 device, rtsp/http URL, GStreamer pipeline, video file,
image folder.

A *raw source* only opens, grabs BGR frames and closes; it may block in the driver. Everything a live line
needs around it (timeouts, reconnects, rotation, ROI) is ``edge_agent.inspection.frame_source``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from edge_agent.config import SourceConfig
from edge_agent.redact import redact_uri

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
    full: np.ndarray | None = None  # the rotated full frame when a ROI is cut from it (``image`` is a view: no copy)
    # Seconds into a video file (its frame rate) or an image folder (source.fps_limit); None for live sources.
    media_time: float | None = None
    # The recipe whose rotation and ROI cut this frame (FrameGeometry.recipe); None without [[recipes]].
    recipe: str | None = None


@dataclass(frozen=True)
class FrameGeometry:
    """How a frame is cut from the camera's image: rotation, then ROI; ``recipe`` tags the frames cut so.

    One immutable object, read once per frame, so that a recipe switch (edge_agent/service/recipes.py)
    changes rotation, ROI and tag together at a frame boundary, never between them.
    """

    roi: tuple[int, int, int, int] | None = None
    rotate: int = 0
    recipe: str | None = None


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
    def fps(self) -> float | None:
        """A video file's frame rate as the container states it (None for live sources or when unknown)."""
        if self._capture is None or self.kind != "file":
            return None
        fps = float(self._capture.get(cv2.CAP_PROP_FPS) or 0.0)
        return fps if 0.0 < fps < 10_000.0 else None

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
