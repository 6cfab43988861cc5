"""The line-to-model loop in stats and /metrics: kept frames, drift, the shadow model, a running recording.

``kept_figures``, ``drift_figures``, ``shadow_figures`` and ``recording_figures`` are the ``stats``
message's parts (each loop component's ``figures()``, edge_agent/service/loop.py); ``LoopCollector`` is the
/metrics part, read at scrape time (nothing per frame) from the ``LoopParts`` the agent runs then.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.inspection.drift import REASONS, DriftMonitor
from edge_agent.inspection.shadow import ShadowRunner
from edge_agent.service.keep import FrameKeeper
from edge_agent.service.recorder import FrameRecorder


@dataclass(frozen=True)
class LoopParts:
    """The loop parts the agent runs now (each may be None; the drift monitor is replaced on a reload)."""

    keeper: FrameKeeper | None = None
    drift: DriftMonitor | None = None
    shadow: ShadowRunner | None = None


def _finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def kept_figures(keeper: FrameKeeper) -> dict[str, Any] | None:
    """The ``stats`` message's ``kept`` figures (None when keeping is off)."""
    if not keeper.active:
        return None
    return {**keeper.counters.__dict__, "problem": keeper.problem}


def drift_figures(drift: DriftMonitor) -> dict[str, Any]:
    """The ``stats`` message's ``drift`` figures."""
    report = drift.report()
    return {
        "enabled": report.enabled,
        "note": report.note,
        "reasons": report.reasons,
        "statistics": {
            s.name: {
                "distance": round(s.distance, 4),
                "relative_shift": _finite(s.relative_shift),
                "window_median": _finite(s.window_median),
                "reference_median": _finite(s.reference_median),
                "frames": s.frames,
                "drifting": s.drifting,
            }
            for s in report.stats
        },
    }


def shadow_figures(runner: ShadowRunner) -> dict[str, Any]:
    """The ``stats`` message's ``shadow`` figures."""
    shadow = runner.snapshot()
    return {
        **{k: v for k, v in shadow.__dict__.items() if k != "recent_differences"},
        "agreement": shadow.agreement,
        "recent_differences": [d.__dict__ for d in shadow.recent_differences],
    }


def recording_figures(recorder: FrameRecorder) -> dict[str, Any]:
    """The ``stats`` message's ``recording`` figures (the running recording, or the last one)."""
    return {**recorder.summary(), "done": recorder.done}


class LoopCollector(Collector):
    """/metrics families of the loop parts, read at scrape time."""

    def __init__(self, parts: Callable[[], LoopParts]) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        parts = self.parts()
        keeper, drift, shadow = parts.keeper, parts.drift, parts.shadow
        if keeper is not None and keeper.active:
            c = keeper.counters
            kept = CounterMetricFamily("edge_agent_kept_frames", "Frames kept for review, by kind.", labels=["kind"])
            kept.add_metric(["flagged"], c.kept_flagged)
            kept.add_metric(["good"], c.kept_good)
            kept.add_metric(["part"], c.kept_parts)
            yield kept
            skipped = CounterMetricFamily(
                "edge_agent_kept_skipped", "Frames due to be kept but not written, by reason.", labels=["reason"]
            )
            skipped.add_metric(["busy"], c.skipped_busy)
            skipped.add_metric(["disk"], c.skipped_disk)
            yield skipped
            yield CounterMetricFamily(
                "edge_agent_kept_removed", "Kept frames removed to hold keep.max_total_mb.", value=c.removed_quota
            )
            yield GaugeMetricFamily("edge_agent_kept_bytes", "Bytes of kept frames on disk.", value=c.bytes_kept)
        if drift is not None and drift.enabled:
            report = drift.report()
            distance = GaugeMetricFamily(
                "edge_agent_drift_distance",
                "KS distance of the window to the training images, by statistic.",
                labels=["statistic"],
            )
            shift = GaugeMetricFamily(
                "edge_agent_drift_relative_shift",
                "Window median vs training median, relative, by statistic.",
                labels=["statistic"],
            )
            for s in report.stats:
                distance.add_metric([s.name], s.distance)
                shift.add_metric([s.name], s.relative_shift if math.isfinite(s.relative_shift) else 0.0)
            yield distance
            yield shift
            drifting = GaugeMetricFamily("edge_agent_drifting", "1 while a drift reason is raised.", labels=["reason"])
            for reason in dict.fromkeys(REASONS.values()):
                drifting.add_metric([reason], float(reason in report.reasons))
            yield drifting
        if shadow is not None:
            r = shadow.snapshot()
            frames = CounterMetricFamily(
                "edge_agent_shadow_frames", "Live frames offered to the shadow model, by outcome.", labels=["outcome"]
            )
            frames.add_metric(["compared"], r.compared)
            frames.add_metric(["skipped_share"], r.skipped_share)
            frames.add_metric(["skipped_busy"], r.skipped_busy)
            frames.add_metric(["skipped_backlog"], r.skipped_backlog)
            frames.add_metric(["failed"], r.failures)
            yield frames
            yield CounterMetricFamily(
                "edge_agent_shadow_agreed", "Compared frames with the same verdict.", value=r.agreed
            )
            differ = CounterMetricFamily(
                "edge_agent_shadow_differ", "Compared frames judged differently, by who rejects.", labels=["rejects"]
            )
            differ.add_metric(["candidate_only"], r.candidate_only)
            differ.add_metric(["live_only"], r.live_only)
            yield differ
            yield CounterMetricFamily(
                "edge_agent_shadow_cpu_seconds", "CPU time the shadow model's thread used.", value=r.cpu_s
            )
            yield CounterMetricFamily(
                "edge_agent_shadow_candidate_rejects",
                "Compared frames the candidate would have rejected.",
                value=r.candidate_rejects,
            )
