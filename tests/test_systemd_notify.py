"""sd_notify on a real unix datagram socket: framing, abstract sockets, watchdog rate limit, failures."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
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


# -- the real agent: `edge-agent run` as systemd would start it --------------------------------------------

REPO = Path(__file__).resolve().parent.parent
N_IMAGES = 30


@dataclass
class AgentRun:
    """An `edge-agent run` subprocess, its datagrams (arrival time, text) and its JSON log lines."""

    process: subprocess.Popen[str]
    datagrams: list[tuple[float, str]]
    logs: list[dict[str, object]]

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.process.poll() is not None:
                return predicate()
            time.sleep(0.05)
        return False

    def times_of(self, text: str) -> list[float]:
        return [t for t, message in list(self.datagrams) if text in message.split("\n")]

    def events(self) -> list[str]:
        return [str(line.get("event")) for line in list(self.logs)]


@pytest.fixture(scope="module")
def contract_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from contract_bundle import build_contract_bundle

    return build_contract_bundle(tmp_path_factory.mktemp("model") / "bundle", height=64, width=64)


def image_folder(root: Path) -> Path:
    from contract_bundle import good_frame

    folder = root / "frames"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(N_IMAGES):
        cv2.imwrite(str(folder / f"part_{i:03d}.png"), good_frame(rng, 64, 64))
    return folder


@pytest.fixture(scope="session")
def numba_cache(pytestconfig: pytest.Config) -> Path:
    # What the unit does (CacheDirectory= + NUMBA_CACHE_DIR): the NFA is compiled once, not at every start.
    # Kept in pytest's cache dir, so later sessions skip the compile too (Numba re-checks the source).
    return Path(pytestconfig.cache.mkdir("numba-agent"))  # type: ignore[union-attr]


def start_agent(
    tmp_path: Path, bundle: Path, source: Path, notify: NotifyListener, numba_cache: Path, fps: float = 10.0
) -> AgentRun:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "cam1"\nstate_dir = "{tmp_path / "state"}"\nlog_format = "json"\n'
        f'[model]\nbundle = "{bundle}"\nthreads = 1\n'
        # stall_timeout_s is how long a stage may show no progress before the pings stop.
        f'[source]\nuri = "{source}"\nloop = true\nfps_limit = {fps}\nstall_timeout_s = 1.0\n'
        f"[mqtt]\nport = {_closed_port()}\n"
        "[http]\nenabled = false\n"
    )
    env = {
        **os.environ,
        "NOTIFY_SOCKET": notify.env_value,
        "WATCHDOG_USEC": "2000000",
        "NUMBA_CACHE_DIR": str(numba_cache),
    }
    env.pop("WATCHDOG_PID", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    run = AgentRun(process, [], [])

    def read_socket() -> None:
        notify.sock.settimeout(0.2)
        while process.poll() is None:
            try:
                data = notify.sock.recv(4096)
                run.datagrams.append((time.time(), data.decode()))
            except TimeoutError:
                continue
            except OSError:  # the test closed the socket
                return

    def read_log() -> None:
        for line in process.stderr:  # type: ignore[union-attr]
            with contextlib.suppress(ValueError):
                run.logs.append(json.loads(line))

    threading.Thread(target=read_socket, daemon=True).start()
    threading.Thread(target=read_log, daemon=True).start()
    return run


def _closed_port() -> int:
    # The agent keeps retrying MQTT in the background; no broker is needed for these tests.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(run: AgentRun) -> None:
    if run.process.poll() is None:
        run.process.kill()
        run.process.wait(timeout=10)


def test_agent_ready_only_after_engine_nfa_and_source(
    tmp_path: Path, contract_model: Path, listener: NotifyListener, numba_cache: Path
) -> None:
    run = start_agent(tmp_path, contract_model, image_folder(tmp_path), listener, numba_cache)
    try:
        assert run.wait_for(lambda: bool(run.times_of("READY=1")), timeout=90), run.events()
        ready_at = run.times_of("READY=1")[0]
        # The log pipe may lag the socket: read on until the line the agent writes after READY.
        assert run.wait_for(lambda: "agent_ready" in run.events(), timeout=10)
        # Every start-up step was logged (log "ts": wall time, rounded to 1 ms) before READY reached the socket.
        before = {
            str(line["event"]): float(line["ts"]) for line in list(run.logs) if float(line["ts"]) <= ready_at + 0.001
        }  # type: ignore[arg-type]
        for event in ("engine_loaded", "warmed_up", "source_opened", "pipeline_started"):
            assert event in before, f"{event} not logged before READY: {sorted(before)}"
        ready_message = next(m for t, m in run.datagrams if "READY=1" in m)
        assert "STATUS=" in ready_message and "contract" in ready_message  # model name in systemctl status
        # Pings flow while frames flow.
        assert run.wait_for(lambda: len([t for t in run.times_of("WATCHDOG=1") if t > ready_at]) >= 3, timeout=10)
        run.process.send_signal(signal.SIGTERM)
        assert run.process.wait(timeout=30) == 0
        assert run.wait_for(lambda: bool(run.times_of("STOPPING=1")), timeout=30)
    finally:
        _stop(run)


def test_agent_with_a_bad_source_never_reports_ready(
    tmp_path: Path, contract_model: Path, listener: NotifyListener, numba_cache: Path
) -> None:
    run = start_agent(tmp_path, contract_model, tmp_path / "no-such-folder", listener, numba_cache)
    try:
        assert run.process.wait(timeout=90) == 1
        time.sleep(0.3)
        assert run.times_of("READY=1") == [] and run.times_of("WATCHDOG=1") == []
        stopping = [m for _, m in run.datagrams if m.startswith("STOPPING=1")]
        assert stopping and "no-such-folder" in stopping[0]
    finally:
        _stop(run)


def test_a_frame_read_that_hangs_stops_the_pings_and_the_agent_with_the_reason(
    tmp_path: Path, contract_model: Path, listener: NotifyListener, numba_cache: Path
) -> None:
    folder = image_folder(tmp_path)
    run = start_agent(tmp_path, contract_model, folder, listener, numba_cache, fps=10.0)
    try:
        assert run.wait_for(lambda: bool(run.times_of("READY=1")), timeout=90), run.events()
        # The last image becomes a FIFO nobody writes to: when the capture stage reaches it (about 3 s in at
        # 10 fps), cv2.imread blocks in open(2) forever, as a read from a dead network share would.
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        os.replace(fifo, folder / f"part_{N_IMAGES - 1:03d}.png")
        ready_at = run.times_of("READY=1")[0]
        assert run.wait_for(lambda: len([t for t in run.times_of("WATCHDOG=1") if t > ready_at]) >= 2, timeout=10)

        # The read is given up after stall_timeout_s (1 s): the pings stop ...
        def silent_for(seconds: float) -> bool:
            pings = run.times_of("WATCHDOG=1")
            return bool(pings) and time.time() - pings[-1] > seconds

        assert run.wait_for(lambda: silent_for(4.0), timeout=30), "WATCHDOG=1 kept coming while the read hung"
        # ... and, since a file source must not skip frames, the agent stops with exit 1 and says why (systemd's
        # Restart=on-failure starts it again), instead of hanging until the watchdog's SIGABRT.
        assert run.process.wait(timeout=60) == 1
        time.sleep(0.3)
        stopping = [m for _, m in run.datagrams if m.startswith("STOPPING=1")]
        assert stopping and f"part_{N_IMAGES - 1:03d}.png" in stopping[0] and "stall watchdog" in stopping[0]
        assert "stage_failed" in run.events()
    finally:
        _stop(run)
