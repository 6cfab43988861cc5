"""What the agent writes on request stays inside its budgets and its folders (issue 24 findings 10 and 11).

- cmd/record and the review's moves into training_dir get the keep's free-space floor (keep.min_free_mb) and
  a quota (keep.training_max_total_mb). A full disk is simulated as the keep and snapshot tests do: a floor
  larger than any disk.
- The review refuses symlinks: a symlinked training/good, training_dir or kept frame file never makes
  ``edge-agent review`` move a file outside training_dir, or a foreign file into it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from agent_harness import REPO, AgentThread, agent_config, send_command, write_toml
from line_helpers import keep_frames
from mqtt_broker import MosquittoBroker, Subscriber

from edge_agent.config import KeepConfig
from edge_agent.inspection.loaded_model import LoadedModel
from edge_agent.service.disk_budget import BudgetExceeded, DiskBudget, training_budget
from edge_agent.service.recorder import FrameRecorder, RecordError, RecordSettings
from edge_agent.service.review import ReviewError, ReviewStore


def _noise(seed: int, side: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def test_cmd_record_is_refused_below_the_free_space_floor(
    tmp_path: Path, bundles: dict[str, Path], frames: Path, broker: MosquittoBroker
) -> None:
    """With less free space than keep.min_free_mb (keep and snapshot refuse too), cmd/record writes nothing."""
    values = agent_config(
        tmp_path / "state", bundles["v1"], str(frames), broker.port, None,
        source={"loop": True, "fps_limit": 20.0},
        keep={"flagged": True, "min_free_mb": 1e12},
    )  # fmt: skip
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    try:
        assert subscriber.wait_for(lambda ms: sum(m.topic.endswith("/inspection") for m in ms) >= 3, 60)
        send_command(broker, "record", {"count": 5, "only_good": False, "request_id": "full"})
        assert subscriber.wait_for(lambda ms: any(m.topic.endswith("/cmd/record/result") for m in ms), 30)
        reply = subscriber.on("/cmd/record/result")[0].json()
        assert reply["ok"] is False and "keep.min_free_mb" in reply["message"], reply
        assert not list((tmp_path / "state" / "training").rglob("*.png"))
    finally:
        assert agent.stop() == 0
        subscriber.close()


def test_a_recording_stops_at_the_training_quota(tmp_path: Path) -> None:
    training = tmp_path / "training"
    (training / "good").mkdir(parents=True)
    (training / "good" / "old.png").write_bytes(b"x" * 20_000)  # what is already there counts
    # Room for the old file and about three noise images (each ~12 KB as PNG).
    keep = KeepConfig(training_dir=training, min_free_mb=0, training_max_total_mb=0.06)
    recorder = FrameRecorder(training / "good" / "rec", RecordSettings(count=100), budget=training_budget(keep))
    written = 0
    with pytest.raises(RecordError, match=r"keep\.training_max_total_mb"):
        for seed in range(100):
            recorder.offer(_noise(seed), seed, now=float(seed))
            written = recorder.counts.written
    assert 1 <= written < 100
    total = sum(p.stat().st_size for p in training.rglob("*") if p.is_file())
    assert total <= 60_000
    # The next recording writes nothing either.
    again = FrameRecorder(training / "good" / "rec2", RecordSettings(count=1), budget=training_budget(keep))
    with pytest.raises(RecordError, match=r"keep\.training_max_total_mb"):
        again.offer(_noise(1000), 1000)
    assert not list((training / "good" / "rec2").iterdir())


def test_review_moves_respect_the_training_budget(contract_model: LoadedModel, tmp_path: Path) -> None:
    ids = keep_frames(contract_model, tmp_path / "kept", defects=1)
    full = KeepConfig(training_dir=tmp_path / "training", min_free_mb=1e12)
    store = ReviewStore(tmp_path / "kept", tmp_path / "training", training_budget(full))
    with pytest.raises(ReviewError, match=r"keep\.min_free_mb"):
        store.mark_good(ids[0])
    assert (tmp_path / "kept" / ids[0] / "frame.png").is_file()  # still waiting for review


def test_a_long_lived_budget_sees_what_others_wrote(tmp_path: Path) -> None:
    """The review page's budget walks training_dir again (a recording adds files it never claimed)."""
    budget = DiskBudget(tmp_path, max_total_mb=0.01, min_free_mb=0, name="keep", remeasure_s=0.0)
    budget.claim(1000)
    (tmp_path / "recorded.png").write_bytes(b"x" * 20_000)
    with pytest.raises(BudgetExceeded, match=r"keep\.training_max_total_mb"):
        budget.claim(1)


@pytest.fixture
def kept(contract_model: LoadedModel, tmp_path: Path) -> list[str]:
    return keep_frames(contract_model, tmp_path / "kept", defects=3)


def _review(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``edge-agent review`` as its own process (as root on a box runs it: ``sudo edge-agent review``)."""
    config = write_toml(tmp_path / "agent.toml", {"state_dir": str(tmp_path / "state"),
                        "keep": {"dir": str(tmp_path / "kept"), "training_dir": str(tmp_path / "training"),
                                 "min_free_mb": 0}})  # fmt: skip
    command = [sys.executable, "-m", "edge_agent.cli", "review", "--config", str(config), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)


def test_review_refuses_a_symlinked_training_folder(kept: list[str], tmp_path: Path) -> None:
    """Finding 11: the service user replaces training/good with a symlink to a folder only root may write."""
    elsewhere = tmp_path / "root-only"
    elsewhere.mkdir()
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "good").symlink_to(elsewhere)
    result = _review(tmp_path, "good", kept[0])
    assert result.returncode == 1 and "symlink" in result.stderr, result.stderr
    assert list(elsewhere.iterdir()) == []
    assert (tmp_path / "kept" / kept[0] / "frame.png").is_file()

    # The same for defect/, and for the training folder itself.
    (tmp_path / "training" / "defect").symlink_to(elsewhere)
    assert _review(tmp_path, "defect", kept[1]).returncode == 1
    (tmp_path / "training" / "good").unlink()
    (tmp_path / "training" / "defect").unlink()
    (tmp_path / "training").rmdir()
    (tmp_path / "training").symlink_to(elsewhere)
    assert _review(tmp_path, "good", kept[1]).returncode == 1
    assert list(elsewhere.iterdir()) == []

    # A real folder works.
    (tmp_path / "training").unlink()
    result = _review(tmp_path, "good", kept[0])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "training" / "good" / f"{kept[0]}.png").is_file()


def test_review_refuses_symlinked_kept_files_and_folders(kept: list[str], tmp_path: Path) -> None:
    """A kept frame.png (or the kept folder) that is a symlink would pull any file root can read into training."""
    secret = tmp_path / "secret.txt"
    secret.write_text("root only\n")
    frame = tmp_path / "kept" / kept[0] / "frame.png"
    frame.unlink()
    frame.symlink_to(secret)
    store = ReviewStore(tmp_path / "kept", tmp_path / "training")
    with pytest.raises(ReviewError, match="symlink"):
        store.mark_good(kept[0])
    with pytest.raises(ReviewError):
        store.file(kept[0], "frame.png")
    assert secret.read_text() == "root only\n"
    assert not list((tmp_path / "training").rglob("*.png"))

    outside = tmp_path / "outside-kept"
    os.rename(tmp_path / "kept" / kept[1], outside)
    (tmp_path / "kept" / kept[1]).symlink_to(outside)
    with pytest.raises(ReviewError, match="symlink"):
        store.confirm_defect(kept[1])
    assert (outside / "frame.png").is_file()
    store.confirm_defect(kept[2])  # a real kept folder still moves
    assert (tmp_path / "training" / "defect" / f"{kept[2]}.png").is_file()
