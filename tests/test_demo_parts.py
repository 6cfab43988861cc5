"""``edge-agent demo`` as a new user runs it: tracked mode, the real reject relay, one pulse per defective part.

Trains the demo's model (torch; about a minute or two on 2 cores), renders the demo video, runs the agent
with ``[parts] mode = "tracked"`` and the real ``edge-agent reject-relay`` process with an MQTT actuator.
The summary is computed from the part messages and the actuator orders received over MQTT.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_decides_each_part_once_and_pulses_once_per_defective_part(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "demo", "--workdir", str(tmp_path), "--threads", "2"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    assert "=> 10 parts, 3 rejected, 3 pulses" in out, out[-3000:]
    assert re.search(r"false rejects \.+ 0\n", out)
    assert "caught 3" in out
    # One part message per part, each part id once; the relay fired each defective part once.
    part_lines = re.findall(r"\[agent\] part (\S+): (REJECT|pass)", out)
    assert len(part_lines) == 10 and len({p for p, _ in part_lines}) == 10
    assert [v for _, v in part_lines].count("REJECT") == 3
    relay = [json.loads(line) for line in (tmp_path / "relay.log").read_text().splitlines() if line.startswith("{")]
    fired = [r["part_id"] for r in relay if r.get("decision") == "fired"]
    rejected = [p for p, v in part_lines if v == "REJECT"]
    assert sorted(fired) == sorted(rejected)
    assert len([r for r in relay if r.get("decision") == "skipped-good"]) == 7
