"""The PLC interfaces of a running agent (``edge-agent run`` in its own process, triggered parts on a looping
frame folder, ONNX Runtime, mosquitto), driven by independent clients: node-opcua's client runs the OPC UA
cycle by subscription (tests/plc_clients/opcua_cycle.js), Debian's mbpoll the Modbus cycle.

One agent serves the whole module; each test leaves no result waiting for an ack.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import write_frames
from mqtt_broker import MosquittoBroker, Subscriber
from plc_helpers import MBPOLL, PLC_PASSWORD, PLC_USER, PlcAgent, mbpoll, mbpoll_values, plc_values, start_plc_agent

pytest.importorskip("asyncua", reason="the plc extra (asyncua) is not installed")
pytest.importorskip("pymodbus", reason="the plc extra (pymodbus) is not installed")

pytestmark = pytest.mark.slow
CLIENTS = Path(__file__).resolve().parent / "plc_clients"
NODE = shutil.which("node")
RESULTS_QUEUE = 4
need_node_opcua = pytest.mark.skipif(
    NODE is None or not (CLIENTS / "node_modules" / "node-opcua-client").is_dir(),
    reason="node-opcua is not installed here (npm ci --prefix tests/plc_clients; CI installs it)",
)
need_mbpoll = pytest.mark.skipif(MBPOLL is None, reason="mbpoll is not installed (apt-get install mbpoll; CI does)")


@pytest.fixture(scope="module")
def running(
    tmp_path_factory: pytest.TempPathFactory, contract_bundle: Path
) -> Iterator[tuple[PlcAgent, MosquittoBroker]]:
    tmp = tmp_path_factory.mktemp("plc-agent")
    broker = MosquittoBroker(tmp / "mosquitto", None).start()
    frames = write_frames(tmp / "frames", 20)
    values = plc_values(tmp, contract_bundle, str(frames), broker.port, results_queue=RESULTS_QUEUE)
    plc = start_plc_agent(tmp, values)
    try:
        assert plc.agent.wait_for_event("plc_modbus_listening", 300), plc.agent.tail()
        assert plc.agent.wait_for_event("agent_ready", 60), plc.agent.tail()
        yield plc, broker
    finally:
        if plc.agent.process.poll() is None:
            plc.agent.kill()
        broker.stop()


def write(port: int, *args: str) -> None:
    done = mbpoll(port, *args)
    assert done.returncode == 0, done.stderr


def wait_results_valid(port: int, value: int, timeout: float = 15.0) -> None:
    """Modbus has no subscriptions: a PLC reads ResultsValid every cycle; so does this."""
    deadline = time.monotonic() + timeout
    while mbpoll_values(port, "-t", "1", "-r", "3", "-c", "1")[3] != value:
        assert time.monotonic() < deadline, f"ResultsValid never became {value}"
        time.sleep(0.02)


def drain(port: int) -> None:
    """Ack every waiting result (the PLC catching up)."""
    for _ in range(RESULTS_QUEUE + 2):
        if mbpoll_values(port, "-t", "1", "-r", "3", "-c", "1")[3] == 0:
            return
        write(port, "-t", "0", "-r", "1", "127.0.0.1", "1")
        wait_results_valid(port, 0)
        write(port, "-t", "0", "-r", "1", "127.0.0.1", "0")
        time.sleep(0.1)


@need_node_opcua
def test_node_opcua_runs_the_cycle_by_subscription_and_every_result_echoes_its_trigger_id(
    running: tuple[PlcAgent, MosquittoBroker], tmp_path: Path
) -> None:
    plc, broker = running
    parts = Subscriber(broker, "uflow/cam1/part")
    try:
        done = subprocess.run(
            [NODE, str(CLIENTS / "opcua_cycle.js"), plc.opcua_url, PLC_USER, PLC_PASSWORD, str(tmp_path / "pki"),
             str(plc.cert), "1000", "5"],
            capture_output=True, text=True, timeout=180, cwd=CLIENTS,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:] + plc.agent.tail()
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        cycles = [line["cycle"] for line in lines if "cycle" in line]
        assert [c["triggerId"] for c in cycles] == [1000, 1001, 1002, 1003, 1004]
        for cycle in cycles:
            assert cycle["ResultTriggerId"] == cycle["triggerId"]  # echoed in every result
            assert cycle["Status"] == 1 and cycle["Pass"] != cycle["Fail"] and cycle["ProcessingTimeMs"] > 0
        assert len({c["ResultSequence"] for c in cycles}) == 5
        assert parts.wait_for(lambda ms: len(ms) >= 6, 20)
        published = {m.json()["part_id"]: m.json() for m in parts.messages}
        for cycle in cycles:  # the PLC's result is the part message's verdict
            assert published[cycle["PartId"]]["anomalous"] == cycle["Fail"]
        (busy,) = [line["busy"] for line in lines if "busy" in line]
        assert busy["statuses"] == ["Good", "Good", "Good", "BadInvalidState"]
        assert "busy" in busy["lastError"] and busy["echoed"] == 900001
        (counters,) = [line["counters"] for line in lines if "counters" in line]
        assert counters["TriggerErrors"] >= 1 and counters["TriggerCount"] >= 6
    finally:
        parts.close()


@need_mbpoll
def test_mbpoll_runs_the_modbus_cycle_against_the_agent(running: tuple[PlcAgent, MosquittoBroker]) -> None:
    plc, _ = running
    port = plc.modbus_port
    drain(port)
    before = mbpoll_values(port, "-t", "3:int", "-B", "-r", "14", "-c", "1")[14]  # TriggerCount
    for trigger_id in (70001, 70002, 70003):
        write(port, "-t", "4:int", "-B", "-r", "0", "127.0.0.1", str(trigger_id))
        write(port, "-t", "0", "-r", "0", "127.0.0.1", "1")
        wait_results_valid(port, 1)
        result = mbpoll_values(port, "-t", "3:int", "-B", "-r", "0", "-c", "2")
        assert result[2] == trigger_id  # ResultTriggerId
        assert mbpoll_values(port, "-t", "3", "-r", "4", "-c", "1")[4] == 1  # Status: inspected
        write(port, "-t", "0", "-r", "1", "127.0.0.1", "1")  # ResultsAck
        wait_results_valid(port, 0)
        write(port, "-t", "0", "-r", "1", "127.0.0.1", "0")
    assert mbpoll_values(port, "-t", "3:int", "-B", "-r", "14", "-c", "1")[14] == before + 3


@need_mbpoll
def test_a_plc_that_never_acks_does_not_block_inspection(running: tuple[PlcAgent, MosquittoBroker]) -> None:
    plc, broker = running
    port = plc.modbus_port
    drain(port)
    overflow_before = mbpoll_values(port, "-t", "3:int", "-B", "-r", "24", "-c", "1")[24]
    parts = Subscriber(broker, "uflow/cam1/part")
    try:
        for trigger_id in range(80001, 80013):  # 12 triggers; the PLC acks none of their results
            deadline = time.monotonic() + 15
            while mbpoll_values(port, "-t", "1", "-r", "1", "-c", "1")[1] != 1:  # TriggerReady
                assert time.monotonic() < deadline, "TriggerReady never came back: inspection is blocked"
                time.sleep(0.02)
            write(port, "-t", "4:int", "-B", "-r", "0", "127.0.0.1", str(trigger_id))
            write(port, "-t", "0", "-r", "0", "127.0.0.1", "1")
        assert parts.wait_for(lambda ms: len(ms) >= 12, 30), plc.agent.tail()
        assert all(m.json()["status"] == "inspected" for m in parts.messages)  # every part went out on MQTT
        time.sleep(0.5)
        overflow = mbpoll_values(port, "-t", "3:int", "-B", "-r", "24", "-c", "1")[24] - overflow_before
        queued = mbpoll_values(port, "-t", "3:int", "-B", "-r", "12", "-c", "1")[12]
        assert queued == RESULTS_QUEUE and overflow == 12 - 1 - RESULTS_QUEUE  # one shown, the bound, the rest
        assert mbpoll_values(port, "-t", "3:int", "-B", "-r", "2", "-c", "1")[2] == 80001  # the oldest is still shown
        drain(port)
        assert mbpoll_values(port, "-t", "3:int", "-B", "-r", "12", "-c", "1")[12] == 0
        assert mbpoll_values(port, "-t", "3:int", "-B", "-r", "2", "-c", "1")[2] == 80012  # the newest was kept
    finally:
        parts.close()


@need_mbpoll
def test_garbage_on_both_ports_cannot_crash_the_agent_and_it_stops_cleanly(
    running: tuple[PlcAgent, MosquittoBroker],
) -> None:
    plc, _ = running
    junk = [
        b"\x00" * 7,  # a truncated Modbus header
        b"\x00\x01\x00\x00\xff\xff\x01\x03\x00\x00",  # a length far past the frame
        b"\x00\x02\x00\x00\x00\x06\x01\x63\x00\x00\x00\x01",  # an unknown function code
        b"HELF" + (2**31 - 1).to_bytes(4, "little") + b"\xff" * 64,  # an OPC UA hello claiming 2 GiB
        bytes(range(256)) * 64,
    ]
    for port in (plc.modbus_port, plc.opcua_port):
        for payload in junk:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(payload)
                sock.settimeout(1.0)
                with contextlib.suppress(TimeoutError, ConnectionError):
                    sock.recv(1024)
    assert plc.agent.process.poll() is None, plc.agent.tail()
    write(plc.modbus_port, "-t", "4:int", "-B", "-r", "0", "127.0.0.1", "55")
    write(plc.modbus_port, "-t", "0", "-r", "0", "127.0.0.1", "1")
    wait_results_valid(plc.modbus_port, 1)
    assert mbpoll_values(plc.modbus_port, "-t", "3:int", "-B", "-r", "2", "-c", "1")[2] == 55
    drain(plc.modbus_port)
    assert plc.agent.terminate() == 0, plc.agent.tail()
    assert plc.agent.events("plc_opcua_listening") and not plc.agent.events("plc_opcua_failed")
    assert not plc.agent.events("plc_modbus_failed")


def test_an_agent_without_plc_credentials_exits_with_a_config_error_naming_the_command(
    tmp_path: Path, contract_bundle: Path
) -> None:
    from edge_agent.exit_codes import EXIT_CONFIG

    broker = MosquittoBroker(tmp_path / "mosquitto", None).start()
    try:
        values = plc_values(tmp_path, contract_bundle, str(write_frames(tmp_path / "frames", 3)), broker.port)
        plc = start_plc_agent(tmp_path, values, make_credentials=False)
        assert plc.agent.process.wait(timeout=300) == EXIT_CONFIG, plc.agent.tail()
        (error,) = plc.agent.events("config_error")
        assert "edge-agent plc passwd" in error["msg"]  # users are checked first, then the certificate
    finally:
        broker.stop()
