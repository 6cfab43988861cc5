"""Kept frames (edge_agent/service/keep.py) from real inspections with a contract bundle and ONNX Runtime."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
from line_helpers import inspected_job

from edge_agent.config import KeepConfig
from edge_agent.inspection.loaded_model import LoadedModel
from edge_agent.service.keep import FrameKeeper, folder_size, kept_folders


def test_flagged_frames_are_kept_with_maps_and_message(contract_model: LoadedModel, tmp_path: Path) -> None:
    keeper = FrameKeeper(KeepConfig(flagged=True, dir=tmp_path / "kept", min_free_mb=0))
    keeper.start()
    try:
        kinds = [keeper.offer(inspected_job(contract_model, seq, defect=seq % 3 == 0)) for seq in range(9)]
        assert keeper.drain()
    finally:
        keeper.stop()
    assert kinds == ["flagged", None, None] * 3
    folders = kept_folders(tmp_path / "kept")
    assert len(folders) == 3 and all(f.name.endswith("-flagged") for f in folders)
    files = {p.name for p in folders[0].iterdir()}
    assert {"frame.png", "anomaly_map.npy", "mask.png", "overlay.png", "inspection.json"} <= files
    message = json.loads((folders[0] / "inspection.json").read_text())
    assert message["anomalous"] is True and message["sequence"] == 0
    assert cv2.imread(str(folders[0] / "mask.png"), cv2.IMREAD_GRAYSCALE).max() == 255
    assert keeper.counters.kept_flagged == 3 and keeper.counters.kept_good == 0 and keeper.problem == ""


def test_good_frames_at_the_sampled_rate(contract_model: LoadedModel, tmp_path: Path) -> None:
    keeper = FrameKeeper(KeepConfig(flagged=False, good_rate=0.25, dir=tmp_path / "kept", min_free_mb=0))
    keeper.start()
    try:
        jobs = [inspected_job(contract_model, seq, defect=False) for seq in range(12)] + [
            inspected_job(contract_model, 99, defect=True)
        ]
        kinds = [keeper.offer(job) for job in jobs]
        assert keeper.drain()
    finally:
        keeper.stop()
    assert kinds.count("good") == 3 and kinds[-1] is None
    assert keeper.counters.kept_good == 3


def test_the_quota_removes_the_oldest(contract_model: LoadedModel, tmp_path: Path) -> None:
    directory = tmp_path / "kept"
    probe = FrameKeeper(KeepConfig(flagged=True, dir=tmp_path / "probe", min_free_mb=0))
    probe.start()
    probe.offer(inspected_job(contract_model, 0, defect=True))
    probe.drain()
    probe.stop()
    one = folder_size(kept_folders(tmp_path / "probe")[0])
    # Room for about three frames.
    keeper = FrameKeeper(KeepConfig(flagged=True, dir=directory, max_total_mb=3.5 * one / 1e6, min_free_mb=0))
    keeper.start()
    try:
        for seq in range(8):
            keeper.offer(inspected_job(contract_model, seq * 3, defect=True))
            assert keeper.drain()
    finally:
        keeper.stop()
    folders = kept_folders(directory)
    total = sum(folder_size(f) for f in folders)
    assert total <= 3.5 * one and len(folders) == 3
    sequences = [json.loads((f / "inspection.json").read_text())["sequence"] for f in folders]
    assert sequences == [15, 18, 21]  # the newest survive
    assert keeper.counters.removed_quota == 5 and keeper.counters.bytes_kept == total


def test_an_unwritable_folder_degrades_and_recovers(contract_model: LoadedModel, tmp_path: Path) -> None:
    # A file where the folder's parent should be: unwritable for root too (as a read-only mount is).
    blocker = tmp_path / "mount"
    blocker.write_text("not a folder")
    keeper = FrameKeeper(KeepConfig(flagged=True, dir=blocker / "kept", min_free_mb=0))
    keeper.start()
    try:
        assert keeper.offer(inspected_job(contract_model, 0, defect=True)) == "flagged"
        assert keeper.drain()
        assert "cannot write kept frames" in keeper.problem and keeper.counters.skipped_disk == 1
        blocker.unlink()
        keeper.offer(inspected_job(contract_model, 3, defect=True))
        assert keeper.drain()
        assert keeper.problem == "" and keeper.counters.kept_flagged == 1
    finally:
        keeper.stop()


def test_too_little_free_space_keeps_nothing(contract_model: LoadedModel, tmp_path: Path) -> None:
    keeper = FrameKeeper(KeepConfig(flagged=True, dir=tmp_path / "kept", min_free_mb=1e12))
    keeper.start()
    try:
        keeper.offer(inspected_job(contract_model, 0, defect=True))
        assert keeper.drain()
    finally:
        keeper.stop()
    assert "MB free" in keeper.problem and kept_folders(tmp_path / "kept") == []


def test_a_full_queue_skips_instead_of_blocking(contract_model: LoadedModel, tmp_path: Path) -> None:
    keeper = FrameKeeper(KeepConfig(flagged=True, dir=tmp_path / "kept", min_free_mb=0, queue=1))
    job = inspected_job(contract_model, 0, defect=True)
    keeper._thread = object()  # type: ignore[assignment]  # a writer that never takes anything
    started = time.monotonic()
    kinds = [keeper.offer(job) for _ in range(5)]
    assert time.monotonic() - started < 1.0
    assert kinds == ["flagged", None, None, None, None] and keeper.counters.skipped_busy == 4
