"""Helpers of bench/pipeline.py: CPU time per pipeline stage, and a real MJPEG-over-HTTP camera.

``StageCpu`` reads the kernel's per-thread CPU accounting (/proc/self/task/<tid>/stat, utime + stime) while
the agent runs, and sums it by stage: the pipeline's stage threads are named ``stage-<name>``; other Python
threads (MQTT client, spool, drift, keep writer) are ``other``; threads Python does not know are native
ones, ONNX Runtime's intra-op pool above all (and a video decoder's threads), counted as ``pool``.

``MjpegStream`` is ffmpeg serving a looping MJPEG video over HTTP at a fixed rate, like an IP camera
(tests/stream_server.py makes the tests' one the same way). The video is MJPEG already and ffmpeg
copies it (``-c copy``), so the server costs almost no CPU on the box under test.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
STAGES = ("capture", "infer", "nfa", "publish")
GROUPS = (*STAGES, "pool", "other")


def _task_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process, by thread id."""
    out: dict[int, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended between listdir and open
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) * _TICK_S  # utime, stime (fields 14, 15)
    return out


class StageCpu:
    """Per-stage CPU seconds of one agent run (sampled every ``interval_s`` until ``stop``)."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self._baseline = _task_cpu_s()  # threads alive before the run: only their growth counts
        self._last: dict[int, float] = {}
        self._group: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-cpu-sampler", daemon=True)
        self._own = 0

    def start(self) -> StageCpu:
        self._thread.start()
        return self

    def _sample(self) -> None:
        python = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        for tid, seconds in _task_cpu_s().items():
            if tid == self._own:
                continue
            self._last[tid] = seconds
            if tid not in self._group:
                name = python.get(tid)
                if name is None:
                    group = "pool"
                elif name.startswith("stage-"):
                    group = name.removeprefix("stage-")
                else:
                    group = "other"
                self._group[tid] = group

    def _loop(self) -> None:
        self._own = threading.get_native_id()
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval_s)

    def stop(self) -> dict[str, float]:
        """Stop sampling; CPU seconds by group (the stages, ``pool``, ``other``)."""
        self._sample()
        self._stop.set()
        self._thread.join()
        totals = dict.fromkeys(GROUPS, 0.0)
        for tid, seconds in self._last.items():
            group = self._group[tid]
            totals[group] = totals.get(group, 0.0) + seconds - self._baseline.get(tid, 0.0)
        return totals


def write_mjpeg_video(path: Path, frames: list[np.ndarray], fps: float) -> Path:
    """BGR frames as an MJPEG AVI (ffmpeg can serve it without re-encoding)."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"this OpenCV cannot write MJPEG to {path}")
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()
    return path


class MjpegStream:
    """ffmpeg serving ``video`` on http://127.0.0.1:<port>/cam.mjpg at its frame rate, looping, to one client."""

    def __init__(self, video: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/cam.mjpg"
        self._command = [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-re",
            "-stream_loop",
            "-1",
            "-i",
            str(video),
            "-c",
            "copy",
            "-f",
            "mpjpeg",
            "-listen",
            "1",
            self.url,
        ]
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MjpegStream:
        self._process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        if self._process is not None:
            self._process.wait()
