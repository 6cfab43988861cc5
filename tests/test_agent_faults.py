"""Faults against a real ``edge-agent run`` process (tests/fault_scenarios.py): the broker killed for 20 s
while 500 frames flow, the agent SIGKILLed with a full spool, a network camera that crashes and one that
goes silent. bench/faults.py runs the same scenarios and prints a table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fault_scenarios import agent_sigkill, broker_outage, camera_faults
from stream_server import needs_ffmpeg

from edge_agent.demo.local_broker import find_mosquitto

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


@pytest.fixture(scope="module")
def numba_cache(pytestconfig: pytest.Config) -> Path:
    return Path(pytestconfig.cache.mkdir("numba-agent"))  # type: ignore[union-attr]


@pytest.mark.slow
def test_broker_killed_for_20_s_while_500_frames_flow_loses_nothing(tmp_path: Path, numba_cache: Path) -> None:
    report = broker_outage(tmp_path, frames=500, fps=25.0, kill_after_s=3.0, outage_s=20.0, numba_cache=numba_cache)
    assert report.exit_code == 0, report.log_tail
    delivery = report.delivery
    # One message per inspected frame, deduplicated by id, in frame order: none lost.
    assert delivery.sequences == list(range(500)), (len(delivery.unique), report.log_tail)
    assert report.killed_after_messages < 250  # the outage really covered most of the run
    assert report.connects >= 2 and report.spool_left == 0
    assert all(not m["replayed"] for m in delivery.unique)  # resent within one run: not a replay


def test_agent_sigkilled_with_a_full_spool_delivers_it_after_restart(tmp_path: Path, numba_cache: Path) -> None:
    report = agent_sigkill(tmp_path, frames=150, fps=25.0, run_s=3.0, numba_cache=numba_cache)
    spooled = report.spooled_at_kill
    assert len(spooled) >= 20, report.log_tail
    # What reached the disk before the SIGKILL is gap-free from the first frame: nothing made was lost
    # except, possibly, the last commit interval's worth.
    assert [m["sequence"] for m in spooled] == list(range(len(spooled)))
    assert report.second_run_exit == 0, report.log_tail
    by_id = {m["message_id"]: m for m in report.delivery.unique}
    assert all(m["message_id"] in by_id for m in spooled), "a spooled message was not delivered after the restart"
    assert all(by_id[m["message_id"]]["replayed"] is True for m in spooled)
    # The second run's own 150 frames follow, not marked replayed.
    fresh = [m for m in report.delivery.unique if not m["replayed"]]
    assert [m["sequence"] for m in fresh] == list(range(150))
    assert report.expired_dropped == 0


@needs_ffmpeg
def test_network_camera_crash_and_silence_reconnect_and_are_reported(tmp_path: Path, numba_cache: Path) -> None:
    report = camera_faults(tmp_path, numba_cache=numba_cache, down_s=3.0, stall_timeout_s=3.0)
    states = report.states
    assert states[-1] == "open", (states, report.log_tail)
    # Each state change is published at once (stats on change), in order, for both faults.
    assert states.count("reconnecting") >= 2 and "opening" in states, states
    health = report.health_while_down
    assert health["status"] == "degraded" and any(p.startswith("source is reconnecting") for p in health["problems"])
    # Sequence numbers run on across both outages: one stream (gaps are frames the latest-frame policy dropped).
    sequences = report.sequences_before + report.sequences_after
    assert sequences == sorted(set(sequences))
    assert report.reconnects >= 2
    assert report.lost_reasons[0] == "read_failed" and "stalled" in report.lost_reasons, report.lost_reasons
    assert report.recovery_s < 10
