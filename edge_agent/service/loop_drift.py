"""``[drift]``: the live frames against the bundle's training images (edge_agent/inspection/drift.py).

One loop component (an ``AgentPart`` and a pipeline ``FrameObserver``, edge_agent/service/loop.py). It samples
at most one frame per ``drift.sample_every_s`` on the publish thread, and starts again from scratch with the
new bundle's reference after a reload.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edge_agent.bundle import Bundle
from edge_agent.config import DriftConfig
from edge_agent.inspection.drift import DriftMonitor, model_statistics
from edge_agent.inspection.loaded_model import LoadedModel
from edge_agent.inspection.pipeline import FrameJob
from edge_agent.inspection.preprocess import model_input
from edge_agent.messages import PartMessage
from edge_agent.service.loop_metrics import drift_figures

log = logging.getLogger(__name__)


class DriftCheck:
    """The drift monitor of the model being served, fed by the published frames."""

    def __init__(self, config: DriftConfig, model: LoadedModel) -> None:
        self.config = config
        self._bundle: Bundle | None = None
        self._reasons: list[str] = []
        self.monitor = self._new_monitor(model)

    def _new_monitor(self, model: LoadedModel) -> DriftMonitor:
        manifest = model.bundle.manifest
        self._bundle = model.bundle
        self._reasons = []
        reference = manifest.drift_reference
        if reference is None:
            log.warning(
                "the bundle has no drift reference (exported before drift checks): the drift check is off",
                extra={"event": "drift_off", "model": manifest.name, "version": manifest.version},
            )
        return DriftMonitor(reference, self.config)

    def on_frame(self, job: FrameJob) -> None:
        """Sample the frame when one is due; log a change of the drift reasons."""
        monitor = self.monitor
        if job.model.bundle is not self._bundle:
            # A reloaded model was trained on other images: compare with its own reference, from scratch.
            monitor = self.monitor = self._new_monitor(job.model)
        if not monitor.due():
            return
        rgb = model_input(job.frame.image, *job.model.input_size)
        passed = not job.message.anomalous
        stats = model_statistics(job.output.anomaly_map, np.asarray(job.output.scale_maps[0])) if passed else None
        monitor.add(rgb, passed, stats)
        # The report costs a few sorts of the window: once per sample (at most sample_every_s), to log changes.
        reasons = monitor.report().reasons
        if reasons != self._reasons:
            level, event = (logging.WARNING, "drift_detected") if reasons else (logging.INFO, "drift_cleared")
            log.log(
                level,
                "drift: %s",
                ", ".join(reasons) or "none",
                extra={
                    "event": event,
                    "reasons": reasons,
                    "previous": self._reasons,
                    "frames_sampled": monitor.frames_sampled,
                    "sequence": job.frame.sequence,
                },
            )
            self._reasons = reasons

    def on_part(self, job: FrameJob, part: PartMessage) -> None:
        """Parts do not feed the drift check (their frames already did)."""

    def start(self) -> None:
        """Nothing to start: the check runs on the publish thread."""

    def tick(self) -> None:
        """Nothing time-based."""

    def stop(self) -> None:
        """Nothing to release."""

    def figures(self) -> dict[str, Any]:
        """The ``stats`` message's ``drift``."""
        return {"drift": drift_figures(self.monitor)}

    def problems(self) -> list[str]:
        """One sentence per drifting statistic."""
        return self.monitor.report().problems
