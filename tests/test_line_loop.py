"""The line-to-model loop in the running agent: kept frames, cmd/record, the review page, the shadow model, drift.

Real parts only: the agent in a thread with a contract bundle on ONNX Runtime, a real mosquitto, real HTTP,
frames from image folders and from videos ffmpeg encodes (as a camera's recording would be).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_harness import AgentThread, agent_config, http_get, send_command
from contract_bundle import build_contract_bundle
from mqtt_broker import MosquittoBroker, Subscriber, free_port
from stream_server import needs_ffmpeg

from edge_agent.bundle import read_manifest, write_manifest
from edge_agent.demo.synthetic import good_image
from edge_agent.inspection.drift import build_reference
from edge_agent.inspection.preprocess import model_input

# The bundles and frames fixtures: tests/agent_fixtures.py.


class Line:
    """A running agent with a subscriber on everything it publishes."""

    def __init__(self, agent: AgentThread, subscriber: Subscriber, broker: MosquittoBroker, http_port: int) -> None:
        self.agent, self.subscriber, self.broker, self.http_port = agent, subscriber, broker, http_port

    def stats(self) -> list[dict]:
        return [m.json() for m in self.subscriber.on("/stats")]

    def wait_stats(self, predicate, timeout: float = 30.0) -> dict:  # type: ignore[no-untyped-def]
        assert self.subscriber.wait_for(
            lambda ms: any(predicate(m.json()) for m in ms if m.topic.endswith("/stats")), timeout
        ), f"no stats message matched; last: {self.stats()[-1:]}"
        return next(s for s in reversed(self.stats()) if predicate(s))

    def command(self, name: str, payload: dict, timeout: float = 30.0) -> dict:
        before = len(self.subscriber.on(f"/cmd/{name}/result"))
        send_command(self.broker, name, payload)
        assert self.subscriber.wait_for(lambda ms: len([m for m in ms if m.topic.endswith(f"/cmd/{name}/result")])
                                        > before, timeout), f"no reply to {name}"  # fmt: skip
        return self.subscriber.on(f"/cmd/{name}/result")[before].json()


@pytest.fixture
def line(tmp_path: Path, bundles: dict[str, Path], frames: Path, broker: MosquittoBroker) -> Iterator[Line]:
    http_port = free_port()
    values = agent_config(
        tmp_path / "state", bundles["v1"], str(frames), broker.port, http_port,
        source={"loop": True, "fps_limit": 20.0},
        keep={"flagged": True, "min_free_mb": 0},
        http={"enabled": True, "port": http_port, "review": True},
        model={"bundle": str(bundles["v1"]), "backend": "onnxruntime", "threads": 1, "shadow": str(bundles["v2"]),
               "shadow_share": 0.5},
    )  # fmt: skip
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    # Commands reach an agent that is connected: wait for its first inspections.
    assert subscriber.wait_for(lambda ms: sum(m.topic.endswith("/inspection") for m in ms) >= 3, 60)
    yield Line(agent, subscriber, broker, http_port)
    assert agent.stop() == 0
    subscriber.close()


def test_flagged_frames_are_kept_counted_and_reviewable(line: Line, tmp_path: Path) -> None:
    stats = line.wait_stats(lambda s: (s.get("kept") or {}).get("kept_flagged", 0) >= 2, timeout=60)
    assert stats["kept"]["kept_good"] == 0 and stats["kept"]["problem"] == ""
    kept = sorted((tmp_path / "state" / "kept").iterdir())
    assert kept and all(json.loads((k / "inspection.json").read_text())["anomalous"] for k in kept)
    status, _, metrics = http_get(line.http_port, "/metrics")
    assert status == 200 and 'edge_agent_kept_frames_total{kind="flagged"}' in metrics
    status, _, body = http_get(line.http_port, "/review.json")
    listed = json.loads(body)["frames"]
    assert status == 200 and listed and listed[0]["anomalous"]


def test_the_shadow_model_agrees_and_is_counted(line: Line) -> None:
    stats = line.wait_stats(lambda s: (s.get("shadow") or {}).get("compared", 0) >= 3, timeout=60)
    shadow = stats["shadow"]
    assert shadow["candidate"] == "contract 2.0.0" and shadow["agreement"] == 1.0
    assert (
        shadow["compared"] + shadow["skipped_share"] + shadow["skipped_busy"] + shadow["skipped_backlog"]
        <= (shadow["offered"])
    )
    # The share (0.5) bounds what the shadow takes whatever the machine's speed: a frame that finds it busy
    # is skipped as busy and keeps its credit, so how the rest splits into share and busy skips is timing.
    assert shadow["compared"] <= shadow["offered"] * 0.5 + 1 and shadow["skipped_share"] >= 1
    _, _, metrics = http_get(line.http_port, "/metrics")
    assert 'edge_agent_shadow_frames_total{outcome="compared"}' in metrics


def test_cmd_record_writes_a_training_folder(line: Line, tmp_path: Path) -> None:
    reply = line.command("record", {"count": 4, "only_good": True, "request_id": "rec1"})
    assert reply["ok"] and reply["request_id"] == "rec1"
    out = Path(reply["data"]["out"])
    assert out.parent == tmp_path / "state" / "training" / "good"
    busy = line.command("record", {"count": 4})
    assert not busy["ok"] and "already running" in busy["message"]
    stats = line.wait_stats(lambda s: (s.get("recording") or {}).get("done") is True, timeout=60)
    assert stats["recording"]["written"] == 4
    assert len(list(out.glob("*.png"))) == 4
    assert line.command("record", {"stop": True})["message"] == "no recording is running"


# -- drift on a camera video -----------------------------------------------------------------------

STEP_AT = 40
WINDOW = 30


def _camera_video(folder: Path, change) -> Path:  # type: ignore[no-untyped-def]
    """An MJPEG video (as an IP camera sends) of different good surfaces; ``change`` applies from STEP_AT on."""
    folder.mkdir()
    for i in range(STEP_AT + 2 * WINDOW):
        rgb = good_image(500 + i, 96, 96)
        if i >= STEP_AT:
            rgb = change(rgb)
        cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    video = folder / "camera.avi"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-framerate", "25", "-i",
                    str(folder / "%04d.png"), "-c:v", "mjpeg", "-q:v", "3", str(video)], check=True)  # fmt: skip
    return video


def _bundle_trained_on(root: Path, video: Path) -> Path:
    """A contract bundle whose drift reference comes from the video's first frames (the recorded training images)."""
    bundle = build_contract_bundle(root)
    capture = cv2.VideoCapture(str(video))
    images = []
    while len(images) < STEP_AT:
        ok, frame = capture.read()
        assert ok
        images.append(model_input(frame, 64, 64))
    capture.release()
    manifest = read_manifest(bundle)
    write_manifest(bundle, manifest.model_copy(update={"drift_reference": build_reference(np.stack(images))}))
    return bundle


def _brighter(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb * 1.15), 0, 255).astype(np.uint8)


def _defocused(rgb: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(rgb, (0, 0), 1.5)


@needs_ffmpeg
@pytest.mark.parametrize(
    ("change", "reason", "other"), [(_brighter, "brightness", "blur"), (_defocused, "blur", "brightness")]
)
def test_a_step_on_the_camera_raises_its_drift_reason_within_the_window(  # type: ignore[no-untyped-def]
    change, reason: str, other: str, tmp_path: Path, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    video = _camera_video(tmp_path / "camera", change)
    bundle = _bundle_trained_on(tmp_path / "bundle", video)
    http_port = free_port()
    values = agent_config(tmp_path / "state", bundle, str(video), broker.port, http_port,
                          drift={"window": WINDOW, "min_frames": 10, "sample_every_s": 0.0})  # fmt: skip
    last: dict = {}
    caplog.set_level(logging.INFO, logger="edge_agent")

    def health_at_the_end(job) -> None:  # type: ignore[no-untyped-def]
        if job.frame.sequence == STEP_AT + 2 * WINDOW - 1:  # the last frame: ask /healthz while it still runs
            last.update(zip(("status", "type", "body"), http_get(http_port, "/healthz"), strict=True))

    agent = AgentThread.from_values(values, on_result=health_at_the_end).start()
    agent.thread.join(120)  # the video ends: the agent stops by itself
    assert agent.stop() == 0
    detected = [r for r in caplog.records if getattr(r, "event", "") == "drift_detected"]
    assert detected, "no drift was detected"
    first = detected[0]
    assert reason in first.reasons and other not in first.reasons
    # Sample n is frame n - 1 (every frame sampled): found after the step, within one window of it.
    assert STEP_AT < first.frames_sampled <= STEP_AT + WINDOW
    assert all(other not in r.reasons for r in detected)
    assert last["status"] == 503 and f"drift ({reason})" in last["body"]
    shutil.rmtree(tmp_path / "camera")


def test_a_disk_without_room_degrades_health_and_inspection_goes_on(
    tmp_path: Path, bundles: dict[str, Path], frames: Path, broker: MosquittoBroker
) -> None:
    # A file where the kept frames' folder should be: the writer fails as on a read-only mount.
    (tmp_path / "blocker").write_text("not a folder")
    http_port = free_port()
    values = agent_config(tmp_path / "state", bundles["v1"], str(frames), broker.port, http_port,
                          source={"loop": True, "fps_limit": 20.0},
                          keep={"flagged": True, "min_free_mb": 0, "dir": str(tmp_path / "blocker" / "kept")})  # fmt: skip
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    try:
        line = Line(agent, subscriber, broker, http_port)
        stats = line.wait_stats(lambda s: (s.get("kept") or {}).get("skipped_disk", 0) >= 1, timeout=60)
        assert stats["status"] == "degraded" and any("cannot write kept frames" in p for p in stats["problems"])
        status, _, body = http_get(http_port, "/healthz")
        assert status == 503 and "cannot write kept frames" in body
        before = stats["frames_inspected"]
        line.wait_stats(lambda s: s["frames_inspected"] >= before + 10, timeout=30)  # inspection goes on
    finally:
        assert agent.stop() == 0
        subscriber.close()


def _contract_with_reference(root: Path, version: str, gain: float) -> Path:
    """A contract bundle whose training images were the contract's good frames times ``gain``."""
    from contract_bundle import good_frame

    bundle = build_contract_bundle(root, version=version)
    rng = np.random.default_rng(7)
    images = np.stack([np.clip(good_frame(rng, 64, 64) * gain, 0, 255).astype(np.uint8) for _ in range(40)])
    manifest = read_manifest(bundle)
    write_manifest(bundle, manifest.model_copy(update={"drift_reference": build_reference(images)}))
    return bundle


def test_a_reloaded_model_is_compared_with_its_own_training_images(
    tmp_path: Path, frames: Path, broker: MosquittoBroker
) -> None:
    dim = _contract_with_reference(tmp_path / "dim", "1.0.0", gain=0.7)  # trained under dimmer light
    matching = _contract_with_reference(tmp_path / "matching", "2.0.0", gain=1.0)
    current = tmp_path / "current"
    current.symlink_to(dim)
    http_port = free_port()
    values = agent_config(tmp_path / "state", current, str(frames), broker.port, http_port,
                          source={"loop": True, "fps_limit": 30.0},
                          drift={"window": 20, "min_frames": 10, "sample_every_s": 0.0})  # fmt: skip
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    try:
        line = Line(agent, subscriber, broker, http_port)
        stats = line.wait_stats(lambda s: "brightness" in ((s.get("drift") or {}).get("reasons") or []), 60)
        assert stats["status"] == "degraded" and any("drift (brightness)" in p for p in stats["problems"])
        current.unlink()
        current.symlink_to(matching)
        assert line.command("reload", {"version": "2.0.0"})["ok"]
        # With its own reference the new model's window fills without drift (the old one would stay raised).
        after = line.wait_stats(
            lambda s: (
                s["model"]["version"] == "2.0.0"
                and (s.get("drift") or {}).get("reasons") == []
                and s["drift"]["statistics"]["brightness"]["frames"] >= 10
            ),
            60,
        )
        assert after["status"] == "ok"
    finally:
        assert agent.stop() == 0
        subscriber.close()


def test_anomalous_parts_are_kept_with_their_deciding_frame(
    tmp_path: Path, broker: MosquittoBroker, contract_bundle: Path
) -> None:
    from edge_agent.demo.conveyor import ConveyorSpec, write_conveyor_video
    from edge_agent.service.review import ReviewStore

    spec = ConveyorSpec(width=192, height=128, parts=4, speed_px=8, defect_parts=(2,), seed=4)
    write_conveyor_video(tmp_path / "conveyor.avi", spec)
    values = agent_config(tmp_path / "state", contract_bundle, str(tmp_path / "conveyor.avi"), broker.port,
                          parts={"mode": "tracked"}, keep={"flagged": True, "min_free_mb": 0})  # fmt: skip
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    agent.thread.join(120)  # the video ends: the agent stops by itself
    assert agent.stop() == 0
    assert subscriber.wait_for(lambda ms: sum(m.topic.endswith("/part") for m in ms) >= 4, 10)
    anomalous = {p["part_id"] for p in (m.json() for m in subscriber.on("/part")) if p["anomalous"]}
    subscriber.close()
    # The contract bundle knows no conveyor, so it flags parts; which ones does not matter here.
    assert anomalous
    kept = {f.id: f for f in ReviewStore(tmp_path / "state" / "kept", tmp_path / "training").frames(1000)}
    parts = {k: f for k, f in kept.items() if f.kind == "part"}
    assert len(parts) == len(kept)  # with parts on, parts are kept instead of anomalous frames
    saved = {json.loads((tmp_path / "state" / "kept" / k / "part.json").read_text())["part_id"] for k in parts}
    assert saved == anomalous and all(f.anomalous for f in parts.values())
    assert all(k.endswith(f"-part-{json.loads((tmp_path / 'state' / 'kept' / k / 'part.json').read_text())['part_id']}")
               for k in parts)  # fmt: skip
