"""The records the pipeline's stages hand each other, and the seams around the pipeline.

Each stage hands the next an immutable record of what it made: ``Captured`` (capture) -> ``Inferred``
(infer) -> ``Scored`` (NFA); the publish stage makes ``FrameJob``, the complete published frame that every
``FrameObserver`` sees (nothing optional but the mode's ``trigger`` and ``parts_view``, so no reader asserts).
``Publisher`` is where the publish stage hands its messages, ``PartStage`` the tracker of tracked mode.
``inspection_message`` makes a scored frame's MQTT message (the pipeline and ``single.inspect_frame``).
The pipeline itself is pipeline.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from edge_agent.engines.base import EngineOutput
from edge_agent.inspection.drivers import Frame
from edge_agent.inspection.loaded_model import LoadedModel
from edge_agent.inspection.scoring import Verdict
from edge_agent.inspection.triggers import Trigger
from edge_agent.messages import MAX_INSPECTION_REGIONS, InspectionMessage, ModelRef, PartMessage, StageLatency

if TYPE_CHECKING:
    from edge_agent.inspection.parts import PartsView


@dataclass(frozen=True)
class Captured:
    """Stage 1 (capture): a frame read from the source, and in triggered mode the trigger it serves."""

    frame: Frame
    capture_ms: float
    trigger: Trigger | None = None


@dataclass(frozen=True)
class Inferred:
    """Stage 2 (infer): the model that inferred the frame (it also scores and labels it) and its maps."""

    captured: Captured
    model: LoadedModel
    output: EngineOutput
    preprocess_ms: float
    infer_ms: float


@dataclass(frozen=True)
class Scored:
    """Stage 3 (NFA): the verdict."""

    inferred: Inferred
    verdict: Verdict
    nfa_ms: float
    nfa_done: float  # monotonic time the NFA stage finished


@dataclass(frozen=True)
class FrameJob:
    """Stage 4 (publish): a published frame with what every stage made of it, as observers see it.

    Immutable and complete: only ``trigger`` (triggered mode) and ``parts_view`` (tracked mode) may be None.
    """

    frame: Frame
    model: LoadedModel
    output: EngineOutput
    verdict: Verdict
    message: InspectionMessage
    trigger: Trigger | None = None
    parts_view: PartsView | None = None  # tracked mode: the parts in view of this frame (the preview)


class Publisher(Protocol):
    """Where the pipeline hands each result (publish/mqtt.py's MqttPublisher): the frame's path never
    imports its last stage, so inspection/ depends only on this and on the message models."""

    def publish_inspection(self, message: InspectionMessage) -> object:
        """Queue one inspection message (the return value, e.g. whether it was queued, is not read)."""
        ...

    def publish_part(self, message: PartMessage) -> object:
        """Queue one part message."""
        ...


class FrameObserver(Protocol):
    """What runs beside the stages on every published frame and every decided part (metrics, the line-to-model
    loop, the PLC, a caller's hook), on the publish thread, in the order the observers were added.

    The one error policy: an observer that raises is logged (``observer_failed``, with its traceback) and
    counted (``Pipeline.observer_failures``); the frame, the other observers and the pipeline go on. An
    observer never stops inspection: only a failing stage does. An observer must be quick (heavier work goes to
    its own thread) and must not keep the frame's arrays beyond what it needs.
    """

    def on_frame(self, job: FrameJob) -> None:
        """A frame was published (its inspection message is handed to the publisher)."""
        ...

    def on_part(self, job: FrameJob, part: PartMessage) -> None:
        """A part was decided and published; ``job`` is the frame that decided it."""
        ...


@dataclass(frozen=True)
class Hooks:
    """A ``FrameObserver`` made of functions (either may be left out); ``name`` is what a failure is logged as.

    The functions may return a value (what they did, for their own tests); the pipeline ignores it.
    """

    name: str
    frame: Callable[[FrameJob], object] | None = field(default=None, repr=False)
    part: Callable[[FrameJob, PartMessage], object] | None = field(default=None, repr=False)

    def on_frame(self, job: FrameJob) -> None:
        if self.frame is not None:
            self.frame(job)

    def on_part(self, job: FrameJob, part: PartMessage) -> None:
        if self.part is not None:
            self.part(job, part)


class PartStage(Protocol):
    """Frames in, part messages out (edge_agent.inspection.parts.TrackedParts)."""

    @property
    def view(self) -> PartsView | None: ...

    def observe(self, frame: Frame, verdict: Verdict, model: ModelRef | None) -> list[PartMessage]: ...

    def finish(self, frame: Frame | None, model: ModelRef | None) -> list[PartMessage]: ...


def inspection_message(scored: Scored, device_id: str) -> InspectionMessage:
    """The MQTT message for a scored frame; ``publish`` and ``total`` latency end now."""
    inferred, verdict = scored.inferred, scored.verdict
    captured = inferred.captured
    frame = captured.frame
    now = time.monotonic()
    latency = StageLatency(
        capture=round(captured.capture_ms, 3),
        preprocess=round(inferred.preprocess_ms, 3),
        infer=round(inferred.infer_ms, 3),
        nfa=round(scored.nfa_ms, 3),
        publish=round((now - scored.nfa_done) * 1000.0, 3),
        total=round((now - frame.monotonic) * 1000.0, 3),
    )
    return InspectionMessage(
        device_id=device_id,
        sequence=frame.sequence,
        capture_time=frame.capture_time,
        source=frame.source_id,
        model=inferred.model.ref,
        image_score=verdict.image_score,
        anomalous=verdict.anomalous,
        log10_epsilon=verdict.log10_epsilon,
        regions=list(verdict.regions[:MAX_INSPECTION_REGIONS]),  # most significant first; under the relay's limit
        frame_size=frame.frame_size,
        latency_ms=latency,
    )
