"""The real ``edge-agent reject-relay`` process across restarts, against a real mosquitto.

- SIGTERM: a reject due within stop_drain_s is still fired, the retained status becomes ``stopped``, exit 0;
  messages published while the relay is down wait in its persistent session and, after the restart, are
  fired at their planned time or counted missed by their deadline; a message id fired before the restart
  is a duplicate after it.
- SIGKILL while a reject is scheduled (already acknowledged to the broker): the Will says ``offline`` and
  the restarted relay resumes the reject from its journal and fires it once, on time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mqtt_broker import MosquittoBroker, Subscriber
from relay_helpers import RecordingHttpServer, RelayProcess, inspection, relay_toml

from edge_agent.config import MqttConfig
from edge_agent.publish.mqtt import MqttPublisher

FIRE_TOLERANCE_MS = 150.0  # stated bound for these tests (process start-up competes for 2 shared cores)
EARLY_MS = 2.0


@pytest.fixture
def camera(broker: MosquittoBroker) -> Iterator[MqttPublisher]:
    publisher = MqttPublisher(MqttConfig(port=broker.port, message_expiry_s=60, drain_timeout_s=5), "cam1")
    publisher.start()
    assert publisher.wait_connected(10)
    yield publisher
    publisher.stop()


@pytest.fixture
def watcher(broker: MosquittoBroker) -> Iterator[Subscriber]:
    subscriber = Subscriber(broker, "uflow/relay/r1/status")
    yield subscriber
    subscriber.close()


def start_relay(config: Path, log: Path, processes: list[RelayProcess]) -> RelayProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    relay = RelayProcess(config, log, env=env).start()
    processes.append(relay)
    # Counted across the log file, which both runs share.
    runs = len(processes)
    assert relay.wait_for_event("relay_subscribed", timeout=60, count=runs), log.read_text()[-3000:]
    return relay


def lateness_ms(http: RecordingHttpServer, planned: dict[str, float]) -> dict[str, float]:
    return {a.body["message_id"]: (a.wall - planned[a.body["message_id"]]) * 1000.0 for a in http.arrivals}


def statuses(watcher: Subscriber) -> list[bytes]:
    return [m.payload for m in watcher.on("/status")]


def test_restart_loses_nothing_queued_and_never_fires_twice(
    tmp_path: Path,
    broker: MosquittoBroker,
    http: RecordingHttpServer,
    camera: MqttPublisher,
    watcher: Subscriber,
) -> None:
    delay = 5.0
    config = relay_toml(
        tmp_path / "relay.toml",
        broker.port,
        tmp_path / "state",
        f'kind = "http"\nurl = "{http.url}"',
        extra=f'[clock]\nmode = "fixed"\n[timing]\ndelay_s = {delay}\ntolerance_s = 0.5\n',
    )
    log = tmp_path / "relay.log"
    processes: list[RelayProcess] = []
    try:
        first = start_relay(config, log, processes)
        assert watcher.wait_for(lambda ms: statuses(watcher)[-1:] == [b"online"])
        planned: dict[str, float] = {}
        # Published before the stop with 4 s of travel left... then the relay is asked to stop 2.5 s before it is
        # due: outside the 2 s drain window, so it stays in the journal; this one is due inside it and fires.
        before = inspection("cam1", 1)
        soon = inspection("cam1", 2, capture_time=time.time() - delay + 1.0)
        for message in (before, soon):
            planned[message.message_id] = message.capture_time + delay
            camera.publish_inspection(message)
        assert journal_rows(tmp_path / "state" / "relay.sqlite", 2)
        time.sleep(0.3)
        assert first.terminate() == 0
        assert soon.message_id in http.ids(), "a reject due within stop_drain_s is fired before exiting"
        assert watcher.wait_for(lambda ms: statuses(watcher)[-1:] == [b"stopped"])

        # While the relay is down: one still in time after the restart, one whose deadline passes before it,
        # a good frame, and a redelivery of the id the stopped relay already fired.
        queued = inspection("cam1", 3)
        planned[queued.message_id] = queued.capture_time + delay
        expired = inspection("cam1", 4, capture_time=time.time() - delay - 1.0)
        good = inspection("cam1", 5, anomalous=False)
        for message in (queued, expired, good, soon):
            camera.publish_inspection(message)
        assert camera.wait_until_delivered(10)

        second = start_relay(config, log, processes)
        assert http.wait_for(lambda arrivals: len(arrivals) >= 3, timeout=delay + 10)
        time.sleep(0.5)
        ids = http.ids()
        assert sorted(ids) == sorted([soon.message_id, before.message_id, queued.message_id]), "each exactly once"
        late = lateness_ms(http, planned)
        assert all(-EARLY_MS <= ms <= FIRE_TOLERANCE_MS for ms in late.values()), late
        decisions = {(r["decision"], r["message_id"]) for r in second.decisions()}
        assert ("missed", expired.message_id) in decisions
        assert ("duplicate", soon.message_id) in decisions
        assert ("skipped-good", good.message_id) in decisions
        assert ("fired", queued.message_id) in decisions and ("fired", before.message_id) in decisions
        resumed = [r for r in second.records() if r.get("event") == "relay_resumed"]
        assert [r["message_id"] for r in resumed] == [before.message_id]
        assert second.terminate() == 0
    finally:
        for process in processes:
            process.stop_if_running()


def test_killed_relay_resumes_a_scheduled_reject_from_its_journal(
    tmp_path: Path,
    broker: MosquittoBroker,
    http: RecordingHttpServer,
    camera: MqttPublisher,
    watcher: Subscriber,
) -> None:
    delay = 4.0
    config = relay_toml(
        tmp_path / "relay.toml",
        broker.port,
        tmp_path / "state",
        f'kind = "http"\nurl = "{http.url}"',
        extra=f"[timing]\ndelay_s = {delay}\ntolerance_s = 0.5\n",
    )
    log = tmp_path / "relay.log"
    processes: list[RelayProcess] = []
    try:
        first = start_relay(config, log, processes)
        message = inspection("cam1", 1)
        planned = {message.message_id: message.capture_time + delay}
        camera.publish_inspection(message)
        assert journal_rows(tmp_path / "state" / "relay.sqlite", 1)
        first.kill()  # acknowledged to the broker, so only the journal remembers it
        assert watcher.wait_for(lambda ms: statuses(watcher)[-1:] == [b"offline"], timeout=15), "the Will"
        assert http.ids() == []

        second = start_relay(config, log, processes)
        assert http.wait_for(lambda arrivals: len(arrivals) >= 1, timeout=delay + 10)
        camera.publish_inspection(message)  # and a late redelivery is still a duplicate
        deadline = time.monotonic() + 10
        while not second.decisions("duplicate") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert http.ids() == [message.message_id]
        late = lateness_ms(http, planned)
        assert all(-EARLY_MS <= ms <= FIRE_TOLERANCE_MS for ms in late.values()), late
        # The camera's redelivery, and maybe the broker's own: the kill can land after the journal commit but
        # before the PUBACK left, and the persistent session then hands the message to the new relay too.
        duplicates = [r["message_id"] for r in second.decisions("duplicate")]
        assert duplicates and set(duplicates) == {message.message_id}
        assert second.terminate() == 0
    finally:
        for process in processes:
            process.stop_if_running()


def journal_rows(journal: Path, count: int, timeout: float = 15.0) -> bool:
    """True once the relay's journal holds ``count`` decisions (scheduling is logged at DEBUG only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if journal.exists():
            with contextlib.closing(sqlite3.connect(journal)) as db:
                (rows,) = db.execute("SELECT COUNT(*) FROM decisions").fetchone()
            if rows >= count:
                return True
        time.sleep(0.05)
    return False


def test_systemd_ready_watchdog_and_stopping(
    tmp_path: Path,
    broker: MosquittoBroker,
    http: RecordingHttpServer,
) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="notify-"))  # short path: AF_UNIX names are limited to 108 bytes
    address = sock_dir / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(address))
    receiver.settimeout(0.2)
    config = relay_toml(tmp_path / "relay.toml", broker.port, tmp_path / "state", f'kind = "http"\nurl = "{http.url}"')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "WATCHDOG_"))}
    relay = RelayProcess(
        config, tmp_path / "relay.log", env={**env, "NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": "2000000"}
    )
    received: list[str] = []

    def drain(until: Callable[[list[str]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until(received):
            with contextlib.suppress(TimeoutError):
                received.append(receiver.recv(4096).decode())
        return until(received)

    try:
        relay.start()
        assert drain(lambda r: any(m.startswith("READY=1") for m in r), 60), received
        # Pinged at a quarter of WatchdogSec while the scheduler loops: at least 3 in 2.5 s.
        assert drain(lambda r: sum(m == "WATCHDOG=1" for m in r) >= 3, 5), received
        relay.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert drain(lambda r: any(m.startswith("STOPPING=1") for m in r), 20), received
        assert relay.process.wait(30) == 0  # type: ignore[union-attr]
    finally:
        relay.stop_if_running()
        receiver.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
