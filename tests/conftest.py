"""Shared session fixtures: synthetic data and a real, tiny U-Flow bundle trained on it.

``tiny_bundle`` is a genuine model: EfficientNet-Lite0 (ImageNet weights) + U-Flow trained on
synthetic good surfaces at 128x128 and exported through the normal path (ONNX parity checked,
verified by the agent's loader). It separates the synthetic defects and its NFA decision flags
them (tests/test_training.py proves both), so agent tests can rely on it. Built once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Fixture modules for every test (instead of importing fixtures into each test module): the MQTT broker
# (broker, broker_factory), the contract bundle (contract_bundle), the agent's bundles and frames, and the
# in-process reject relay (http, relay_factory, camera).
pytest_plugins = [
    "mqtt_broker",
    "contract_bundle",
    "agent_fixtures",
    "relay_fixtures",
    "systemd_fixtures",
    "line_helpers",
]

# Spinning OpenMP threads make torch ~10x slower when the (2-core) machine is shared with other jobs;
# this must be set before torch is first imported, i.e. here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TINY_IMAGE_SIZE = 128


@pytest.fixture(scope="session", autouse=True)
def nfa_compiled() -> None:
    """Compile the NFA's Numba kernels once, before any test waits on an agent.

    In a fresh clone nothing is cached: the first agent of the session would compile them inside its
    start-up, which took over a minute on a loaded 2-core machine and ran out a test's wait for its
    first inspections. Compiled here, every agent in this process starts warm (and the on-disk cache
    serves agent subprocesses).
    """
    from edge_agent.inspection import nfa

    nfa.warm_up()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No EDGE_AGENT_* variable of the caller's shell leaks into a settings test."""
    for name in list(os.environ):
        if name.startswith("EDGE_AGENT_"):
            monkeypatch.delenv(name)


TINY_SEED = 0


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MVTec-layout synthetic dataset at 128x128: 40 good train images, 8 good + 16 defect test images."""
    from training.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic_data")
    write_synthetic_dataset(
        root,
        train_good=40,
        test_good=8,
        defects_per_kind=4,
        height=TINY_IMAGE_SIZE,
        width=TINY_IMAGE_SIZE,
        seed=TINY_SEED,
    )
    return root


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory: pytest.TempPathFactory, synthetic_data_dir: Path) -> Path:
    """A finished training run of the tiny model (config.json, checkpoint.pt, history.json, selftest/)."""
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    pytest.importorskip("FrEIA")
    from training.api import QUICK_EPOCHS, QUICK_LR_FINAL_FACTOR, QUICK_NORM_IN_JACOBIAN, QUICK_STRIDES
    from training.model import UFlowConfig
    from training.train import TrainConfig, train

    run_dir = tmp_path_factory.mktemp("tiny_run")
    config = UFlowConfig(
        image_height=TINY_IMAGE_SIZE,
        image_width=TINY_IMAGE_SIZE,
        strides=QUICK_STRIDES,
        norm_in_jacobian=QUICK_NORM_IN_JACOBIAN,
        seed=TINY_SEED,
        # The flow alone: four validation images are too few for the fitted null, so the bundle would be
        # flow-only anyway (tests/test_heads.py trains and exports the heads).
        heads=("flow",),
    )
    train_config = TrainConfig(epochs=QUICK_EPOCHS, batch_size=8, lr_final_factor=QUICK_LR_FINAL_FACTOR)
    train(synthetic_data_dir, run_dir, config, train_config, progress=False)
    return run_dir


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_run_dir: Path) -> Path:
    """The tiny run exported as a verified model bundle directory (treat as read-only; copy to modify)."""
    from training.export import export_bundle

    return export_bundle(
        tiny_run_dir, tmp_path_factory.mktemp("tiny_bundle_parent") / "bundle", name="tiny", version="1"
    )
