"""The reject relay's unit file: `systemd-analyze verify` passes as shipped and its exposure stays low."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from systemd_fixtures import (
    SYSTEMD_ANALYZE,
    UNITS,
    exposure,
    needs_systemd_analyze,
    parse_unit,
    systemd_version,
)

UNIT = "edge-reject-relay.service"
MAX_RELAY_EXPOSURE = 2.0  # lower than the agent's: no GPU, no camera, no JIT


@needs_systemd_analyze
def test_relay_unit_verifies(scratch_root: Path) -> None:
    # The agent's scratch root (distribution units, ours, an executable at the install path), plus this unit.
    shutil.copy(UNITS / UNIT, scratch_root / "etc/systemd/system" / UNIT)
    result = subprocess.run(
        [SYSTEMD_ANALYZE or "", "verify", f"--root={scratch_root}", f"/etc/systemd/system/{UNIT}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


@needs_systemd_analyze
def test_relay_unit_exposure() -> None:
    if systemd_version() < 250:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or newer")
    score, report = exposure(UNITS / UNIT)
    assert score <= MAX_RELAY_EXPOSURE, report


def test_relay_unit_contract() -> None:
    service = parse_unit(UNIT)["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main" and service["WatchdogSec"]
    assert service["ExecStart"].endswith("edge-agent reject-relay --config /etc/edge-agent/reject-relay.toml")
    assert service["User"] == "edge-reject-relay" and service["StateDirectory"] == "edge-reject-relay"
    assert service["MemoryDenyWriteExecute"] == "yes" and service["DevicePolicy"] == "closed"
    assert "PrivateDevices" not in service  # it would hide /dev/gpiochip*
    assert "DeviceAllow=char-gpiochip rw" in (UNITS / UNIT).read_text()
    # The stop timeout leaves room for the drain window of the example config.
    from edge_agent.relay.config import load_relay_settings

    drain = load_relay_settings(UNITS / "reject-relay.toml").stop_drain_s
    assert float(service["TimeoutStopSec"].rstrip("s")) > drain + 5
