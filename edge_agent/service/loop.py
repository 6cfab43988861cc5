"""The agent's side of the line-to-model loop: kept frames, drift, the shadow model, recordings, the review page.

``LineLoop`` builds the components the settings ask for, each an ``AgentPart`` (start, tick, stop, figures,
problems: edge_agent/service/agent_part.py) and a pipeline ``FrameObserver`` (cheap on the publish thread:
heavier work has its own thread), written down together as ``LoopComponent``:

- ``Keeping`` (below): flagged frames, a share of good ones and rejected parts, for review ([keep]);
- ``DriftCheck`` (edge_agent/service/loop_drift.py): the frames against the training images ([drift]);
- ``Recording`` (edge_agent/service/loop_record.py): ``cmd/record``;
- ``ShadowCheck`` (edge_agent/service/loop_shadow.py): a candidate model on live frames ([model] shadow).

The loop itself is an ``AgentPart`` over them: the agent calls ``start``, ``tick`` (every supervisor round)
and ``stop``, and reads ``figures`` (the ``stats`` message's ``kept``, ``drift``, ``shadow``, ``recording``)
and ``problems`` (/healthz). ``attach`` hangs the ``record`` command, the review routes and a /metrics
collector on the agent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from edge_agent.config import AgentSettings
from edge_agent.inspection.pipeline import FrameJob, FrameObserver, Pipeline
from edge_agent.messages import PartMessage
from edge_agent.publish.commands import Done
from edge_agent.service.agent_part import AgentPart
from edge_agent.service.disk_budget import training_budget
from edge_agent.service.http_server import HttpServer
from edge_agent.service.keep import FrameKeeper
from edge_agent.service.loop_drift import DriftCheck
from edge_agent.service.loop_metrics import LoopCollector, LoopParts, kept_figures
from edge_agent.service.loop_record import Recording
from edge_agent.service.loop_shadow import ShadowCheck
from edge_agent.service.part_frames import PartFrameBook

# The review page's view of training_dir's size is walked again this often: recordings add to it meanwhile.
REVIEW_REMEASURE_S = 60.0

FIGURES = ("kept", "drift", "shadow", "recording")  # the stats message's loop fields, None when that part is off


class LoopComponent(AgentPart[dict[str, Any]], FrameObserver, Protocol):
    """One component of the loop: an ``AgentPart`` whose figures are ``stats`` fields, fed by the pipeline."""


class Keeping:
    """[keep]: the frames and parts worth a person's look, written by the keeper's own thread."""

    def __init__(self, keeper: FrameKeeper, book: PartFrameBook | None) -> None:
        self.keeper = keeper
        self.book = book  # tracked parts are decided frames after their evidence: the book holds those frames

    @classmethod
    def create(cls, settings: AgentSettings) -> Keeping | None:
        """The keeping the settings ask for, or None when nothing is to be kept."""
        book = PartFrameBook() if settings.parts.mode == "tracked" and settings.keep.flagged else None
        keeper = FrameKeeper(settings.keep, parts_mode=settings.parts.mode != "off", book=book)
        return cls(keeper, book) if keeper.active else None

    def on_frame(self, job: FrameJob) -> None:
        """Note the parts in view (the book), then offer the frame to the keeper."""
        if self.book is not None:
            self.book.observe(job)
        self.keeper.offer(job)

    def on_part(self, job: FrameJob, part: PartMessage) -> None:
        """Offer a decided part (kept when anomalous) with its evidence frame."""
        self.keeper.offer_part(job, part)

    def start(self) -> None:
        """Start the writer thread."""
        self.keeper.start()

    def tick(self) -> None:
        """Nothing time-based (the writer enforces the disk quota as it writes)."""

    def stop(self) -> None:
        """Finish pending writes (bounded)."""
        self.keeper.stop()

    def figures(self) -> dict[str, Any]:
        """The ``stats`` message's ``kept``."""
        return {"kept": kept_figures(self.keeper)}

    def problems(self) -> list[str]:
        """Kept frames that cannot be written."""
        return [self.keeper.problem] if self.keeper.problem else []


class LineLoop:
    """Kept frames, drift, shadow, recordings and review for one agent (see the module docstring)."""

    def __init__(self, settings: AgentSettings, pipeline: Pipeline) -> None:
        self.settings = settings
        self.keeping = Keeping.create(settings)
        self.drift = DriftCheck(settings.drift, pipeline.model) if settings.drift.enabled else None
        self.recording = Recording(settings)
        shadow = settings.model.shadow
        self.shadow = ShadowCheck(settings, shadow, pipeline) if shadow is not None else None
        # In this order the frames reach them, they start and their problems are listed.
        self.components: list[LoopComponent] = [
            c for c in (self.keeping, self.drift, self.recording, self.shadow) if c is not None
        ]
        for component in self.components:
            pipeline.add_observer(component)

    def attach(
        self,
        http: HttpServer | None,
        register_metrics: Callable[[LoopCollector], None],
        register_command: Callable[[str, Callable[[Any], Done]], None],
    ) -> None:
        """Hang the loop on the agent's HTTP server, metrics registry and command processor."""
        register_metrics(LoopCollector(self.running))
        register_command("record", self.recording.record_command)
        if http is not None and self.settings.http.review:
            from edge_agent.service.review import ReviewStore
            from edge_agent.service.review_page import ReviewPage

            keep = self.settings.keep
            assert keep.dir is not None and keep.training_dir is not None
            keeper = self.keeping.keeper if self.keeping is not None else None
            store = ReviewStore(keep.dir, keep.training_dir, training_budget(keep, remeasure_s=REVIEW_REMEASURE_S))
            ReviewPage(store, keeper.forget if keeper else None).register(http)

    def running(self) -> LoopParts:
        """The parts /metrics reads now (the drift monitor is replaced on a reload, the shadow loads at start)."""
        return LoopParts(
            keeper=self.keeping.keeper if self.keeping is not None else None,
            drift=self.drift.monitor if self.drift is not None else None,
            shadow=self.shadow.runner if self.shadow is not None else None,
        )

    # -- AgentPart ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer threads and load the shadow model (a shadow that cannot load is logged, not fatal)."""
        for component in self.components:
            component.start()

    def tick(self) -> None:
        """Every supervisor round: end a recording past its time, save the shadow's totals now and then."""
        for component in self.components:
            component.tick()

    def stop(self) -> None:
        """End a recording first (its last frames are written), then the other components."""
        self.recording.stop()
        for component in self.components:
            if component is not self.recording:
                component.stop()

    def figures(self) -> dict[str, Any]:
        """The ``stats`` message's loop figures (None for a part that is off)."""
        figures: dict[str, Any] = dict.fromkeys(FIGURES)
        for component in self.components:
            figures.update(component.figures())
        return figures

    def problems(self) -> list[str]:
        """/healthz sentences: kept frames that cannot be written, drift."""
        return [problem for component in self.components for problem in component.problems()]
