"""A real network camera on loopback: ffmpeg serving a looping video as HTTP MJPEG (multipart JPEG).

``ffmpeg -listen 1`` serves one client per process, like many cheap IP cameras; a client that reconnects
needs a fresh server process, which is what ``restart()`` gives (same port, same URL). ``pause()``
(SIGSTOP) makes a server that stays up but stops sending frames; ``kill()`` a crashed one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_agent.demo.conveyor import write_video
from edge_agent.demo.local_broker import free_port

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")


def numbered_frame(index: int, width: int = 64, height: int = 48) -> np.ndarray:
    """A BGR frame whose mean grey level encodes ``index`` (survives video compression)."""
    return np.full((height, width, 3), 10 + 20 * index, dtype=np.uint8)


def camera_video(path: Path, frames: int = 100, size: tuple[int, int] = (160, 120), fps: float = 25.0) -> Path:
    """A short video whose frames cycle through 7 grey levels (a stand-in for a camera's picture)."""
    write_video(path, [numbered_frame(i % 7, *size) for i in range(frames)], fps, size)
    return path


class MjpegServer:
    """ffmpeg streaming ``video`` forever at its frame rate on http://127.0.0.1:<port>/cam.mjpg."""

    def __init__(self, video: Path, port: int | None = None) -> None:
        self.video = video
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/cam.mjpg"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> MjpegServer:
        self.process = subprocess.Popen(
            [
                "ffmpeg",
                "-nostdin",
                "-loglevel",
                "error",
                "-re",
                "-stream_loop",
                "-1",
                "-i",
                str(self.video),
                "-c:v",
                "mjpeg",
                "-q:v",
                "5",
                "-f",
                "mpjpeg",
                "-listen",
                "1",
                self.url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return self

    def kill(self) -> None:
        """SIGKILL: the camera crashed or lost power."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: the server stays up (its socket open) but sends nothing more."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def restart(self) -> MjpegServer:
        self.kill()
        return self.start()

    def __enter__(self) -> MjpegServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
        self.kill()
