"""The demo's line in tracked mode: the real ``edge-agent reject-relay`` with an MQTT actuator, and a watcher.

The watcher is an MQTT client (made by the one client factory, edge_agent/publish/client.py) standing where a
PLC and a dashboard would: it receives the agent's part messages and the relay's reject orders (the
actuator's topic), so the demo's summary counts parts and pulses from what the agent and the relay actually
published. In frames mode (frames.py) the same watcher stands where a reject relay would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTProtocolVersion

from edge_agent.config import AgentSettings, MqttConfig
from edge_agent.demo.conveyor import ConveyorSpec, ConveyorTruth
from edge_agent.demo.local_broker import BrokerError
from edge_agent.publish.client import new_client

PLC_TOPIC = "plc/demo/reject"
RELAY_ID = "demo-relay"
DEVICE_ID = "demo"


class RunAgent(Protocol):
    """``edge_agent.cli.run.run_agent``, passed in: the demo's floor does not import the CLI's."""

    def __call__(self, settings: AgentSettings, on_result: Callable[[Any], None] | None = None) -> int: ...


def say(text: str) -> None:
    """One line for the person watching."""
    print(text, flush=True)


def write_relay_config(
    path: Path, port: int, state_dir: Path, device_id: str, decision_distance_m: float, speed_m_s: float
) -> Path:
    """A relay config for the demo: part messages of one camera, the belt speed, an MQTT actuator."""
    path.write_text(
        f'relay_id = "{RELAY_ID}"\nstate_dir = "{state_dir}"\nlog_format = "json"\nstop_drain_s = 5.0\n'
        f'log_good_decisions = true\ncameras = ["{device_id}"]\n\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\ntopics = ["uflow/{device_id}/part"]\n'
        f'\n[clock]\nmode = "fixed"\n\n[timing]\ndecision_distance_m = {decision_distance_m}\n'
        f"speed_m_s = {speed_m_s}\ntolerance_s = 0.25\n\n"
        f'[actuator]\nkind = "mqtt"\ntopic = "{PLC_TOPIC}"\n'
    )
    return path


class RelayChild:
    """``edge-agent reject-relay --config ...`` as a child process with its JSON log in a file."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start it and wait until it subscribed; BrokerError when it did not."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_RELAY_")}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "reject-relay", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                env={**env, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(r.get("event") == "relay_subscribed" for r in self.records()):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise BrokerError(f"the reject relay did not start; see {self.log_path}")

    def records(self) -> list[dict[str, Any]]:
        """The relay's JSON log lines so far."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def decisions(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == "relay_decision" and r.get("decision") == name]

    def stop(self) -> int | None:
        """SIGTERM (rejects due within stop_drain_s still fire), then wait."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


@dataclass
class LineWatcher:
    """Subscribes to the agent's topics and the actuator's, collecting part messages and reject pulses.

    ``label`` names it in the lines it prints; ``print_rejects`` prints every anomalous inspection message
    (frames mode, where no part messages come).
    """

    host: str
    port: int
    device_id: str
    prefix: str = "uflow"
    say: Callable[[str], None] = print
    label: str = "line"
    print_rejects: bool = False
    parts: list[dict[str, Any]] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    pulses: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    client: paho.Client | None = None

    def start(self) -> None:
        subscribed = threading.Event()
        config = MqttConfig(host=self.host, port=self.port)
        self.client = new_client(config, f"demo-{self.label}-watcher", MQTTProtocolVersion.MQTTv311)
        topics = [(f"{self.prefix}/{self.device_id}/#", 1), (PLC_TOPIC, 1)]
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise BrokerError(f"the {self.label} watcher could not subscribe on {self.host}:{self.port}")

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        topic, payload = message.topic, message.payload
        with self._cond:
            if topic == PLC_TOPIC:
                order = json.loads(payload)
                self.pulses.append((time.time(), order))
                self.say(
                    f"   [plc] REJECT pulse for part {order.get('part_id')} "
                    f"({order.get('lateness_ms', 0.0):.1f} ms after its planned time)"
                )
            elif topic.endswith("/status"):
                self.statuses.append(payload.decode())
                self.say(f"   [{self.label}] agent status: {payload.decode()}")
            elif topic.endswith("/part"):
                data = json.loads(payload)
                self.parts.append(data)
                frames = data["frames"]
                verdict = "REJECT" if data["anomalous"] else "pass"
                self.say(
                    f"   [agent] part {data['part_id']}: {verdict:6s} log10 NFA {data['log_nfa']:9.1f} over "
                    f"{frames['count']} frames ({frames['first_sequence']}-{frames['last_sequence']})"
                )
            elif topic.endswith("/inspection"):
                data = json.loads(payload)
                self.frames.append(data)
                if self.print_rejects and data["anomalous"]:
                    regions = "; ".join(
                        f"bbox {r['bbox']} area {r['area']} px log10 NFA {r['log_nfa']:.1f}" for r in data["regions"]
                    )
                    self.say(
                        f"   [{self.label}] frame {data['sequence']:4d}  REJECT  score {data['image_score']:.3f}  "
                        f"{regions}"
                    )
            self._cond.notify_all()

    def wait_for_status(self, status: str, timeout: float) -> bool:
        """True once the agent published ``status`` (e.g. ``stopped``), False after ``timeout`` seconds."""
        return self.wait_for(lambda w: status in w.statuses, timeout)

    def wait_for(self, predicate: Callable[[LineWatcher], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


PX_PER_M = 1000.0  # the demo's camera: one pixel is one millimetre of belt
DECISION_DISTANCE_M = 0.3  # from the agent's decision line (the view's exit edge) to the reject actuator


def run_tracked(
    bundle: Path,
    video: Path,
    broker_host: str,
    broker_port: int,
    truth: ConveyorTruth,
    spec: ConveyorSpec,
    workdir: Path,
    threads: int,
    say: Callable[[str], None],
    run_agent: RunAgent,
) -> tuple[int, TrackedNumbers]:
    """Step 5 in tracked mode: relay process, watcher, the agent on the video; (exit code, summary numbers)."""
    from edge_agent.config import load_settings
    from edge_agent.logs import setup_logging

    device_id = DEVICE_ID
    speed_m_s = spec.speed_px * spec.fps / PX_PER_M
    config = workdir / "agent.toml"
    config.write_text(
        f'device_id = "{device_id}"\nstate_dir = "{workdir / "state"}"\nlog_format = "json"\n\n'
        f'[model]\nbundle = "{bundle}"\nbackend = "onnxruntime"\nthreads = {threads}\n\n'
        f'[source]\nuri = "{video}"\n\n[mqtt]\nport = {broker_port}\npublish = "anomalous"\n\n'
        f'[parts]\nmode = "tracked"\npx_per_m = {PX_PER_M}\n'
    )
    relay_config = write_relay_config(
        workdir / "reject-relay.toml", broker_port, workdir / "relay-state", device_id, DECISION_DISTANCE_M, speed_m_s
    )
    journal = workdir / "relay-state" / "relay.sqlite"
    if journal.exists():  # a previous demo's part ids would not clash, but its counts would confuse
        for suffix in ("", "-wal", "-shm"):
            Path(f"{journal}{suffix}").unlink(missing_ok=True)
    relay = RelayChild(relay_config, workdir / "relay.log")
    watcher = LineWatcher(broker_host, broker_port, device_id, say=say)
    watcher.start()
    say(
        "Step 5/5: the agent runs on the video in tracked mode (one verdict per part, ONNX Runtime on the CPU); "
        f"the real reject relay (edge-agent reject-relay --config {relay_config}) fires an MQTT actuator on "
        f"{PLC_TOPIC} {DECISION_DISTANCE_M} m down the belt ({speed_m_s:g} m/s)."
    )
    relay.start()
    say(f"   (the same run from a shell: edge-agent run --config {config})")
    agent_log = workdir / "agent.log"
    settings = load_settings(config)
    try:
        with agent_log.open("w") as stream:
            setup_logging("INFO", "json", stream=stream)
            code = run_agent(settings)
        setup_logging("WARNING", "text")
        rejected = sum(1 for p in watcher.parts if p["anomalous"])
        # The last reject is due a moment after the last part left the view.
        watcher.wait_for(lambda w: len(w.pulses) >= rejected, timeout=DECISION_DISTANCE_M / speed_m_s + 5.0)
        time.sleep(0.5)  # a second pulse for one part would arrive now
    finally:
        relay.stop()
        watcher.stop()
    numbers = tracked_numbers(watcher, relay, truth)
    return code, numbers


@dataclass(frozen=True)
class TrackedNumbers:
    """What a tracked demo run did, against the ground truth."""

    parts: int
    true_parts: int
    rejected: int
    pulses: int
    relay_fired: int
    relay_duplicates: int
    relay_missed: int
    defective: list[int]
    caught: list[int]
    false_rejects: list[int] | None  # None when the part count differs (no matching)
    max_pulses_per_part: int
    lateness_ms: list[float]


def tracked_numbers(watcher: LineWatcher, relay: RelayChild, truth: ConveyorTruth) -> TrackedNumbers:
    """Parts and pulses against the ground truth (parts matched in the order they passed)."""
    parts = sorted(watcher.parts, key=lambda p: p["first_capture_time"])
    defective = [p.index for p in truth.parts if p.kind]
    pulses_per_part: dict[str, int] = {}
    for _, order in watcher.pulses:
        part_id = str(order.get("part_id", ""))
        pulses_per_part[part_id] = pulses_per_part.get(part_id, 0) + 1
    matched = len(parts) == len(truth.parts)
    rejected = [i for i, p in enumerate(parts) if p["anomalous"]]
    return TrackedNumbers(
        parts=len(parts),
        true_parts=len(truth.parts),
        rejected=len(rejected),
        pulses=len(watcher.pulses),
        relay_fired=len(relay.decisions("fired")),
        relay_duplicates=len(relay.decisions("duplicate")),
        relay_missed=len(relay.decisions("missed")),
        defective=defective,
        caught=[i for i in defective if matched and i in rejected],
        false_rejects=[i for i in rejected if i not in defective] if matched else None,
        max_pulses_per_part=max(pulses_per_part.values(), default=0),
        lateness_ms=[round(float(o.get("lateness_ms", 0.0)), 1) for _, o in watcher.pulses],
    )


def say_tracked_summary(n: TrackedNumbers, say: Callable[[str], None]) -> None:
    """The summary lines of a tracked demo run."""
    say("\nSummary")
    say(f"   parts decided by the agent ...... {n.parts} (on the belt: {n.true_parts})")
    defective = ", ".join(f"#{i + 1}" for i in n.defective)
    say(f"   parts rejected .................. {n.rejected} (defective: {defective}; caught {len(n.caught)})")
    false = "unknown (part count differs)" if n.false_rejects is None else str(len(n.false_rejects))
    say(f"   false rejects ................... {false}")
    say(
        f"   reject pulses at the actuator ... {n.pulses} (relay: fired {n.relay_fired}, duplicates "
        f"{n.relay_duplicates}, missed {n.relay_missed}; at most {n.max_pulses_per_part} per part; "
        f"lateness ms {n.lateness_ms})"
    )
    say(f"   => {n.parts} parts, {n.rejected} rejected, {n.pulses} pulses")
