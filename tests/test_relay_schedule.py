"""Fire-time planning and the clock-offset estimate (pure logic; the broker tests are in test_relay.py)."""

from __future__ import annotations

import time

import pytest
from relay_helpers import inspection

from edge_agent.relay.config import ClockConfig, DeviceTiming
from edge_agent.relay.schedule import (
    ClockEstimator,
    ClockOffsets,
    OffsetChoice,
    agent_latency_s,
    offset_sample,
    plan_fire,
)

TIMING = DeviceTiming(travel_s=1.5, tolerance_s=0.05, clock_offset_s=0.0, how="delay_s=1.5")


def test_agent_latency_excludes_the_capture_stage() -> None:
    # The capture stage's read happens before the timestamp: only total - capture elapsed since capture_time.
    message = inspection("cam1", 0, capture_time=100.0, latency_s=0.2)
    assert message.latency_ms.capture == 1.0
    assert agent_latency_s(message) == pytest.approx(0.2)
    assert offset_sample(message, arrival=100.25) == pytest.approx(0.05)


def test_plan_adds_offset_travel_and_tolerance() -> None:
    message = inspection("cam1", 0, capture_time=1000.0, latency_s=0.04)
    plan = plan_fire(message, arrival=1003.2, timing=TIMING, offset=OffsetChoice(3.0, "estimated"))
    assert plan.capture_time == pytest.approx(1003.0)
    assert plan.planned_time == pytest.approx(1004.5)
    assert plan.deadline == pytest.approx(1004.55)
    assert plan.clock_source == "estimated"


def test_a_camera_clock_ahead_is_capped_by_the_arrival() -> None:
    # The camera's clock is 30 s ahead and nothing corrects it: without the cap the reject would fire 30 s late.
    arrival = 2000.0
    message = inspection("cam1", 0, capture_time=arrival + 30.0 - 0.04, latency_s=0.04)
    plan = plan_fire(message, arrival, TIMING, OffsetChoice(0.0, "configured"))
    assert plan.capture_time == pytest.approx(arrival - 0.04)
    assert plan.planned_time == pytest.approx(arrival - 0.04 + 1.5)
    assert plan.clock_source == "configured+arrival-bound"


def test_estimate_is_the_floor_once_confirmed() -> None:
    estimator = ClockEstimator(ClockConfig(confirm_samples=3, confirm_spread_s=0.01))
    for sample in (0.50, 0.30):
        estimator.add(sample, now=1.0)
    assert estimator.estimate(now=1.0) is None  # too few samples
    estimator.add(0.305, now=1.0)
    assert estimator.estimate(now=1.0) is None  # three samples, only two near the floor
    estimator.add(0.302, now=1.0)
    assert estimator.estimate(now=1.0) == pytest.approx(0.30)


def test_a_burst_of_queued_messages_does_not_confirm_a_wrong_floor() -> None:
    # After a restart the broker delivers what waited in the session: each message waited a different time,
    # so their samples are spread out and the estimate is not confirmed (the configured offset is used).
    # The camera's clock is 0.25 s behind the relay's.
    config = ClockConfig(confirm_samples=5, confirm_spread_s=0.05)
    offsets = ClockOffsets(config)
    arrival = time.time()
    for i in range(20):
        waited = 2.0 - i * 0.1  # published every 100 ms while the relay was down
        message = inspection("cam1", i, capture_time=arrival - waited - 0.25 - 0.04, latency_s=0.04)
        choice = offsets.observe(message, arrival, configured_s=0.0)
        assert choice == OffsetChoice(0.0, "configured")
    # Then live traffic (a steady 3 ms transit) confirms the true offset within the transit time.
    for i in range(20, 26):
        message = inspection("cam1", i, capture_time=arrival - 0.25 - 0.04, latency_s=0.04)
        choice = offsets.observe(message, arrival + 0.003, configured_s=0.0)
    assert choice.source == "estimated" and choice.offset_s == pytest.approx(0.253)


def test_replayed_messages_are_not_clock_samples() -> None:
    offsets = ClockOffsets(ClockConfig(confirm_samples=2))
    arrival = time.time()
    for i in range(5):
        message = inspection("cam1", i, capture_time=arrival - 60.0, replayed=True)
        assert offsets.observe(message, arrival, configured_s=0.0).source == "configured"


def test_fixed_mode_never_estimates() -> None:
    offsets = ClockOffsets(ClockConfig(mode="fixed", confirm_samples=1))
    message = inspection("cam1", 0, capture_time=time.time() - 5.0)
    assert offsets.observe(message, time.time(), configured_s=0.2) == OffsetChoice(0.2, "configured")


def test_last_estimate_is_kept_across_restarts_for_keep_s() -> None:
    now = time.time()
    offsets = ClockOffsets(ClockConfig(keep_s=3600), kept={"cam1": (0.7, now - 60), "cam2": (0.9, now - 7200)})
    message = inspection("cam1", 0)
    assert offsets.observe(message, time.time(), configured_s=0.0) == OffsetChoice(0.7, "last-estimate")
    stale = inspection("cam2", 0)
    assert offsets.observe(stale, time.time(), configured_s=0.1) == OffsetChoice(0.1, "configured")


def test_old_samples_are_forgotten() -> None:
    estimator = ClockEstimator(ClockConfig(confirm_samples=2, max_age_s=10))
    estimator.add(0.1, now=0.0)
    estimator.add(0.1, now=1.0)
    assert estimator.estimate(now=5.0) == pytest.approx(0.1)
    assert estimator.estimate(now=20.0) is None


def test_skew_warning_names_the_camera(caplog: pytest.LogCaptureFixture) -> None:
    offsets = ClockOffsets(ClockConfig(confirm_samples=2, warn_offset_s=0.1))
    arrival = time.time()
    for i in range(3):
        offsets.observe(inspection("cam4", i, capture_time=arrival - 2.0 - 0.04), arrival, configured_s=0.0)
    warnings = [r for r in caplog.records if getattr(r, "event", "") == "relay_clock_skew"]
    assert len(warnings) == 1 and warnings[0].device_id == "cam4"  # type: ignore[attr-defined]
    assert warnings[0].estimated_offset_s == pytest.approx(2.0, abs=1e-3)  # type: ignore[attr-defined]
