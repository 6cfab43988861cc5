"""``cmd/record``: good images from the inspected frames into a training folder (edge_agent/service/recorder.py).

One loop component (an ``AgentPart`` and a pipeline ``FrameObserver``, edge_agent/service/loop.py). The
publish thread only hands frames to the gate (edge_agent/service/record_gate.py: with ``only_good`` a frame
waits for its parts' verdicts); the ``[record]`` thread (niced) writes the PNGs. ``tick`` ends a recording
past its ``max_s``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any

from edge_agent.config import AgentSettings
from edge_agent.inspection.pipeline import FrameJob
from edge_agent.messages import PartMessage, RecordCommand
from edge_agent.publish.commands import CommandFailed, Done
from edge_agent.service.disk_budget import training_budget
from edge_agent.service.keep import WRITER_NICE
from edge_agent.service.loop_metrics import recording_figures
from edge_agent.service.record_gate import HeldFrame, RecordGate, frame_clock
from edge_agent.service.recorder import FrameRecorder, RecordError, RecordSettings
from edge_agent.thread_priority import lower_thread_priority

log = logging.getLogger(__name__)

RECORD_QUEUE = 16  # released frames waiting for the PNG writer (a decided part releases its frames at once)


class Recording:
    """At most one recording at a time, started and stopped by ``cmd/record``."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self._recorder: FrameRecorder | None = None
        self._last_recording: FrameRecorder | None = None
        self._gate: RecordGate | None = None  # with only_good: frames wait for their parts' verdicts
        self._gate_lock = threading.Lock()
        self._record_until = 0.0
        self._record_queue: queue.Queue[HeldFrame | None] = queue.Queue(maxsize=RECORD_QUEUE)
        self._record_thread: threading.Thread | None = None
        self._record_lock = threading.Lock()

    # -- AgentPart ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Nothing to start: a recording starts with its command."""

    def tick(self) -> None:
        """End a recording past its ``max_s``."""
        if self._recorder is not None and time.monotonic() >= self._record_until:
            self._end_recording("max_s reached")

    def stop(self) -> None:
        """End a running recording (its pending images are written, bounded)."""
        self._end_recording("the agent stopped")

    def figures(self) -> dict[str, Any]:
        """The ``stats`` message's ``recording``: the running recording, or the last one (None before any)."""
        recorder = self._recorder or self._last_recording
        return {"recording": recording_figures(recorder) if recorder is not None else None}

    def problems(self) -> list[str]:
        """None: a failed recording is answered and logged, the agent is fine."""
        return []

    # -- the command ----------------------------------------------------------------------------------

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
        log.info("recording started", extra={"event": "record_started", "out": str(out), "count": command.count})
        return Done(f"recording up to {command.count} images into {out}", {"out": str(out)})

    # -- FrameObserver --------------------------------------------------------------------------------

    def on_frame(self, job: FrameJob) -> None:
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

    def on_part(self, job: FrameJob, part: PartMessage) -> None:
        """A decided tracked part releases (good) or discards (anomalous) its frames waiting in the gate."""
        if part.mode != "tracked":
            return  # a triggered part is its frame: the frame's own verdict already says it
        with self._gate_lock:
            if self._gate is not None:
                self._gate.part_decided(part.part_id, part.anomalous)

    # -- the writer -----------------------------------------------------------------------------------

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
                log.error("recording failed: %s", exc, extra={"event": "record_failed"})
                break
            if recorder.done:
                threading.Thread(target=self._end_recording, args=("count reached",), daemon=True).start()
        try:
            recorder.write_summary()
        except OSError as exc:
            log.warning("cannot write record.json: %s", exc, extra={"event": "record_summary_failed"})

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
        log.info("recording ended (%s)", why, extra={"event": "record_ended", **recorder.summary()})
