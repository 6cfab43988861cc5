"""The relay's ledger (edge_agent/relay/ledger.py): decisions counted by ``Decision`` and rendered into the stats
fields their ``counter`` names, the good ids, the camera bound; and firing's typed outcome record."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from edge_agent.messages import RelayDeviceStats, RelayStats
from edge_agent.relay.actuators import FireOrder
from edge_agent.relay.firing import FireOutcome, Job
from edge_agent.relay.intake import MalformedMessage
from edge_agent.relay.ledger import GOOD_IDS_REMEMBERED, PER_CAMERA, Ledger
from edge_agent.relay.report import Decision
from edge_agent.relay.schedule import Plan

ROOT = Path(__file__).resolve().parents[1]


def test_every_counted_decision_names_a_stats_field() -> None:
    counted = [d for d in Decision if d.counter is not None]
    assert {d.counter for d in counted} <= set(RelayStats.model_fields)
    assert {d.counter for d in PER_CAMERA} <= set(RelayDeviceStats.model_fields)
    assert Decision.SKIPPED_PARTS_MODE.counter == "skipped_parts_mode"  # one name, not skipped_good


def test_decisions_are_rendered_into_their_counters_in_total_and_per_camera() -> None:
    ledger = Ledger(max_devices=4)
    ledger.received("cam1", 0.25, "configured")
    for decision in (Decision.FAILED, Decision.INTERRUPTED, Decision.SKIPPED_PARTS_MODE, Decision.SKIPPED_GOOD):
        ledger.count(decision, "cam1")
    ledger.count(Decision.UNCONFIGURED, "cam1")  # relay-wide only: the per-camera stats have no such field
    ledger.count(Decision.RATE_LIMITED, "cam1")
    assert ledger.count(Decision.RATE_LIMITED) == 2  # a belt topic: relay-wide only; returns the total
    ledger.fired("cam1", 4.0)
    ledger.internal_error()
    snapshot = ledger.snapshot(journal_errors=3)
    cam = snapshot.devices["cam1"]
    assert (cam.actuator_failures, cam.skipped_parts_mode, cam.skipped_good, cam.fired) == (2, 1, 1, 1)
    assert (cam.rate_limited, cam.received, cam.clock_offset_s) == (1, 1, 0.25)
    totals = snapshot.totals
    assert (totals["actuator_failures"], totals["unconfigured"], totals["rate_limited"]) == (2, 1, 2)
    assert (totals["malformed"], totals["errors"], totals["journal_errors"]) == (1, 1, 3)
    assert snapshot.lateness_ms == [4.0]
    stats = snapshot.stats("r", uptime_s=1.0, connected=True, pending=0, journal_ok=True)  # every field there
    assert (stats.skipped_parts_mode, stats.skipped_good, stats.lateness_ms_max) == (1, 1, 4.0)


def test_a_decision_counted_per_camera_needs_its_camera_and_an_uncounted_one_is_refused() -> None:
    ledger = Ledger(max_devices=4)
    with pytest.raises(ValueError, match="name the device"):
        ledger.count(Decision.MISSED)
    with pytest.raises(ValueError, match="not counted"):
        ledger.count(Decision.SCHEDULED, "cam1")


def test_cameras_beyond_max_devices_are_refused_unless_listed() -> None:
    ledger = Ledger(max_devices=1, listed=["line2"])
    ledger.admit("cam1")
    ledger.admit("line2")
    with pytest.raises(MalformedMessage, match="max_devices"):
        ledger.admit("cam2")


def test_a_good_id_is_first_once_and_the_memory_is_bounded() -> None:
    ledger = Ledger(max_devices=1)
    assert ledger.first_good("a") and not ledger.first_good("a")
    for i in range(GOOD_IDS_REMEMBERED):
        ledger.first_good(f"x{i}")
    assert ledger.first_good("a")  # forgotten, oldest first


def test_a_fire_outcome_carries_the_fields_of_its_log_line() -> None:
    order = FireOrder(
        message_id="m",
        device_id="cam1",
        sequence=1,
        capture_time=0.0,
        image_score=0.0,
        regions=0,
        planned_time=1.0,
        deadline=1.1,
        relay_id="r",
    )

    class Described:
        description = "http POST http://plc/reject"

    job = Job(0.0, 0, 0.1, order, Plan(0.0, 1.0, 1.1, 1.0, 0.0, "configured"), Described())  # type: ignore[arg-type]  # only .description is read
    fired = FireOutcome(Decision.FIRED, job, 1, fired_time=1.0000004, lateness_ms=0.12345)
    assert fired.log_fields() == {"fired_time": 1.0, "lateness_ms": 0.123, "attempts": 1}
    held = FireOutcome(Decision.MISSED, job, held_s=30.0).log_fields()
    assert held["held_s"] == 30.0 and "stopped belt" in held["reason"]
    failed = FireOutcome(Decision.FAILED, job, 2, error="HTTP 500", retryable=True).log_fields()
    assert failed == {"reason": "HTTP 500", "attempts": 2, "actuator": "http POST http://plc/reject", "retryable": True}


def test_relay_counts_are_kept_by_decision_never_by_attribute_name() -> None:
    # setattr by a counter's name is how a log word and a counter drifted apart before the ledger.
    counting = ("ledger", "report", "relay", "parts", "gate", "firing")
    offenders = [
        f"{name}.py:{node.lineno}"
        for name in counting
        for node in ast.walk(ast.parse((ROOT / "edge_agent" / "relay" / f"{name}.py").read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "getattr")
    ]
    assert not offenders
