"""ONNX Runtime's thread plan (edge_agent/engines/threads.py): the choice, and a real session made with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from contract_bundle import build_contract_bundle

from edge_agent.bundle import load_bundle
from edge_agent.config import ConfigError, ModelConfig, load_settings
from edge_agent.engines import create_engine
from edge_agent.engines.onnxruntime import OnnxRuntimeEngine
from edge_agent.engines.threads import INTER_SPIN_KEY, INTRA_SPIN_KEY, available_cores, plan_threads


@pytest.mark.parametrize("live", [True, False])
def test_one_core_gets_one_thread_that_does_not_spin(live: bool) -> None:
    plan = plan_threads(0, "auto", cores=1, live=live)
    assert (plan.intra_op_threads, plan.inter_op_threads, plan.spinning, plan.pin_cores) == (1, 1, False, False)


@pytest.mark.parametrize("cores", [2, 4, 8])
@pytest.mark.parametrize("live", [True, False])
def test_several_cores_get_a_thread_each_and_no_spinning(cores: int, live: bool) -> None:
    plan = plan_threads(0, "auto", cores=cores, live=live)
    assert plan.intra_op_threads == cores
    assert plan.inter_op_threads == 1  # sequential execution: more would idle
    assert plan.spinning is False  # the capture, NFA and publish threads need these cores
    assert plan.pin_cores is False
    assert plan.session_config() == {INTRA_SPIN_KEY: "0", INTER_SPIN_KEY: "0"}
    assert plan.cores == cores and plan.live is live


def test_explicit_settings_win() -> None:
    plan = plan_threads(3, "on", cores=2, live=True)
    assert (plan.intra_op_threads, plan.spinning) == (3, True)
    assert plan.session_config() == {INTRA_SPIN_KEY: "1", INTER_SPIN_KEY: "1"}
    assert "model.threads = 3" in plan.reason and "model.spinning = on" in plan.reason
    # Threads set, spinning still chosen; and spinning set, threads still chosen.
    assert plan_threads(1, "auto", cores=8, live=False).spinning is False
    assert plan_threads(0, "on", cores=4, live=False).intra_op_threads == 4


def test_the_plan_says_what_and_why() -> None:
    text = plan_threads(0, "auto", cores=2, live=True).describe()
    assert "2 intra-op" in text and "spinning off" in text and "2 core(s)" in text and "live" in text


@pytest.mark.parametrize(("threads", "cores"), [(-1, 2), (0, 0)])
def test_impossible_inputs_are_refused(threads: int, cores: int) -> None:
    with pytest.raises(ValueError, match=r"threads|cores"):
        plan_threads(threads, "auto", cores=cores, live=False)


def test_spinning_setting_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"model\.spinning"):
        load_settings(None, model={"spinning": "sometimes"})
    assert ModelConfig().spinning == "auto" and ModelConfig().threads == 0


def test_available_cores_follows_the_affinity_mask() -> None:
    assert available_cores() == len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_contract_bundle(tmp_path_factory.mktemp("threads") / "bundle")


def _session_options(engine: OnnxRuntimeEngine) -> tuple[int, int, str, str]:
    options = engine._session.get_session_options()  # what the live session was really made with
    return (
        options.intra_op_num_threads,
        options.inter_op_num_threads,
        options.get_session_config_entry(INTRA_SPIN_KEY),
        options.get_session_config_entry(INTER_SPIN_KEY),
    )


def test_a_real_session_is_made_with_the_chosen_options(bundle_dir: Path) -> None:
    engine = create_engine(load_bundle(bundle_dir), ModelConfig(backend="onnxruntime"), live=True)
    assert isinstance(engine, OnnxRuntimeEngine)
    try:
        plan = engine.threads
        assert plan == plan_threads(0, "auto", available_cores(), live=True)
        assert _session_options(engine) == (plan.intra_op_threads, 1, "0", "0")
        engine.infer(np.full((64, 64, 3), 128, np.uint8))  # the session runs with them
    finally:
        engine.close()
    explicit = OnnxRuntimeEngine(load_bundle(bundle_dir), threads=1, spinning="on")
    try:
        assert _session_options(explicit) == (1, 1, "1", "1")
    finally:
        explicit.close()


def test_a_narrowed_affinity_mask_gives_one_thread(bundle_dir: Path) -> None:
    """In a process allowed one core (as taskset or a container cpuset does), the session gets one thread."""
    code = f"""
import json, os
os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
from edge_agent.bundle import load_bundle
from edge_agent.config import ModelConfig
from edge_agent.engines import create_engine
engine = create_engine(load_bundle({str(bundle_dir)!r}), ModelConfig(backend="onnxruntime"), live=True)
options = engine._session.get_session_options()
print(json.dumps([engine.threads.cores, options.intra_op_num_threads, engine.threads.spinning]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1, 1, False]
