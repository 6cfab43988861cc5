"""The agent loop: capture -> preprocess + infer -> NFA + message -> publish, one thread per stage.

Stages are joined by bounded queues, so a slow stage never lets memory grow. Frames are dropped
only at the capture edge and only for live sources (the newest frame replaces a waiting one and the
drop is counted); files and folders block the capture thread instead (backpressure), so every
frame is inspected. Every frame carries its per-stage latency into its message.

Stopping (a signal, or the end of a file) is a sentinel that flows down the stages behind the frames
already captured, so in-flight frames are still inspected and published before the threads end.

The model is swappable at run time (``swap_model``): the inference stage takes the current model under
a lock for each frame and the frame carries it on, so a frame is scored and labelled by the model that
inferred it, and the old engine is closed only once no inference runs on it.

Each stage hands the next one an immutable record of what it made (``Captured`` -> ``Inferred`` ->
``Scored``, stage_records.py), and the publish stage makes the complete ``FrameJob`` that observers see.
The stages are the pipeline: a stage that fails (the tracker and the trigger book included) stops it.
Everything else that wants the frames is a ``FrameObserver`` (``on_frame``, ``on_part``) with one error
policy: its failure is logged and counted, never fatal (see ``FrameObserver``).

Latency (``StageLatency`` in every message, milliseconds): ``capture`` is the source read (decode; for a
live source also the wait for the camera's next frame); ``total`` runs from the moment the frame was in
memory to the moment its message was handed to the MQTT client, so it includes the queue waits but not
the wait for the camera.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from edge_agent.inspection.drivers import Frame
from edge_agent.inspection.frame_source import FrameSource
from edge_agent.inspection.loaded_model import LoadedModel
from edge_agent.inspection.preprocess import AspectCheck, model_input
from edge_agent.inspection.stage_queue import END, End, StageQueue

# The records and seams live in stage_records.py; the names readers know the pipeline by are re-exported here.
from edge_agent.inspection.stage_records import Captured, Inferred, Scored, inspection_message
from edge_agent.inspection.stage_records import FrameJob as FrameJob
from edge_agent.inspection.stage_records import FrameObserver as FrameObserver
from edge_agent.inspection.stage_records import Hooks as Hooks
from edge_agent.inspection.stage_records import PartStage as PartStage
from edge_agent.inspection.stage_records import Publisher as Publisher
from edge_agent.inspection.triggers import Trigger, TriggerBook, triggered_message
from edge_agent.messages import PartMessage

log = logging.getLogger(__name__)

T = TypeVar("T")  # a stage record


@dataclass
class PipelineStats:
    """Counters and recent latencies, read by the supervisor for status lines and the stats topic."""

    started: float = field(default_factory=time.monotonic)
    frames_captured: int = 0
    frames_inspected: int = 0
    anomalous_frames: int = 0
    _recent_totals: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    _recent_times: deque[float] = field(default_factory=lambda: deque(maxlen=200))
    _capture_times: deque[float] = field(default_factory=lambda: deque(maxlen=200))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def captured(self) -> None:
        """One frame read from the source (inspected or not: triggered mode skips most)."""
        with self._lock:
            self.frames_captured += 1
            self._capture_times.append(time.monotonic())

    def capture_fps(self, window_s: float = 10.0) -> float:
        """Frames read from the source per second over the last ``window_s`` seconds."""
        return self._rate(self._capture_times, window_s)

    def record(self, total_ms: float, anomalous: bool) -> None:
        """One published frame."""
        with self._lock:
            self.frames_inspected += 1
            self.anomalous_frames += int(anomalous)
            self._recent_totals.append(total_ms)
            self._recent_times.append(time.monotonic())

    def fps(self, window_s: float = 10.0) -> float:
        """Inspected frames per second over the last ``window_s`` seconds (0 when idle)."""
        return self._rate(self._recent_times, window_s)

    def _rate(self, stamps: deque[float], window_s: float) -> float:
        now = time.monotonic()
        with self._lock:
            times = [t for t in stamps if now - t <= window_s]
        if len(times) < 2:
            return 0.0
        span = times[-1] - times[0]
        return (len(times) - 1) / span if span > 0 else 0.0

    def latency_percentiles(self) -> tuple[float, float]:
        """p50 and p99 of capture-to-publish latency in ms over the recent frames."""
        with self._lock:
            values = np.asarray(self._recent_totals, dtype=np.float64)
        if values.size == 0:
            return 0.0, 0.0
        p50, p99 = np.percentile(values, [50, 99])
        return float(p50), float(p99)


@dataclass(frozen=True)
class PipelineSettings:
    """Queue sizes between stages (frames)."""

    capture_queue: int = 2  # live sources use 1: a waiting frame is replaced by a newer one
    infer_queue: int = 2
    publish_queue: int = 8


class Pipeline:
    """Four threads (capture, infer, nfa, publish) over one source, a swappable model and a publisher."""

    STAGES = ("capture", "infer", "nfa", "publish")

    def __init__(
        self,
        source: FrameSource,
        model: LoadedModel,
        publisher: Publisher,
        device_id: str,
        settings: PipelineSettings | None = None,
        parts: PartStage | None = None,
        triggers: TriggerBook | None = None,
    ) -> None:
        settings = settings or PipelineSettings()
        self.triggers = triggers  # triggered mode: only frames a trigger asked for are inspected
        self.frames_untriggered = 0
        self.parts = parts  # tracked mode: frames -> part messages, in the publish stage (frames in order)
        self.source = source
        self.publisher = publisher
        self.device_id = device_id
        self.observers: list[FrameObserver] = []  # add_observer(); one error policy (FrameObserver)
        self.observer_failures = 0
        self.stats = PipelineStats()
        self.error: BaseException | None = None
        self.ended = False  # the source reached its end (files and folders)
        self.last_job: FrameJob | None = None  # the last published frame, with its maps (snapshots)
        self.last_frame: Frame | None = None  # the last frame read from the source, inspected or not
        self._model = model
        self._model_lock = threading.Lock()
        # With [[recipes]] (service/recipes.py): the model of the recipe that cut the frame, called under the
        # model lock; None: every frame gets the current model.
        self.model_for: Callable[[Frame], LoadedModel] | None = None
        # One warning when the source's frames (after the ROI) have another aspect than the model's.
        self._aspect = AspectCheck(source.source_id)
        self._stop = threading.Event()
        capture_size = 1 if source.drop_frames else settings.capture_queue
        # A triggered frame is never replaced by a newer one: its trigger would be lost without a report.
        drop = source.drop_frames and triggers is None
        self._to_infer: StageQueue[Captured] = StageQueue(capture_size, drop_oldest=drop)
        self._to_nfa: StageQueue[Inferred] = StageQueue(settings.infer_queue)
        self._to_publish: StageQueue[Scored] = StageQueue(settings.publish_queue)
        self._threads: list[threading.Thread] = []
        self.heartbeats: dict[str, float] = dict.fromkeys(self.STAGES, time.monotonic())
        # A source waiting for a camera or reconnecting is alive, not hung.
        source.on_wait = lambda: self._beat("capture")

    def add_observer(self, observer: FrameObserver) -> None:
        """Tell ``observer`` of every frame published and part decided from now on (add before ``start``)."""
        self.observers.append(observer)

    # -- the model ----------------------------------------------------------------------------------

    @property
    def model(self) -> LoadedModel:
        """The model new frames are inferred with."""
        return self._model

    def swap_model(self, model: LoadedModel) -> LoadedModel:
        """Serve ``model`` from the next frame on; returns the old one (no inference runs on it any more)."""
        with self._model_lock:
            old, self._model = self._model, model
        return old

    # -- control ------------------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Frames waiting for inference or NFA: above 0, the live stages are behind (the shadow model waits)."""
        return len(self._to_infer) + len(self._to_nfa)

    @property
    def frames_dropped(self) -> int:
        return self._to_infer.dropped

    def start(self) -> None:
        """Start the stage threads (the source must be open)."""
        targets = (self._capture_loop, self._infer_loop, self._nfa_loop, self._publish_loop)
        for name, target in zip(self.STAGES, targets, strict=True):
            thread = threading.Thread(target=self._guarded, args=(name, target), name=f"stage-{name}", daemon=True)
            self._threads.append(thread)
        for thread in self._threads:
            thread.start()
        log.info(
            "pipeline started",
            extra={
                "event": "pipeline_started",
                "drop_policy": "latest" if self.source.drop_frames else "every",
                "source": self.source.source_id,
            },
        )

    def request_stop(self) -> None:
        """Stop capturing; frames already captured are still inspected and published."""
        self._stop.set()
        self.source.cancel()  # a source waiting for a camera or backing off returns at once

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every stage to finish; True when all have."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.running

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def responsive(self, max_silence_s: float) -> bool:
        """True while every live stage has shown a sign of life within ``max_silence_s`` (watchdog)."""
        now = time.monotonic()
        for name, thread in zip(self.STAGES, self._threads, strict=True):
            if thread.is_alive() and now - self.heartbeats[name] > max_silence_s:
                return False
        return self.error is None

    # -- stages -------------------------------------------------------------------------------------

    def _guarded(self, name: str, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as exc:
            # One failed stage stops the whole pipeline; the run command turns this into exit 1.
            self.error = exc
            self._stop.set()
            log.exception("pipeline stage failed", extra={"event": "stage_failed", "stage": name, "error": str(exc)})
            self._abort_downstream(name)

    def _abort_downstream(self, failed: str) -> None:
        queues: dict[str, StageQueue[Captured] | StageQueue[Inferred] | StageQueue[Scored]] = {
            "capture": self._to_infer,
            "infer": self._to_nfa,
            "nfa": self._to_publish,
        }
        if failed in queues:
            queues[failed].put(END, timeout=1.0)

    def _beat(self, stage: str) -> None:
        self.heartbeats[stage] = time.monotonic()

    def _capture_loop(self) -> None:
        while not self._stop.is_set():
            self._beat("capture")
            started = time.monotonic()
            frame = self.source.read()
            if frame is None:
                if self._stop.is_set():
                    break
                self.ended = True
                log.info(
                    "source ended",
                    extra={
                        "event": "source_ended",
                        "source": self.source.source_id,
                        "frames": self.stats.frames_captured,
                    },
                )
                break
            self.stats.captured()
            self.last_frame = frame  # the live camera for the preview (triggered mode inspects few frames)
            trigger = None
            if self.triggers is not None:
                trigger = self.triggers.take(frame.capture_time)
                if trigger is None:
                    self.frames_untriggered += 1
                    continue
            self._forward(self._to_infer, Captured(frame, (time.monotonic() - started) * 1000.0, trigger), "capture")
        self._forward(self._to_infer, END, "capture")

    def _infer_loop(self) -> None:
        while (captured := self._next(self._to_infer, "infer")) is not None:
            frame = captured.frame
            with self._model_lock:
                model = self._model if self.model_for is None else self.model_for(frame)
                started = time.monotonic()
                self._aspect.check(frame.image.shape[:2], model.input_size)
                tensor = model_input(frame.image, *model.input_size)
                inferred = time.monotonic()
                output = model.engine.infer(tensor)
            done = time.monotonic()
            job = Inferred(captured, model, output, (inferred - started) * 1000.0, (done - inferred) * 1000.0)
            self._forward(self._to_nfa, job, "infer")
        self._forward(self._to_nfa, END, "infer")

    def _nfa_loop(self) -> None:
        while (inferred := self._next(self._to_nfa, "nfa")) is not None:
            started = time.monotonic()
            frame = inferred.captured.frame
            height, width = frame.image.shape[:2]
            verdict = inferred.model.scorer.score(inferred.output, (width, height), frame.roi_offset)
            done = time.monotonic()
            self._forward(self._to_publish, Scored(inferred, verdict, (done - started) * 1000.0, done), "nfa")
        self._forward(self._to_publish, END, "nfa")

    def _publish_loop(self) -> None:
        while (scored := self._next(self._to_publish, "publish")) is not None:
            message = inspection_message(scored, self.device_id)
            self.publisher.publish_inspection(message)
            self.stats.record(message.latency_ms.total, message.anomalous)
            parts: list[PartMessage] = []
            view = None
            inferred, captured = scored.inferred, scored.inferred.captured
            if self.parts is not None:
                parts = self.parts.observe(captured.frame, scored.verdict, inferred.model.ref)
                view = self.parts.view  # the preview draws the parts of this very frame
            job = FrameJob(
                captured.frame, inferred.model, inferred.output, scored.verdict, message, captured.trigger, view
            )
            self.last_job = job
            for observer in self.observers:
                self._tell(observer, "on_frame", job)
            self._publish_parts(parts, job)
            if job.trigger is not None:
                self._publish_parts([self._triggered(job, job.trigger)], job)
        if self.parts is not None and self.last_job is not None and self.error is None:
            last = self.last_job
            self._publish_parts(self.parts.finish(last.frame, last.model.ref), last)

    def _tell(self, observer: FrameObserver, hook: str, job: FrameJob, part: PartMessage | None = None) -> None:
        """Call one observer under the one error policy (FrameObserver): a failure is logged and counted."""
        try:
            if part is None:
                observer.on_frame(job)
            else:
                observer.on_part(job, part)
        except Exception as exc:
            self.observer_failures += 1
            log.exception(
                "pipeline observer failed",
                extra={
                    "event": "observer_failed",
                    "observer": repr(observer),
                    "hook": hook,
                    "sequence": job.frame.sequence,
                    "error": str(exc),
                },
            )

    def _triggered(self, job: FrameJob, trigger: Trigger) -> PartMessage:
        verdict, frame = job.verdict, job.frame
        regions = verdict.regions
        log_nfa = min(r.log_nfa for r in regions) if regions else min(0.0, float(verdict.log_nfa.min()))
        return triggered_message(
            self.device_id,
            trigger,
            frame.sequence,
            frame.capture_time,
            verdict.anomalous,
            verdict.log10_epsilon,
            verdict.regions,
            log_nfa,
            round((time.monotonic() - frame.monotonic) * 1000.0, 3),
            model=job.model.ref,
        )

    def _publish_parts(self, messages: list[PartMessage], job: FrameJob) -> None:
        for message in messages:
            self.publisher.publish_part(message)
            for observer in self.observers:
                self._tell(observer, "on_part", job, message)
            log.info(
                "part decided",
                extra={
                    "event": "part_decided",
                    "mode": message.mode,
                    "status": message.status,
                    "part_id": message.part_id,
                    "trigger_id": message.trigger_id,
                    "anomalous": message.anomalous,
                    "log_nfa": round(message.log_nfa, 3),
                    "frames": message.frames.count,
                },
            )

    def _next(self, queue: StageQueue[T], stage: str) -> T | None:
        """The next record for a stage, or None at the end of the stream."""
        while True:
            self._beat(stage)
            item = queue.get()
            if item is None:
                continue
            if isinstance(item, End):
                return None
            return item

    def _forward(self, queue: StageQueue[T], item: T | End, stage: str) -> None:
        """Put with backpressure; gives up only when another stage failed (nobody would take it)."""
        while not queue.put(item):
            self._beat(stage)
            if self.error is not None:
                return
