"""The device path never needs torch: every edge_agent module imports and the device commands run in a
process where torch, timm, FrEIA and onnx cannot be imported (tests/torch_block.py)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from torch_block import BLOCKED, torch_free_env

import edge_agent


def device_modules() -> list[str]:
    """Every module of the edge_agent package (``__main__`` modules run a command when imported)."""
    found = pkgutil.walk_packages(edge_agent.__path__, prefix="edge_agent.")
    return sorted(m.name for m in found if not m.name.endswith(".__main__"))


def run_torch_free(tmp_path: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = torch_free_env(tmp_path / "block")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_the_block_really_blocks(tmp_path: Path) -> None:
    result = run_torch_free(tmp_path, ["-c", "import torch"])
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr and "blocked" in result.stderr


def test_every_edge_agent_module_imports_without_torch(tmp_path: Path) -> None:
    modules = device_modules()
    assert "edge_agent.inspection.pipeline" in modules and "edge_agent.cli.run" in modules
    code = (
        "import importlib, json, sys\n"
        f"mods = {modules!r}\n"
        "failed = {}\n"
        "for m in mods:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as exc:\n"
        "        failed[m] = f'{type(exc).__name__}: {exc}'\n"
        f"loaded = sorted(n for n in sys.modules if n.split('.')[0] in {set(BLOCKED)!r})\n"
        "print(json.dumps({'failed': failed, 'loaded': loaded}))\n"
    )
    result = run_torch_free(tmp_path, ["-c", code])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}, report["failed"]
    assert report["loaded"] == []


def test_cli_help_without_torch(tmp_path: Path) -> None:
    result = run_torch_free(tmp_path, ["-m", "edge_agent.cli", "--help"])
    assert result.returncode == 0, result.stderr
    for command in ("run", "segment", "demo"):
        assert command in result.stdout


def test_segment_on_the_tiny_bundle_without_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    image = tmp_path / "part.png"
    cv2.imwrite(str(image), np.full((80, 120, 3), 128, np.uint8))
    out = tmp_path / "out"
    result = run_torch_free(
        tmp_path, ["-m", "edge_agent.cli", "segment", "--bundle", str(tiny_bundle), "--out", str(out), str(image)]
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "part.json").read_text())
    assert isinstance(report["anomalous"], bool) and report["image_size"] == [120, 80]
    assert np.load(out / "part_lognfa.npy").shape == (80, 120)


def test_demo_without_torch_says_how_to_install_training(tmp_path: Path) -> None:
    result = run_torch_free(tmp_path, ["-m", "edge_agent.cli", "demo", "--workdir", str(tmp_path / "demo")])
    assert result.returncode != 0
    assert "pip install '.[train]'" in result.stdout + result.stderr
