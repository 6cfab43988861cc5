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
import re
import socket
import sys
import threading
import time
from pathlib import Path
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
        help="print the resolved configuration (travel per camera, frame and part mode, actuators), check that "
        "the actuators can be used (command on PATH, GPIO chip and line, the MQTT broker of an mqtt actuator) "
        "and exit: 0 usable, 2 a configuration problem, 1 the broker of an mqtt actuator cannot be reached",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edge-agent reject-relay``."""
    try:
        settings = load_relay_settings(args.config, **parse_overrides(args.overrides))
    except ConfigError as exc:
        setup_logging("INFO", "text")
        log.error("configuration error: %s", exc, extra={"event": "config_error"})
        return EXIT_CONFIG
    config_problems: list[str] = []
    reach_problems: list[str] = []
    if args.check:
        description = describe(settings)
        config_problems, reach_problems = check_actuators(settings)
        description["problems"] = config_problems + reach_problems
        print(json.dumps(description, indent=2))
        for problem in config_problems + reach_problems:
            print(f"edge-agent reject-relay --check: {problem}", file=sys.stderr)
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
        return EXIT_CONFIG if config_problems else EXIT_FAILURE if reach_problems else EXIT_OK
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
            "part_mode": _part_travel(settings, device_id),
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


def _part_travel(settings: RelaySettings, device_id: str) -> dict[str, object]:
    """Part messages: the travel of a part decided exactly on the line, computed by the relay's own plan_part."""
    from edge_agent.messages import PartFrames, PartMessage
    from edge_agent.relay.parts import plan_part

    timing = settings.part_timing_for(device_id)
    belt = settings.belt
    if timing is None:
        return {"travel": "not configured: set decision_distance_m under [timing] or [devices.<id>]"}
    live = "encoder " + str(belt.encoder_topic) if belt.encoder_topic else belt.speed_topic
    result: dict[str, object] = {
        "decision_distance_m": timing.distance_m,
        "speed_m_s": timing.speed_m_s,
        "live_speed": live,
        "tolerance_s": timing.tolerance_s,
        "clock_offset_s": timing.clock_offset_s,
    }
    if timing.speed_m_s is None:
        result["travel_s"] = None
        result["travel"] = (
            f"by the live belt speed from {live}; until the first value, anomalous parts are 'unconfigured'"
            if live
            else "no belt speed: set speed_m_s, [belt] speed_topic or encoder_topic"
        )
        return result
    # A part decided now, exactly on the decision line, arriving at once: the relay's own arithmetic.
    now = time.time()
    probe = PartMessage(
        device_id=device_id or "check",
        part_id="check",
        mode="tracked",
        anomalous=True,
        log_nfa=-1.0,
        log10_epsilon=0.0,
        first_capture_time=now,
        decision_time=now,
        frames=PartFrames(count=1),
    )
    plan, _ = plan_part(probe, now, timing.distance_m, timing.speed_m_s, timing.tolerance_s, 0.0, "check")
    result["travel_s"] = round(plan.travel_s, 6)
    result["travel"] = (
        f"{timing.distance_m:g} m / {timing.speed_m_s:g} m/s from the decision line, less how far the part is past it"
        + (f"; the live speed from {live} replaces it once received" if live else "")
    )
    return result


def check_actuators(settings: RelaySettings) -> tuple[list[str], list[str]]:
    """(configuration problems, unreachable brokers) of the actuators the relay would build at start."""
    from edge_agent.relay.actuators import ActuatorConfigError, create_actuator

    problems: list[str] = []
    unreachable: list[str] = []
    named = [(f"devices.{d}.actuator", settings.devices[d].actuator) for d in settings.devices]
    for where, config in [("actuator", settings.actuator), *named]:
        if config is None:
            continue
        if config.kind == "mqtt":
            reason = _broker_unreachable(settings.mqtt.host, settings.mqtt.port, 3.0)
            if reason and not unreachable:
                unreachable.append(
                    f"{where}: kind = mqtt publishes on the relay's broker {settings.mqtt.host}:"
                    f"{settings.mqtt.port}, which cannot be reached ({reason})"
                )
            continue
        try:
            create_actuator(config).close()
        except ActuatorConfigError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if config.kind == "command" and config.command:
            problems += [f"{where}: {p}" for p in gpio_problems(config.command)]
    return problems, unreachable


def gpio_problems(argv: list[str]) -> list[str]:
    """A ``gpioset``/``gpioget`` command naming a GPIO chip that does not exist or a line it does not have."""
    if not argv or Path(argv[0]).name not in ("gpioset", "gpioget"):
        return []
    chips = [a for a in argv[1:] if re.fullmatch(r"(/dev/)?gpiochip\d+", a)]
    lines = [int(m.group(1)) for a in argv[1:] if (m := re.fullmatch(r"(\d+)(=\S*)?", a))]
    problems = []
    for chip in chips:
        device = Path(chip if chip.startswith("/dev/") else f"/dev/{chip}")
        if not device.exists():
            problems.append(f"GPIO chip {device} does not exist on this machine (see gpiodetect)")
            continue
        count = _gpio_lines(device)
        for line in lines:
            if count is not None and line >= count:
                problems.append(f"GPIO chip {device} has {count} lines: line {line} does not exist (see gpioinfo)")
    return problems


def _gpio_lines(device: Path) -> int | None:
    """The number of lines of a GPIO character device (GPIO_GET_CHIPINFO_IOCTL), None when it cannot be read."""
    import fcntl
    import os
    import struct

    try:
        fd = os.open(device, os.O_RDONLY)
    except OSError:
        return None
    try:
        info = bytearray(68)  # struct gpiochip_info: char name[32], char label[32], __u32 lines
        fcntl.ioctl(fd, 0x8044B401, info)
        return int(struct.unpack_from("I", info, 64)[0])
    except OSError:
        return None
    finally:
        os.close(fd)


def _broker_unreachable(host: str, port: int, timeout_s: float) -> str:
    """Why a TCP connection to the broker fails, or "" when it connects."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return ""
    except OSError as exc:
        return exc.strerror or str(exc)


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
