"""The systemd side of the GPU path: the Jetson drop-in for every unit that touches the GPU, and the
build unit's exit statuses and start-timeout extension matching what build-engine does."""

from __future__ import annotations

import re
from pathlib import Path

from edge_agent.cli import build_engine

UNITS = Path(__file__).resolve().parents[1] / "systemd"


def _settings(unit: Path, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", unit.read_text(encoding="utf-8"), flags=re.M)


def test_every_unit_that_touches_the_gpu_ships_the_jetson_drop_in() -> None:
    agent_drop_in = (UNITS / "edge-agent.service.d" / "jetson.conf").read_text(encoding="utf-8")
    gpu_units = [
        u for u in sorted(UNITS.glob("*.service")) if "char-nvidia* rw" in " ".join(_settings(u, "DeviceAllow"))
    ]
    assert {u.name for u in gpu_units} >= {
        "edge-agent.service",
        "edge-agent-update.service",
        "edge-agent-build-engine.service",
    }
    for unit in gpu_units:
        drop_in = UNITS / f"{unit.name}.d" / "jetson.conf"
        assert drop_in.is_file(), f"{unit.name} touches the GPU but has no Jetson drop-in"
        assert drop_in.read_text(encoding="utf-8") == agent_drop_in
        assert "DeviceAllow=/dev/nvmap rw" in agent_drop_in


def test_build_unit_hides_only_not_installed_and_lets_progress_extend_the_timeout() -> None:
    unit = UNITS / "edge-agent-build-engine.service"
    success = " ".join(_settings(unit, "SuccessExitStatus")).split()
    assert success == [str(build_engine.EXIT_UNAVAILABLE)]
    assert str(build_engine.EXIT_NO_GPU) not in success and build_engine.EXIT_NO_GPU != build_engine.EXIT_UNAVAILABLE
    # A oneshot's EXTEND_TIMEOUT_USEC is only accepted with NotifyAccess set.
    assert _settings(unit, "NotifyAccess") == ["main"]
