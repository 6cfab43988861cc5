"""sd_notify over $NOTIFY_SOCKET (a unix datagram socket), with no dependency beyond the stdlib.

Outside systemd (no NOTIFY_SOCKET) every call is a cheap no-op, so the agent calls these
unconditionally. The protocol (sd_notify(3)): one datagram per message, newline-separated
``KEY=VALUE`` assignments, sent to the path in $NOTIFY_SOCKET (``@name`` = abstract namespace).

WATCHDOG=1 must come from code that proves the agent is making progress (the frame loop's supervisor,
which pings only while every stage shows fresh heartbeats), never from a free-running timer: a timer
thread keeps pinging while the frame loop is stuck, and systemd would never restart the agent.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)

# At most one "sd_notify failed" warning per this many seconds: the frame loop may call watchdog()
# many times a second while the manager is away, and the journal must not fill with the same line.
_WARN_EVERY_S = 60.0
# An unchanged STATUS= line is re-sent at most this often (it costs the manager a wake-up each time).
_SAME_STATUS_EVERY_S = 60.0


class SystemdNotifier:
    """Sends READY/STATUS/WATCHDOG/RELOADING/STOPPING to the service manager; thread-safe."""

    def __init__(self, socket_path: str | None = None, watchdog_usec: str | None = None) -> None:
        path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
        self._address = notify_address(path) if path else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        usec = watchdog_usec if watchdog_usec is not None else _watchdog_usec_for_this_process()
        self.watchdog_interval_s: float | None = _parse_usec(usec)
        self._last_ping = float("-inf")
        self._last_status: tuple[str, float] = ("", float("-inf"))
        self._last_warning = float("-inf")

    @property
    def enabled(self) -> bool:
        """True when a service manager is listening (NOTIFY_SOCKET was set and usable)."""
        return self._address is not None

    @property
    def watchdog_enabled(self) -> bool:
        """True when the unit has WatchdogSec= and this process is the one it watches."""
        return self._address is not None and self.watchdog_interval_s is not None

    def notify(self, message: str) -> bool:
        """Send one raw sd_notify message (newline-separated assignments); False if it could not be sent."""
        if self._address is None:
            return False
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(message.encode("utf-8"), self._address)
                return True
            except OSError as exc:
                # The manager may be restarting (daemon-reexec); a lost notification must not stop the agent.
                now = time.monotonic()
                if now - self._last_warning >= _WARN_EVERY_S:
                    self._last_warning = now
                    log.warning(
                        "sd_notify failed: %s",
                        exc,
                        extra={"event": "sd_notify_failed", "socket": _printable(self._address)},
                    )
                return False

    def ready(self, status: str = "") -> bool:
        """READY=1: the engine is loaded, NFA warmed and the source opened."""
        return self.notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def status(self, text: str) -> bool:
        """A line shown by `systemctl status` (an unchanged line is not re-sent for a minute)."""
        line = _one_line(text)
        now = time.monotonic()
        last_line, last_time = self._last_status
        if line == last_line and now - last_time < _SAME_STATUS_EVERY_S:
            return False
        self._last_status = (line, now)
        return self.notify(f"STATUS={line}")

    def watchdog(self) -> bool:
        """WATCHDOG=1, at most every quarter of WatchdogSec=; a no-op when the unit has no watchdog.

        Call it from the code path that proves progress (see the module docstring); calling it more
        often than needed is cheap, so callers need no timer of their own.
        """
        if not self.watchdog_enabled:
            return False
        assert self.watchdog_interval_s is not None
        now = time.monotonic()
        with self._lock:
            if now - self._last_ping < self.watchdog_interval_s / 4:
                return False
            self._last_ping = now
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float, status: str = "") -> bool:
        """EXTEND_TIMEOUT_USEC: ask for ``seconds`` more before the start (or stop) timeout fires.

        For a start-up step that is legitimately slow (a first Numba compile on a Jetson, a cold disk).
        """
        usec = max(1, int(seconds * 1_000_000))
        return self.notify(f"EXTEND_TIMEOUT_USEC={usec}" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def reloading(self, status: str = "") -> bool:
        """RELOADING=1 while a new model is swapped in; send ready() when it is serving again."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        message = f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}"
        return self.notify(message + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def stopping(self, status: str = "") -> bool:
        """STOPPING=1 on shutdown (clean or not; the STATUS= line says which)."""
        return self.notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def close(self) -> None:
        """Close the socket (a later call reopens it)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def notify_address(path: str) -> str | None:
    """The sendto() address for a NOTIFY_SOCKET value, or None (logged) when it cannot be used.

    ``@name`` is the abstract namespace (a leading NUL byte); anything else must be an absolute path.
    Other forms (e.g. systemd 253's ``vsock:``) are not spoken here, so the notifier is disabled.
    """
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    log.warning(
        "NOTIFY_SOCKET %r is neither an absolute path nor an abstract socket; systemd notifications are off",
        path,
        extra={"event": "sd_notify_unsupported", "socket": path},
    )
    return None


def _watchdog_usec_for_this_process() -> str | None:
    # WATCHDOG_PID names the process systemd watches; a child that inherited the variables must not ping.
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return usec


def _parse_usec(usec: str | None) -> float | None:
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning(
            "WATCHDOG_USEC=%r is not a number; watchdog pings are off", usec, extra={"event": "sd_notify_unsupported"}
        )
        return None
    return value / 1e6 if value > 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _printable(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address
