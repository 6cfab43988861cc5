"""``[model] shadow``: a candidate model judged on a share of the live frames (edge_agent/inspection/shadow.py).

One loop component (an ``AgentPart`` and a pipeline ``FrameObserver``, edge_agent/service/loop.py). ``start``
loads the candidate (a candidate that cannot load is logged, not fatal); the runner's own niced thread does
the work, only while the live stages have no backlog; its totals are saved now and then and at the stop, so
they survive a restart.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from edge_agent.config import AgentSettings
from edge_agent.inspection.pipeline import FrameJob, Pipeline
from edge_agent.inspection.shadow import ShadowRunner
from edge_agent.messages import PartMessage
from edge_agent.service.loop_metrics import shadow_figures

log = logging.getLogger(__name__)

SHADOW_STATE_EVERY_S = 60.0


class ShadowCheck:
    """The shadow runner of one agent, once ``start`` has loaded it."""

    def __init__(self, settings: AgentSettings, path: Path, pipeline: Pipeline) -> None:
        self.settings = settings
        self.path = path
        self.pipeline = pipeline
        self.runner: ShadowRunner | None = None
        self._next_save = 0.0
        self._drops_seen = 0

    def start(self) -> None:
        """Load, verify and start the candidate; a failure is logged and the agent runs without it."""
        from edge_agent.fleet.signing import SigningError, verify_installed_bundle
        from edge_agent.inspection.loaded_model import ModelLoadError, load_model
        from edge_agent.inspection.shadow import STATE_NAME, load_state

        # One ONNX Runtime thread: the shadow's work stays on its own niced thread.
        config = self.settings.model.model_copy(update={"threads": 1})
        try:
            # Like the live bundle: with a fleet key configured, the shadow must carry a valid signature too
            # (it runs on live frames, and its totals open the fleet's shadow gate).
            verify_installed_bundle(self.path, self.settings.update.public_key)
            candidate = load_model(self.path, config, self.settings.nfa)
        except (ModelLoadError, SigningError) as exc:
            log.error("cannot load the shadow model: %s", exc, extra={"event": "shadow_failed", "error": str(exc)})
            return
        runner = ShadowRunner(
            candidate,
            self.settings.model.shadow_share,
            self.settings.device_id,
            live_backlog=self._live_pressure,
        )
        resumed = runner.resume(load_state(self.settings.state_dir / STATE_NAME))
        runner.start()
        self.runner = runner
        log.info(
            "shadow model running",
            extra={
                "event": "shadow_started",
                "candidate": runner.report.candidate,
                "share": runner.share,
                "resumed": resumed,
            },
        )

    def on_frame(self, job: FrameJob) -> None:
        """Offer the frame to the runner (it takes it only when its share and the live backlog allow)."""
        if self.runner is not None:
            self.runner.offer(job)

    def on_part(self, job: FrameJob, part: PartMessage) -> None:
        """The shadow compares frames, not parts."""

    def tick(self) -> None:
        """Save the totals every ``SHADOW_STATE_EVERY_S``."""
        if self.runner is not None and time.monotonic() >= self._next_save:
            self._next_save = time.monotonic() + SHADOW_STATE_EVERY_S
            self._save_state()

    def stop(self) -> None:
        """Save the totals and close the candidate."""
        if self.runner is not None:
            self._save_state()
            self.runner.stop()

    def figures(self) -> dict[str, Any]:
        """The ``stats`` message's ``shadow`` (None until the candidate runs)."""
        return {"shadow": shadow_figures(self.runner) if self.runner is not None else None}

    def problems(self) -> list[str]:
        """None: a shadow that cannot load or fails is logged and counted, the live inspection is fine."""
        return []

    def _live_pressure(self) -> int:
        """Frames waiting in the live stages plus live frames dropped since the last look: 0 means spare time."""
        dropped = self.pipeline.frames_dropped
        new_drops, self._drops_seen = dropped - self._drops_seen, dropped
        return self.pipeline.backlog + new_drops

    def _save_state(self) -> None:
        from edge_agent.inspection.shadow import STATE_NAME, save_state

        if self.runner is None:
            return
        try:
            save_state(self.settings.state_dir / STATE_NAME, self.runner.state())
        except OSError as exc:
            log.warning("cannot save the shadow totals: %s", exc, extra={"event": "shadow_state_failed"})
