"""CI runs ruff and mypy beside the tests, and the mypy configuration holds each package to its level."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
OUR_PACKAGES = ("edge_agent", "training", "calibration")


def test_ci_runs_ruff_and_mypy_so_that_a_finding_fails_it() -> None:
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "set -euo pipefail" in lines  # a failing check stops the script with its status
    venv_line = next(i for i, line in enumerate(lines) if "python3 -m venv .venv" in line)
    for check in (".venv/bin/ruff check .", ".venv/bin/ruff format --check .", ".venv/bin/python -m mypy"):
        assert check in lines, f".ci/run does not run {check!r}"
        assert lines.index(check) > venv_line, f"{check!r} runs before the venv that installs it exists"


def test_mypy_config_checks_our_packages_and_never_silences_them() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    assert set(config["files"]) == set(OUR_PACKAGES)
    assert not config.get("ignore_missing_imports") and not config.get("ignore_errors")
    for override in config.get("overrides", []):
        modules = [override["module"]] if isinstance(override["module"], str) else override["module"]
        silenced = override.get("ignore_missing_imports") or override.get("ignore_errors")
        ours = [m for m in modules if m.split(".")[0] in OUR_PACKAGES]
        assert not (silenced and ours), f"an override silences our own modules: {ours}"
    assert any(
        "mypy" in dep
        for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    )


def _mypy(tmp_path: Path, package: str, source: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / package).mkdir(parents=True)
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "probe.py").write_text(source)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(REPO / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            f"{package}/probe.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("package", OUR_PACKAGES)
def test_a_type_error_fails_mypy_in_every_package(tmp_path: Path, package: str) -> None:
    pytest.importorskip("mypy")
    result = _mypy(tmp_path, package, "def count() -> int:\n    return 'three'\n")
    assert result.returncode == 1, result.stdout
    assert "probe.py:2" in result.stdout


def test_edge_agent_is_strict_and_training_is_not(tmp_path: Path) -> None:
    # an unannotated function: strict's disallow_untyped_defs refuses it on the device package only
    pytest.importorskip("mypy")
    untyped = "def double(x):\n    return 2 * x\n"
    assert _mypy(tmp_path / "a", "edge_agent", untyped).returncode == 1
    assert _mypy(tmp_path / "b", "training", untyped).returncode == 0
