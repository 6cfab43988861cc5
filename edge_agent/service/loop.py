"""The agent's side of the line-to-model loop: kept frames, drift, the shadow model, recordings, the review page.

``LineLoop`` builds what the settings ask for and hangs it on the running agent through a few narrow
hooks: pipeline observers (all cheap on the publish thread: heavier work has its own thread), the
``record`` command, the review routes, a /metrics collector, /healthz problems and the ``stats``
figures. The agent calls ``start``, ``tick`` (every supervisor round) and ``stop``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import AgentSettings
from edge_agent.inspection.drift import DriftMonitor, model_statistics
from edge_agent.inspection.loaded_model import LoadedModel
from edge_agent.inspection.pipeline import FrameJob, Hooks, Pipeline
from edge_agent.inspection.preprocess import model_input
from edge_agent.logs import log_event
from edge_agent.messages import PartMessage, RecordCommand
from edge_agent.publish.commands import CommandFailed, Done
from edge_agent.service.disk_budget import training_budget
from edge_agent.service.http_server import HttpServer
from edge_agent.service.keep import WRITER_NICE, FrameKeeper
from edge_agent.service.loop_metrics import LoopCollector, LoopParts, loop_figures, loop_problems
from edge_agent.service.part_frames import PartFrameBook
from edge_agent.service.record_gate import HeldFrame, RecordGate, frame_clock
from edge_agent.service.recorder import FrameRecorder, RecordError, RecordSettings
from edge_agent.thread_priority import lower_thread_priority

log = logging.getLogger(__name__)

# The review page's view of training_dir's size is walked again this often: recordings add to it meanwhile.
REVIEW_REMEASURE_S = 60.0

SHADOW_STATE_EVERY_S = 60.0
RECORD_QUEUE = 16  # released frames waiting for the PNG writer (a decided part releases its frames at once)


class LineLoop:
    """Kept frames, drift, shadow, recordings and review for one agent (see the module docstring)."""

    def __init__(self, settings: AgentSettings, pipeline: Pipeline) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.parts = LoopParts(recorder=lambda: self._recorder or self._last_recording)
        self._last_recording: FrameRecorder | None = None
        # Tracked parts are decided frames after their evidence was seen: the book holds their frames till then.
        book = PartFrameBook() if settings.parts.mode == "tracked" and settings.keep.flagged else None
        keeper = FrameKeeper(settings.keep, parts_mode=settings.parts.mode != "off", book=book)
        if keeper.active:
            self.parts.keeper = keeper
            if book is not None:
                pipeline.add_observer(Hooks("part_frames", frame=book.observe))
            pipeline.add_observer(Hooks("keep", frame=keeper.offer, part=keeper.offer_part))
        self._drift_bundle: object | None = None
        self._drift_reasons: list[str] = []
        if settings.drift.enabled:
            self.parts.drift = self._new_drift_monitor()
            pipeline.add_observer(Hooks("drift", frame=self._observe_drift))
        self._recorder: FrameRecorder | None = None
        self._gate: RecordGate | None = None  # with only_good: frames wait for their parts' verdicts
        self._gate_lock = threading.Lock()
        self._record_until = 0.0
        self._record_queue: queue.Queue[HeldFrame | None] = queue.Queue(maxsize=RECORD_QUEUE)
        self._record_thread: threading.Thread | None = None
        self._record_lock = threading.Lock()
        pipeline.add_observer(Hooks("record", frame=self._observe_record, part=self._observe_record_part))
        self._next_shadow_save = 0.0
        self._drops_seen = 0

    # -- life cycle ---------------------------------------------------------------------------------

    def attach(
        self,
        http: HttpServer | None,
        register_metrics: Callable[[LoopCollector], None],
        register_command: Callable[[str, Callable[[Any], Done]], None],
    ) -> None:
        """Hang the loop on the agent's HTTP server, metrics registry and command processor."""
        register_metrics(LoopCollector(self.parts))
        register_command("record", self.record_command)
        if http is not None and self.settings.http.review:
            from edge_agent.service.review import ReviewStore
            from edge_agent.service.review_page import ReviewPage

            keep = self.settings.keep
            assert keep.dir is not None and keep.training_dir is not None
            keeper = self.parts.keeper
            store = ReviewStore(keep.dir, keep.training_dir, training_budget(keep, remeasure_s=REVIEW_REMEASURE_S))
            ReviewPage(store, keeper.forget if keeper else None).register(http)

    def start(self) -> None:
        """Start the writer threads and load the shadow model (a shadow that cannot load is logged, not fatal)."""
        if self.parts.keeper is not None:
            self.parts.keeper.start()
        if self.settings.model.shadow is not None:
            self._start_shadow(self.settings.model.shadow)

    def stop(self) -> None:
        """Finish pending writes (bounded) and close the shadow model."""
        self._end_recording("the agent stopped")
        if self.parts.keeper is not None:
            self.parts.keeper.stop()
        if self.parts.shadow is not None:
            self._save_shadow_state()
            self.parts.shadow.stop()

    def tick(self) -> None:
        """Every supervisor round: end a recording past its time, save the shadow's totals now and then."""
        if self._recorder is not None and time.monotonic() >= self._record_until:
            self._end_recording("max_s reached")
        if self.parts.shadow is not None and time.monotonic() >= self._next_shadow_save:
            self._next_shadow_save = time.monotonic() + SHADOW_STATE_EVERY_S
            self._save_shadow_state()

    # -- views --------------------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """/healthz sentences: kept frames that cannot be written, drift."""
        return loop_problems(self.parts)

    def figures(self) -> dict[str, Any]:
        """The ``stats`` message's loop figures."""
        return loop_figures(self.parts)

    # -- drift --------------------------------------------------------------------------------------

    def _new_drift_monitor(self, model: LoadedModel | None = None) -> DriftMonitor:
        config = self.settings.drift
        model = model or self.pipeline.model
        manifest = model.bundle.manifest
        self._drift_bundle = model.bundle
        self._drift_reasons = []
        reference = manifest.drift_reference
        if reference is None:
            log_event(
                log,
                logging.WARNING,
                "the bundle has no drift reference (exported before drift checks): the drift check is off",
                "drift_off",
                model=manifest.name,
                version=manifest.version,
            )
        return DriftMonitor(reference, config)

    def _observe_drift(self, job: FrameJob) -> None:
        monitor = self.parts.drift
        if job.model.bundle is not self._drift_bundle:
            # A reloaded model was trained on other images: compare with its own reference, from scratch.
            monitor = self.parts.drift = self._new_drift_monitor(job.model)
        if monitor is None or not monitor.due():
            return
        rgb = model_input(job.frame.image, *job.model.input_size)
        passed = not job.message.anomalous
        stats = model_statistics(job.output.anomaly_map, np.asarray(job.output.scale_maps[0])) if passed else None
        monitor.add(rgb, passed, stats)
        # The report costs a few sorts of the window: once per sample (at most sample_every_s), to log changes.
        reasons = monitor.report().reasons
        if reasons != self._drift_reasons:
            level, event = (logging.WARNING, "drift_detected") if reasons else (logging.INFO, "drift_cleared")
            log_event(
                log,
                level,
                "drift: %s",
                event,
                ", ".join(reasons) or "none",
                reasons=reasons,
                previous=self._drift_reasons,
                frames_sampled=monitor.frames_sampled,
                sequence=job.frame.sequence,
            )
            self._drift_reasons = reasons

    # -- shadow -------------------------------------------------------------------------------------

    def _start_shadow(self, path: Path) -> None:
        from edge_agent.fleet.signing import SigningError, verify_installed_bundle
        from edge_agent.inspection.loaded_model import ModelLoadError, load_model
        from edge_agent.inspection.shadow import STATE_NAME, ShadowRunner, load_state

        # One ONNX Runtime thread: the shadow's work stays on its own niced thread.
        config = self.settings.model.model_copy(update={"threads": 1})
        try:
            # Like the live bundle: with a fleet key configured, the shadow must carry a valid signature too
            # (it runs on live frames, and its totals open the fleet's shadow gate).
            verify_installed_bundle(path, self.settings.update.public_key)
            candidate = load_model(path, config, self.settings.nfa)
        except (ModelLoadError, SigningError) as exc:
            log_event(log, logging.ERROR, "cannot load the shadow model: %s", "shadow_failed", exc, error=str(exc))
            return
        runner = ShadowRunner(
            candidate,
            self.settings.model.shadow_share,
            self.settings.device_id,
            live_backlog=self._live_pressure,
        )
        resumed = runner.resume(load_state(self.settings.state_dir / STATE_NAME))
        runner.start()
        self.parts.shadow = runner
        self.pipeline.add_observer(Hooks("shadow", frame=runner.offer))
        log_event(
            log,
            logging.INFO,
            "shadow model running",
            "shadow_started",
            candidate=runner.report.candidate,
            share=runner.share,
            resumed=resumed,
        )

    def _live_pressure(self) -> int:
        """Frames waiting in the live stages plus live frames dropped since the last look: 0 means spare time."""
        dropped = self.pipeline.frames_dropped
        new_drops, self._drops_seen = dropped - self._drops_seen, dropped
        return self.pipeline.backlog + new_drops

    def _save_shadow_state(self) -> None:
        from edge_agent.inspection.shadow import STATE_NAME, save_state

        if self.parts.shadow is None:
            return
        try:
            save_state(self.settings.state_dir / STATE_NAME, self.parts.shadow.state())
        except OSError as exc:
            log_event(log, logging.WARNING, "cannot save the shadow totals: %s", "shadow_state_failed", exc)

    # -- recording (cmd/record) ---------------------------------------------------------------------

    def record_command(self, command: RecordCommand) -> Done:
        """Start (or stop) recording good images from the inspected frames; replies at once."""
        if command.stop:
            recorder = self._recorder
            if recorder is None:
                raise CommandFailed("no recording is running")
            self._end_recording("stopped by cmd/record")
            return Done(f"recording stopped: {recorder.counts.written} images in {recorder.out}", recorder.summary())
        if self._recorder is not None:
            raise CommandFailed(f"a recording into {self._recorder.out} is already running; send stop first")
        keep = self.settings.keep
        assert keep.training_dir is not None
        out = keep.training_dir / "good" / f"record-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            settings = RecordSettings(command.count, command.every_s, command.only_good, command.min_difference)
            recorder = FrameRecorder(out, settings, budget=training_budget(keep))
        except (RecordError, ValueError) as exc:
            raise CommandFailed(str(exc)) from exc
        gate = RecordGate(self._release_to_writer, recorder.note, settings.every_s)
        with self._gate_lock:
            self._gate = gate
        with self._record_lock:
            self._recorder = recorder
            self._record_until = time.monotonic() + command.max_s
            self._record_thread = threading.Thread(
                target=self._record_loop, args=(recorder,), name="record", daemon=True
            )
            self._record_thread.start()
        log_event(log, logging.INFO, "recording started", "record_started", out=str(out), count=command.count)
        return Done(f"recording up to {command.count} images into {out}", {"out": str(out)})

    def _observe_record(self, job: FrameJob) -> None:
        """Publish thread: the frame goes to the gate (bookkeeping only; the writer thread writes)."""
        recorder = self._recorder
        if recorder is None:
            return
        only_good = recorder.settings.only_good
        passed = not only_good or not job.message.anomalous
        view = job.parts_view
        alive: frozenset[str] | None = None
        if only_good and self.settings.parts.mode == "tracked":
            # No view yet (belt still being learned) means no part is tracked: nothing to wait for.
            alive = view.undecided if view is not None else frozenset()
        parts = [p[0] for p in view.parts] if view is not None else []
        with self._gate_lock:
            if self._gate is not None:
                self._gate.offer(job.frame.image, job.frame.sequence, frame_clock(job.frame), passed, parts, alive)

    def _observe_record_part(self, job: FrameJob, message: PartMessage) -> None:
        if message.mode != "tracked":
            return  # a triggered part is its frame: the frame's own verdict already says it
        with self._gate_lock:
            if self._gate is not None:
                self._gate.part_decided(message.part_id, message.anomalous)

    def _release_to_writer(self, held: HeldFrame) -> None:
        # A full queue: the writer is behind and this frame is not considered (a moving belt brings more).
        with contextlib.suppress(queue.Full):
            self._record_queue.put_nowait(held)

    def _record_loop(self, recorder: FrameRecorder) -> None:
        lower_thread_priority(WRITER_NICE)
        while (held := self._record_queue.get()) is not None:
            if recorder.done:
                continue
            try:
                recorder.offer(held.image, held.sequence, True, now=held.clock)
            except RecordError as exc:
                log_event(log, logging.ERROR, "recording failed: %s", "record_failed", exc)
                break
            if recorder.done:
                threading.Thread(target=self._end_recording, args=("count reached",), daemon=True).start()
        try:
            recorder.write_summary()
        except OSError as exc:
            log_event(log, logging.WARNING, "cannot write record.json: %s", "record_summary_failed", exc)

    def _end_recording(self, why: str) -> None:
        with self._record_lock:
            recorder, thread = self._recorder, self._record_thread
            if recorder is None or thread is None:
                return
            self._recorder, self._record_thread = None, None
            self._last_recording = recorder
        with self._gate_lock:
            if self._gate is not None:
                self._gate.abandon()
            self._gate = None
        while True:
            try:
                self._record_queue.put(None, timeout=1.0)
                break
            except queue.Full:
                if not thread.is_alive():
                    break
        thread.join(10.0)
        while not self._record_queue.empty():  # frames queued after the end
            self._record_queue.get_nowait()
        log_event(log, logging.INFO, "recording ended (%s)", "record_ended", why, **recorder.summary())
