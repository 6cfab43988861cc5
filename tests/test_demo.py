"""The demo's conveyor ground truth, and the demo's whole flow (video, broker, agent, relay, summary).

Training inside the demo takes minutes, so here the demo runs with ``--bundle`` (the tiny bundle);
its wall time with training is measured by running ``edge-agent demo`` itself (see the report).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from edge_agent.demo.conveyor import Conveyor, ConveyorSpec, good_training_frames, write_conveyor_video


def test_conveyor_ground_truth_matches_the_pixels() -> None:
    spec = ConveyorSpec(width=96, height=96, parts=5, speed_px=6, defect_parts=(1, 3), seed=3)
    with_defects = Conveyor(spec)
    without = Conveyor(spec, good_only=True)
    truth = with_defects.truth()
    assert truth.frames == with_defects.frames == without.frames
    assert set(truth.defect_frames) | set(truth.partial_frames) | set(truth.clean_frames) == set(range(truth.frames))
    assert truth.defect_frames and truth.partial_frames and truth.clean_frames
    for index in range(truth.frames):
        changed = np.abs(with_defects.frame(index).astype(int) - without.frame(index).astype(int)).max(axis=2) > 20
        if index in truth.clean_frames:
            assert not changed.any(), f"frame {index} is called clean but shows defect pixels"
        else:
            assert changed.any(), f"frame {index} is said to show a defect but does not"
        if index in truth.defect_frames:
            # The whole defect is in view: nothing of it is cut by the frame's left or right edge.
            assert not changed[:, 0].any() and not changed[:, -1].any()
    kinds = [p.kind for p in truth.parts]
    assert kinds == [None, "scratch", None, "dark_blob", None]


def test_training_frames_have_no_defects_and_vary() -> None:
    spec = ConveyorSpec(width=64, height=64, speed_px=2)
    frames = good_training_frames(spec, 24, seed=5)
    assert len(frames) == 24 and all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
    assert len({f.tobytes() for f in frames}) == 24


def test_conveyor_video_decodes_losslessly(tmp_path: Path) -> None:
    spec = ConveyorSpec(width=64, height=64, parts=2, speed_px=8, defect_parts=(1,))
    truth = write_conveyor_video(tmp_path / "c.avi", spec)
    capture = cv2.VideoCapture(str(tmp_path / "c.avi"))
    decoded = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        decoded.append(frame)
    assert len(decoded) == truth.frames
    reference = Conveyor(spec)
    assert all(np.array_equal(decoded[i], reference.frame(i)) for i in (0, truth.frames // 2, truth.frames - 1))


def test_demo_flow_with_a_given_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "demo",
            "--bundle",
            str(tiny_bundle),
            "--workdir",
            str(tmp_path),
            "--frame-size",
            "128",
            "--parts",
            "4",
            "--threads",
            "1",
            "--mode",
            "frames",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for step in ("Step 3/5", "Step 4/5", "Step 5/5", "Summary"):
        assert step in out
    frames = int(re.search(r"frames in the video \.+ (\d+)", out).group(1))
    received = re.search(r"inspection messages received \.+ (\d+) \(one per frame, in order: (\w+)\)", out)
    assert int(received.group(1)) == frames and received.group(2) == "True"
    assert "[relay] agent status: online" in out and "[relay] agent status: stopped" in out
    assert re.search(r"demo wall time \.+ [\d.]+ s", out)
    assert (tmp_path / "conveyor.avi").is_file() and (tmp_path / "agent.toml").is_file()
    assert '"event": "agent_stopped"' in (tmp_path / "agent.log").read_text()
