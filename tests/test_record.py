"""Recording good images (edge_agent/service/recorder.py, ``edge-agent record``) from real ffmpeg videos and streams."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from stream_server import MjpegServer, needs_ffmpeg

from edge_agent.config import SourceConfig
from edge_agent.inspection.frame_source import FrameSource, SourceError
from edge_agent.service.recorder import FrameRecorder, RecordSettings

SIZE = "160x120"


def _lavfi_video(path: Path, graph: str, seconds: float = 3.0) -> Path:
    """A real encoded video from an ffmpeg filter graph (H.264 in MP4, as a camera recording would be)."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", graph, "-t", str(seconds),
         "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", str(path)],
        check=True,
    )  # fmt: skip
    return path


# A still scene seen by a noisy sensor: the same bars with fresh noise in every frame.
STILL = f"smptebars=s={SIZE}:r=25,noise=alls=12:allf=t+u"
# A moving belt: the bars scroll by 2 % of the width per frame.
MOVING = f"smptebars=s={SIZE}:r=25,scroll=horizontal=0.02,noise=alls=12:allf=t+u"


def _record(source: FrameSource, recorder: FrameRecorder, limit: int = 500) -> int:
    seen = 0
    while seen < limit and not recorder.done and (frame := source.read()) is not None:
        recorder.offer(frame.image, frame.sequence)
        seen += 1
    return seen


@needs_ffmpeg
def test_a_still_scene_is_recorded_once(tmp_path: Path) -> None:
    video = _lavfi_video(tmp_path / "still.mp4", STILL)
    source = FrameSource(SourceConfig(uri=str(video)))
    source.open()
    recorder = FrameRecorder(tmp_path / "out", RecordSettings())
    try:
        seen = _record(source, recorder)
    finally:
        source.close()
    assert seen == 75
    assert recorder.counts.written == 1 and recorder.counts.duplicates == 74
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


@needs_ffmpeg
def test_a_moving_stream_is_recorded_frame_after_frame(tmp_path: Path) -> None:
    video = _lavfi_video(tmp_path / "moving.mp4", MOVING)
    with MjpegServer(video) as server:
        source = FrameSource(SourceConfig(uri=server.url, open_timeout_s=10.0, reconnect_initial_s=0.2))
        with contextlib.suppress(SourceError):  # the server needs a moment before it listens
            source.open()
        recorder = FrameRecorder(tmp_path / "out", RecordSettings(count=12))
        try:
            _record(source, recorder)
        finally:
            source.close()
    assert recorder.done and recorder.counts.written == 12
    # Live frames may repeat when the stream is read faster than it sends; most are new.
    assert recorder.counts.duplicates <= recorder.counts.seen // 4
    images = sorted((tmp_path / "out").glob("*.png"))
    assert len(images) == 12 and cv2.imread(str(images[0])).shape == (120, 160, 3)


def _frame(value: int) -> np.ndarray:
    rng = np.random.default_rng(value)
    image = np.full((48, 64, 3), value, dtype=np.uint8)
    image[:, : value % 64] = 255 - value
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


def test_skip_rules(tmp_path: Path) -> None:
    recorder = FrameRecorder(tmp_path / "a", RecordSettings(count=3, every_s=1.0, only_good=True))
    assert recorder.offer(_frame(10), 0, passed=True, now=0.0) == "written"
    assert recorder.offer(_frame(60), 1, passed=True, now=0.5) == "too_soon"
    assert recorder.offer(_frame(60), 2, passed=False, now=1.5) == "flagged"
    assert recorder.offer(_frame(10), 3, passed=True, now=2.0) == "duplicate"
    assert recorder.offer(_frame(60), 4, passed=True, now=3.0) == "written"
    assert recorder.offer(_frame(120), 5, passed=True, now=4.0) == "written"
    assert recorder.done and recorder.offer(_frame(200), 6, passed=True, now=9.0) == "done"
    summary = recorder.summary()
    assert summary["written"] == 3 and summary["flagged"] == 1 and summary["duplicates"] == 1
    with pytest.raises(ValueError, match="count"):
        RecordSettings(count=0)


def test_the_record_command_writes_only_good_frames(tmp_path: Path, contract_bundle: Path) -> None:
    import json
    import sys

    from agent_harness import REPO, write_frames, write_toml

    frames = write_frames(tmp_path / "frames", 12)  # frame 3 holds a defect
    config = write_toml(
        tmp_path / "agent.toml",
        {"state_dir": str(tmp_path / "state"), "model": {"bundle": str(contract_bundle), "backend": "onnxruntime",
         "threads": 1}, "source": {"uri": str(frames)}},
    )  # fmt: skip
    out = tmp_path / "good"
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "record", "--config", str(config), "--out", str(out), "--count", "5",
         "--only-good"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "5 images in" in result.stderr and f"uflow train --data {out} --out runs/good" in result.stderr
    assert "[##############################] 5/5 images" in result.stderr  # the progress bar, full
    assert len(list(out.glob("*.png"))) == 5
    summary = json.loads((out / "record.json").read_text())
    assert summary["written"] == 5 and summary["flagged"] == 1 and summary["seen"] == 6
    bad = subprocess.run([sys.executable, "-m", "edge_agent.cli", "record", "--config", str(config), "--out",
                          str(out), "--count", "0"], capture_output=True, text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "count must be at least 1" in bad.stderr
