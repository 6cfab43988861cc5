"""The thread-per-stage pipeline on real parts: image folders, ONNX Runtime, the NFA, mosquitto."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from contract_bundle import defect_frame, good_frame
from mqtt_broker import MosquittoBroker, Subscriber

from edge_agent.config import ModelConfig, MqttConfig, SourceConfig
from edge_agent.inspection.frame_source import FrameSource
from edge_agent.inspection.loaded_model import load_model
from edge_agent.inspection.pipeline import FrameJob, Hooks, Pipeline
from edge_agent.inspection.stage_queue import END, StageQueue
from edge_agent.messages import InspectionMessage
from edge_agent.publish.mqtt import MqttPublisher

DEFECTS = {3, 8}


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 frames of 128x96 (camera pixels), defects in frames 3 and 8."""
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(7)
    for index in range(12):
        image = defect_frame(rng, 96, 128, (50, 30, 20, 16)) if index in DEFECTS else good_frame(rng, 96, 128)
        cv2.imwrite(str(folder / f"{index:04d}.png"), image)
    return folder


class RelayUnreachable(MqttPublisher):
    """A publisher whose hand-over fails at frame 2: the publish stage itself fails."""

    def publish_inspection(self, message: InspectionMessage) -> bool:
        if message.sequence == 2:
            raise RuntimeError("actuator relay unreachable")
        return super().publish_inspection(message)


def make_pipeline(
    bundle_dir: Path, source_config: SourceConfig, port: int, on_result=None, publisher_type=MqttPublisher
) -> Pipeline:
    model = load_model(bundle_dir, ModelConfig(backend="onnxruntime", threads=1))
    source = FrameSource(source_config)
    source.open()
    publisher = publisher_type(MqttConfig(port=port, drain_timeout_s=10), device_id="cam1")
    publisher.start()
    pipeline = Pipeline(source, model, publisher, "cam1")
    if on_result is not None:
        pipeline.add_observer(Hooks("test", frame=on_result))
    return pipeline


def test_every_frame_of_a_folder_is_published_in_order(
    contract_bundle: Path,
    frames_dir: Path,
    broker: MosquittoBroker,
) -> None:
    subscriber = Subscriber(broker, "uflow/cam1/inspection")
    pipeline = make_pipeline(contract_bundle, SourceConfig(uri=str(frames_dir)), broker.port)
    pipeline.start()
    assert pipeline.join(60)
    assert pipeline.error is None and pipeline.ended
    assert pipeline.publisher.stop()
    assert subscriber.wait_for(lambda ms: len(ms) == 12, timeout=10)
    subscriber.close()

    payloads = [m.json() for m in subscriber.messages]
    assert [p["sequence"] for p in payloads] == list(range(12))
    assert {p["sequence"] for p in payloads if p["anomalous"]} == DEFECTS
    for payload in payloads:
        assert payload["frame_size"] == [128, 96]
        latency = payload["latency_ms"]
        assert latency["infer"] > 0 and latency["nfa"] > 0 and latency["preprocess"] > 0
        assert latency["total"] >= latency["infer"] + latency["nfa"]
    for payload in payloads:
        if payload["anomalous"]:
            x, y, w, h = payload["regions"][0]["bbox"]
            assert x <= 50 and y <= 30 and x + w >= 70 and y + h >= 46  # covers the defect, camera pixels
    assert pipeline.frames_dropped == 0
    assert pipeline.stats.frames_inspected == 12 and pipeline.stats.anomalous_frames == 2


@pytest.mark.parametrize(("roi", "warned"), [(None, True), ((16, 0, 96, 96), False)])
def test_frames_of_another_aspect_are_warned_about_once(
    contract_bundle: Path,
    frames_dir: Path,
    broker: MosquittoBroker,
    caplog: pytest.LogCaptureFixture,
    roi: tuple[int, int, int, int] | None,
    warned: bool,
) -> None:
    """128x96 frames into the square 64x64 model: one structured warning for the run, not one per frame;
    a square ROI of the same frames matches the model and is not warned about."""
    pipeline = make_pipeline(contract_bundle, SourceConfig(uri=str(frames_dir), roi=roi), broker.port)
    with caplog.at_level("WARNING"):
        pipeline.start()
        assert pipeline.join(60) and pipeline.error is None
    assert pipeline.publisher.stop()
    events = [r for r in caplog.records if getattr(r, "event", None) == "frame_aspect_mismatch"]
    assert len(events) == (1 if warned else 0)
    if warned:
        event = events[0]
        assert (event.frame_width, event.frame_height, event.model_width) == (128, 96, 64)  # type: ignore[attr-defined]
        assert event.source == pipeline.source.source_id and "source.roi" in event.getMessage()  # type: ignore[attr-defined]


def test_latest_frame_policy_drops_and_counts_under_a_slow_consumer(
    contract_bundle: Path,
    frames_dir: Path,
    broker: MosquittoBroker,
) -> None:
    seen: list[int] = []

    def slow_consumer(job: FrameJob) -> None:
        seen.append(job.frame.sequence)
        time.sleep(0.05)

    config = SourceConfig(uri=str(frames_dir), loop=True, drop_policy="latest")
    pipeline = make_pipeline(contract_bundle, config, broker.port, on_result=slow_consumer)
    pipeline.start()
    time.sleep(2.0)
    pipeline.request_stop()
    assert pipeline.join(30)
    pipeline.publisher.stop()
    assert pipeline.error is None
    assert pipeline.frames_dropped > 0
    # Every captured frame is either inspected or counted as dropped; nothing vanishes silently.
    assert pipeline.stats.frames_inspected + pipeline.frames_dropped == pipeline.stats.frames_captured
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_stop_drains_frames_in_flight(
    contract_bundle: Path,
    frames_dir: Path,
    broker: MosquittoBroker,
) -> None:
    subscriber = Subscriber(broker, "uflow/cam1/inspection")
    pipeline = make_pipeline(contract_bundle, SourceConfig(uri=str(frames_dir), loop=True), broker.port)
    pipeline.start()
    time.sleep(1.0)
    pipeline.request_stop()
    assert pipeline.join(30)
    assert pipeline.publisher.stop()
    captured = pipeline.stats.frames_captured
    assert captured > 12  # it looped
    assert pipeline.stats.frames_inspected == captured
    assert subscriber.wait_for(lambda ms: len(ms) == captured, timeout=10)
    assert [m.json()["sequence"] for m in subscriber.messages] == list(range(captured))
    subscriber.close()


def test_a_failing_stage_stops_every_stage_and_is_reported(
    contract_bundle: Path,
    frames_dir: Path,
    broker: MosquittoBroker,
) -> None:
    config = SourceConfig(uri=str(frames_dir), loop=True)
    pipeline = make_pipeline(contract_bundle, config, broker.port, publisher_type=RelayUnreachable)
    pipeline.start()
    assert pipeline.join(30), "threads must end after a stage failure"
    pipeline.publisher.stop(timeout=2)
    assert isinstance(pipeline.error, RuntimeError)
    assert not pipeline.responsive(60.0)
    assert pipeline.stats.frames_inspected == 2  # frames 0 and 1


def test_an_observer_that_raises_is_logged_and_counted_and_inspection_goes_on(
    contract_bundle: Path,
    frames_dir: Path,
    broker: MosquittoBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The one error policy of FrameObserver: a failing observer never stops the frames or the other observers."""
    after: list[int] = []

    def explode(job: FrameJob) -> None:
        if job.frame.sequence in DEFECTS:
            raise RuntimeError("dashboard unreachable")

    pipeline = make_pipeline(contract_bundle, SourceConfig(uri=str(frames_dir)), broker.port, on_result=explode)
    pipeline.add_observer(Hooks("after", frame=lambda job: after.append(job.frame.sequence)))
    with caplog.at_level("ERROR"):
        pipeline.start()
        assert pipeline.join(60)
    assert pipeline.publisher.stop()
    assert pipeline.error is None and pipeline.ended
    assert pipeline.stats.frames_inspected == 12 and after == list(range(12))
    assert pipeline.observer_failures == len(DEFECTS)
    failed = [r for r in caplog.records if getattr(r, "event", "") == "observer_failed"]
    assert [(r.sequence, r.hook, r.observer) for r in failed] == [  # type: ignore[attr-defined]
        (s, "on_frame", "Hooks(name='test')") for s in sorted(DEFECTS)
    ]
    assert all(r.exc_info is not None for r in failed)  # with the traceback


def test_stage_queue_drop_oldest_counts_and_keeps_end() -> None:
    queue: StageQueue[int] = StageQueue(1, drop_oldest=True)
    assert queue.put(1) and queue.put(2) and queue.put(3)
    assert queue.dropped == 2 and queue.get() == 3
    queue.put(4)
    done = threading.Event()

    def put_end() -> None:
        while not queue.put(END):
            pass
        done.set()

    threading.Thread(target=put_end, daemon=True).start()
    time.sleep(0.3)
    assert not done.is_set()  # the end marker waits for room instead of dropping frame 4
    assert queue.get() == 4
    assert done.wait(2)
    assert queue.get() is END and queue.dropped == 2


def test_stage_queue_blocks_when_full_without_drop() -> None:
    queue: StageQueue[int] = StageQueue(2)
    assert queue.put(1) and queue.put(2)
    assert queue.put(3, timeout=0.05) is False
    assert queue.get() == 1 and queue.put(3)
    assert [queue.get(), queue.get(), queue.get(timeout=0.05)] == [2, 3, None]


def test_a_hung_stage_stops_looking_responsive(
    contract_bundle: Path,
    frames_dir: Path,
    broker: MosquittoBroker,
) -> None:
    release = threading.Event()
    hung = threading.Event()

    def hang_on_frame_4(job: FrameJob) -> None:
        if job.frame.sequence == 4:
            hung.set()
            release.wait(30)  # e.g. a blocking call that never returns

    pipeline = make_pipeline(contract_bundle, SourceConfig(uri=str(frames_dir)), broker.port, on_result=hang_on_frame_4)
    pipeline.start()
    assert hung.wait(60)
    assert pipeline.responsive(30.0)  # still within the allowed silence
    time.sleep(1.5)
    assert not pipeline.responsive(1.0), "the systemd watchdog must stop being fed while a stage hangs"
    release.set()
    assert pipeline.join(60)
    pipeline.publisher.stop()
    assert pipeline.error is None and pipeline.stats.frames_inspected == 12
