"""Recording good images with parts on: no frame that shows a defective or undecided part is written (issue 21).

Real parts: the agent in a thread (contract bundle on ONNX Runtime, real mosquitto) records from a looping belt
of PNG frames (tests/checker_belt.py) on which one part carries a defect the model flags; ``edge-agent record``
as a process on the same belt and on an ffmpeg-encoded video file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_harness import REPO, AgentThread, agent_config, send_command, write_toml
from checker_belt import CheckerBelt, write_checker_belt
from contract_bundle import build_contract_bundle
from mqtt_broker import MosquittoBroker, Subscriber
from stream_server import needs_ffmpeg

from edge_agent.service.record_gate import RecordGate

SPEC = CheckerBelt()
DEFECTIVE = SPEC.defect_parts[0]


@pytest.fixture(scope="module")
def belt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checker_belt(tmp_path_factory.mktemp("belt") / "frames", SPEC)


@pytest.fixture(scope="module")
def belt_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A contract bundle at the belt's frame size (no resize: the 8x8 block means stay flat)."""
    return build_contract_bundle(tmp_path_factory.mktemp("belt_bundle"), height=SPEC.height, width=SPEC.width)


def _frames_written(folder: Path, belt: Path) -> list[int]:
    """The belt frame index of every written image (checked pixel for pixel against the source frame)."""
    indices = []
    for image in sorted(folder.glob("*.png")):
        sequence = int(image.stem.split("-")[-2])
        index = sequence % SPEC.frames
        source = cv2.imread(str(belt / f"{index:06d}.png"))
        assert np.array_equal(cv2.imread(str(image)), source), image.name
        indices.append(index)
    return indices


def test_cmd_record_writes_no_frame_of_a_defective_part(
    tmp_path: Path, broker: MosquittoBroker, belt: Path, belt_bundle: Path
) -> None:
    values = agent_config(tmp_path / "state", belt_bundle, str(belt), broker.port,
                          source={"loop": True, "fps_limit": 25.0}, parts={"mode": "tracked"})  # fmt: skip
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    try:
        assert subscriber.wait_for(lambda ms: sum(m.topic.endswith("/inspection") for m in ms) >= 3, 60)
        send_command(broker, "record", {"count": 10_000, "only_good": True, "min_difference": 0})
        assert subscriber.wait_for(lambda ms: any(m.topic.endswith("/cmd/record/result") for m in ms), 30)
        reply = subscriber.on("/cmd/record/result")[0].json()
        assert reply["ok"], reply
        out = Path(reply["data"]["out"])
        before = len(subscriber.on("/part"))
        # Two passes of the defective part after the recording began (the belt loops every few seconds).
        assert subscriber.wait_for(
            lambda ms: (
                sum(m.json()["anomalous"] for m in ms[before:] if m.topic.endswith("/part")) >= 2
                and sum(m.topic.endswith("/part") for m in ms[before:]) >= 9
            ),
            120,
        ), [m.json() for m in subscriber.on("/part")]
        send_command(broker, "record", {"stop": True})
        assert subscriber.wait_for(lambda ms: sum(m.topic.endswith("/cmd/record/result") for m in ms) >= 2, 30)
    finally:
        assert agent.stop() == 0
        subscriber.close()
    written = _frames_written(out, belt)
    shown = [i for i in written if SPEC.in_view(i, DEFECTIVE)]
    assert shown == [], f"frames showing the defective part were recorded: {shown}"
    # Good parts were recorded (the gate holds frames until their parts pass; it does not drop everything).
    assert any(SPEC.in_view(i, p) for i in written for p in range(SPEC.parts) if p != DEFECTIVE)
    summary = json.loads((out / "record.json").read_text())
    assert summary["written"] == len(written) and summary["flagged"] > 0


def _record(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "record", "--config", str(config), "--out", str(out), *extra],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip


def test_record_command_in_tracked_mode_waits_for_the_parts(tmp_path: Path, belt: Path, belt_bundle: Path) -> None:
    config = write_toml(tmp_path / "agent.toml", {
        "state_dir": str(tmp_path / "state"),
        "model": {"bundle": str(belt_bundle), "backend": "onnxruntime", "threads": 1},
        "source": {"uri": str(belt)}, "parts": {"mode": "tracked"},
    })  # fmt: skip
    result = _record(config, tmp_path / "good", "--only-good", "--min-difference", "0")
    assert result.returncode == 0, result.stderr
    written = _frames_written(tmp_path / "good", belt)
    assert written and not [i for i in written if SPEC.in_view(i, DEFECTIVE)]
    assert any(SPEC.in_view(i, 3) for i in written)  # the last part, decided when the folder ended
    assert "train with: uflow train --data " in result.stderr and " --out " in result.stderr


@needs_ffmpeg
def test_record_every_spaces_a_video_file_by_its_own_time(tmp_path: Path) -> None:
    video = tmp_path / "moving.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
         "smptebars=s=160x120:r=25,scroll=horizontal=0.02,noise=alls=12:allf=t+u", "-t", "4", "-pix_fmt", "yuv420p",
         "-c:v", "libx264", "-preset", "ultrafast", str(video)],
        check=True,
    )  # fmt: skip
    config = write_toml(tmp_path / "agent.toml", {"state_dir": str(tmp_path / "state"), "source": {"uri": str(video)}})
    result = _record(config, tmp_path / "out", "--every", "1")
    assert result.returncode == 0, result.stderr
    # 100 frames at 25 fps are 4 s of video: one image at 0, 1, 2 and 3 s, however fast the file is read.
    assert len(list((tmp_path / "out").glob("*.png"))) == 4


def test_the_gate_holds_frames_until_their_parts_are_decided() -> None:
    released: list[int] = []
    skipped: list[str] = []
    gate = RecordGate(lambda held: released.append(held.sequence), skipped.append)
    image = np.zeros((4, 4, 3), np.uint8)
    gate.offer(image, 0, 0.0, True, [], alive=[])  # empty belt: written at once
    gate.offer(image, 1, 0.1, True, ["a"], alive=["a"])
    gate.offer(image, 2, 0.2, True, ["a", "b"], alive=["a", "b"])
    gate.offer(image, 3, 0.3, False, ["b"], alive=["a", "b"])  # the frame itself is flagged
    gate.offer(image, 4, 0.4, True, ["b", "c"], alive=["a", "b", "c"])
    assert released == [0] and gate.held == 3
    gate.part_decided("a", anomalous=False)
    assert released == [0, 1]  # frame 2 still waits for b
    gate.part_decided("b", anomalous=True)
    assert released == [0, 1] and gate.held == 0  # 2 and 4 show b
    gate.offer(image, 5, 0.5, True, ["b", "c"], alive=["c"])  # b, decided, still in view
    gate.offer(image, 6, 0.6, True, ["d"], alive=["d"])
    gate.offer(image, 7, 0.7, True, [], alive=[])  # c and d vanished without a decision (noise)
    gate.offer(image, 8, 0.8, True, [], alive=[])
    assert released == [0, 1, 7, 8]
    assert skipped.count("flagged") == 4 and skipped.count("undecided") == 1
    spaced = RecordGate(lambda held: released.append(held.sequence), skipped.append, every_s=1.0)
    for sequence, clock in ((10, 0.0), (11, 0.5), (12, 1.0)):
        spaced.offer(image, sequence, clock, True)  # frame mode: the frame's own verdict, at once
    assert released[-2:] == [10, 12] and skipped[-1] == "too_soon"
