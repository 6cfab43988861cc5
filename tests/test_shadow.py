"""Shadow mode (edge_agent/inspection/shadow.py): real candidate bundles on ONNX Runtime judge real inspections.

No timed assertions: the behaviour that keeps the live fps (the share, skipping while busy or while the live
pipeline is behind, the lowest priority) is tested; bench/shadow.py measures the fps.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from contract_bundle import build_contract_bundle
from line_helpers import inspected_job

from edge_agent.config import ModelConfig
from edge_agent.inspection.loaded_model import LoadedModel, load_model
from edge_agent.inspection.shadow import ShadowRunner, gate_problem, load_state, save_state


def _candidate(root: Path, **kwargs: object) -> LoadedModel:
    return load_model(build_contract_bundle(root, **kwargs), ModelConfig(backend="onnxruntime", threads=1))


def test_the_same_model_agrees_on_exactly_the_share(contract_model: LoadedModel, tmp_path: Path) -> None:
    runner = ShadowRunner(_candidate(tmp_path / "same", version="2.0.0"), share=0.1, device_id="cam1")
    runner.start()
    try:
        jobs = [inspected_job(contract_model, seq, defect=seq % 4 == 0) for seq in range(40)]
        outcomes = []
        for job in jobs:
            outcomes.append(runner.offer(job))
            assert runner.wait_idle()
        report = runner.snapshot()
    finally:
        runner.stop()
    assert outcomes.count("queued") == 4 and outcomes.count("share") == 36
    assert report.compared == 4 and report.agreement == 1.0 and report.candidate == "contract 2.0.0"
    assert report.cpu_s > 0
    assert report.candidate_only == report.live_only == 0 and report.recent_differences == []


def test_a_stricter_candidate_would_reject_more(contract_model: LoadedModel, tmp_path: Path) -> None:
    # Expecting an eighth of the pixel noise, the candidate sees every good frame as anomalous.
    runner = ShadowRunner(_candidate(tmp_path / "strict", pixel_noise=1.0), share=1.0, device_id="cam1")
    runner.start()
    try:
        for seq in range(10):
            runner.offer(inspected_job(contract_model, seq, defect=seq == 3))
            assert runner.wait_idle()
        report = runner.snapshot()
    finally:
        runner.stop()
    assert report.compared == 10 and report.candidate_rejects == 10 and report.live_rejects == 1
    assert report.candidate_only == 9 and report.live_only == 0 and report.agreement == pytest.approx(0.1)
    assert [d.sequence for d in report.recent_differences] == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_skips_while_busy_or_while_the_live_pipeline_is_behind(contract_model: LoadedModel, tmp_path: Path) -> None:
    backlog = [0]
    runner = ShadowRunner(_candidate(tmp_path / "c"), share=1.0, device_id="cam1", live_backlog=lambda: backlog[0])
    job = inspected_job(contract_model, 0, defect=False)
    runner._busy = True  # a candidate still working on an earlier frame
    started = time.monotonic()
    assert [runner.offer(job) for _ in range(5)] == ["busy"] * 5
    assert time.monotonic() - started < 1.0  # offering never waits for the shadow
    runner._busy = False
    backlog[0] = 1
    assert runner.offer(job) == "backlog"
    report = runner.snapshot()
    assert report.skipped_busy == 5 and report.skipped_backlog == 1 and report.compared == 0
    runner.candidate.close()


def test_the_shadow_thread_runs_at_the_lowest_priority(contract_model: LoadedModel, tmp_path: Path) -> None:
    runner = ShadowRunner(_candidate(tmp_path / "c"), share=1.0, device_id="cam1")
    runner.start()
    try:
        runner.offer(inspected_job(contract_model, 0, defect=False))
        assert runner.wait_idle() and runner.native_id is not None
        assert os.getpriority(os.PRIO_PROCESS, runner.native_id) == 19
        assert os.sched_getscheduler(runner.native_id) == os.SCHED_IDLE
        assert os.getpriority(os.PRIO_PROCESS, 0) < 19  # the rest of the process is untouched
        assert os.sched_getscheduler(0) != os.SCHED_IDLE
    finally:
        runner.stop()


def test_active_time_accumulates_between_compared_frames_only(contract_model: LoadedModel, tmp_path: Path) -> None:
    """Issue 24 finding 13: shadow hours are the gaps between compared frames, each at most ACTIVE_GAP_S."""
    runner = ShadowRunner(_candidate(tmp_path / "c", version="2.0.0"), share=1.0, device_id="cam1")
    runner.start()
    try:
        started = time.monotonic()
        for seq in range(3):
            runner.offer(inspected_job(contract_model, seq, defect=False))
            assert runner.wait_idle()
        elapsed = time.monotonic() - started
        active = runner.state().active_s
        assert 0 < active <= elapsed
    finally:
        runner.stop()
        runner.candidate.close()


def test_totals_survive_a_restart_and_open_the_fleet_gate(contract_model: LoadedModel, tmp_path: Path) -> None:
    state_path = tmp_path / "shadow.json"
    assert "has not run as the shadow" in gate_problem(state_path, "2.0.0", hours=1, min_agreement=0.99)
    runner = ShadowRunner(_candidate(tmp_path / "c", version="2.0.0"), share=1.0, device_id="cam1")
    runner.start()
    try:
        for seq in range(3):
            runner.offer(inspected_job(contract_model, seq, defect=False))
            assert runner.wait_idle()
        state = runner.state()
    finally:
        runner.stop()
    save_state(state_path, state)
    assert "for 0.0 of the 1 active hours" in gate_problem(state_path, "2.0.0", hours=1, min_agreement=0.99)
    assert gate_problem(state_path, "2.0.0", hours=0, min_agreement=0.99) is None
    assert "shadow runs 2.0.0" in gate_problem(state_path, "3.0.0", hours=0, min_agreement=0.99)
    # Issue 24 finding 13: downtime is not shadow time. Started two hours ago, but the agent was down since.
    save_state(state_path, replace(state, started=state.started - 7200))
    assert "of the 1 active hours" in gate_problem(state_path, "2.0.0", hours=1, min_agreement=0.99)
    # Two active hours (as the agent would have saved them), after a restart with the same candidate.
    save_state(state_path, replace(state, active_s=7200.0))
    again = ShadowRunner(_candidate(tmp_path / "c2", version="2.0.0"), share=1.0, device_id="cam1")
    assert again.resume(load_state(state_path))
    assert again.state().compared == 3 and again.state().hours >= 2
    save_state(state_path, again.state())
    assert gate_problem(state_path, "2.0.0", hours=2, min_agreement=0.99) is None
    # Finding 13: a minimum of compared frames, and the exact model (its sha256), not only the version string.
    assert "3 of the 10 frames" in gate_problem(state_path, "2.0.0", hours=2, min_agreement=0.99, min_compared=10)
    sha = again.state().sha256
    assert gate_problem(state_path, "2.0.0", hours=2, min_agreement=0.99, sha256=sha) is None
    assert "another model" in gate_problem(state_path, "2.0.0", hours=2, min_agreement=0.99, sha256="0" * 64)
    save_state(state_path, replace(again.state(), agreed=2))
    assert "66.67% of 3 frames" in gate_problem(state_path, "2.0.0", hours=2, min_agreement=0.99)
    other = ShadowRunner(_candidate(tmp_path / "c3", version="2.0.0", pixel_noise=1.0), share=1.0, device_id="cam1")
    assert not other.resume(load_state(state_path))  # another model under the same version number
    again.candidate.close()
    other.candidate.close()
    state_path.write_text("{not json")
    assert load_state(state_path) is None
