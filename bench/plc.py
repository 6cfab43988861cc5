"""Trigger to result over the PLC interfaces: OPC UA and Modbus TCP next to MQTT, on the demo conveyor.

One real agent (``edge-agent run`` in its own process, triggered parts, ONNX Runtime on the CPU) watches the
demo's conveyor video, paced like a camera (``--fps``, 25 as the demo renders it), with its OPC UA server
(Basic256Sha256 Sign&Encrypt, a user, the certificate made as docs/plc.md says), its Modbus server and
mosquitto on loopback. The clients take turns, one trigger at a time:

- **OPC UA**: asyncua's client writes TriggerId + Trigger in one request and waits for the subscription's
  ResultsValid = true notification (publishing interval 5 ms); then reads the result, checks the echoed
  TriggerId, and acks (ResultsAck true, wait for false, ResultsAck false);
- **Modbus**: pymodbus's client writes the TriggerId registers and the Trigger coil, then reads
  ResultsValid every ``--poll-ms`` (a PLC's cycle; the figure includes up to one poll period), checks the
  echoed TriggerId, acks;
- **MQTT**: publishes ``{"trigger_id": ...}`` on ``<prefix>/<device>/trigger`` (QoS 1) and waits for the
  part message (the gateway's path today).

Each figure is the trigger request leaving the client to the client knowing the result is there. It
includes waiting for the next frame (up to 1/fps: the trigger lands at a random phase of the camera)
and the inference; the difference between the rows is the protocol's.

    .venv/bin/edge-agent demo --workdir /tmp/demo                # once: trains the demo bundle
    .venv/bin/python bench/plc.py --bundle /tmp/demo/bundle      # 60 cycles each, ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from agent_bench import print_latency_table, start_agent, stop_agent, wait_log, write_config  # noqa: E402
from mqtt_observer import MqttObserver  # noqa: E402

from edge_agent.demo.conveyor import Conveyor, ConveyorSpec, write_video  # noqa: E402
from edge_agent.demo.local_broker import LocalMosquitto, free_port  # noqa: E402

USER, PASSWORD = "bench", "bench-password-1"


def cli(config: Path, *args: str, stdin: str = "") -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args[:1], "--config", str(config), *args[1:]],
        input=stdin, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"edge-agent {' '.join(args)}: {done.stderr}")


class OpcUaPlc:
    """The OPC UA cycle by subscription (asyncua's client in its own loop thread)."""

    def __init__(self, url: str, cert: Path, work: Path) -> None:
        self.url, self.cert, self.work = url, cert, work
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.call(self._connect())

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _connect(self) -> None:
        from asyncua import Client, ua
        from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

        from edge_agent.plc.security import application_uri, make_certificate

        make_certificate(self.work / "client.der", self.work / "client.pem", "bench-client", ["127.0.0.1"], 30)
        self.ua = ua
        client = Client(self.url, timeout=10)
        client.application_uri = application_uri("bench-client")
        client.set_user(USER)
        client.set_password(PASSWORD)
        await client.set_security(
            SecurityPolicyBasic256Sha256, str(self.work / "client.der"), str(self.work / "client.pem"),
            server_certificate=str(self.cert), mode=ua.MessageSecurityMode.SignAndEncrypt,
        )  # fmt: skip
        await client.connect()
        self.client = client
        index = await client.get_namespace_index("urn:uflow-edge:plc")
        self.node = lambda name: client.get_node(ua.NodeId(name, index))
        self.valid: asyncio.Queue[bool] = asyncio.Queue()
        queue = self.valid

        class Handler:
            def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
                queue.put_nowait(bool(value))

        subscription = await client.create_subscription(5, Handler())
        await subscription.subscribe_data_change(self.node("ResultsValid"), queuesize=10)
        assert (await self.valid.get()) is False

    async def _until(self, value: bool) -> None:
        while (await asyncio.wait_for(self.valid.get(), 20)) is not value:
            pass

    async def _cycle(self, trigger_id: int) -> float:
        ua = self.ua
        while not self.valid.empty():  # notifications of the other clients' cycles
            self.valid.get_nowait()
        started = time.perf_counter()
        await self.client.write_values(
            [self.node("TriggerId"), self.node("Trigger")],
            [ua.Variant(trigger_id, ua.VariantType.UInt32), ua.Variant(True, ua.VariantType.Boolean)],
        )
        while True:  # a late notification of another client's cycle may still come first
            await self._until(True)
            elapsed = time.perf_counter() - started
            if await self.node("ResultTriggerId").read_value() == trigger_id:
                break
        await self.node("ResultsAck").write_value(ua.Variant(True, ua.VariantType.Boolean))
        await self._until(False)
        await self.node("ResultsAck").write_value(ua.Variant(False, ua.VariantType.Boolean))
        return elapsed

    def cycle(self, trigger_id: int) -> float:
        return float(self.call(self._cycle(trigger_id)))

    def close(self) -> None:
        self.call(self.client.disconnect())


class ModbusPlc:
    """The Modbus cycle, ResultsValid polled every ``poll_s`` like a PLC's cycle."""

    def __init__(self, port: int, poll_s: float) -> None:
        from pymodbus.client import ModbusTcpClient

        self.client = ModbusTcpClient("127.0.0.1", port=port)
        assert self.client.connect()
        self.poll_s = poll_s

    def _valid(self) -> bool:
        return bool(self.client.read_discrete_inputs(3, count=1).bits[0])

    def _until(self, value: bool) -> None:
        deadline = time.monotonic() + 20
        while self._valid() is not value:
            assert time.monotonic() < deadline, "ResultsValid did not change"
            time.sleep(self.poll_s)

    def cycle(self, trigger_id: int) -> float:
        started = time.perf_counter()
        self.client.write_registers(0, [trigger_id >> 16, trigger_id & 0xFFFF])
        self.client.write_coil(0, True)
        self._until(True)
        elapsed = time.perf_counter() - started
        words = self.client.read_input_registers(2, count=2).registers
        assert (words[0] << 16 | words[1]) == trigger_id, "Modbus result for another trigger"
        self.client.write_coil(1, True)
        self._until(False)
        self.client.write_coil(1, False)
        return elapsed


class MqttPlc(MqttObserver):
    """A trigger on MQTT and its part message (the gateway path)."""

    def __init__(self, broker: LocalMosquitto) -> None:
        self.parts: list[float] = []
        super().__init__(broker.host, broker.port, "bench-plc", [("uflow/bench/part", 1)], clock=time.perf_counter)

    def handle(self, topic: str, body: Any, arrived: float) -> None:
        self.parts.append(arrived)

    def cycle(self, trigger_id: int) -> float:
        with self.cond:
            seen = len(self.parts)
        started = time.perf_counter()
        self.client.publish("uflow/bench/trigger", json.dumps({"trigger_id": str(trigger_id)}), qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.parts) > seen, 20), "no part message"
            return self.parts[seen] - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bundle", type=Path, required=True, help="the demo's bundle (edge-agent demo --workdir D: D/bundle)"
    )
    parser.add_argument("--video", type=Path, default=None, help="default: render the demo's conveyor")
    parser.add_argument("--cycles", type=int, default=60, help="cycles per protocol")
    parser.add_argument("--fps", type=float, default=25.0, help="camera pace (the demo video's rate)")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="the Modbus PLC's cycle")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-plc-"))
    video = args.video
    if video is None:
        spec = ConveyorSpec(width=256, height=256, parts=10, speed_px=8, defect_parts=(2, 6, 8),
                            defect_kinds=("crack", "dark_blob", "bright_blob"), seed=0)  # fmt: skip
        video = work / "conveyor.avi"
        write_video(video, iter(Conveyor(spec)), spec.fps, (spec.width, spec.height))
    broker = LocalMosquitto(work / "broker")
    broker.start()
    opcua_port, modbus_port = free_port(), free_port()
    config = work / "agent.toml"
    write_config(config, {
        "device_id": "bench", "state_dir": str(work / "state"), "log_format": "json",
        "model": {"bundle": str(args.bundle.resolve()), "backend": "onnxruntime", "threads": args.threads},
        "source": {"uri": str(video), "loop": True, "fps_limit": args.fps},
        "mqtt": {"port": broker.port, "publish": "anomalous"},
        "parts": {"mode": "triggered", "triggers": ["mqtt"], "trigger_delay_s": 0.0, "trigger_timeout_s": 2.0},
        "plc": {"opcua_enabled": True, "opcua_port": opcua_port, "modbus_enabled": True, "modbus_port": modbus_port},
    })  # fmt: skip
    cli(config, "plc", "cert")
    cli(config, "plc", "passwd", "--user", USER, stdin=PASSWORD + "\n")
    log = work / "agent.log"
    agent = start_agent(config, log)
    try:
        wait_log(log, "agent_ready", 600)
        clients: dict[str, Any] = {
            "OPC UA (subscription)": OpcUaPlc(f"opc.tcp://127.0.0.1:{opcua_port}/uflow",
                                              work / "state" / "plc" / "server-cert.der", work),
            f"Modbus TCP (poll {args.poll_ms:g} ms)": ModbusPlc(modbus_port, args.poll_ms / 1000),
            "MQTT (trigger -> part message)": MqttPlc(broker),
        }  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in clients}
        trigger_id = 1
        for _ in range(3):  # warm-up, not counted
            for client in clients.values():
                client.cycle(trigger_id)
                trigger_id += 1
        for _ in range(args.cycles):
            for name, client in clients.items():
                times[name].append(client.cycle(trigger_id) * 1000)
                trigger_id += 1
                time.sleep(0.013)  # land the next trigger at another phase of the frame clock
        clients["OPC UA (subscription)"].close()
    finally:
        stop_agent(agent, broker)
    print(f"trigger -> result valid, {args.cycles} cycles each, camera at {args.fps:g} fps "
          f"(frame wait up to {1000 / args.fps:.0f} ms included), bundle {args.bundle}")  # fmt: skip
    print_latency_table("interface", times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
