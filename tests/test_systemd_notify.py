"""sd_notify on a real unix datagram socket: framing, abstract sockets, watchdog rate limit, failures."""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.systemd import SystemdNotifier, notify_address


class NotifyListener:
    """What systemd does: a bound AF_UNIX datagram socket that collects every message."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def receive(self, timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode("utf-8")

    def drain(self) -> list[str]:
        messages = []
        self.sock.settimeout(0.05)
        while True:
            try:
                messages.append(self.sock.recv(4096).decode("utf-8"))
            except TimeoutError:
                return messages


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    yield NotifyListener(sock, str(path))
    sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[NotifyListener]:
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    yield NotifyListener(sock, "@" + name)
    sock.close()


def test_ready_status_stopping_framing(listener: NotifyListener) -> None:
    notifier = SystemdNotifier(socket_path=listener.env_value, watchdog_usec="")
    assert notifier.enabled and not notifier.watchdog_enabled
    assert notifier.ready("12.0 fps | model tile 1.2.0\n(onnxruntime)")
    assert listener.receive() == "READY=1\nSTATUS=12.0 fps | model tile 1.2.0 (onnxruntime)"
    assert notifier.status("source   reconnecting")
    assert listener.receive() == "STATUS=source reconnecting"
    assert notifier.stopping("stopping: draining in-flight frames")
    assert listener.receive() == "STOPPING=1\nSTATUS=stopping: draining in-flight frames"
    assert notifier.stopping()
    assert listener.receive() == "STOPPING=1"


def test_abstract_namespace_socket(abstract_listener: NotifyListener) -> None:
    notifier = SystemdNotifier(socket_path=abstract_listener.env_value, watchdog_usec="")
    assert notifier.ready()
    assert abstract_listener.receive() == "READY=1"


def test_reads_notify_socket_and_watchdog_from_environment(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SystemdNotifier()
    assert notifier.watchdog_enabled and notifier.watchdog_interval_s == 2.0
    assert notifier.watchdog()
    assert listener.receive() == "WATCHDOG=1"


def test_watchdog_for_another_pid_is_off(listener: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> None:
    # A child process that inherited systemd's variables must not ping on its parent's behalf.
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    notifier = SystemdNotifier()
    assert not notifier.watchdog_enabled
    assert not notifier.watchdog()
    assert listener.drain() == []


def test_watchdog_is_rate_limited_to_a_quarter_interval(listener: NotifyListener) -> None:
    notifier = SystemdNotifier(socket_path=listener.env_value, watchdog_usec="400000")  # 0.4 s -> every 0.1 s
    sent_at = []
    calls = 0
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        calls += 1
        if notifier.watchdog():
            sent_at.append(time.monotonic())
        time.sleep(0.002)
    assert listener.drain() == ["WATCHDOG=1"] * len(sent_at)
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert len(sent_at) >= 3 and calls > 5 * len(sent_at)
    assert min(gaps) >= 0.1 - 1e-3


def test_watchdog_without_watchdogsec_sends_nothing(listener: NotifyListener) -> None:
    notifier = SystemdNotifier(socket_path=listener.env_value, watchdog_usec="")
    for _ in range(10):
        assert not notifier.watchdog()
    assert listener.drain() == []


def test_unchanged_status_is_not_resent(listener: NotifyListener) -> None:
    notifier = SystemdNotifier(socket_path=listener.env_value, watchdog_usec="")
    assert notifier.status("10 fps")
    assert not notifier.status("10 fps")
    assert notifier.status("11 fps")
    assert listener.drain() == ["STATUS=10 fps", "STATUS=11 fps"]


def test_extend_timeout_and_reloading(listener: NotifyListener) -> None:
    notifier = SystemdNotifier(socket_path=listener.env_value, watchdog_usec="")
    assert notifier.extend_timeout(90, "compiling NFA")
    assert listener.receive() == "EXTEND_TIMEOUT_USEC=90000000\nSTATUS=compiling NFA"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading("reloading model 1.3.0")
    fields = dict(line.split("=", 1) for line in listener.receive().split("\n"))
    assert fields["RELOADING"] == "1" and fields["STATUS"] == "reloading model 1.3.0"
    assert before <= int(fields["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_outside_systemd_everything_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.watchdog() and not notifier.stopping()


def test_unsupported_socket_value_disables_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_agent.systemd"):
        notifier = SystemdNotifier(socket_path="vsock:2:1234", watchdog_usec="")
    assert not notifier.enabled
    assert "vsock:2:1234" in caplog.text
    assert notify_address("@x") == "\0x" and notify_address("/run/systemd/notify") == "/run/systemd/notify"


def test_vanished_manager_warns_once_and_keeps_going(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier(socket_path=str(tmp_path / "nobody-listens.sock"), watchdog_usec="")
    with caplog.at_level(logging.WARNING, logger="edge_agent.systemd"):
        results = [notifier.status(f"frame {i}") for i in range(20)]
    assert results == [False] * 20
    failures = [r for r in caplog.records if getattr(r, "event", "") == "sd_notify_failed"]
    assert len(failures) == 1
    assert "nobody-listens.sock" in failures[0].socket  # type: ignore[attr-defined]
