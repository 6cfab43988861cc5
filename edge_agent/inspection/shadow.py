"""Shadow mode: a candidate bundle judges a share of the live frames, with spare time only, and is compared.

``[model] shadow = PATH`` loads a second bundle next to the live one. After a live frame is published, the
publish thread offers it here (``offer``: a few comparisons, never a wait). It is handed to the shadow's own
thread only when all of these hold:

- the frame is in the configured share (``model.shadow_share``; a credit counter, so exactly that share,
  evenly spread);
- the shadow thread is idle (one frame at a time: a slow candidate skips frames, it never queues them);
- the live pipeline has no backlog (no frame waiting for inference or NFA) and its live source dropped no
  frame since the last offer: the live model is not behind.

The shadow thread runs at the lowest CPU priority (SCHED_IDLE and nice 19, for this thread only) and its
ONNX Runtime session uses one thread, so the kernel gives it only time the live stages do not want. Nothing it does
is published as an inspection; its figures (``ShadowReport``) go into stats and /metrics: frames compared,
verdict agreement, the frames where the two differ (either way) and the candidate's would-be rejects.

The running totals are also saved to ``<state_dir>/shadow.json`` (``save_state``), keyed by the
candidate's model sha256, so they survive a restart of the agent, and the fleet updater can require
hours of agreement before it installs that version (``gate_problem``; ``shadow_gate`` per group in
latest.json). The hours are active time: the time between compared frames, each gap counted up to
``ACTIVE_GAP_S``, so a stopped agent or a stopped line adds nothing (wall time since the start would count
a week of downtime as a week of shadowing). The gate also needs ``min_compared`` frames and the exact model
(its sha256, checked by the updater on the downloaded, signature-checked bundle), not only its version.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_agent.fileio import atomic_write
from edge_agent.inspection.loaded_model import LoadedModel
from edge_agent.inspection.pipeline import FrameJob
from edge_agent.inspection.single import inspect_frame
from edge_agent.thread_priority import lower_thread_priority

log = logging.getLogger(__name__)

STATE_NAME = "shadow.json"
RECENT_DIFFERENCES = 20
SHADOW_NICE = 19
# The longest gap between two compared frames that counts as shadow time: beyond it the agent was stopped,
# the line idle or the shadow starved, and the rest of the gap does not count.
ACTIVE_GAP_S = 60.0


@dataclass(frozen=True)
class Difference:
    """One frame the two models judged differently."""

    sequence: int
    capture_time: float
    live_anomalous: bool
    live_score: float
    candidate_score: float


@dataclass
class ShadowReport:
    """The comparison so far (stats topic, /metrics, the fleet gate)."""

    candidate: str  # "<name> <version>"
    candidate_sha256: str
    started: float  # unix time the shadow started
    offered: int = 0
    compared: int = 0
    agreed: int = 0
    candidate_rejects: int = 0  # frames the candidate would have rejected
    live_rejects: int = 0  # of the compared frames
    candidate_only: int = 0  # candidate rejects, live passes
    live_only: int = 0  # live rejects, candidate passes
    skipped_share: int = 0
    skipped_busy: int = 0  # the shadow was still busy with an earlier frame
    skipped_backlog: int = 0  # the live pipeline had frames waiting
    failures: int = 0
    cpu_s: float = 0.0  # CPU time the shadow thread spent judging frames (its whole cost to the box)
    active_s: float = 0.0  # shadow time that counts for the fleet gate (ACTIVE_GAP_S), earlier runs included
    recent_differences: list[Difference] = field(default_factory=list)

    @property
    def agreement(self) -> float | None:
        """Share of compared frames with the same verdict (None before the first)."""
        return self.agreed / self.compared if self.compared else None


class ShadowRunner:
    """Runs ``candidate`` on a share of the live frames in a low-priority thread and compares verdicts."""

    def __init__(
        self,
        candidate: LoadedModel,
        share: float,
        device_id: str,
        live_backlog: Callable[[], int] = lambda: 0,
    ) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError("the shadow share must be in (0, 1]")
        self.candidate = candidate
        self.share = share
        self.device_id = device_id
        self.live_backlog = live_backlog
        ref = candidate.ref
        self.report = ShadowReport(f"{ref.name} {ref.version}", ref.sha256, time.time())
        self._credit = 0.0
        self._pending: FrameJob | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._busy = False
        self._differences: deque[Difference] = deque(maxlen=RECENT_DIFFERENCES)
        self._lock = threading.Lock()
        self._last_compared: float | None = None  # monotonic time of the last comparison (this run only)
        self._thread: threading.Thread | None = None
        self.native_id: int | None = None  # the shadow thread's kernel id (its nice value is per thread)

    def start(self) -> None:
        """Start the shadow thread."""
        self._thread = threading.Thread(target=self._loop, name="shadow", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the frame in progress (bounded wait) and close the candidate."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self.candidate.close()

    def offer(self, job: FrameJob) -> str:
        """Pipeline observer (publish thread): hand the frame over when due and there is room; never waits.

        Returns what happened: ``queued``, ``share``, ``busy`` or ``backlog``.
        """
        report = self.report
        report.offered += 1
        self._credit += self.share
        if self._credit < 1.0 - 1e-9:  # (float sums: ten times 0.1 is 0.999...)
            report.skipped_share += 1
            return "share"
        if self._busy or self._pending is not None:
            report.skipped_busy += 1  # the credit stays: the next free moment takes the next frame
            return "busy"
        if self.live_backlog() > 0:
            report.skipped_backlog += 1
            return "backlog"
        self._credit -= 1.0
        with self._wake:
            self._pending = job
            self._busy = True
            self._wake.notify_all()
        return "queued"

    def resume(self, state: ShadowState | None) -> bool:
        """Continue the totals of an earlier run of this same candidate (its sha256); True when resumed."""
        if state is None or state.sha256 != self.report.candidate_sha256:
            return False
        with self._lock:
            self.report.started = state.started
            self.report.compared += state.compared
            self.report.agreed += state.agreed
            self.report.candidate_rejects += state.candidate_rejects
            self.report.active_s += state.active_s
        return True

    def state(self) -> ShadowState:
        """What ``save_state`` writes."""
        report, ref = self.snapshot(), self.candidate.ref
        return ShadowState(
            ref.version,
            ref.sha256,
            report.started,
            time.time(),
            report.compared,
            report.agreed,
            report.candidate_rejects,
            report.active_s,
        )

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until the shadow has no frame (tests); True when idle in time."""
        deadline = time.monotonic() + timeout
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._busy

    def snapshot(self) -> ShadowReport:
        """A consistent copy of the report."""
        with self._lock:
            copy = ShadowReport(**{**self.report.__dict__, "recent_differences": list(self._differences)})
        return copy

    # -- the shadow thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        self.native_id = lower_thread_priority(SHADOW_NICE, idle=True)
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._pending is not None or self._stopping)
                if self._stopping:
                    return
                job, self._pending = self._pending, None
            started = time.thread_time()
            try:
                assert job is not None
                self._compare(job)
            except Exception as exc:  # a failing candidate must never touch the live inspection
                self.report.failures += 1
                if self.report.failures in (1, 10, 100):
                    log.warning("shadow model failed: %s", exc, extra={"event": "shadow_failed", "error": str(exc)})
            finally:
                self.report.cpu_s += time.thread_time() - started
                self._busy = False

    def _compare(self, live: FrameJob) -> None:
        shadow = inspect_frame(self.candidate, live.frame, self.device_id)
        live_bad, shadow_bad = live.message.anomalous, shadow.message.anomalous
        now = time.monotonic()
        with self._lock:
            report = self.report
            if self._last_compared is not None:
                report.active_s += min(now - self._last_compared, ACTIVE_GAP_S)
            self._last_compared = now
            report.compared += 1
            report.agreed += int(live_bad == shadow_bad)
            report.live_rejects += int(live_bad)
            report.candidate_rejects += int(shadow_bad)
            report.candidate_only += int(shadow_bad and not live_bad)
            report.live_only += int(live_bad and not shadow_bad)
            if live_bad != shadow_bad:
                self._differences.append(
                    Difference(
                        live.frame.sequence,
                        live.frame.capture_time,
                        live_bad,
                        live.message.image_score,
                        shadow.message.image_score,
                    )
                )


@dataclass(frozen=True)
class ShadowState:
    """The shadow's totals on disk (``<state_dir>/shadow.json``), for restarts and the fleet gate."""

    version: str
    sha256: str
    started: float  # unix time the shadow of this candidate began
    updated: float  # unix time of this save
    compared: int
    agreed: int
    candidate_rejects: int = 0
    active_s: float = 0.0  # shadow time that counts (not the downtime between started and updated)

    @property
    def hours(self) -> float:
        """Active shadow hours (``active_s``); a file from before active time was kept has none."""
        return max(0.0, self.active_s) / 3600.0

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None


def save_state(path: Path, state: ShadowState) -> None:
    """Write the state atomically (a crash leaves the old file or the new one)."""
    atomic_write(Path(path), json.dumps(asdict(state), indent=1) + "\n")


def load_state(path: Path) -> ShadowState | None:
    """The saved state, or None when there is none or it is unreadable (then the gate stays closed)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return ShadowState(**{k: raw[k] for k in ShadowState.__dataclass_fields__ if k in raw})
    except (OSError, ValueError, TypeError):
        return None


def gate_problem(
    path: Path, version: str, hours: float, min_agreement: float, min_compared: int = 1, sha256: str | None = None
) -> str | None:
    """Why ``version`` may not be installed yet under a shadow requirement; None when it may.

    ``sha256``: the model the update would install (its ONNX file's sha256 from the signature-checked
    bundle); the shadow must have run that exact model. Without it (before the download) only the version
    is compared."""
    state = load_state(path)
    if state is None or state.version != version:
        shadowed = f" (the shadow runs {state.version})" if state is not None else ""
        return f"{version} has not run as the shadow model on this box yet{shadowed}; set model.shadow to it first"
    if sha256 is not None and state.sha256 != sha256:
        return (
            f"the shadow ran another model under version {version} (sha256 {state.sha256[:12]}…, the release's "
            f"is {sha256[:12]}…); set model.shadow to the published bundle"
        )
    agreement = state.agreement
    if state.hours < hours:
        return f"{version} has been the shadow for {state.hours:.1f} of the {hours:g} active hours required"
    if state.compared < min_compared:
        return f"{version} was compared on {state.compared} of the {min_compared} frames required"
    if agreement is None or agreement < min_agreement:
        shown = "no frames" if agreement is None else f"{agreement:.2%} of {state.compared} frames"
        return f"{version} agreed with the live model on {shown}; {min_agreement:.2%} required"
    return None
