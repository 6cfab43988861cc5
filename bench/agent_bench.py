"""What bench/plc.py and bench/recipe.py share: one real agent's config file, process and log, and the table.

Both benches run ``edge-agent run`` in its own process on a TOML file they write, wait for its
``agent_ready`` log line, and print latencies as rows of p50 / p99 / max / mean.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.demo.local_broker import LocalMosquitto

ROOT = Path(__file__).resolve().parents[1]


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal (bool, number, list, else a string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, sections: dict[str, Any], recipes: Sequence[dict[str, Any]] = ()) -> None:
    """The agent's TOML: top-level keys, then a ``[name]`` table per dict in ``sections``, then ``[[recipes]]``."""
    lines = [f"{k} = {toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    for name, section in sections.items():
        if isinstance(section, dict):
            lines += ["", f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in section.items())]
    for recipe in recipes:
        lines += ["", "[[recipes]]", *(f"{k} = {toml_value(v)}" for k, v in recipe.items())]
    path.write_text("\n".join(lines) + "\n")


def start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``edge-agent run --config config`` in its own process, stdout and stderr into ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)], stdout=out, stderr=out, cwd=ROOT
        )


def stop_agent(agent: subprocess.Popen[bytes], broker: LocalMosquitto) -> None:
    """Stop the agent (SIGTERM, its clean stop: up to 60 s), then the broker it published to."""
    agent.terminate()
    agent.wait(60)
    broker.stop()


def wait_log(log: Path, event: str, timeout: float) -> None:
    """Return once the agent has logged ``event``; SystemExit with the log's tail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and f'"event": "{event}"' in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise SystemExit(f"the agent did not log {event} in {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def print_latency_table(heading: str, rows: dict[str, list[float]]) -> None:
    """One row per name: p50, p99, max and mean of its milliseconds, under a header led by ``heading``."""
    print(f"{heading:34} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}")
    for name, values in rows.items():
        print(
            f"{name:34} {percentile(values, 50):8.1f} {percentile(values, 99):8.1f} {max(values):8.1f} "
            f"{statistics.fmean(values):8.1f}"
        )
