"""Fire-time accuracy of the reject relay (``edge-agent reject-relay``), measured at the actuator.

A private mosquitto on loopback; the relay runs as its real process; this script plays a camera that
publishes agent-shaped inspection messages (every ``--anomalous-every``-th one anomalous) at ``--fps``
through the agent's own MQTT publisher. Each anomalous part should be rejected at
``capture_time + delay``; lateness = when the actuator saw the order - that time (same host, one clock):

- http:    a loopback HTTP server records when each POST arrives;
- command: ``/bin/sh -c 'echo "$0 $(date +%s.%N)" >> file' {message_id}`` (two execs: an upper bound
           for a command like gpioset);
- mqtt:    a subscriber on the PLC gateway topic records when each order arrives.

"relay" columns are the relay's own numbers (its log: actual - planned at the moment it calls the
actuator, on its monotonic clock). Prints a markdown table.

    .venv/bin/python bench/relay_timing.py                      # 200 rejects per row, all rows
    .venv/bin/python bench/relay_timing.py --rejects 50 --actuators http --clock fixed
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from relay_helpers import RecordingHttpServer, RelayProcess, inspection, relay_toml  # noqa: E402

from edge_agent.config import MqttConfig  # noqa: E402
from edge_agent.demo.local_broker import LocalMosquitto  # noqa: E402
from edge_agent.publish.mqtt import MqttPublisher  # noqa: E402

DEVICE = "cam1"
PLC_TOPIC = "plc/line1/reject"


class TopicRecorder:
    """Records the arrival time of each order on the PLC topic."""

    def __init__(self, port: int) -> None:
        self.arrivals: dict[str, float] = {}
        ready = threading.Event()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(PLC_TOPIC, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
        self.client.on_message = lambda c, u, m: self.arrivals.setdefault(
            json.loads(m.payload)["message_id"], time.time()
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("cannot subscribe to the PLC topic")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else float("nan")


def run_case(kind: str, clock: str, args: argparse.Namespace, broker: LocalMosquitto, work: Path) -> dict:
    """One row: start a relay, publish, collect arrival times, stop."""
    case = work / f"{kind}-{clock}"
    case.mkdir()
    http = RecordingHttpServer() if kind == "http" else None
    recorder = TopicRecorder(broker.port) if kind == "mqtt" else None
    fired_file = case / "fired.txt"
    actuator = {
        "http": f'kind = "http"\nurl = "{http.url if http else ""}"',
        "command": 'kind = "command"\ncommand = ["/bin/sh", "-c", "echo \\"$0 $(date +%s.%N)\\" >> '
        + str(fired_file)
        + '", "{message_id}"]',
        "mqtt": f'kind = "mqtt"\ntopic = "{PLC_TOPIC}"',
    }[kind]
    extra = (
        f"log_good_decisions = false\n[timing]\ndelay_s = {args.delay}\ntolerance_s = {args.tolerance}\n"
        f'[clock]\nmode = "{clock}"\n'
    )
    config = relay_toml(
        case / "relay.toml", broker.port, case / "state", actuator, f"bench-{kind}-{clock}", extra=extra
    )
    relay = RelayProcess(config, case / "relay.log").start()
    if not relay.wait_for_event("relay_connected", 30):
        raise RuntimeError(f"relay did not connect: {(case / 'relay.log').read_text()[-2000:]}")
    time.sleep(0.5)  # the subscription is in place once SUBACK came; a little margin for the first messages
    publisher = MqttPublisher(MqttConfig(port=broker.port, message_expiry_s=30), DEVICE)
    publisher.start()
    publisher.wait_connected(10)
    planned: dict[str, float] = {}
    frames = args.rejects * args.anomalous_every
    period = 1.0 / args.fps
    started = time.monotonic()
    for sequence in range(frames):
        # Paced on the monotonic clock like a camera; capture 40 ms before publishing, as the message says.
        time.sleep(max(0.0, started + sequence * period - time.monotonic()))
        anomalous = sequence % args.anomalous_every == 0
        message = inspection(DEVICE, sequence, anomalous=anomalous, latency_s=0.04)
        if anomalous:
            planned[message.message_id] = message.capture_time + args.delay
        publisher.publish_inspection(message)
    time.sleep(args.delay + args.tolerance + 1.0)
    relay.terminate()
    publisher.stop()
    if kind == "http":
        assert http is not None
        seen = {a.body["message_id"]: a.wall for a in http.arrivals}
        http.close()
    elif kind == "mqtt":
        assert recorder is not None
        seen = dict(recorder.arrivals)
        recorder.close()
    else:
        seen = {}
        if fired_file.exists():
            for line in fired_file.read_text().splitlines():
                message_id, stamp = line.split()
                seen[message_id] = float(stamp)
    at_actuator = [(seen[m] - planned[m]) * 1000.0 for m in planned if m in seen]
    relay_side = [float(r["lateness_ms"]) for r in relay.decisions("fired")]
    return {
        "actuator": kind,
        "clock": clock,
        "rejects": len(planned),
        "fired": len(relay.decisions("fired")),
        "missed": len(relay.decisions("missed")),
        "failed": len(relay.decisions("failed")),
        "twice": len(relay.decisions("fired")) - len({r["message_id"] for r in relay.decisions("fired")}),
        "at_actuator": at_actuator,
        "relay": relay_side,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rejects", type=int, default=200, help="anomalous messages per row")
    parser.add_argument("--fps", type=float, default=40.0, help="messages per second (good and anomalous)")
    parser.add_argument("--anomalous-every", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.5, help="travel delay, seconds")
    parser.add_argument("--tolerance", type=float, default=0.05, help="tolerance window, seconds")
    parser.add_argument("--actuators", nargs="+", default=["http", "command", "mqtt"])
    parser.add_argument("--clock", nargs="+", default=["estimate", "fixed"])
    parser.add_argument(
        "--broker-nodelay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="set_tcp_nodelay true in mosquitto.conf (the recommended broker setting)",
    )
    args = parser.parse_args()
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        print("mosquitto is not installed (apt-get install mosquitto)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    rows = []
    broker = LocalMosquitto(work / "broker")
    if args.broker_nodelay:
        # mosquitto's own sends to subscribers (the relay, a PLC gateway) without Nagle's delay; see docs.
        with broker.config.open("a") as config:
            config.write("set_tcp_nodelay true\n")
    broker.start()
    try:
        for kind in args.actuators:
            for clock in args.clock:
                print(
                    f"... {kind} / {clock}: {args.rejects} rejects at {args.fps:g} msg/s", file=sys.stderr, flush=True
                )
                rows.append(run_case(kind, clock, args, broker, work))
    finally:
        broker.stop()
    print(
        f"\nreject relay fire-time accuracy: delay {args.delay} s, tolerance {args.tolerance * 1000:.0f} ms, "
        f"{args.fps:g} msg/s, 1 in {args.anomalous_every} anomalous, broker set_tcp_nodelay "
        f"{'true' if args.broker_nodelay else 'false'}; lateness in ms (negative = early)\n"
    )
    print(
        "| actuator | clock | rejects | fired | missed | failed | fired twice | at actuator p50 | p99 | max | min "
        "| relay p50 | relay p99 | relay max |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        a, r = row["at_actuator"], row["relay"]
        print(
            f"| {row['actuator']} | {row['clock']} | {row['rejects']} | {row['fired']} | {row['missed']} | "
            f"{row['failed']} | {row['twice']} | {percentile(a, 0.5):.2f} | {percentile(a, 0.99):.2f} | "
            f"{max(a, default=float('nan')):.2f} | {min(a, default=float('nan')):.2f} | {percentile(r, 0.5):.2f} | "
            f"{percentile(r, 0.99):.2f} | {max(r, default=float('nan')):.2f} |"
        )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
