"""Helpers for the reject relay tests and bench/relay_timing.py: a loopback HTTP actuator that records
when each order arrives, agent-shaped inspection messages, a relay config writer and the relay as a
real ``edge-agent reject-relay`` process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from mqtt_broker import MosquittoBroker
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.messages import InspectionMessage, ModelRef, Region, StageLatency

ROOT = Path(__file__).resolve().parent.parent
CAMERAS = ("cam1", "cam2")  # the cameras a test relay acts for (relay config ``cameras``)
MODEL = ModelRef(name="m", version="1", sha256="0" * 64, backend="onnxruntime", precision="fp32")


def inspection(
    device_id: str,
    sequence: int,
    anomalous: bool = True,
    capture_time: float | None = None,
    latency_s: float = 0.04,
    **fields: Any,
) -> InspectionMessage:
    """An agent-shaped message; by default captured ``latency_s`` ago, which its latency_ms says too."""
    capture = time.time() - latency_s if capture_time is None else capture_time
    regions = [Region(bbox=(10, 10, 5, 5), area=25, log_nfa=-3.0, max_score=0.9)] if anomalous else []
    return InspectionMessage(
        device_id=device_id,
        sequence=sequence,
        capture_time=capture,
        model=MODEL,
        image_score=0.9 if anomalous else 0.1,
        anomalous=anomalous,
        log10_epsilon=0.0,
        regions=regions,
        frame_size=(64, 64),
        latency_ms=StageLatency(capture=1.0, total=latency_s * 1000.0 + 1.0),
        **fields,
    )


@dataclass(frozen=True)
class Arrival:
    """One order the HTTP actuator received."""

    wall: float  # time.time() when the request line was read
    body: dict[str, Any]


class RecordingHttpServer:
    """A loopback HTTP server that answers every POST with ``status`` (after ``delay_s``) and records its arrival."""

    def __init__(self, status: int = 200, delay_s: float = 0.0) -> None:
        self.status = status
        self.delay_s = delay_s
        self.arrivals: list[Arrival] = []
        self._cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                wall = time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer._cond:
                    outer.arrivals.append(Arrival(wall, json.loads(body)))
                    outer._cond.notify_all()
                time.sleep(outer.delay_s)  # a slow PLC gateway
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/reject"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def ids(self) -> list[str]:
        with self._cond:
            return [a.body["message_id"] for a in self.arrivals]

    def wait_for(self, predicate: Callable[[list[Arrival]], bool], timeout: float = 20.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.arrivals), timeout)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def relay_toml(
    path: Path,
    port: int,
    state_dir: Path,
    actuator: str,
    relay_id: str = "r1",
    topics: tuple[str, ...] = ("uflow/+/inspection",),
    extra: str = "",
    cameras: tuple[str, ...] = CAMERAS,
) -> Path:
    """Write a relay config: one broker, the given [actuator] body (TOML lines), anything else in ``extra``; the
    relay acts for ``cameras``."""
    topic_list = ", ".join(json.dumps(t) for t in topics)
    camera_list = ", ".join(json.dumps(c) for c in cameras)
    path.write_text(
        f'relay_id = "{relay_id}"\nstate_dir = "{state_dir}"\nlog_format = "json"\nstop_drain_s = 2.0\n'
        f"cameras = [{camera_list}]\n{extra}\n"
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\ntopics = [{topic_list}]\nstats_interval_s = 1.0\n'
        f"reconnect_initial_s = 1\nreconnect_max_s = 2\n\n[actuator]\n{actuator}\n"
    )
    return path


class RelayProcess:
    """``edge-agent reject-relay --config ...`` as a child process, its JSON log kept in a file."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "reject-relay", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                cwd=ROOT,
                env=self.env,
            )
        return self

    def wait_for_event(self, event: str, timeout: float = 30.0, count: int = 1) -> bool:
        """True once the log holds ``count`` lines with this event (False if the process died first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len([r for r in self.records() if r.get("event") == event]) >= count:
                return True
            if self.process is not None and self.process.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def records(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (non-JSON lines are skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def decisions(self, name: str | None = None) -> list[dict[str, Any]]:
        """The relay's decision lines, optionally only one kind."""
        return [
            r
            for r in self.records()
            if r.get("event") == "relay_decision" and (name is None or r.get("decision") == name)
        ]

    def stop_if_running(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def http_actuator(server: RecordingHttpServer) -> str:
    return f'kind = "http"\nurl = "{server.url}"\ntimeout_s = 2.0\nretries = 1'


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def logged(caplog: pytest.LogCaptureFixture, decision: str) -> list[logging.LogRecord]:
    """The relay's decision records of one kind."""
    return [r for r in caplog.records if getattr(r, "decision", "") == decision]


def raw_publish(broker: MosquittoBroker, topic: str, payload: bytes) -> None:
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
