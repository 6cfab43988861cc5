"""Progress of a TensorRT build, which can take many minutes on a Jetson: TensorRT's logger and progress
monitor, and a heartbeat that keeps systemd's start timeout extended while the build makes progress."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from edge_agent.systemd import SystemdNotifier

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALL_S = 600.0  # no TensorRT progress for this long: stop extending systemd's start timeout


@dataclass
class BuildProgress:
    """Build phases and their timing, fed by TensorRT's progress monitor; thread-safe, pure Python.

    ``step`` returns False once ``cancel`` is set, which asks TensorRT to stop the build.
    """

    started: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    log_every_s: float = 10.0
    _phases: dict[str, tuple[float, int, str | None]] = field(default_factory=dict)
    _last_log: float = 0.0
    _last_activity: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def idle_s(self) -> float:
        """Seconds since TensorRT last reported a phase or a step (or since the build started)."""
        with self._lock:
            return time.monotonic() - self._last_activity

    def phase_start(self, name: str, parent: str | None, steps: int) -> None:
        with self._lock:
            self._phases[name] = (time.monotonic(), steps, parent)
            self._last_activity = time.monotonic()
        if parent is None:  # nested phases are many and short; the top level is what a person follows
            log.info(
                f"TensorRT build phase started: {name}",
                extra={
                    "event": "trt_phase_start",
                    "phase": name,
                    "steps": steps,
                    "elapsed_s": round(self.elapsed(), 1),
                },
            )

    def step(self, name: str, step: int) -> bool:
        now = time.monotonic()
        with self._lock:
            self._last_activity = now
            _, steps, _ = self._phases.get(name, (now, 0, None))
            due = now - self._last_log >= self.log_every_s
            if due:
                self._last_log = now
        if due:
            log.info(
                f"TensorRT build: {name} {step}/{steps}",
                extra={
                    "event": "trt_progress",
                    "phase": name,
                    "step": step,
                    "steps": steps,
                    "elapsed_s": round(self.elapsed(), 1),
                },
            )
        return not self.cancel.is_set()

    def phase_finish(self, name: str) -> None:
        with self._lock:
            began, _, parent = self._phases.pop(name, (time.monotonic(), 0, None))
            self._last_activity = time.monotonic()
        if parent is None:
            log.info(
                f"TensorRT build phase finished: {name} in {time.monotonic() - began:.1f} s",
                extra={
                    "event": "trt_phase_finish",
                    "phase": name,
                    "phase_s": round(time.monotonic() - began, 1),
                    "elapsed_s": round(self.elapsed(), 1),
                },
            )

    def active_phases(self) -> list[str]:
        with self._lock:
            return list(self._phases)


class Heartbeat:
    """Logs "still building" with the elapsed time every ``period`` seconds until stopped, and keeps
    systemd's start timeout from killing a build that is making progress.

    TensorRT's progress monitor can be silent for minutes inside one tactic search; a person
    watching ``journalctl`` must still see that the build is alive. Under systemd (NOTIFY_SOCKET set:
    the agent's Type=notify unit, or the build unit with NotifyAccess=main) each beat sends
    EXTEND_TIMEOUT_USEC while TensorRT reported a phase or step in the last ``stall_s`` seconds: a
    killed build starts again from nothing, so a progressing one must be allowed to finish, and a
    stuck one must still time out.
    """

    def __init__(
        self,
        progress: BuildProgress,
        what: str,
        period: float = HEARTBEAT_S,
        notifier: SystemdNotifier | None = None,
        stall_s: float = STALL_S,
    ) -> None:
        self._progress = progress
        self._what = what
        self._period = period
        self._own_notifier = notifier is None
        self._notifier = notifier if notifier is not None else SystemdNotifier()
        self._stall_s = stall_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trt-build-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._own_notifier:
            self._notifier.close()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            elapsed = self._progress.elapsed()
            log.info(
                f"still building the TensorRT engine for {self._what}: {elapsed:.0f} s elapsed",
                extra={
                    "event": "trt_build_heartbeat",
                    "elapsed_s": round(elapsed, 1),
                    "phases": self._progress.active_phases(),
                },
            )
            if self._progress.idle_s() <= self._stall_s:
                # Three beats of margin: one late or lost datagram must not let the timeout fire.
                self._notifier.extend_timeout(
                    3 * self._period, status=f"building TensorRT engine for {self._what}: {elapsed:.0f} s"
                )


_TRT_LEVELS = {
    "INTERNAL_ERROR": logging.CRITICAL,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "INFO": logging.DEBUG,
    "VERBOSE": logging.DEBUG,
}


def make_trt_logger(trt: ModuleType, verbose: bool = False) -> Any:
    """A ``trt.ILogger`` that forwards TensorRT's messages to Python logging (journald)."""
    trt_log = logging.getLogger("tensorrt")
    minimum = trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.WARNING

    base: Any = trt.ILogger  # the base comes from the module passed in (real or fake TensorRT)

    class _Logger(base):  # type: ignore[misc]  # the base is the runtime TensorRT module's class: no stubs
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # the binding requires the explicit base __init__

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) > int(minimum):  # lower value = more severe
                return
            level = _TRT_LEVELS.get(getattr(severity, "name", str(severity)).split(".")[-1], logging.INFO)
            trt_log.log(level, msg, extra={"event": "tensorrt_log"})

    return _Logger()


def make_progress_monitor(trt: ModuleType, progress: BuildProgress) -> Any:
    """A ``trt.IProgressMonitor`` (TensorRT >= 10.0) that feeds ``progress``."""

    base: Any = trt.IProgressMonitor

    class _Monitor(base):  # type: ignore[misc]  # as _Logger: a class of the TensorRT module passed in
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return progress.step(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            progress.phase_finish(phase_name)

    return _Monitor()
