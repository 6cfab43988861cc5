"""Commands as docs/operations.md writes them (issue 21): options after the action, --set everywhere, train hints.

Real processes of ``edge-agent`` and ``uflow``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_harness import REPO, write_toml


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_review_export_takes_the_config_after_the_action(tmp_path: Path) -> None:
    training = tmp_path / "training"
    (training / "good").mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(training / "good" / f"g{i}.png"), np.full((32, 32, 3), 60 * i, np.uint8))
    config = write_toml(tmp_path / "agent.toml", {"state_dir": str(tmp_path / "state"),
                        "keep": {"training_dir": str(training)}})  # fmt: skip
    out = tmp_path / "dataset"
    result = _run("edge_agent.cli", "review", "export", str(out), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert (out / "split.json").is_file()
    assert f"train with: uflow train --data {out / 'split.json'} --out runs/dataset" in result.stdout
    listed = _run("edge_agent.cli", "review", "list", "--config", str(config), "--set", "keep.dir=" + str(tmp_path))
    assert listed.returncode == 0, listed.stderr


def test_doctor_takes_set_like_record_and_review(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "agent.toml", {"state_dir": str(tmp_path / "state")})
    result = _run("edge_agent.cli", "doctor", "--config", str(config), "--set", "device_id=cam-doc", "--json")
    assert "unrecognized arguments" not in result.stderr and result.returncode in (0, 1), result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert "device_id=cam-doc" in rows["config"]["detail"]
    bad = _run("edge_agent.cli", "doctor", "--set", "nonsense")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_a_failed_training_leaves_no_run_folder(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    data = tmp_path / "good"
    data.mkdir()
    for i in range(4):
        cv2.imwrite(str(data / f"g{i}.png"), np.full((64, 64, 3), 100 + i, np.uint8))
    (data / "broken.png").write_bytes(b"not a png at all")  # read after config.json is written
    out = tmp_path / "runs" / "line1"
    result = _run("training.cli", "train", "--data", str(data), "--out", str(out), "--image-size", "64",
                  "--epochs", "1", "--random-weights", "--quiet", timeout=600)  # fmt: skip
    assert result.returncode != 0 and "broken.png" in result.stderr, result.stderr[-2000:]
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    # A run folder that already held something keeps it; only the failed run's files go.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _run("training.cli", "train", "--data", str(data), "--out", str(out), "--image-size", "64",
                  "--epochs", "1", "--random-weights", "--quiet", timeout=600)  # fmt: skip
    assert result.returncode != 0 and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
