"""Shared by the unit-file tests: where the units are, `systemd-analyze`, and a scratch root that holds the
distribution's units, ours, and an executable at the install path (`verify` checks ExecStart= binaries)."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
UNIT_FILES = (
    "edge-agent.service",
    "edge-agent-build-engine.service",
    "edge-agent-update.service",
    "edge-agent-update.timer",
)
INSTALLED_BINARY = "opt/edge-agent/venv/bin/edge-agent"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package `systemd`)"
)


def systemd_version() -> int:
    out = subprocess.run([SYSTEMD_ANALYZE or "", "--version"], capture_output=True, text=True, check=True).stdout
    return int(re.match(r"systemd (\d+)", out).group(1))  # type: ignore[union-attr]


def distribution_unit_dir() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "multi-user.target").exists():
            return candidate
    pytest.skip("no distribution unit directory with multi-user.target")


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sysroot")
    shutil.copytree(distribution_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for name in UNIT_FILES:
        shutil.copy(UNITS / name, etc / name)
    (etc / "edge-agent.service.d").mkdir()
    shutil.copy(UNITS / "edge-agent.service.d/jetson.conf", etc / "edge-agent.service.d/jetson.conf")
    binary = root / INSTALLED_BINARY
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    return root


def parse_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    # Repeated keys (DeviceAllow=, Environment=) would overwrite each other; only presence matters here.
    parser.read_string(
        re.sub(
            r"^(DeviceAllow|Environment|SystemCallFilter|ConditionPathExists)=",
            r"#\1=",
            (UNITS / name).read_text(),
            flags=re.M,
        )
    )
    return parser


def exposure(unit: Path) -> tuple[float, str]:
    result = subprocess.run(
        [SYSTEMD_ANALYZE or "", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1)), result.stdout
