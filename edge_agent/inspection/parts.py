"""Tracked mode: frames in, one ``PartMessage`` per part out (tracking.py follows, part_verdict.py decides).

Runs in the pipeline's publish stage, which sees every inspected frame in order, after the frame's own
inspection message: :meth:`TrackedParts.observe` feeds the tracker with the frame and each part in view
with the frame's log10 NFA map, and returns the messages of the parts decided by this frame.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from edge_agent.config import PartsConfig
from edge_agent.inspection.drivers import Frame
from edge_agent.inspection.part_verdict import FrameObservation, PartDecision, PartEvidence
from edge_agent.inspection.scoring import Verdict
from edge_agent.inspection.tracking import DecidedPart, PartTracker, TrackedPart, TrackingSettings
from edge_agent.messages import MAX_PART_REGIONS, ModelRef, PartFrames, PartMessage, PartPosition, PartRegion

log = logging.getLogger(__name__)

MAX_VERDICTS = 256  # decided parts whose verdict the view remembers (a decided part may stay in view)
MIN_TRAVEL_PX = 0.5  # a frame after less belt travel than this adds no observation (the belt stands still)


@dataclass
class PartCounters:
    """Parts since start (stats, /metrics, the demo's summary)."""

    decided: int = 0
    anomalous: int = 0
    noise: int = 0  # blobs seen in fewer than min_frames frames


@dataclass(frozen=True)
class PartsView:
    """What the preview draws: the parts in view of the last frame and the decision line."""

    sequence: int
    parts: tuple[tuple[str, int, int, bool], ...]  # part id, x0, x1 (ROI pixels), already decided
    decision_line_x: float
    direction: str
    undecided: frozenset[str] = frozenset()  # parts the tracker follows and has not decided yet (in view or not)
    rejected: frozenset[str] = frozenset()  # parts in view decided anomalous (by this frame or before)

    def verdict_of(self, part_id: str, decided: bool) -> str:
        """``REJECTED``, ``passed`` or ``pending``: what a caption says of a part in view."""
        if not decided:
            return "pending"
        return "REJECTED" if part_id in self.rejected else "passed"

    def caption(self) -> str:
        """The parts in view and their verdicts, e.g. ``#2 REJECTED, #3 pending`` (``no part in view``)."""
        words = [f"#{p[0].rsplit('-', 1)[-1]} {self.verdict_of(p[0], p[3])}" for p in self.parts]
        return ", ".join(words) or "no part in view"


@dataclass
class TrackedParts:
    """The tracker, each part's evidence and the part messages (single thread: the publish stage)."""

    config: PartsConfig
    device_id: str
    started: float = field(default_factory=time.time)
    counters: PartCounters = field(default_factory=PartCounters)
    _tracker: PartTracker | None = None
    _evidence: dict[str, PartEvidence] = field(default_factory=dict)
    _last_time: float | None = None
    _speed_px_s: float | None = None
    _view: PartsView | None = None
    _shape: tuple[int, ...] = ()
    _next_number: int = 1
    _noise_before: int = 0
    _verdicts: dict[str, bool] = field(default_factory=dict)  # recent decided parts: anomalous?
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def view(self) -> PartsView | None:
        """The latest frame's parts (read by the preview from another thread)."""
        with self._lock:
            return self._view

    def observe(self, frame: Frame, verdict: Verdict, model: ModelRef | None) -> list[PartMessage]:
        """One inspected frame; the messages of the parts it decided."""
        image = frame.image
        restarted: list[PartMessage] = []
        if self._tracker is not None and self._shape != image.shape[:2]:
            restarted = self._restart(frame, model, image.shape[:2])
        if self._tracker is None:
            prefix = f"{int(self.started)}-"
            self._tracker = PartTracker(
                TrackingSettings.from_config(self.config),
                image.shape[1],
                id_prefix=prefix,
                first_number=self._next_number,
            )
            self._shape = image.shape[:2]
        tracker = self._tracker
        in_view, decided = tracker.update(image, frame.sequence, frame.capture_time)
        self._measure_speed(tracker, frame.capture_time)
        height, width = image.shape[:2]
        map_h, map_w = verdict.log_nfa.shape
        scale = (width / map_w, height / map_h)
        sign = 1 if self.config.direction == "right_to_left" else -1
        moved = tracker.motion.last_px >= MIN_TRAVEL_PX or self.config.speed_px_s is not None
        for part in in_view:
            if part.track.decided:
                continue
            evidence = self._evidence.setdefault(part.track.part_id, self._new_evidence(verdict))
            if evidence.observations and not moved:
                continue  # a stopped belt shows the same view again: not a new observation of the part
            evidence.add(
                FrameObservation(frame.sequence, verdict.log_nfa, scale, part.origin_x, sign, (part.x0, part.x1))
            )
        messages = restarted + [self._message(done, frame, model) for done in decided]
        for message in messages:
            self._verdicts[message.part_id] = message.anomalous
        while len(self._verdicts) > MAX_VERDICTS:
            del self._verdicts[next(iter(self._verdicts))]
        with self._lock:
            self._view = _view_of(frame.sequence, in_view, tracker, self._verdicts)
        self.counters.noise = self._noise_before + tracker.noise
        return messages

    def _restart(self, frame: Frame, model: ModelRef | None, shape: tuple[int, ...]) -> list[PartMessage]:
        """The frame size changed (the camera reopened at another resolution): the parts in view are decided
        now, and the belt is learned again at the new size; part ids continue."""
        assert self._tracker is not None
        old = self._tracker
        messages = [self._message(done, frame, model) for done in old.flush(frame.sequence)]
        log.warning(
            "frame size changed from %s to %s: parts in view decided now, the belt model is learned again",
            self._shape,
            shape,
            extra={"event": "parts_restarted", "old_shape": list(self._shape), "new_shape": list(shape)},
        )
        self._next_number = old.next_number
        self._noise_before += old.noise
        self._tracker = None
        return messages

    def finish(self, frame: Frame | None, model: ModelRef | None) -> list[PartMessage]:
        """End of the stream: decide the parts still in view (with enough frames)."""
        if self._tracker is None or frame is None:
            return []
        decided = self._tracker.flush(frame.sequence)
        self.counters.noise = self._noise_before + self._tracker.noise
        return [self._message(done, frame, model) for done in decided]

    def switch(self, config: PartsConfig, frame: Frame | None, model: ModelRef | None) -> list[PartMessage]:
        """A recipe switch (service/recipes.py): the parts in view are decided now with the old recipe's last
        frame and model, then the belt is learned again with ``config``; part ids and counters continue."""
        messages = self.finish(frame, model)
        if self._tracker is not None:
            self._next_number = self._tracker.next_number
            self._noise_before += self._tracker.noise
        self._tracker = None
        self._evidence.clear()
        self.config = config
        self._speed_px_s = self._last_time = None  # another ROI may have another scale: measured again
        return messages

    def _new_evidence(self, verdict: Verdict) -> PartEvidence:
        return PartEvidence(verdict.log10_epsilon, candidate_slack=self.config.candidate_slack)

    def _measure_speed(self, tracker: PartTracker, capture_time: float) -> None:
        if self._last_time is not None and capture_time > self._last_time:
            speed = tracker.motion.last_px / (capture_time - self._last_time)
            self._speed_px_s = speed if self._speed_px_s is None else 0.8 * self._speed_px_s + 0.2 * speed
        self._last_time = capture_time

    def _message(self, done: DecidedPart, frame: Frame, model: ModelRef | None) -> PartMessage:
        track = done.track
        evidence = self._evidence.pop(track.part_id, None)
        decision = evidence.decide(track.u1 - track.u0) if evidence is not None and evidence.observations else None
        self.counters.decided += 1
        anomalous = bool(decision and decision.anomalous)
        self.counters.anomalous += int(anomalous)
        centre = (done.leading_x + done.trailing_x) / 2.0
        beyond = (
            done.decision_line_x - centre if self.config.direction == "right_to_left" else centre - done.decision_line_x
        )
        px_per_m = self.config.px_per_m
        return PartMessage(
            device_id=self.device_id,
            part_id=track.part_id,
            mode="tracked",
            anomalous=anomalous,
            log_nfa=decision.log_nfa if decision else 0.0,
            log10_epsilon=decision.log10_epsilon if decision else 0.0,
            first_capture_time=track.first_capture_time,
            decision_time=frame.capture_time,
            frames=PartFrames(count=track.frames, first_sequence=track.first_frame, last_sequence=track.last_frame),
            regions=_regions(decision, frame.roi_offset),
            position_at_decision=PartPosition(
                leading_x=round(done.leading_x, 2),
                trailing_x=round(done.trailing_x, 2),
                decision_line_x=round(done.decision_line_x, 2),
                beyond_line_px=round(beyond, 2),
                beyond_line_m=None if px_per_m is None else round(beyond / px_per_m, 5),
                belt_px_s=None if self._speed_px_s is None else round(self._speed_px_s, 2),
            ),
            model=model,
            latency_ms=round((time.monotonic() - frame.monotonic) * 1000.0, 3),
        )


def _regions(decision: PartDecision | None, offset: tuple[int, int]) -> list[PartRegion]:
    """The part's significant regions, the most significant first, at most MAX_PART_REGIONS (the message must stay
    under the relay's size limit; the part's own log NFA is the first one's)."""
    if decision is None:
        return []
    significant = sorted(
        (r for r in decision.regions if np.isfinite(r.log_nfa) and r.log_nfa < decision.log10_epsilon),
        key=lambda r: r.log_nfa,
    )[:MAX_PART_REGIONS]
    return [
        PartRegion(
            bbox=r.bbox,
            log_nfa=round(r.log_nfa, 4),
            frames=r.frames,
            best_sequence=r.best_sequence,
            best_bbox=(r.best_bbox[0] + offset[0], r.best_bbox[1] + offset[1], r.best_bbox[2], r.best_bbox[3]),
            best_frame_log_nfa=round(r.best_frame_log_nfa, 4),
        )
        for r in significant
    ]


def _view_of(sequence: int, in_view: list[TrackedPart], tracker: PartTracker, verdicts: dict[str, bool]) -> PartsView:
    return PartsView(
        sequence=sequence,
        parts=tuple((p.track.part_id, p.x0, p.x1, p.track.decided) for p in in_view),
        rejected=frozenset(p.track.part_id for p in in_view if verdicts.get(p.track.part_id)),
        decision_line_x=tracker.decision_x,
        direction=tracker.settings.direction,
        undecided=frozenset(t.part_id for t in tracker.tracks),
    )
