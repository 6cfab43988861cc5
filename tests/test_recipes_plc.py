"""Recipe switches from outside a running ``edge-agent run`` (triggered parts, two recipes, OPC UA and Modbus on
loopback): node-opcua's client and Debian's mbpoll write RecipeSelect and see RecipeActive, ``edge-agent recipe``
sends cmd/recipe over a real mosquitto, and every part message after a switch carries the new recipe and its
model version.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import REPO, write_frames
from mqtt_broker import MosquittoBroker, Subscriber
from plc_helpers import MBPOLL, PLC_PASSWORD, PLC_USER, PlcAgent, mbpoll, mbpoll_values, plc_values, start_plc_agent

pytest.importorskip("asyncua", reason="the plc extra (asyncua) is not installed")
pytest.importorskip("pymodbus", reason="the plc extra (pymodbus) is not installed")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MBPOLL is None, reason="mbpoll is not installed (CI installs it)")]

VERSIONS = {"a": "1.0.0", "b": "2.0.0"}
IR_RECIPE_ACTIVE, IR_LAST_ERROR = 27, 26
CLIENTS = Path(__file__).resolve().parent / "plc_clients"
NODE = shutil.which("node")


@pytest.fixture(scope="module")
def running(
    tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]
) -> Iterator[tuple[PlcAgent, MosquittoBroker]]:
    tmp = tmp_path_factory.mktemp("recipes-plc")
    broker = MosquittoBroker(tmp / "mosquitto", None).start()
    values = plc_values(tmp, tmp / "unused", str(write_frames(tmp / "frames", 20)), broker.port)
    values["recipes"] = [
        {"name": "a", "bundle": str(bundles["v1"])},
        {"name": "b", "bundle": str(bundles["v2"]), "rotate": 180},
    ]
    plc = start_plc_agent(tmp, values)
    try:
        assert plc.agent.wait_for_event("agent_ready", 300), plc.agent.tail()
        yield plc, broker
    finally:
        if plc.agent.process.poll() is None:
            plc.agent.kill()
        broker.stop()


def registers(port: int, first: int, count: int) -> dict[int, float]:
    return mbpoll_values(port, "-t", "3", "-r", str(first), "-c", str(count))


def recipe_active(port: int) -> int:
    return int(registers(port, IR_RECIPE_ACTIVE, 1)[IR_RECIPE_ACTIVE])


def select(port: int, index: int) -> subprocess.CompletedProcess[str]:
    return mbpoll(port, "-t", "4", "-r", "2", "127.0.0.1", str(index))  # holding register 2: RecipeSelect


def trigger_part(port: int, parts: Subscriber, trigger_id: int) -> dict:
    """One Modbus trigger, its result acked; the part message it produced."""
    assert mbpoll(port, "-t", "4:int", "-B", "-r", "0", "127.0.0.1", str(trigger_id)).returncode == 0
    assert mbpoll(port, "-t", "0", "-r", "0", "127.0.0.1", "1").returncode == 0
    assert parts.wait_for(lambda ms: any(m.json().get("trigger_id") == str(trigger_id) for m in ms), 30)
    deadline = time.monotonic() + 15
    while mbpoll_values(port, "-t", "1", "-r", "3", "-c", "1")[3] != 1:  # ResultsValid
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert mbpoll(port, "-t", "0", "-r", "1", "127.0.0.1", "1").returncode == 0  # ResultsAck
    while mbpoll_values(port, "-t", "1", "-r", "3", "-c", "1")[3] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert mbpoll(port, "-t", "0", "-r", "1", "127.0.0.1", "0").returncode == 0
    return next(m.json() for m in parts.messages if m.json().get("trigger_id") == str(trigger_id))


def test_recipe_select_over_modbus_switches_and_an_unknown_index_is_refused(
    running: tuple[PlcAgent, MosquittoBroker],
) -> None:
    plc, broker = running
    port = plc.modbus_port
    parts = Subscriber(broker, "uflow/cam1/part")
    try:
        assert recipe_active(port) == 0
        part = trigger_part(port, parts, 81001)
        assert (part["model"]["recipe"], part["model"]["version"]) == ("a", VERSIONS["a"])

        assert select(port, 1).returncode == 0
        assert recipe_active(port) == 1
        for trigger_id in (81002, 81003):
            part = trigger_part(port, parts, trigger_id)
            assert (part["model"]["recipe"], part["model"]["version"]) == ("b", VERSIONS["b"])

        refused = select(port, 5)
        assert refused.returncode != 0  # exception 03: illegal data value
        assert recipe_active(port) == 1 and int(registers(port, IR_LAST_ERROR, 1)[IR_LAST_ERROR]) == 4
        part = trigger_part(port, parts, 81004)
        assert part["model"]["recipe"] == "b"  # the active recipe stayed
    finally:
        parts.close()


def recipe_cli(plc: PlcAgent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "recipe", "--config", str(plc.config), *args],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip


def test_the_cli_switches_the_running_agent_and_the_plc_sees_it(running: tuple[PlcAgent, MosquittoBroker]) -> None:
    plc, broker = running
    port = plc.modbus_port
    listed = recipe_cli(plc, "--list")
    assert listed.returncode == 0 and listed.stdout.splitlines()[1].split("\t")[:2] == ["1", "b"]

    done = recipe_cli(plc, "a")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ok"] is True and answer["data"]["recipe"] == "a"
    assert recipe_active(port) == 0  # RecipeActive follows a switch from any interface

    parts = Subscriber(broker, "uflow/cam1/part")
    try:
        part = trigger_part(port, parts, 82001)
        assert (part["model"]["recipe"], part["model"]["version"]) == ("a", VERSIONS["a"])
    finally:
        parts.close()

    refused = recipe_cli(plc, "--index", "9")
    assert refused.returncode == 1 and json.loads(refused.stdout)["ok"] is False
    assert recipe_active(port) == 0


@pytest.mark.skipif(
    NODE is None or not (CLIENTS / "node_modules" / "node-opcua-client").is_dir(),
    reason="node-opcua is not installed here (npm ci --prefix tests/plc_clients; CI installs it)",
)
def test_node_opcua_switches_the_recipe_by_subscription_and_an_unknown_index_is_refused(
    running: tuple[PlcAgent, MosquittoBroker], tmp_path: Path
) -> None:
    plc, broker = running
    port = plc.modbus_port
    assert select(port, 0).returncode == 0 and recipe_active(port) == 0
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(CLIENTS / "opcua_recipe.js"), plc.opcua_url, PLC_USER, PLC_PASSWORD, str(tmp_path / "pki"),
         str(plc.cert), "1", "9"],
        capture_output=True, text=True, timeout=120, cwd=CLIENTS,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + plc.agent.tail()
    lines = {
        key: value
        for line in done.stdout.splitlines()
        if line.startswith("{")
        for key, value in json.loads(line).items()
    }
    assert lines["initial"] == 0
    assert lines["switch"]["status"] == "Good" and lines["switch"]["active"] == 1
    refused = lines["refused"]
    assert refused["status"] == "BadOutOfRange" and refused["active"] == 1 and refused["notified"] == 1
    assert refused["code"] == 4 and "recipe index 9" in refused["lastError"]
    parts = Subscriber(broker, "uflow/cam1/part")
    try:  # the next part is judged by recipe b
        part = trigger_part(port, parts, 83001)
        assert (part["model"]["recipe"], part["model"]["version"]) == ("b", VERSIONS["b"])
    finally:
        parts.close()
