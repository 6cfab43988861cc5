"""Frame sources on real files: video, image folder, a live HTTP stream served by ffmpeg; clear errors."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from stream_server import MjpegServer, camera_video, needs_ffmpeg, numbered_frame

from edge_agent.config import SourceConfig
from edge_agent.demo.conveyor import write_video as write_conveyor_video
from edge_agent.inspection.drivers import SourceError, describe_video_io, detect_kind, has_gstreamer
from edge_agent.inspection.frame_source import FrameSource, crop


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    height, width = frames[0].shape[:2]
    write_conveyor_video(path, frames, fps, (width, height))
    return path


def read_all(source: FrameSource, limit: int = 1000) -> list:
    frames = []
    while len(frames) < limit and (frame := source.read()) is not None:
        frames.append(frame)
    return frames


def test_detect_kind(tmp_path: Path) -> None:
    assert detect_kind("0") == "camera"
    assert detect_kind("/dev/video2") == "camera"
    assert detect_kind("rtsp://10.0.0.5/stream1") == "stream"
    assert detect_kind("http://cam.local/mjpeg") == "stream"
    assert detect_kind("videotestsrc ! videoconvert ! appsink") == "gstreamer"
    assert detect_kind(str(tmp_path)) == "folder"
    assert detect_kind(str(tmp_path / "line.mp4")) == "file"


def test_video_file_every_frame_in_order_with_metadata(tmp_path: Path) -> None:
    path = write_video(tmp_path / "line.avi", [numbered_frame(i) for i in range(8)])
    source = FrameSource(SourceConfig(uri=str(path)))
    source.open()
    before = time.time()
    frames = read_all(source)
    source.close()
    assert not source.live and not source.drop_frames
    assert [f.sequence for f in frames] == list(range(8))
    levels = [float(f.image.mean()) for f in frames]
    assert levels == sorted(levels) and abs(levels[0] - 10) < 4 and abs(levels[-1] - 150) < 4
    assert all(f.image.shape == (48, 64, 3) and f.frame_size == (64, 48) for f in frames)
    assert all(before - 1 <= f.capture_time <= time.time() for f in frames)
    assert source.state == "closed"


def test_video_file_loops_and_sequence_continues(tmp_path: Path) -> None:
    path = write_video(tmp_path / "line.avi", [numbered_frame(i) for i in range(3)])
    source = FrameSource(SourceConfig(uri=str(path), loop=True))
    source.open()
    frames = read_all(source, limit=7)
    assert [f.sequence for f in frames] == list(range(7))
    levels = [round(float(f.image.mean()) / 20) for f in frames]
    assert levels[:3] == levels[3:6]


def test_folder_sorted_and_unreadable_files_skipped(tmp_path: Path) -> None:
    for index in (2, 0, 1):
        cv2.imwrite(str(tmp_path / f"part_{index:02d}.png"), numbered_frame(index))
    (tmp_path / "part_01b.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    source = FrameSource(SourceConfig(uri=str(tmp_path)))
    source.open()
    frames = read_all(source)
    assert source.kind == "folder"
    assert [float(f.image.mean()) for f in frames] == [10.0, 30.0, 50.0]
    assert [p.name for p in source.raw.skipped] == ["part_01b.png"]


def test_roi_and_rotation_give_source_frame_offsets(tmp_path: Path) -> None:
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[5, 7] = 255  # a marker at x=7, y=5 in the camera image
    cv2.imwrite(str(tmp_path / "a.png"), image)
    source = FrameSource(SourceConfig(uri=str(tmp_path), rotate=90, roi=(20, 3, 20, 30)))
    source.open()
    frame = source.read()
    assert frame is not None
    # Rotated 90 clockwise the frame is 40 wide and 60 high; the marker moves to x = 40-1-5 = 34, y = 7.
    assert frame.frame_size == (40, 60)
    assert frame.roi_offset == (20, 3)
    assert frame.image.shape == (30, 20, 3)
    ys, xs = np.nonzero(frame.image[:, :, 0])
    assert (int(xs[0]) + 20, int(ys[0]) + 3) == (34, 7)


def test_roi_outside_frame_is_an_error_naming_roi_and_size() -> None:
    with pytest.raises(SourceError, match=r"source\.roi \[50, 0, 20, 10\] does not fit inside the 60x40 frame"):
        crop(np.zeros((40, 60, 3), np.uint8), (50, 0, 20, 10))


def test_fps_limit_paces_a_file(tmp_path: Path) -> None:
    for index in range(5):
        cv2.imwrite(str(tmp_path / f"{index}.png"), numbered_frame(index))
    source = FrameSource(SourceConfig(uri=str(tmp_path), fps_limit=20.0))
    source.open()
    started = time.monotonic()
    frames = read_all(source)
    assert len(frames) == 5  # a file never drops frames, it waits
    assert time.monotonic() - started >= 4 / 20.0 - 0.01


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    source = FrameSource(SourceConfig(uri=str(tmp_path / "missing.mp4")))
    with pytest.raises(SourceError, match=r"video file .*missing\.mp4 does not exist"):
        source.open()
    assert source.state == "failed"


def test_undecodable_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(SourceError, match=r"broken\.mp4 cannot be decoded by OpenCV"):
        FrameSource(SourceConfig(uri=str(path))).open()


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"holds no images"):
        FrameSource(SourceConfig(uri=str(tmp_path))).open()


def test_missing_camera_is_a_clear_error() -> None:
    with pytest.raises(SourceError, match=r"camera .* (could not be opened|does not exist)"):
        FrameSource(SourceConfig(uri="/dev/video63")).open()
    with pytest.raises(SourceError, match=r"camera 63 could not be opened"):
        FrameSource(SourceConfig(uri="63")).open()


def test_gstreamer_pipeline_without_gstreamer_says_so() -> None:
    if has_gstreamer():
        pytest.skip("this OpenCV has GStreamer")
    with pytest.raises(SourceError, match=r"no GStreamer backend"):
        FrameSource(SourceConfig(uri="videotestsrc ! videoconvert ! appsink")).open()


def test_video_io_description_lists_backends() -> None:
    info = describe_video_io()
    assert "FFMPEG" in info["stream_backends"]
    assert isinstance(info["gstreamer"], bool)


@needs_ffmpeg
def test_live_http_mjpeg_stream_served_by_ffmpeg(tmp_path: Path) -> None:
    video = camera_video(tmp_path / "cam.avi", frames=300)
    with MjpegServer(video) as server:
        source = FrameSource(SourceConfig(uri=server.url, open_timeout_s=10.0, reconnect_initial_s=0.2))
        with contextlib.suppress(SourceError):  # the server needs a moment before it listens: read() reconnects
            source.open()
        frames = [source.read() for _ in range(5)]
        source.close()
    assert source.kind == "stream" and source.live and source.drop_frames
    assert [f.sequence for f in frames] == list(range(5))
    assert all(f.image.shape == (120, 160, 3) for f in frames)
