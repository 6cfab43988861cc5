"""Recipe switch time: from ``cmd/recipe`` leaving the operator's client to the first frame judged by the new recipe.

One real agent (``edge-agent run`` in its own process, ONNX Runtime on the CPU) watches the demo's conveyor
video paced like a camera (``--fps``, newest frame wins as for a live camera) with two preloaded recipes:
``upright`` (the bundle, no rotation) and ``turned`` (``--bundle-b``, default the same bundle, rotated 180
degrees), mosquitto on loopback. The bench's MQTT client sends ``cmd/recipe`` alternately, at random
gaps, and times on its own clock:

- **reply**: the command to the agent's answer on ``cmd/recipe/result``;
- **first frame cut**: the command to the capture time of the first frame whose message says the new
  recipe (``model.recipe``): it includes waiting for the camera's next frame (up to 1/fps);
- **first frame judged**: the command to that frame's inspection message arriving at the client: the
  frame inferred, scored and published by the new recipe's model (the goal: < 200 ms on 2 cores).

Every message is also checked: once the first frame of the new recipe has arrived, no message of the old
one may follow (the bench stops with an error if one does).

``--plc``: the switch from each interface, one row each. The PLC servers need triggered parts (frames no
trigger asks for are not inspected), so the agent runs triggered with its OPC UA server (Basic256Sha256
Sign&Encrypt, a user, as bench/plc.py) and Modbus server on loopback, and the interfaces take turns, each
switching to the other recipe the way a PLC changes over:

- **OPC UA**: asyncua's client writes RecipeSelect (the write's response: switch answered), then runs
  bench/plc.py's trigger cycle (TriggerId + Trigger, ResultsValid by subscription, read, ack);
- **Modbus**: pymodbus's client writes holding register 2 (RecipeSelect), then the trigger cycle (ResultsValid
  polled every ``--poll-ms``);
- **MQTT**: ``cmd/recipe`` and its answer, then a trigger on ``<prefix>/<device>/trigger``.

Timed from the switch request leaving the client: the switch answered, and the part message of the next
trigger (its frame cut, inferred, scored and published by the new recipe) arriving at the bench's MQTT
observer. Every part message must carry the recipe of the switch before its trigger, and the inspection
messages in frame order change recipe exactly as asked.

    .venv/bin/edge-agent demo --workdir /tmp/demo                 # once: trains the demo bundle
    .venv/bin/python bench/recipe.py --bundle /tmp/demo/bundle    # 40 switches, ~1 min on 2 cores
    .venv/bin/python bench/recipe.py --bundle /tmp/demo/bundle --plc --switches 30   # 30 per interface
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from agent_bench import percentile, print_latency_table, start_agent, stop_agent, wait_log, write_config  # noqa: E402
from mqtt_observer import MqttObserver  # noqa: E402

from edge_agent.demo.conveyor import Conveyor, ConveyorSpec, write_video  # noqa: E402
from edge_agent.demo.local_broker import LocalMosquitto  # noqa: E402

RECIPES = ("upright", "turned")


class Operator(MqttObserver):
    """The operator's MQTT client: sends cmd/recipe, sees every inspection and answer."""

    def __init__(self, broker: LocalMosquitto) -> None:
        self.inspections: list[tuple[float, dict[str, Any]]] = []  # (arrival, message)
        self.replies: dict[str, tuple[float, dict[str, Any]]] = {}
        topics = [("uflow/bench/inspection", 1), ("uflow/bench/cmd/recipe/result", 1)]
        super().__init__(broker.host, broker.port, "bench-operator", topics)

    def handle(self, topic: str, body: Any, arrived: float) -> None:
        if topic.endswith("/inspection"):
            self.inspections.append((arrived, body))
        else:
            self.replies[body.get("request_id") or ""] = (arrived, body)

    def switch(self, name: str, request_id: str) -> tuple[float, float, float]:
        """(reply, first frame cut, first frame judged) in ms after the command, on this client's clock."""
        with self.cond:
            seen = len(self.inspections)
        sent = time.time()
        self.client.publish("uflow/bench/cmd/recipe", json.dumps({"name": name, "request_id": request_id}), qos=1)
        with self.cond:
            ok = self.cond.wait_for(
                lambda: (
                    request_id in self.replies and any(m["model"]["recipe"] == name for _, m in self.inspections[seen:])
                ),
                20,
            )
            if not ok:
                raise SystemExit(f"no reply or no frame of recipe {name} within 20 s")
            replied, reply = self.replies[request_id]
            if not reply["ok"]:
                raise SystemExit(f"switch to {name} refused: {reply['message']}")
            arrived, first = next((a, m) for a, m in self.inspections[seen:] if m["model"]["recipe"] == name)
        return (replied - sent) * 1000, (first["capture_time"] - sent) * 1000, (arrived - sent) * 1000

    def check_order(self, asked: list[str]) -> int:
        """Every message in sequence order: the recipe changes exactly as asked (``asked``: the first recipe, then
        each switch's); SystemExit otherwise. Returns how many messages were checked."""
        with self.cond:
            ordered = sorted((m for _, m in self.inspections), key=lambda m: m["sequence"])
        runs: list[str] = []
        for message in ordered:
            if not runs or runs[-1] != message["model"]["recipe"]:
                runs.append(message["model"]["recipe"])
        if runs != asked:
            raise SystemExit(f"recipes in frame order {runs} differ from the switches asked {asked}")
        return len(ordered)


def load_plc_bench() -> Any:
    """bench/plc.py as a module (its OPC UA and Modbus trigger cycles; bench/ is no package)."""
    spec = importlib.util.spec_from_file_location("bench_plc", ROOT / "bench" / "plc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PartObserver(MqttObserver):
    """Every part and inspection message, with its arrival on the bench's clock (perf_counter)."""

    def __init__(self, broker: LocalMosquitto) -> None:
        self.parts: dict[str, tuple[float, dict[str, Any]]] = {}  # trigger id -> (arrival, message)
        self.inspections: list[dict[str, Any]] = []
        topics = [("uflow/bench/part", 1), ("uflow/bench/inspection", 1)]
        super().__init__(broker.host, broker.port, "bench-observer", topics, clock=time.perf_counter)

    def handle(self, topic: str, body: Any, arrived: float) -> None:
        if topic.endswith("/part"):
            self.parts[str(body.get("trigger_id"))] = (arrived, body)
        else:
            self.inspections.append(body)

    def part(self, trigger_id: int) -> tuple[float, dict[str, Any]]:
        with self.cond:
            if not self.cond.wait_for(lambda: str(trigger_id) in self.parts, 20):
                raise SystemExit(f"no part message for trigger {trigger_id} within 20 s")
            return self.parts[str(trigger_id)]


class MqttSwitch:
    """cmd/recipe and its answer, then a trigger on MQTT (bench/plc.py's MqttPlc waits for its part)."""

    def __init__(self, broker: LocalMosquitto, plc: Any) -> None:
        self.operator = Operator(broker)
        self.trigger = plc.MqttPlc(broker)
        self.count = 0

    def switch(self, index: int) -> None:
        self.count += 1
        request_id = f"m{self.count}"
        operator = self.operator
        operator.client.publish("uflow/bench/cmd/recipe", json.dumps({"index": index, "request_id": request_id}), qos=1)
        with operator.cond:
            if not operator.cond.wait_for(lambda: request_id in operator.replies, 20):
                raise SystemExit("no answer to cmd/recipe within 20 s")
            if not operator.replies[request_id][1]["ok"]:
                raise SystemExit(f"cmd/recipe refused: {operator.replies[request_id][1]['message']}")

    def cycle(self, trigger_id: int) -> None:
        self.trigger.cycle(trigger_id)


class PlcSwitch:
    """A bench/plc.py PLC client (its trigger cycle) that also switches the recipe and reads RecipeActive."""

    def __init__(self, client: Any) -> None:
        self.plc = client

    def cycle(self, trigger_id: int) -> None:
        self.plc.cycle(trigger_id)


class OpcUaSwitch(PlcSwitch):
    """RecipeSelect written over OPC UA (the write's response), then bench/plc.py's subscription cycle."""

    def switch(self, index: int) -> None:
        ua = self.plc.ua
        self.plc.call(self.plc.node("RecipeSelect").write_value(ua.Variant(index, ua.VariantType.UInt16)))

    def active(self) -> int:
        return int(self.plc.call(self.plc.node("RecipeActive").read_value()))


class ModbusSwitch(PlcSwitch):
    """Holding register 2 (RecipeSelect) written over Modbus, then bench/plc.py's polled cycle."""

    def switch(self, index: int) -> None:
        if self.plc.client.write_register(2, index).isError():
            raise SystemExit(f"Modbus RecipeSelect {index} refused")

    def active(self) -> int:
        return int(self.plc.client.read_input_registers(27, count=1).registers[0])  # RecipeActive


def write_agent_config(
    path: Path, args: argparse.Namespace, work: Path, video: Path, bundle_b: Path, port: int, **more: Any
) -> None:
    """The agent's config in both modes: the two recipes (``--bundle`` upright, ``bundle_b`` turned 180 degrees),
    the camera paced at ``--fps`` (newest frame wins), mosquitto on ``port``, no HTTP; ``more`` adds sections."""
    write_config(
        path,
        {
            "device_id": "bench", "state_dir": str(work / "state"), "log_format": "json",
            "model": {"backend": "onnxruntime", "threads": args.threads},
            "source": {"uri": str(video), "loop": True, "fps_limit": args.fps, "drop_policy": "latest"},
            "mqtt": {"port": port, "stats_interval_s": 60.0},
            "http": {"enabled": False},
            **more,
        },
        [
            {"name": RECIPES[0], "bundle": str(args.bundle.resolve())},
            {"name": RECIPES[1], "bundle": str(bundle_b.resolve()), "rotate": 180},
        ],
    )  # fmt: skip


def check_agent_log(log: Path) -> None:
    """SystemExit with the first ``stage_failed`` line of the agent's log, if any."""
    failed = [line for line in log.read_text(errors="replace").splitlines() if '"stage_failed"' in line]
    if failed:
        raise SystemExit(f"the agent failed: {failed[0]}")


def plc_main(args: argparse.Namespace, work: Path, video: Path, bundle_b: Path) -> int:
    """``--plc``: a switch from each interface (MQTT, OPC UA, Modbus), then the next trigger's part message."""
    from edge_agent.demo.local_broker import free_port

    plc = load_plc_bench()
    broker = LocalMosquitto(work / "broker")
    broker.start()
    opcua_port, modbus_port = free_port(), free_port()
    config = work / "agent.toml"
    write_agent_config(
        config, args, work, video, bundle_b, broker.port,
        parts={"mode": "triggered", "triggers": ["mqtt"], "trigger_delay_s": 0.0, "trigger_timeout_s": 2.0},
        plc={"opcua_enabled": True, "opcua_port": opcua_port, "modbus_enabled": True, "modbus_port": modbus_port},
    )  # fmt: skip
    plc.cli(config, "plc", "cert")
    plc.cli(config, "plc", "passwd", "--user", plc.USER, stdin=plc.PASSWORD + "\n")
    log = work / "agent.log"
    agent = start_agent(config, log)
    names = ("MQTT cmd/recipe", "OPC UA RecipeSelect", "Modbus RecipeSelect (HR 2)")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    expected: dict[str, str] = {}  # trigger id -> the recipe its part must carry
    asked = [RECIPES[0]]
    try:
        wait_log(log, "agent_ready", 600)
        observer = PartObserver(broker)
        opcua = plc.OpcUaPlc(
            f"opc.tcp://127.0.0.1:{opcua_port}/uflow", work / "state" / "plc" / "server-cert.der", work
        )
        interfaces: dict[str, Any] = {
            names[0]: MqttSwitch(broker, plc),
            names[1]: OpcUaSwitch(opcua),
            names[2]: ModbusSwitch(plc.ModbusPlc(modbus_port, args.poll_ms / 1000)),
        }
        rng = random.Random(0)
        trigger_id, index = 1000, 0
        for round_ in range(args.switches + 1):
            for name, interface in interfaces.items():
                index = 1 - index
                trigger_id += 1
                started = time.perf_counter()
                interface.switch(index)
                answered = time.perf_counter()
                interface.cycle(trigger_id)
                arrived, part = observer.part(trigger_id)
                asked.append(RECIPES[index])
                expected[str(trigger_id)] = RECIPES[index]
                if part["model"]["recipe"] != RECIPES[index]:
                    raise SystemExit(
                        f"{name}: trigger {trigger_id} judged by {part['model']['recipe']}, asked {asked[-1]}"
                    )
                if hasattr(interface, "active") and interface.active() != index:
                    raise SystemExit(f"{name}: RecipeActive is not {index} after the switch")
                if round_ > 0:  # the first round warms every path up, not counted
                    times[name].append(((answered - started) * 1000, (arrived - started) * 1000))
                time.sleep(rng.uniform(0.1, 0.4))  # another phase of the camera's frame clock each time
        opcua.close()
        with observer.cond:
            wrong = [t for t, (_, m) in observer.parts.items() if t in expected and m["model"]["recipe"] != expected[t]]
            inspections = sorted(observer.inspections, key=lambda m: m["sequence"])
        if wrong:
            raise SystemExit(f"part messages judged by the wrong recipe: triggers {wrong}")
        runs: list[str] = []
        for message in inspections:
            if not runs or runs[-1] != message["model"]["recipe"]:
                runs.append(message["model"]["recipe"])
        if runs != asked[1:]:
            raise SystemExit(f"inspections in frame order: recipes {runs}, switches asked {asked[1:]}")
    finally:
        stop_agent(agent, broker)
    check_agent_log(log)
    print(
        f"recipe switch by interface, {args.switches} switches each (taking turns, at random gaps), triggered parts, "
        f"camera at {args.fps:g} fps (frame wait up to {1000 / args.fps:.0f} ms included), {len(expected)} parts "
        f"and {len(inspections)} inspections checked, bundles {args.bundle}, {bundle_b}"
    )
    print(f"{'switch from':30} {'answered p50':>12} {'p99':>7} {'max':>7} {'judged p50':>11} {'p99':>7} {'max':>7}")
    for name, rows in times.items():
        answered_ms, judged_ms = [r[0] for r in rows], [r[1] for r in rows]
        print(
            f"{name:30} {percentile(answered_ms, 50):12.1f} {percentile(answered_ms, 99):7.1f} {max(answered_ms):7.1f} "
            f"{percentile(judged_ms, 50):11.1f} {percentile(judged_ms, 99):7.1f} {max(judged_ms):7.1f}"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="the demo's bundle (edge-agent demo: D/bundle)")
    parser.add_argument("--bundle-b", type=Path, default=None, help="the second recipe's bundle (default --bundle)")
    parser.add_argument("--video", type=Path, default=None, help="default: render the demo's conveyor")
    parser.add_argument("--switches", type=int, default=40)
    parser.add_argument("--fps", type=float, default=25.0, help="camera pace (the demo video's rate)")
    parser.add_argument("--threads", type=int, default=0, help="model.threads (0: the agent chooses)")
    parser.add_argument("--plc", action="store_true", help="switch from MQTT, OPC UA and Modbus in turn (triggered)")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="--plc: the Modbus PLC's cycle")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-recipe-"))
    video = args.video
    if video is None:
        spec = ConveyorSpec(width=256, height=256, parts=10, speed_px=8, seed=0)
        video = work / "conveyor.avi"
        write_video(video, iter(Conveyor(spec)), spec.fps, (spec.width, spec.height))
    bundle_b = args.bundle_b or args.bundle
    if args.plc:
        return plc_main(args, work, video, bundle_b)
    broker = LocalMosquitto(work / "broker")
    broker.start()
    config = work / "agent.toml"
    write_agent_config(config, args, work, video, bundle_b, broker.port)
    log = work / "agent.log"
    agent = start_agent(config, log)
    rows: list[tuple[float, float, float]] = []
    try:
        wait_log(log, "agent_ready", 600)
        operator = Operator(broker)
        rng = random.Random(0)
        asked = [RECIPES[0]]
        for index in range(args.switches + 2):
            asked.append(RECIPES[(index + 1) % 2])
            timing = operator.switch(asked[-1], f"s{index}")
            if index >= 2:  # two warm-up switches, not counted
                rows.append(timing)
            time.sleep(rng.uniform(0.3, 0.8))  # another phase of the camera's frame clock each time
        checked = operator.check_order(asked)
    finally:
        stop_agent(agent, broker)
    check_agent_log(log)
    print(
        f"recipe switch, {len(rows)} switches at random gaps, camera at {args.fps:g} fps "
        f"(frame wait up to {1000 / args.fps:.0f} ms included), {checked} messages, bundles {args.bundle}, {bundle_b}"
    )
    columns = ("the agent's reply", "first frame cut (capture)", "first frame judged (received)")
    print_latency_table("from cmd/recipe sent to", {name: [row[k] for row in rows] for k, name in enumerate(columns)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
