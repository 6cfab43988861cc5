"""``edge-agent run``: load the bundle, open the source, inspect and publish until stopped.

Start-up order matters to systemd (Type=notify): READY is sent only after the engine is loaded, the
NFA compiled and a full frame path warmed, and the source opened; the MQTT broker may still be
unreachable then (it is retried in the background and never blocks inspection). A live source (camera,
stream) that cannot be opened at start does not stop the agent: it starts degraded and reconnects with
backoff; a file or folder that cannot be opened is an error. While the stage threads are alive and
responsive the supervisor loop (edge_agent/service/agent.py) sends WATCHDOG; a hung stage stops the pings so
systemd restarts the agent.

Exit status: 0 after a clean stop (SIGTERM/SIGINT) or the end of a file or folder; 1 when the bundle,
engine, file source or spool cannot be used or a stage failed; 2 for a configuration error.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent import __version__
from edge_agent.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    add_config_arguments,
    install_signal_handlers,
    parse_overrides,
)
from edge_agent.config import AgentSettings, ConfigError, load_settings
from edge_agent.logs import setup_logging
from edge_agent.redact import redact_uri
from edge_agent.systemd import SystemdNotifier

if TYPE_CHECKING:
    from edge_agent.inspection.pipeline import FrameJob

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent run``."""
    add_config_arguments(parser, "agent", "EDGE_AGENT_", "source.uri=line1.mp4")


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


def run_agent(
    settings: AgentSettings,
    on_result: Callable[[FrameJob], None] | None = None,
    stop: threading.Event | None = None,
    notifier: SystemdNotifier | None = None,
) -> int:
    """Run the agent until the source ends, ``stop`` is set, or SIGTERM/SIGINT; return the exit status.

    ``on_result`` sees every published frame after the agent's own observers (a pipeline ``FrameObserver``:
    an exception it raises is logged and counted, it does not stop the agent).
    """
    stop = stop or threading.Event()
    notifier = notifier or SystemdNotifier()
    _use_numba_cache_in(settings.state_dir)
    # Imported here so NUMBA_CACHE_DIR is set before Numba loads (scoring imports the NFA).
    from edge_agent.bundle import BundleError, read_manifest
    from edge_agent.fleet.signing import SigningError, verify_installed_bundle
    from edge_agent.inspection import nfa
    from edge_agent.inspection.drivers import SourceError, describe_video_io
    from edge_agent.inspection.frame_source import FrameSource
    from edge_agent.inspection.loaded_model import ModelLoadError, load_model
    from edge_agent.publish.spool import SpoolError
    from edge_agent.service.agent import Agent
    from edge_agent.service.recipes import RecipeBook, install_recipes

    log.info(
        "edge agent starting",
        extra={
            "event": "agent_starting",
            "version": __version__,
            "device_id": settings.device_id,
            "bundle": str(settings.model.bundle),
            "source": redact_uri(settings.source.uri),
            **describe_video_io(),
        },
    )
    try:
        # A missing or unreadable bundle fails at once, before the camera is opened and the NFA warmed up.
        for bundle in [r.bundle for r in settings.recipes] or [settings.bundle_dir]:
            read_manifest(bundle)
    except BundleError as exc:
        log.error("%s", exc, extra={"event": "model_failed", "bundle": str(bundle)})
        notifier.stopping(f"failed: {exc}")
        return EXIT_FAILURE
    source = FrameSource(settings.source)
    try:
        # The source next: a missing file should fail in a second, not after the warm-up.
        notifier.status(f"starting: opening {source.kind} {redact_uri(settings.source.uri)}")
        source.open()
    except SourceError as exc:
        if not source.live:
            log.error(
                "cannot open the source: %s",
                exc,
                extra={"event": "source_failed", "source": redact_uri(settings.source.uri)},
            )
            notifier.stopping(f"failed: {exc}")
            return EXIT_FAILURE
        # A camera that boots slower than this box, or a stream server being restarted, is not a reason to
        # crash-loop: the agent starts, says it is degraded, and keeps reconnecting with backoff.
        log.warning(
            "the source is not available yet; starting anyway and reconnecting in the background",
            extra={
                "event": "source_unavailable_at_start",
                "source": redact_uri(settings.source.uri),
                "error": redact_uri(str(exc)),
            },
        )
    book: RecipeBook | None = None
    try:
        # The first start compiles the NFA (seconds on a small CPU): ask systemd for time, don't get killed.
        notifier.extend_timeout(120, "starting: loading the model, compiling the NFA, warming up")
        nfa.warm_up()
        if settings.recipes:
            # Every recipe preloaded and warmed up now: a product changeover then loads nothing.
            book = RecipeBook.load(settings, live=source.live)
            model = book.active.model
        else:
            # With a fleet key configured the installed bundle must still carry its signature (not only hashes).
            verify_installed_bundle(settings.bundle_dir, settings.update.public_key)
            model = load_model(settings.bundle_dir, settings.model, settings.nfa, live=source.live)
    except (ModelLoadError, SigningError) as exc:
        log.error("%s", exc, extra={"event": "model_failed", "bundle": str(settings.model.bundle)})
        source.close()
        notifier.stopping(f"failed: {exc}")
        return EXIT_FAILURE
    try:
        agent = Agent(settings, model, source, notifier, on_result=on_result)
    except SpoolError as exc:
        log.error("%s", exc, extra={"event": "spool_failed", "path": str(settings.spool.path)})
        if book is not None:
            book.close()
        else:
            model.close()
        source.close()
        notifier.stopping(f"failed: {exc}")
        return EXIT_FAILURE
    install_recipes(agent, book)
    restore = install_signal_handlers(stop)
    try:
        return agent.serve(stop)
    except ConfigError as exc:
        log.error("configuration error: %s", exc, extra={"event": "config_error"})
        notifier.stopping(f"failed: {exc}")
        agent.pipeline.model.close()
        source.close()
        return EXIT_CONFIG
    finally:
        restore()
        if book is not None:
            book.close(closed=agent.pipeline.model)  # serve() closed the active one


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
