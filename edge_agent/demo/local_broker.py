"""A throw-away mosquitto on a free loopback port, for ``edge-agent demo`` and the tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO_HINT = "mosquitto is not installed: apt-get install mosquitto (the demo and the tests start their own broker)"


class BrokerError(RuntimeError):
    """mosquitto is missing or did not start; the message says which and shows its log."""


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (PATH, then the Debian location), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).is_file()), None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> bool:
    """True once something accepts TCP connections on host:port within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class LocalMosquitto:
    """mosquitto on 127.0.0.1:<port>; ``start()``/``stop()``/``kill()`` may be repeated.

    By default anonymous and without persistence. ``persistence=True`` keeps retained messages, persistent
    sessions and their queued messages across restarts (saved every second and at a clean stop), as a
    plant broker should be configured. ``listener_options`` go under the listener line (TLS files) and
    ``options`` at the end of the file (``password_file``, ``allow_anonymous false``).
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        persistence: bool = False,
        listener_options: str = "",
        options: str = "",
    ) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError(MOSQUITTO_HINT)
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        store = (
            f"persistence true\npersistence_location {self.workdir}/\nautosave_interval 1\n"
            if persistence
            else "persistence false\n"
        )
        # Started as root, mosquitto would switch to the `mosquitto` user, which cannot read test files.
        user = "user root\n" if os.geteuid() == 0 else ""
        anonymous = "" if "allow_anonymous" in options else "allow_anonymous true\n"
        self.config.write_text(
            f"listener {self.port} {self.host}\n{listener_options}{anonymous}{store}{user}"
            "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n" + options
        )
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> LocalMosquitto:
        """Start the broker and wait until it accepts connections."""
        with self.log.open("ab") as log:
            self._process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=log)
        if not wait_for_port(self.port, timeout, self.host):
            self.stop()
            raise BrokerError(f"mosquitto did not listen on port {self.port}: {self.log.read_text()[-2000:]}")
        return self

    def stop(self) -> None:
        """Terminate the broker (kill after 5 s)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL the broker, as a crash or a power cut would (no clean shutdown, no final save)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()
        self._process = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> LocalMosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
