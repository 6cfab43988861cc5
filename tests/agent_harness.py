"""Run the real agent for tests and fault scripts: in this process (a thread) or as ``edge-agent run``.

Both use real parts only: a contract bundle (ONNX Runtime), an image folder or a stream, a mosquitto,
a spool file, an HTTP port. ``AgentThread`` is for tests that talk to the agent (commands, HTTP);
``AgentProcess`` for those that kill it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.publish as mqtt_publish
from contract_bundle import defect_frame, good_frame
from mqtt_broker import MosquittoBroker, Received, Subscriber

from edge_agent.config import AgentSettings, load_settings
from edge_agent.demo.local_broker import LocalMosquitto

REPO = Path(__file__).resolve().parent.parent
DEFECT_EVERY = 10  # frames with sequence % 10 == 3 hold a dark defect


def write_frames(folder: Path, count: int, size: int = 64, seed: int = 0) -> Path:
    """``count`` PNG frames of the contract bundle's "good" texture; every 10th (index 3, 13, ...) has a defect."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        if index % DEFECT_EVERY == 3:
            rgb = defect_frame(rng, size, size, (size // 3, size // 3, size // 4, size // 4))
        else:
            rgb = good_frame(rng, size, size)
        cv2.imwrite(str(folder / f"{index:06d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return folder


def agent_config(
    state: Path,
    bundle: Path,
    source_uri: str,
    broker_port: int,
    http_port: int | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """Settings values for a test agent (nested dicts, as in the TOML file)."""
    values: dict[str, Any] = {
        "device_id": "cam1",
        "state_dir": str(state),
        "log_format": "json",
        "model": {"bundle": str(bundle), "backend": "onnxruntime", "threads": 1},
        "source": {"uri": source_uri},
        "mqtt": {
            "port": broker_port,
            "reconnect_initial_s": 1,
            "reconnect_max_s": 1,
            "stats_interval_s": 1.0,
            "message_expiry_s": 300,
            "drain_timeout_s": 10,
        },
        "http": {"enabled": http_port is not None, "port": http_port or 0},
    }
    for name, section in sections.items():
        if isinstance(section, dict):
            values.setdefault(name, {}).update(section)
        else:
            values[name] = section
    return values


def write_toml(path: Path, values: dict[str, Any]) -> Path:
    """A TOML file for ``edge-agent run --config`` (values are str, int, float, bool, one level of tables, or
    arrays of tables with one level of sub-tables)."""
    tables = [v for v in values.values() if isinstance(v, list) and v and all(isinstance(t, dict) for t in v)]
    lines = [
        f"{k} = {_toml(v)}" for k, v in values.items() if not isinstance(v, dict) and not any(v is t for t in tables)
    ]
    for name, table in values.items():
        if isinstance(table, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
        elif any(table is t for t in tables):  # an array of tables ([[recipes]]), each with its own sub-tables
            for entry in table:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {_toml(v)}" for k, v in entry.items() if not isinstance(v, dict)]
                for sub, inner in entry.items():
                    if isinstance(inner, dict):
                        lines.append(f"[{name}.{sub}]")
                        lines += [f"{k} = {_toml(v)}" for k, v in inner.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


class AgentThread:
    """``run_agent`` in a thread of this process (signal handlers are not installed there)."""

    def __init__(self, settings: AgentSettings, on_result: Callable[..., None] | None = None) -> None:
        from edge_agent.cli.run import run_agent

        self.settings = settings
        self.stop_event = threading.Event()
        self.exit_code: int | None = None

        def target() -> None:
            self.exit_code = run_agent(settings, on_result=on_result, stop=self.stop_event)

        self.thread = threading.Thread(target=target, name="agent-under-test", daemon=True)

    @classmethod
    def from_values(cls, values: dict[str, Any], **kwargs: Any) -> AgentThread:
        return cls(load_settings(None, **values), **kwargs)

    def start(self) -> AgentThread:
        self.thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> int | None:
        self.stop_event.set()
        self.thread.join(timeout)
        return self.exit_code


class AgentProcess:
    """``python -m edge_agent.cli run --config FILE`` with its JSON log in a file."""

    def __init__(self, config: Path, log: Path, numba_cache: Path | None = None) -> None:
        self.config = config
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if numba_cache is not None:
            env["NUMBA_CACHE_DIR"] = str(numba_cache)
        with log.open("a") as stream:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
                stdout=stream,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Log lines (JSON) of this and earlier runs logging to the same file; only ``name`` events if given."""
        lines = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if name is None or entry.get("event") == name:
                    lines.append(entry)
        return lines

    def wait_for_event(self, name: str, timeout: float, count: int = 1) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.events(name)) >= count:
                return True
            if self.process.poll() is not None:
                return len(self.events(name)) >= count
            time.sleep(0.1)
        return False

    def kill(self) -> None:
        """SIGKILL: no clean stop, no final commit, no ``stopped`` status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def send_command(
    broker: LocalMosquitto, name: str, payload: bytes | str | dict[str, Any], prefix: str = "uflow"
) -> None:
    """Publish one command (QoS 1) to ``<prefix>/cam1/cmd/<name>``."""
    body = json.dumps(payload) if isinstance(payload, dict) else payload
    mqtt_publish.single(f"{prefix}/cam1/cmd/{name}", body, qos=1, hostname=broker.host, port=broker.port)


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str, str]:
    """(status, content type, body) of GET http://127.0.0.1:<port><path>; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


class Running:
    """An agent in a thread with a subscriber on everything it publishes."""

    def __init__(self, agent: AgentThread, subscriber: Subscriber, mqtt: MosquittoBroker, http_port: int) -> None:
        self.agent = agent
        self.subscriber = subscriber
        self.broker = mqtt
        self.http_port = http_port

    def inspections(self) -> list[dict]:
        return [m.json() for m in self.subscriber.on("/inspection")]

    def results(self, name: str) -> list[dict]:
        return [m.json() for m in self.subscriber.on(f"/cmd/{name}/result")]

    def wait_inspections(self, count: int, timeout: float = 30.0) -> list[dict]:
        assert self.subscriber.wait_for(
            lambda ms: len([m for m in ms if m.topic.endswith("/inspection")]) >= count, timeout
        ), f"fewer than {count} inspections"
        return self.inspections()

    def command(self, name: str, payload: bytes | str | dict, timeout: float = 30.0) -> dict:
        """Send a command and return its reply (the next one on cmd/<name>/result)."""
        before = len(self.results(name))
        send_command(self.broker, name, payload)
        assert self.subscriber.wait_for(lambda ms: len(on_topic(ms, f"/cmd/{name}/result")) > before, timeout), (
            f"no reply to {name}"
        )
        return self.results(name)[before]


def on_topic(messages: list[Received], suffix: str) -> list[Received]:
    return [m for m in messages if m.topic.endswith(suffix)]
