"""systemd hardening of issue 13: resource limits, an IP allow list (generated from the config), and a separate
user for the reject relay. `systemd-analyze verify` runs on the units as shipped (scratch root, as in
test_systemd_units.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from systemd_fixtures import INSTALLED_BINARY, UNITS, distribution_unit_dir, needs_systemd_analyze, parse_unit

SERVICES = (
    "edge-agent.service",
    "edge-agent-update.service",
    "edge-agent-build-engine.service",
    "edge-reject-relay.service",
)


def _lines(name: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in (UNITS / name).read_text().splitlines() if line.startswith(key + "=")]


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_has_resource_limits_and_an_ip_allow_list(name: str) -> None:
    service = parse_unit(name)["Service"]
    assert service["MemoryMax"] and int(service["TasksMax"]) > 0 and int(service["LimitNOFILE"]) > 0
    assert _lines(name, "IPAddressDeny") == ["any"]
    if name != "edge-agent-build-engine.service":  # builds from local files: no network at all
        assert "localhost" in " ".join(_lines(name, "IPAddressAllow"))


def test_the_relay_runs_as_its_own_user_and_the_two_cannot_read_each_other() -> None:
    relay = parse_unit("edge-reject-relay.service")["Service"]
    agent = parse_unit("edge-agent.service")["Service"]
    assert relay["User"] == relay["Group"] == "edge-reject-relay" != agent["User"]
    assert "/etc/edge-agent/reject-relay.toml" in agent["InaccessiblePaths"]
    assert "/var/lib/edge-agent" in relay["InaccessiblePaths"]
    sysusers = (UNITS / "edge-agent.sysusers").read_text()
    assert "\nu edge-reject-relay " in sysusers


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_creates_the_relay_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        ["systemd-sysusers", "--dry-run", f"--root={tmp_path}", str(UNITS / "edge-agent.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Creating user 'edge-reject-relay'" in result.stdout + result.stderr


@needs_systemd_analyze
def test_hardened_units_verify(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(distribution_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for name in (*SERVICES, "edge-agent-update.timer"):
        shutil.copy(UNITS / name, etc / name)
    binary = root / INSTALLED_BINARY
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    for name in SERVICES:
        result = subprocess.run(
            [shutil.which("systemd-analyze") or "", "verify", f"--root={root}", f"/etc/systemd/system/{name}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        problems = [line for line in result.stderr.splitlines() if "edge-" in line and "Unknown" in line]
        assert problems == [], problems


def test_ip_allow_dropin_lists_the_configured_addresses(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        '[mqtt]\nhost = "127.0.0.2"\n[update]\nsource = "https://127.0.0.3:8443/fleet/"\n'
        '[source]\nuri = "rtsp://viewer:pw@127.0.0.4/stream"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "config", "--config", str(config), "--ip-allow"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=UNITS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    allowed = [line for line in result.stdout.splitlines() if line.startswith("IPAddressAllow=")]
    assert allowed == [
        "IPAddressAllow=",
        "IPAddressAllow=localhost",
        "IPAddressAllow=127.0.0.2",
        "IPAddressAllow=127.0.0.3",
        "IPAddressAllow=127.0.0.4",
    ]
    assert "viewer" not in result.stdout  # the camera's credentials are not printed
    config.write_text('[mqtt]\nhost = "no-such-host.invalid"\n')
    failed = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "config", "--config", str(config), "--ip-allow"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=UNITS.parent,
    )
    assert failed.returncode == 2 and "mqtt.host" in failed.stdout
