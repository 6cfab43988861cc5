"""Sources that fail the way cameras fail, with real processes: a network camera (ffmpeg HTTP MJPEG) that
crashes and comes back, one that stays up but stops sending, one that is not there at start; a file read
that hangs in the kernel. The source must reconnect with backoff, trip its watchdog, say so in the log
and in its state, and never hang the pipeline.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import cv2
import pytest
from stream_server import MjpegServer, camera_video, needs_ffmpeg, numbered_frame

from edge_agent.config import SourceConfig
from edge_agent.inspection.drivers import Frame, SourceError
from edge_agent.inspection.frame_source import FrameSource

pytestmark = needs_ffmpeg


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return camera_video(tmp_path_factory.mktemp("camera") / "cam.avi", frames=100)


def live_config(url: str, **fields: object) -> SourceConfig:
    values: dict[str, object] = {
        "uri": url,
        "open_timeout_s": 2.0,
        "read_timeout_s": 1.0,
        "stall_timeout_s": 20.0,
        "reconnect_initial_s": 0.2,
        "reconnect_max_s": 1.0,
    }
    values.update(fields)
    return SourceConfig(**values)  # type: ignore[arg-type]


class StateLog:
    """Every state change a FrameSource reports, with the time."""

    def __init__(self, source: FrameSource) -> None:
        self.changes: list[tuple[float, str, str, str]] = []
        source.on_state = lambda old, new, reason: self.changes.append((time.monotonic(), old, new, reason))

    def path(self) -> list[str]:
        return [new for _, _, new, _ in self.changes]

    def reasons(self, state: str) -> list[str]:
        return [reason for _, _, new, reason in self.changes if new == state]


def read_frames(source: FrameSource, count: int, timeout: float) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        assert time.monotonic() < deadline, f"only {len(frames)} frames in {timeout} s; state {source.state}"
        frame = source.read()
        assert frame is not None
        frames.append(frame)
    return frames


def open_when_listening(source: FrameSource) -> None:
    """The first read opens it once ffmpeg listens (the reconnect loop retries meanwhile)."""
    with contextlib.suppress(SourceError):
        source.open()


def test_camera_crash_and_return_reconnects_and_resumes(video: Path, caplog: pytest.LogCaptureFixture) -> None:
    with MjpegServer(video) as server:
        source = FrameSource(live_config(server.url))
        states = StateLog(source)
        open_when_listening(source)
        before = read_frames(source, 10, timeout=20)
        server.kill()
        restarted = threading.Timer(2.0, server.start)
        restarted.start()
        with caplog.at_level("INFO", logger="edge_agent.inspection.frame_source"):
            after = read_frames(source, 10, timeout=30)
        restarted.join()
        source.close()
    assert source.counters.reconnects >= 1 and source.counters.read_failures + source.counters.read_timeouts >= 1
    assert "reconnecting" in states.path() and states.path()[-2:] == ["open", "closed"]
    # Sequence numbers run on across the reconnect: the pipeline and its messages see one stream.
    assert [f.sequence for f in before + after] == list(range(20))
    events = [getattr(r, "event", "") for r in caplog.records]
    for event in ("source_lost", "source_reconnecting", "source_reconnected", "source_state"):
        assert event in events, events
    # The last reconnect is the crash's (an earlier one may bring the camera up at start).
    reconnected = [r for r in caplog.records if getattr(r, "event", "") == "source_reconnected"][-1]
    assert reconnected.down_s >= 1.5  # type: ignore[attr-defined]


def test_server_up_but_silent_times_out_the_read_and_reopens(video: Path) -> None:
    with MjpegServer(video) as server:
        source = FrameSource(live_config(server.url, read_timeout_s=1.0))
        states = StateLog(source)
        open_when_listening(source)
        read_frames(source, 5, timeout=20)
        before = len(states.changes)
        server.pause()
        result: list[Frame | None] = []
        reader = threading.Thread(target=lambda: result.append(source.read()), daemon=True)
        reader.start()
        deadline = time.monotonic() + 10
        while "reconnecting" not in states.path()[before:] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert states.changes[before][2:] == ("reconnecting", "read_timeout"), states.changes
        assert source.counters.read_timeouts == 1 and "no data for" in source.last_error
        server.resume()
        server.restart()  # the paused ffmpeg lost its only client; a camera reboot brings a fresh one
        reader.join(30)
        assert result and result[0] is not None, "the source must come back after the server does"
        source.close()


def test_stall_watchdog_reopens_when_reads_block_longer_than_it_allows(
    video: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # read_timeout_s is long here (a camera on an external trigger may legitimately wait); the watchdog
    # still reopens a source that delivered nothing for stall_timeout_s, abandoning the blocked call.
    with MjpegServer(video) as server:
        source = FrameSource(live_config(server.url, read_timeout_s=30.0, stall_timeout_s=2.0))
        states = StateLog(source)
        open_when_listening(source)
        read_frames(source, 5, timeout=20)
        server.pause()
        paused_at = time.monotonic()
        threading.Timer(4.0, lambda: (server.resume(), server.restart())).start()
        with caplog.at_level("WARNING", logger="edge_agent.inspection.frame_source"):
            frames = read_frames(source, 3, timeout=30)
        source.close()
    stalled = [t for t, _, new, reason in states.changes if new == "reconnecting" and reason == "stalled"]
    assert stalled, states.changes
    assert 1.5 <= stalled[0] - paused_at <= 4.0  # the watchdog fired at ~2 s, not at the 30 s read timeout
    lost = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "source_lost"]
    assert source.counters.stalls == 1 and "no frame for 2 s (stall watchdog)" in lost[0]
    assert frames[0].sequence == 5


def test_camera_missing_at_start_is_retried_with_growing_jittered_backoff(
    video: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = MjpegServer(video)
    source = FrameSource(live_config(server.url, reconnect_initial_s=0.4, reconnect_max_s=1.6))
    with pytest.raises(SourceError, match=r"could not be opened"):
        source.open()
    assert source.state == "failed"
    starter = threading.Timer(5.0, server.start)
    starter.start()
    try:
        with caplog.at_level("INFO", logger="edge_agent.inspection.frame_source"):
            frame = source.read()
        assert frame is not None and frame.sequence == 0
    finally:
        starter.join()
        source.close()
        server.kill()
    delays = [r.retry_in_s for r in caplog.records if getattr(r, "event", "") == "source_reconnecting"]  # type: ignore[attr-defined]
    bases = [min(1.6, 0.4 * 2**i) for i in range(len(delays))]
    assert len(delays) >= 3
    assert all(base / 2 - 0.01 <= d <= base + 0.01 for d, base in zip(delays, bases, strict=True)), delays
    assert max(delays) <= 1.6 + 0.01


def test_stop_interrupts_a_reconnecting_source_quickly(video: Path) -> None:
    source = FrameSource(live_config(MjpegServer(video).url, reconnect_initial_s=5.0, reconnect_max_s=5.0))
    with pytest.raises(SourceError):
        source.open()
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(source.read()), daemon=True)
    reader.start()
    time.sleep(0.5)
    stopped = time.monotonic()
    source.cancel()
    reader.join(5)
    assert result == [None] and time.monotonic() - stopped < 1.0
    source.close()


def test_a_file_read_that_hangs_is_an_error_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for index in range(4):
        cv2.imwrite(str(folder / f"part_{index}.png"), numbered_frame(index))
    source = FrameSource(SourceConfig(uri=str(folder), read_timeout_s=1.0))
    source.open()
    # The listed last image becomes a FIFO: cv2.imread blocks in open(2), as on a dead network share.
    os.mkfifo(tmp_path / "fifo")
    os.replace(tmp_path / "fifo", folder / "part_3.png")
    assert [source.read().sequence for _ in range(3)] == [0, 1, 2]  # type: ignore[union-attr]
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"part_3\.png\): a read blocked for more than 1 s"):
        source.read()
    assert time.monotonic() - started < 3.0
    source.close()
    with open(folder / "part_3.png", "wb"):  # release the abandoned reader thread
        pass


def test_roi_that_no_longer_fits_is_fatal_not_a_reconnect_loop(video: Path) -> None:
    with MjpegServer(video) as server:
        source = FrameSource(live_config(server.url, roi=(100, 0, 100, 50)))
        open_when_listening(source)
        with pytest.raises(SourceError, match=r"source\.roi \[100, 0, 100, 50\] does not fit inside the 160x120"):
            source.read()
        source.close()
