"""A real agent with its PLC servers on loopback (triggered parts, a looping frame folder), for the PLC tests
and bench/plc.py: certificate and user made by the real ``edge-agent plc`` commands."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_harness import REPO, AgentProcess, agent_config, write_toml

from edge_agent.demo.local_broker import free_port

PLC_USER, PLC_PASSWORD = "plc1", "s3cret-line-4"


@dataclass
class PlcAgent:
    """The running agent and how to reach its servers."""

    agent: AgentProcess
    config: Path
    opcua_url: str
    opcua_port: int
    modbus_port: int
    cert: Path
    state: Path


def plc_cli(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``edge-agent --config CONFIG plc ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "plc", "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def plc_values(tmp: Path, bundle: Path, source: str, broker_port: int, **plc: Any) -> dict[str, Any]:
    """Agent settings with the PLC servers on free loopback ports (``plc`` overrides keys)."""
    values = agent_config(
        tmp / "state",
        bundle,
        source,
        broker_port,
        source={"loop": True, "fps_limit": 20.0},
        parts={"mode": "triggered", "triggers": ["mqtt"], "trigger_delay_s": 0.0, "trigger_timeout_s": 1.0},
    )
    values["plc"] = {
        "opcua_enabled": True,
        "opcua_port": free_port(),
        "modbus_enabled": True,
        "modbus_port": free_port(),
        **plc,
    }
    return values


def start_plc_agent(tmp: Path, values: dict[str, Any], make_credentials: bool = True) -> PlcAgent:
    """Write the config, make the certificate and the user with the CLI, start ``edge-agent run``."""
    config = write_toml(tmp / "agent.toml", values)
    if make_credentials:
        made = plc_cli(config, "cert")
        assert made.returncode == 0, made.stderr
        added = plc_cli(config, "passwd", "--user", PLC_USER, stdin=PLC_PASSWORD + "\n")
        assert added.returncode == 0, added.stderr
    agent = AgentProcess(config, tmp / "agent.log")
    plc = values["plc"]
    return PlcAgent(
        agent=agent,
        config=config,
        opcua_url=f"opc.tcp://127.0.0.1:{plc['opcua_port']}/uflow",
        opcua_port=plc["opcua_port"],
        modbus_port=plc["modbus_port"],
        cert=Path(values["state_dir"]) / "plc" / "server-cert.der",
        state=Path(values["state_dir"]),
    )


MBPOLL = shutil.which("mbpoll")  # Debian's libmodbus client: the independent Modbus peer of the tests


def mbpoll(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """One ``mbpoll`` call against a Modbus TCP server on loopback ``port`` (unit 1, 0-based, once, quiet)."""
    assert MBPOLL is not None
    return subprocess.run(
        [MBPOLL, "-m", "tcp", "-p", str(port), "-a", "1", "-0", "-1", "-q", *args],
        capture_output=True,
        text=True,
        timeout=20,
    )


def mbpoll_values(port: int, *args: str) -> dict[int, float]:
    """``mbpoll`` reads from 127.0.0.1 as {address: value}."""
    done = mbpoll(port, *args, "127.0.0.1")
    assert done.returncode == 0, done.stderr
    values = {}
    for line in done.stdout.splitlines():
        if line.startswith("["):
            address, _, value = line.partition("]:")
            values[int(address[1:])] = float(value.split()[0])
    return values
