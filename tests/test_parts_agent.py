"""Tracked mode in the real agent process: one part message per part on the conveyor video, through the spool.

The contract bundle is not trained on the conveyor, so its verdicts are not the point here (the demo test,
tests/test_demo_parts.py, checks verdicts with a trained model): this checks the counting, the ids, the frame
ranges, the positions and the publish policy.
"""

from __future__ import annotations

import time
from pathlib import Path

from agent_harness import AgentProcess, agent_config, write_toml
from mqtt_broker import MosquittoBroker, Subscriber

from edge_agent.demo.conveyor import ConveyorSpec, write_conveyor_video


def test_tracked_agent_publishes_one_part_message_per_part(
    tmp_path: Path, broker: MosquittoBroker, contract_bundle: Path
) -> None:
    spec = ConveyorSpec(width=192, height=128, parts=5, speed_px=8, defect_parts=(2,), seed=4)
    truth = write_conveyor_video(tmp_path / "conveyor.avi", spec)
    values = agent_config(
        tmp_path / "state",
        contract_bundle,
        str(tmp_path / "conveyor.avi"),
        broker.port,
        mqtt={"publish": "none"},
        parts={"mode": "tracked", "px_per_m": 1000.0},
    )
    watcher = Subscriber(broker, "uflow/cam1/#")
    agent = AgentProcess(write_toml(tmp_path / "agent.toml", values), tmp_path / "agent.log")
    try:
        assert agent.process.wait(120) == 0, agent.tail()
        assert watcher.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/part")]) >= 5, 10)
        time.sleep(0.5)
        parts = [m.json() for m in watcher.on("/part")]
        assert len(parts) == 5 and len({p["part_id"] for p in parts}) == 5
        assert watcher.on("/inspection") == []  # publish = "none": the part messages carry the verdicts
        started = {p["part_id"].split("-")[0] for p in parts}
        assert len(started) == 1  # <agent start>-<count>
        assert [int(p["part_id"].split("-")[1]) for p in parts] == [1, 2, 3, 4, 5]
        previous_last = -1
        for part in parts:
            frames = part["frames"]
            assert part["schema"] == "uflow.part/1" and part["mode"] == "tracked" and part["status"] == "inspected"
            # Each part is seen while it crosses the view (about (width + part) / speed frames), once.
            assert (spec.width + spec.part_px) / spec.speed_px - 8 <= frames["count"] <= truth.frames
            assert frames["last_sequence"] - frames["first_sequence"] + 1 == frames["count"]
            assert frames["first_sequence"] > previous_last - frames["count"]
            previous_last = frames["last_sequence"]
            position = part["position_at_decision"]
            assert position["trailing_x"] <= position["decision_line_x"] == 0.0
            assert abs(position["beyond_line_m"] - position["beyond_line_px"] / 1000.0) < 1e-4
            assert part["decision_time"] >= part["first_capture_time"]
        stopped = agent.events("agent_stopped")[-1]
        assert stopped["parts"] == 5
        assert len(agent.events("part_decided")) == 5
    finally:
        if agent.process.poll() is None:
            agent.kill()
        watcher.close()
