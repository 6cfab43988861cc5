"""Fixtures for the tests that run a real agent on contract bundles (registered in conftest.py's pytest_plugins).

Module-scoped: each test module builds them once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_harness import write_frames
from contract_bundle import build_contract_bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good bundles 1.0.0 and 2.0.0, one whose model.onnx does not match its hash, one that outputs NaN."""
    root = tmp_path_factory.mktemp("bundles")
    made = {
        "v1": build_contract_bundle(root / "v1", version="1.0.0"),
        "v2": build_contract_bundle(root / "v2", version="2.0.0"),
        "tampered": build_contract_bundle(root / "tampered", version="3.0.0"),
        # pixel_noise 0: z = deviation / 0, so the map is NaN/inf on every frame: loads, fails its warm-up.
        "nan": build_contract_bundle(root / "nan", version="4.0.0", pixel_noise=0.0),
    }
    with (made["tampered"] / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    return made


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 30 frames for a looping image-folder source."""
    return write_frames(tmp_path_factory.mktemp("frames"), 30)
