"""``edge-agent run``: load the bundle, open the source, inspect and publish until stopped.

Start-up order matters to systemd (Type=notify): READY is sent only after the engine is loaded, the
NFA compiled and a full frame path warmed, and the source opened; the MQTT broker may still be
unreachable then (it is retried in the background and never blocks inspection). While the stage
threads are alive and responsive the supervisor loop sends WATCHDOG; a hung stage stops the pings
so systemd restarts the agent.

Exit status: 0 after a clean stop (SIGTERM/SIGINT) or the end of a file or folder; 1 when the bundle,
engine or source cannot be used or a stage failed; 2 for a configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import __version__
from edge_agent.config import AgentSettings, ConfigError, load_settings
from edge_agent.logs import setup_logging
from edge_agent.systemd import SystemdNotifier

if TYPE_CHECKING:
    from edge_agent.bundle import Bundle
    from edge_agent.engines import Engine
    from edge_agent.messages import ModelRef
    from edge_agent.mqtt import MqttPublisher
    from edge_agent.pipeline import FrameJob, Pipeline
    from edge_agent.scoring import FrameScorer
    from edge_agent.sources import FrameSource

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
STATUS_INTERVAL_S = 5.0
SUPERVISE_TICK_S = 0.5
JOIN_TIMEOUT_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent run``."""
    parser.add_argument(
        "--config", type=Path, default=None, help="agent TOML file (EDGE_AGENT_* variables override it)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set mqtt.port=1884 --set source.uri=line1.mp4 (values parse as JSON "
        "when they can: --set source.roi=[0,0,640,480])",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edge-agent run``."""
    try:
        settings = load_settings(args.config, **parse_overrides(args.overrides))
    except ConfigError as exc:
        setup_logging("INFO", "text")
        log.error("configuration error: %s", exc, extra={"event": "config_error"})
        return EXIT_CONFIG
    setup_logging(settings.log_level, settings.log_format)
    return run_agent(settings)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["mqtt.port=1884", ...]`` -> ``{"mqtt": {"port": 1884}}``; a malformed pair is a ConfigError."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. mqtt.port=1884")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return result


def run_agent(
    settings: AgentSettings,
    on_result: Callable[[FrameJob], None] | None = None,
    stop: threading.Event | None = None,
    notifier: SystemdNotifier | None = None,
) -> int:
    """Run the agent until the source ends, ``stop`` is set, or SIGTERM/SIGINT; return the exit status."""
    stop = stop or threading.Event()
    notifier = notifier or SystemdNotifier()
    _use_numba_cache_in(settings.state_dir)
    # Imported here so NUMBA_CACHE_DIR is set before Numba loads (scoring imports the NFA).
    from edge_agent.bundle import BundleError, load_bundle
    from edge_agent.engines import EngineUnavailable, create_engine
    from edge_agent.sources import FrameSource, SourceError, describe_video_io

    log.info(
        "edge agent starting",
        extra={
            "event": "agent_starting",
            "version": __version__,
            "device_id": settings.device_id,
            "bundle": str(settings.model.bundle),
            "source": settings.source.uri,
            **describe_video_io(),
        },
    )
    notifier.status("starting: loading model")
    try:
        bundle = load_bundle(settings.model.bundle)  # type: ignore[arg-type]
        engine = create_engine(bundle, settings.model)
    except (BundleError, EngineUnavailable) as exc:
        log.error(
            "cannot load the model: %s", exc, extra={"event": "model_failed", "bundle": str(settings.model.bundle)}
        )
        notifier.stopping(f"failed: {exc}")
        return EXIT_FAILURE
    try:
        # The source first: a missing camera or file should fail in a second, not after the warm-up.
        source = FrameSource(settings.source)
        notifier.status(f"starting: opening {source.kind} {settings.source.uri}")
        source.open()
    except SourceError as exc:
        log.error("cannot open the source: %s", exc, extra={"event": "source_failed", "source": settings.source.uri})
        engine.close()
        notifier.stopping(f"failed: {exc}")
        return EXIT_FAILURE
    try:
        # The first start compiles the NFA (seconds on a small CPU): ask systemd for time, don't get killed.
        notifier.extend_timeout(120, "starting: compiling the NFA and warming up the model")
        scorer = _warm_path(bundle, engine, settings)
    except Exception as exc:  # an engine that loads but cannot run is a model problem, not a crash
        log.exception("the model failed its warm-up inference", extra={"event": "model_failed", "error": str(exc)})
        source.close()
        engine.close()
        notifier.stopping(f"failed: {exc}")
        return EXIT_FAILURE
    try:
        return _serve(settings, bundle, engine, scorer, source, on_result, stop, notifier)
    finally:
        source.close()
        engine.close()


def _serve(
    settings: AgentSettings,
    bundle: Bundle,
    engine: Engine,
    scorer: FrameScorer,
    source: FrameSource,
    on_result: Callable[[FrameJob], None] | None,
    stop: threading.Event,
    notifier: SystemdNotifier,
) -> int:
    """Publisher, pipeline, READY, supervision until the end, then a clean stop; returns the exit status."""
    from edge_agent.messages import ModelRef
    from edge_agent.mqtt import MqttPublisher
    from edge_agent.pipeline import Pipeline

    publisher = MqttPublisher(settings.mqtt, settings.device_id)
    publisher.start()
    model_ref = ModelRef(
        name=bundle.manifest.name,
        version=bundle.manifest.version,
        sha256=bundle.model_sha256(settings.model.precision),
        backend=engine.backend,
        precision=settings.model.precision,
    )
    pipeline = Pipeline(source, engine, scorer, publisher, settings.device_id, model_ref, on_result=on_result)
    restore = install_signal_handlers(stop)
    try:
        pipeline.start()
        notifier.ready(_status_line(pipeline, publisher, model_ref))
        log.info("agent ready", extra={"event": "agent_ready", "backend": engine.backend, "model": model_ref.name})
        _supervise(settings, pipeline, publisher, model_ref, stop, notifier)
        pipeline.request_stop()
        notifier.stopping("stopping: draining in-flight frames")
        if not pipeline.join(JOIN_TIMEOUT_S):
            log.error("pipeline did not stop in time", extra={"event": "pipeline_stuck", "timeout_s": JOIN_TIMEOUT_S})
    finally:
        restore()
    failed = pipeline.error is not None
    publisher.stop("offline" if failed else "stopped")
    summary = {
        "frames": pipeline.stats.frames_inspected,
        "anomalous": pipeline.stats.anomalous_frames,
        "dropped": pipeline.frames_dropped,
        "ended": pipeline.ended,
        "published": publisher.counters.inspections_published,
        "acked": publisher.counters.acked,
    }
    log.info("edge agent stopped", extra={"event": "agent_stopped", "failed": failed, **summary})
    return EXIT_FAILURE if failed else EXIT_OK


def _warm_path(bundle: Bundle, engine: Engine, settings: AgentSettings) -> FrameScorer:
    """Compile the NFA and run one blank frame through engine and scorer, so frame 1 is not slow."""
    import numpy as np

    from edge_agent import nfa
    from edge_agent.scoring import FrameScorer

    started = time.monotonic()
    nfa.warm_up()
    scorer = FrameScorer(bundle.manifest, settings.nfa)
    _, height, width, _ = engine.io.input.shape
    output = engine.infer(np.full((height, width, 3), 128, dtype=np.uint8))
    scorer.score(output, (width, height))
    log.info(
        "inference path warmed up",
        extra={
            "event": "warmed_up",
            "seconds": round(time.monotonic() - started, 2),
            "log10_epsilon": scorer.rule.log10_epsilon,
        },
    )
    return scorer


def _supervise(
    settings: AgentSettings,
    pipeline: Pipeline,
    publisher: MqttPublisher,
    model_ref: ModelRef,
    stop: threading.Event,
    notifier: SystemdNotifier,
) -> None:
    """Until the pipeline ends or a stop is asked: watchdog pings, status lines, stats messages."""
    from edge_agent.messages import StatsMessage

    started = time.time()
    next_status = time.monotonic() + STATUS_INTERVAL_S
    next_stats = time.monotonic() + settings.mqtt.stats_interval_s
    stall_s = settings.source.stall_timeout_s
    while pipeline.running and not stop.is_set():
        if pipeline.responsive(stall_s):
            notifier.watchdog()
        now = time.monotonic()
        if now >= next_status:
            next_status = now + STATUS_INTERVAL_S
            notifier.status(_status_line(pipeline, publisher, model_ref))
        if now >= next_stats:
            next_stats = now + settings.mqtt.stats_interval_s
            p50, p99 = pipeline.stats.latency_percentiles()
            publisher.publish_stats(
                StatsMessage(
                    device_id=settings.device_id,
                    time=time.time(),
                    uptime_s=round(time.time() - started, 1),
                    fps=round(pipeline.stats.fps(), 2),
                    frames_inspected=pipeline.stats.frames_inspected,
                    frames_dropped=pipeline.frames_dropped,
                    anomalous_frames=pipeline.stats.anomalous_frames,
                    latency_ms_p50=round(p50, 2),
                    latency_ms_p99=round(p99, 2),
                    spool_depth=len(publisher.outbox),
                    source_state=pipeline.source.state,
                    model=model_ref,
                )
            )
        stop.wait(SUPERVISE_TICK_S)
    if stop.is_set():
        log.info("stop requested", extra={"event": "stop_requested"})


def _status_line(pipeline: Pipeline, publisher: MqttPublisher, model_ref: ModelRef) -> str:
    """One line for `systemctl status`: fps, model, source and broker state."""
    stats = pipeline.stats
    broker = "mqtt connected" if publisher.connected else "mqtt DISCONNECTED"
    return (
        f"{stats.fps():.1f} fps | model {model_ref.name} {model_ref.version} ({model_ref.backend}) | "
        f"source {pipeline.source.kind} {pipeline.source.state} | {broker} | "
        f"{stats.frames_inspected} frames, {stats.anomalous_frames} anomalous, {pipeline.frames_dropped} dropped"
    )


def install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM/SIGINT set ``stop``; returns a function restoring the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: object) -> None:
        log.info("signal received", extra={"event": "signal", "signal": signal.Signals(signum).name})
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def _use_numba_cache_in(state_dir: Path) -> None:
    """Point Numba's JIT cache into the state directory when it is writable (no JIT on every start)."""
    if "NUMBA_CACHE_DIR" in os.environ:
        return
    cache = Path(state_dir) / "numba-cache"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # Numba falls back to __pycache__ or the user cache; start-up is slower, nothing breaks
    if os.access(cache, os.W_OK):
        os.environ["NUMBA_CACHE_DIR"] = str(cache)
