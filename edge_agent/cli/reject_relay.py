"""``edge-agent reject-relay``: fire a reject actuator for every anomalous part the cameras report.

Runs until SIGTERM/SIGINT. Under systemd (Type=notify) READY is sent once the journal is open, the
actuators are checked and the MQTT client is started (a broker that is down is retried; the messages
wait in the broker's session); WATCHDOG pings come only while the scheduler thread is looping.

Exit status: 0 after a clean stop; 1 when the journal cannot be opened; 2 for a configuration error
(including an actuator command that does not exist).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from typing import TYPE_CHECKING

from edge_agent.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    add_config_arguments,
    install_signal_handlers,
    parse_overrides,
)
from edge_agent.config import ConfigError
from edge_agent.logs import setup_logging
from edge_agent.relay.config import RelaySettings, load_relay_settings
from edge_agent.systemd import SystemdNotifier

if TYPE_CHECKING:  # imported when the relay runs, not for --help
    from edge_agent.relay.relay import RejectRelay

log = logging.getLogger(__name__)

SUPERVISE_TICK_S = 0.25
STATUS_INTERVAL_S = 5.0
HOUSEKEEPING_INTERVAL_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent reject-relay``."""
    add_config_arguments(parser, "relay", "EDGE_AGENT_RELAY_", "timing.delay_s=1.5")
    parser.add_argument(
        "--check",
        action="store_true",
        help="print the resolved configuration (travel time per camera, actuators) and exit",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edge-agent reject-relay``."""
    try:
        settings = load_relay_settings(args.config, **parse_overrides(args.overrides))
    except ConfigError as exc:
        setup_logging("INFO", "text")
        log.error("configuration error: %s", exc, extra={"event": "config_error"})
        return EXIT_CONFIG
    if args.check:
        print(json.dumps(describe(settings), indent=2))
    if not settings.known_devices:
        # It would count every message unknown_devices and fire nothing: say so now, not on the line.
        setup_logging("INFO", "text")
        log.error(
            "configuration error: no camera: list the cameras this relay acts for in cameras = [...] (top level) or "
            "under [devices.<device_id>]",
            extra={"event": "config_error"},
        )
        return EXIT_CONFIG
    if args.check:
        return EXIT_OK
    setup_logging(settings.log_level, settings.log_format)
    return run_relay(settings)


def describe(settings: RelaySettings) -> dict[str, object]:
    """What the relay will do, for ``--check`` (no connection, no journal)."""
    devices: dict[str, object] = {}
    for device_id in settings.known_devices:
        timing = settings.timing_for(device_id)
        actuator = settings.actuator_for(device_id)
        devices[device_id] = {
            "travel_s": timing.travel_s if timing else None,
            "travel": timing.how if timing else "not configured: anomalous messages are counted 'unconfigured'",
            "tolerance_s": timing.tolerance_s if timing else None,
            "clock_offset_s": timing.clock_offset_s if timing else None,
            "actuator": _without_secrets(actuator.model_dump(exclude_none=True)) if actuator else None,
        }
    return {
        "relay_id": settings.relay_id,
        "client_id": settings.client_id,
        "broker": f"{settings.mqtt.host}:{settings.mqtt.port}",
        "topics": settings.mqtt.topics,
        "session_expiry_s": settings.mqtt.session_expiry_s,
        "clock": settings.clock.model_dump(),
        "journal": str(settings.journal),
        "devices": devices,
        "other_cameras": "counted unknown_devices, never fired (not in cameras or [devices])",
        "limits": settings.limits.model_dump(),
    }


def _without_secrets(actuator: dict[str, object]) -> dict[str, object]:
    """Header values (tokens) are not printed."""
    headers = actuator.get("headers")
    if isinstance(headers, dict) and headers:
        actuator["headers"] = {name: "***" for name in headers}
    return actuator


def run_relay(
    settings: RelaySettings, stop: threading.Event | None = None, notifier: SystemdNotifier | None = None
) -> int:
    """Run the relay until ``stop`` is set or SIGTERM/SIGINT; return the exit status."""
    from edge_agent.relay.actuators import ActuatorConfigError
    from edge_agent.relay.dedupe import JournalError
    from edge_agent.relay.relay import RejectRelay

    stop = stop or threading.Event()
    notifier = notifier or SystemdNotifier()
    try:
        relay = RejectRelay(settings)
    except ActuatorConfigError as exc:
        log.error("configuration error: %s", exc, extra={"event": "config_error"})
        notifier.stopping(f"failed: {exc}")
        return EXIT_CONFIG
    except JournalError as exc:
        log.error("%s", exc, extra={"event": "relay_journal_failed", "path": str(settings.journal)})
        notifier.stopping(f"failed: {exc}")
        return EXIT_FAILURE
    restore = install_signal_handlers(stop)
    try:
        relay.start()
        notifier.ready(_status_line(relay))
        log.info(
            "reject relay ready",
            extra={"event": "relay_ready", "relay_id": settings.relay_id, "journal": str(settings.journal)},
        )
        _supervise(settings, relay, stop, notifier)
        notifier.stopping("stopping: firing rejects due in the next seconds")
        relay.stop("stopped")
    finally:
        restore()
    return EXIT_OK


def _supervise(settings: RelaySettings, relay: RejectRelay, stop: threading.Event, notifier: SystemdNotifier) -> None:
    """Watchdog pings, status lines, stats messages and journal housekeeping until stopped."""
    now = time.monotonic()
    next_stats = now + settings.mqtt.stats_interval_s
    next_status = now + STATUS_INTERVAL_S
    next_housekeeping = now + HOUSEKEEPING_INTERVAL_S
    while not stop.is_set():
        if relay.responsive():
            notifier.watchdog()
        now = time.monotonic()
        if now >= next_stats:
            next_stats = now + settings.mqtt.stats_interval_s
            relay.publish_stats()
        if now >= next_status:
            next_status = now + STATUS_INTERVAL_S
            notifier.status(_status_line(relay))
        if now >= next_housekeeping:
            next_housekeeping = now + HOUSEKEEPING_INTERVAL_S
            relay.housekeeping()
        stop.wait(SUPERVISE_TICK_S)
    log.info("stop requested", extra={"event": "stop_requested"})


def _status_line(relay: RejectRelay) -> str:
    """One line for `systemctl status`."""
    stats = relay.stats()
    broker = "mqtt connected" if stats.connected else "mqtt DISCONNECTED"
    if not stats.journal_ok:
        broker += f" | JOURNAL NOT WRITABLE ({stats.journal_errors} errors; deciding from memory)"
    return (
        f"{broker} | fired {stats.fired}, missed {stats.missed}, failed {stats.actuator_failures}, "
        f"duplicates {stats.duplicates}, pending {stats.pending} | lateness p99 {stats.lateness_ms_p99:.1f} ms"
    )
