"""End to end: ``edge-agent run`` as a real subprocess (torch blocked) on a video with known defect frames,
the real tiny U-Flow bundle, a real mosquitto and a subscriber acting as the reject relay; systemd
notifications on a real datagram socket; SIGTERM; a broker that is down at start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from mqtt_broker import MosquittoBroker, Subscriber, free_port
from torch_block import torch_free_env

from edge_agent.demo.conveyor import write_video
from training.synthetic import defect_image, good_image

FRAME_SIZE = 160  # camera pixels; the tiny bundle runs at 128, so the agent resizes and maps boxes back
DEFECT_FRAMES = {3: "dark_blob", 8: "bright_blob", 13: "scratch", 17: "dark_blob"}
N_FRAMES = 20
DEFECT_GAIN = 2.0


@dataclass(frozen=True)
class Video:
    path: Path
    frames: int
    defect_boxes: dict[int, tuple[int, int, int, int]]  # frame -> mask bbox x0, y0, x1, y1 (inclusive)


@pytest.fixture(scope="module")
def e2e_video(tmp_path_factory: pytest.TempPathFactory) -> Video:
    """A lossless video of parts never seen in training; clearly visible defects in DEFECT_FRAMES.

    The planted defects are drawn at twice the synthetic generator's contrast: this test is about the
    agent's path (video -> engine -> NFA -> MQTT), not the tiny model's limit of detection, which
    tests/test_training.py measures on the generator's own defects.
    """
    frames, boxes = [], {}
    for index in range(N_FRAMES):
        seed = 900_000 + index
        good = good_image(seed, FRAME_SIZE, FRAME_SIZE)
        if index in DEFECT_FRAMES:
            sample = defect_image(seed, FRAME_SIZE, FRAME_SIZE, DEFECT_FRAMES[index])
            rgb = np.clip(good + DEFECT_GAIN * (sample.image.astype(np.float64) - good), 0, 255).astype(np.uint8)
            ys, xs = np.nonzero(sample.mask)
            boxes[index] = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        else:
            rgb = good
        frames.append(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    path = tmp_path_factory.mktemp("e2e_video") / "line.avi"
    write_video(path, frames, 10.0, (FRAME_SIZE, FRAME_SIZE))
    return Video(path, N_FRAMES, boxes)


def write_config(
    tmp_path: Path, bundle: Path, video: Path, port: int, loop: bool = False, device: str = "line1"
) -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "{device}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        'log_format = "json"\n'
        "[model]\n"
        f'bundle = "{bundle}"\n'
        'backend = "onnxruntime"\n'
        "threads = 1\n"
        "[source]\n"
        f'uri = "{video}"\n'
        f"loop = {'true' if loop else 'false'}\n"
        "[mqtt]\n"
        f"port = {port}\n"
        "reconnect_initial_s = 1\n"
        "reconnect_max_s = 2\n"
        "message_expiry_s = 120\n"
    )
    return config


@pytest.fixture(scope="module")
def numba_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Numba JIT cache for every agent start in this module (a device keeps it in its state dir)."""
    return tmp_path_factory.mktemp("numba_cache")


def start_agent(
    tmp_path: Path, config: Path, numba_cache: Path, env_extra: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    env = torch_free_env(tmp_path / "block")
    env["NUMBA_CACHE_DIR"] = str(numba_cache)
    env.update(env_extra or {})
    log = (tmp_path / "agent.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def log_events(tmp_path: Path) -> list[dict[str, object]]:
    events = []
    for line in (tmp_path / "agent.log").read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def inspections(subscriber: Subscriber) -> list[dict]:
    return [m.json() for m in subscriber.on("/inspection")]


def overlaps(bbox: list[int], box: tuple[int, int, int, int]) -> bool:
    x, y, w, h = bbox
    x0, y0, x1, y1 = box
    return x <= x1 and x + w - 1 >= x0 and y <= y1 and y + h - 1 >= y0


def test_video_through_edge_agent_run_one_message_per_frame(
    tiny_bundle: Path,
    e2e_video: Video,
    broker: MosquittoBroker,
    tmp_path: Path,
    numba_cache: Path,
) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    subscriber = Subscriber(broker, "uflow/line1/#")
    config = write_config(tmp_path, tiny_bundle, e2e_video.path, broker.port)
    agent = start_agent(
        tmp_path, config, numba_cache, {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"}
    )
    try:
        code = agent.wait(timeout=240)
    finally:
        agent.kill()
    assert code == 0, (tmp_path / "agent.log").read_text()[-3000:]
    assert subscriber.wait_for(lambda ms: any(m.payload == b"stopped" for m in ms), timeout=10)
    subscriber.close()

    received = inspections(subscriber)
    assert [m["sequence"] for m in received] == list(range(e2e_video.frames)), "one message per frame, in order"
    assert len({m["message_id"] for m in received}) == e2e_video.frames
    flagged = {m["sequence"] for m in received if m["anomalous"]}
    assert flagged == set(DEFECT_FRAMES), f"flagged {sorted(flagged)}, defects in {sorted(DEFECT_FRAMES)}"
    for message in received:
        assert message["frame_size"] == [FRAME_SIZE, FRAME_SIZE]
        assert message["model"]["name"] == "tiny" and message["model"]["backend"] == "onnxruntime"
        assert message["latency_ms"]["infer"] > 0 and message["latency_ms"]["total"] > 0
        if message["anomalous"]:
            box = e2e_video.defect_boxes[message["sequence"]]
            assert any(overlaps(r["bbox"], box) for r in message["regions"]), (message["regions"], box)
            assert all(r["log_nfa"] < message["log10_epsilon"] for r in message["regions"])
            assert all(r["bbox"][0] >= 0 and r["bbox"][0] + r["bbox"][2] <= FRAME_SIZE for r in message["regions"])
        else:
            assert message["regions"] == []
    assert [m.payload for m in subscriber.on("/status")] == [b"online", b"stopped"]

    events = [e.get("event") for e in log_events(tmp_path)]
    for before in ("engine_loaded", "warmed_up", "source_opened"):
        assert events.index(before) < events.index("agent_ready")
    assert "source_ended" in events and events[-1] == "agent_stopped"

    notify.settimeout(0.2)
    datagrams = []
    while True:
        try:
            datagrams.append(notify.recv(4096).decode())
        except TimeoutError:
            break
    notify.close()
    ready = next(i for i, d in enumerate(datagrams) if d.startswith("READY=1"))
    assert "fps" in datagrams[ready] and "model tiny" in datagrams[ready]
    assert any(d == "WATCHDOG=1" for d in datagrams[ready:])
    assert datagrams[-1].startswith("STOPPING=1")


def test_sigterm_stops_cleanly_with_stopped_status(
    tiny_bundle: Path,
    e2e_video: Video,
    broker: MosquittoBroker,
    tmp_path: Path,
    numba_cache: Path,
) -> None:
    subscriber = Subscriber(broker, "uflow/line1/#")
    config = write_config(tmp_path, tiny_bundle, e2e_video.path, broker.port, loop=True)
    agent = start_agent(tmp_path, config, numba_cache)
    try:
        assert subscriber.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("inspection")]) >= 5, 180)
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=60)
    finally:
        agent.kill()
    assert code == 0, (tmp_path / "agent.log").read_text()[-3000:]
    assert subscriber.wait_for(lambda ms: ms[-1].payload == b"stopped", timeout=10)
    subscriber.close()
    received = [m["sequence"] for m in inspections(subscriber)]
    # Frames already captured were drained and published: a gap-free run from 0.
    assert received == list(range(len(received)))
    stopped = next(e for e in log_events(tmp_path) if e.get("event") == "agent_stopped")
    assert stopped["frames"] == len(received) and stopped["failed"] is False
    late = Subscriber(broker, "uflow/line1/status")
    assert late.wait_for(lambda ms: len(ms) == 1, timeout=30) and late.messages[0].payload == b"stopped"
    late.close()


def test_broker_down_at_start_does_not_crash_the_agent(
    tiny_bundle: Path,
    e2e_video: Video,
    broker_factory,
    tmp_path: Path,
    numba_cache: Path,
) -> None:
    port = free_port()
    config = write_config(tmp_path, tiny_bundle, e2e_video.path, port, loop=True, device="line2")
    agent = start_agent(tmp_path, config, numba_cache)
    try:
        deadline = time.monotonic() + 120
        while not any(e.get("event") == "mqtt_unreachable" for e in log_events(tmp_path)):
            assert agent.poll() is None, (tmp_path / "agent.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the agent never said the broker is unreachable"
            time.sleep(0.5)
        time.sleep(2.0)
        assert agent.poll() is None, "the agent must keep running without a broker"
        late_broker = broker_factory(port=port)
        subscriber = Subscriber(late_broker, "uflow/line2/#")
        assert subscriber.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("inspection")]) >= 3, 60)
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=60)
    finally:
        agent.kill()
    assert code == 0, (tmp_path / "agent.log").read_text()[-3000:]
    assert subscriber.wait_for(lambda ms: ms[-1].payload == b"stopped", timeout=10)
    subscriber.close()
    received = sorted(m["sequence"] for m in inspections(subscriber))
    # Frames inspected while the broker was down were queued and delivered once it came up.
    assert received[0] == 0 and received == list(range(len(received)))
    assert b"online" in [m.payload for m in subscriber.on("/status")]


def test_missing_bundle_exits_1_with_a_clear_error(tmp_path: Path, e2e_video: Video) -> None:
    config = write_config(tmp_path, tmp_path / "no-bundle", e2e_video.path, free_port())
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert result.returncode == 1
    assert "no-bundle does not exist or is not a directory" in result.stderr
    # issue 21: it failed only after opening the source and the NFA warm-up (19 s on a small box)
    events = [json.loads(line)["event"] for line in result.stderr.splitlines() if line.startswith("{")]
    assert events[-1] == "model_failed"
    assert not any(e.startswith("source") for e in events), events


def test_missing_video_exits_1_with_a_clear_error(tmp_path: Path, tiny_bundle: Path) -> None:
    config = write_config(tmp_path, tiny_bundle, tmp_path / "nope.mp4", free_port())
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "nope.mp4 does not exist" in result.stderr
