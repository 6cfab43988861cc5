"""Real inspections for the issue-16 tests (keep, review, shadow): a contract bundle on ONNX Runtime judges frames.

Registered in conftest.py's pytest_plugins, so ``contract_model`` is a fixture everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from contract_bundle import defect_frame, good_frame

from edge_agent.config import KeepConfig, ModelConfig
from edge_agent.inspection.frame_source import Frame
from edge_agent.inspection.loaded_model import LoadedModel, load_model
from edge_agent.inspection.pipeline import FrameJob
from edge_agent.inspection.single import inspect_frame
from edge_agent.service.keep import FrameKeeper, kept_folders

SIZE = 64


@pytest.fixture(scope="module")
def contract_model(contract_bundle: Path) -> Iterator[LoadedModel]:
    """The contract bundle loaded as the agent loads it (ONNX Runtime, one thread)."""
    loaded = load_model(contract_bundle, ModelConfig(backend="onnxruntime", threads=1))
    yield loaded
    loaded.close()


def inspected_job(model: LoadedModel, sequence: int, defect: bool, size: int = SIZE) -> FrameJob:
    """A frame (a dark square when ``defect``) inspected by ``model``, as the pipeline would publish it."""
    rng = np.random.default_rng(sequence)
    rgb = defect_frame(rng, size, size, (20, 20, 16, 16)) if defect else good_frame(rng, size, size)
    frame = Frame(sequence, time.time(), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), "test", (size, size))
    job = inspect_frame(model, frame, "cam1")
    assert job.message.anomalous is defect
    return job


def keep_frames(model: LoadedModel, directory: Path, defects: int, goods: int = 0) -> list[str]:
    """Kept frame folders written by a real FrameKeeper; returns their names, oldest first."""
    # The queue holds every offer: the writer thread runs niced, and on a loaded machine it may not have taken
    # one frame off before the last is offered (a queue of 8 dropped one of 9 in CI).
    config = KeepConfig(
        flagged=True, good_rate=1.0 if goods else 0.0, dir=directory, min_free_mb=0, queue=max(1, defects + goods)
    )
    keeper = FrameKeeper(config)
    keeper.start()
    try:
        for i in range(defects):
            keeper.offer(inspected_job(model, 1000 + i, defect=True))
        for i in range(goods):
            keeper.offer(inspected_job(model, 2000 + i, defect=False))
        assert keeper.drain(timeout=60.0)
        assert keeper.counters.skipped_busy == 0
    finally:
        keeper.stop()

    return [p.name for p in kept_folders(directory)]
