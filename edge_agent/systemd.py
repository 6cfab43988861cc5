"""sd_notify over $NOTIFY_SOCKET (a unix datagram socket), with no dependency beyond the stdlib.

Outside systemd (no NOTIFY_SOCKET) every call is a cheap no-op, so the agent calls these
unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends READY/STATUS/WATCHDOG/STOPPING to the service manager."""

    def __init__(self, socket_path: str | None = None, watchdog_usec: str | None = None) -> None:
        path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
        self._address = _socket_address(path) if path else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        usec = watchdog_usec if watchdog_usec is not None else _watchdog_usec_for_this_process()
        self.watchdog_interval_s: float | None = int(usec) / 1e6 if usec else None
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self._address is not None

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
                # The manager may be restarting; a lost notification must not stop the agent.
                log.warning("sd_notify failed: %s", exc, extra={"event": "sd_notify_failed"})
                return False

    def ready(self, status: str = "") -> bool:
        """READY=1: the engine is loaded, NFA warmed and the source opened."""
        return self.notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def status(self, text: str) -> bool:
        """A line shown by `systemctl status`."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """WATCHDOG=1, rate-limited to a quarter of the watchdog interval (call it from the frame loop)."""
        if self._address is None:
            return False
        now = time.monotonic()
        if self.watchdog_interval_s is not None and now - self._last_ping < self.watchdog_interval_s / 4:
            return False
        self._last_ping = now
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        """STOPPING=1 on a clean shutdown."""
        return self.notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _socket_address(path: str) -> str:
    # A leading '@' names a socket in the abstract namespace.
    return "\0" + path[1:] if path.startswith("@") else path


def _watchdog_usec_for_this_process() -> str | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return usec


def _one_line(text: str) -> str:
    return " ".join(text.split())
