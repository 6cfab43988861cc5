"""``edge-agent reject-relay --check`` (issue 21): part-mode travel as the relay computes it, actuators that cannot work.

Real processes and a real mosquitto; the demo's own relay config (edge_agent/demo/line.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mqtt_broker import MosquittoBroker, free_port

from edge_agent.demo.line import DECISION_DISTANCE_M, write_relay_config

ROOT = Path(__file__).resolve().parent.parent


def _check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    command = [sys.executable, "-m", "edge_agent.cli", "reject-relay", "--config", str(config), "--check", *extra]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def test_the_demo_config_checks_with_its_part_travel(tmp_path: Path, broker: MosquittoBroker) -> None:
    config = write_relay_config(tmp_path / "relay.toml", broker.port, tmp_path / "state", "cam1", DECISION_DISTANCE_M,
                                0.2)  # fmt: skip
    result = _check(config)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    part = plan["devices"]["cam1"]["part_mode"]
    # The demo fires parts by distance and speed: 0.3 m at 0.2 m/s is 1.5 s from the decision line.
    assert part["travel_s"] == pytest.approx(DECISION_DISTANCE_M / 0.2)
    assert part["decision_distance_m"] == DECISION_DISTANCE_M and plan["problems"] == []
    # The same config with the broker gone: an mqtt actuator cannot publish, the check says so (exit 1).
    down = write_relay_config(tmp_path / "down.toml", free_port(), tmp_path / "state", "cam1", 0.3, 0.2)
    result = _check(down)
    assert result.returncode == 1 and "cannot be reached" in result.stderr


def test_a_missing_command_or_gpio_chip_fails_the_check(tmp_path: Path) -> None:
    base = f'state_dir = "{tmp_path / "state"}"\ncameras = ["cam1"]\n[timing]\ndecision_distance_m = 0.5\nspeed_m_s = 0.5\n'
    missing = tmp_path / "missing.toml"
    missing.write_text(base + '[actuator]\nkind = "command"\ncommand = ["/nonexistent/fire-reject"]\n')
    result = _check(missing)
    assert result.returncode == 2 and "/nonexistent/fire-reject" in result.stderr
    gpioset = tmp_path / "bin" / "gpioset"  # libgpiod's tool, as a stand-in: the chip is what is checked
    gpioset.parent.mkdir()
    gpioset.write_text("#!/bin/sh\nexit 0\n")
    gpioset.chmod(0o755)
    gpio = tmp_path / "gpio.toml"
    gpio.write_text(base + f'[actuator]\nkind = "command"\ncommand = ["{gpioset}", "gpiochip97", "17=1"]\n')
    result = _check(gpio)
    assert result.returncode == 2 and "/dev/gpiochip97 does not exist" in result.stderr
    good = tmp_path / "good.toml"
    good.write_text(base + f'[actuator]\nkind = "command"\ncommand = ["{gpioset}", "--help"]\n')
    result = _check(good)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["devices"]["cam1"]["part_mode"]["travel_s"] == pytest.approx(1.0)
