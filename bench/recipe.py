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

    .venv/bin/edge-agent demo --workdir /tmp/demo                 # once: trains the demo bundle
    .venv/bin/python bench/recipe.py --bundle /tmp/demo/bundle    # 40 switches, ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.demo.conveyor import Conveyor, ConveyorSpec, write_video  # noqa: E402
from edge_agent.demo.local_broker import LocalMosquitto  # noqa: E402

RECIPES = ("upright", "turned")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, sections: dict[str, Any], recipes: list[dict[str, Any]]) -> None:
    lines = [f"{k} = {toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    for name, section in sections.items():
        if isinstance(section, dict):
            lines += ["", f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in section.items())]
    for recipe in recipes:
        lines += ["", "[[recipes]]", *(f"{k} = {toml_value(v)}" for k, v in recipe.items())]
    path.write_text("\n".join(lines) + "\n")


def wait_log(log: Path, event: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and f'"event": "{event}"' in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise SystemExit(f"the agent did not log {event} in {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


class Operator:
    """The operator's MQTT client: sends cmd/recipe, sees every inspection and answer."""

    def __init__(self, broker: LocalMosquitto) -> None:
        import paho.mqtt.client as mqtt

        self.cond = threading.Condition()
        self.inspections: list[tuple[float, dict[str, Any]]] = []  # (arrival, message)
        self.replies: dict[str, tuple[float, dict[str, Any]]] = {}
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-operator")
        client.on_message = self._on_message
        client.connect(broker.host, broker.port)
        client.subscribe([("uflow/bench/inspection", 1), ("uflow/bench/cmd/recipe/result", 1)])
        client.loop_start()
        self.client = client
        time.sleep(0.5)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        arrived = time.time()
        body = json.loads(message.payload)
        with self.cond:
            if message.topic.endswith("/inspection"):
                self.inspections.append((arrived, body))
            else:
                self.replies[body.get("request_id") or ""] = (arrived, body)
            self.cond.notify_all()

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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="the demo's bundle (edge-agent demo: D/bundle)")
    parser.add_argument("--bundle-b", type=Path, default=None, help="the second recipe's bundle (default --bundle)")
    parser.add_argument("--video", type=Path, default=None, help="default: render the demo's conveyor")
    parser.add_argument("--switches", type=int, default=40)
    parser.add_argument("--fps", type=float, default=25.0, help="camera pace (the demo video's rate)")
    parser.add_argument("--threads", type=int, default=0, help="model.threads (0: the agent chooses)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-recipe-"))
    video = args.video
    if video is None:
        spec = ConveyorSpec(width=256, height=256, parts=10, speed_px=8, seed=0)
        video = work / "conveyor.avi"
        write_video(video, iter(Conveyor(spec)), spec.fps, (spec.width, spec.height))
    broker = LocalMosquitto(work / "broker")
    broker.start()
    config = work / "agent.toml"
    bundle_b = args.bundle_b or args.bundle
    write_config(
        config,
        {
            "device_id": "bench", "state_dir": str(work / "state"), "log_format": "json",
            "model": {"backend": "onnxruntime", "threads": args.threads},
            "source": {"uri": str(video), "loop": True, "fps_limit": args.fps, "drop_policy": "latest"},
            "mqtt": {"port": broker.port, "stats_interval_s": 60.0},
            "http": {"enabled": False},
        },
        [
            {"name": RECIPES[0], "bundle": str(args.bundle.resolve())},
            {"name": RECIPES[1], "bundle": str(bundle_b.resolve()), "rotate": 180},
        ],
    )  # fmt: skip
    log = work / "agent.log"
    with log.open("w") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)], stdout=out, stderr=out, cwd=ROOT
        )
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
        agent.terminate()
        agent.wait(60)
        broker.stop()
    mixed = [line for line in log.read_text(errors="replace").splitlines() if '"stage_failed"' in line]
    if mixed:
        raise SystemExit(f"the agent failed: {mixed[0]}")
    print(
        f"recipe switch, {len(rows)} switches at random gaps, camera at {args.fps:g} fps "
        f"(frame wait up to {1000 / args.fps:.0f} ms included), {checked} messages, bundles {args.bundle}, {bundle_b}"
    )
    print(f"{'from cmd/recipe sent to':34} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}")
    for column, name in enumerate(("the agent's reply", "first frame cut (capture)", "first frame judged (received)")):
        values = [row[column] for row in rows]
        print(
            f"{name:34} {percentile(values, 50):8.1f} {percentile(values, 99):8.1f} {max(values):8.1f} "
            f"{statistics.fmean(values):8.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
