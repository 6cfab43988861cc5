"""Fault script: break the agent's world with real processes and print what survived.

    nice -n 10 .venv/bin/python bench/faults.py [--only outage,kill,camera,commands] [--outage-s 20] [--frames 500]

Scenarios (tests/fault_scenarios.py; tests/test_agent_faults.py asserts on the same reports):
- ``outage``: mosquitto (with persistence) SIGKILLed for ``--outage-s`` while ``--frames`` frames flow at 25 fps;
  a reject-relay-like subscriber (persistent session) counts what it got, deduplicated by message id.
- ``kill``: the agent inspects with the broker down (its spool fills), is SIGKILLed, restarted with the broker up.
- ``camera``: an ffmpeg HTTP MJPEG camera crashes and comes back; then stays up but stops sending.
- ``commands``: malformed, oversized and unknown commands at a running agent; inspection must go on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from agent_harness import AgentProcess, agent_config, send_command, write_toml  # noqa: E402
from fault_scenarios import agent_sigkill, broker_outage, camera_faults, contract_setup  # noqa: E402
from mqtt_broker import Subscriber  # noqa: E402

from edge_agent.demo.local_broker import LocalMosquitto  # noqa: E402
from edge_agent.publish.commands import MAX_COMMAND_BYTES  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="outage,kill,camera,commands")
    parser.add_argument("--outage-s", type=float, default=20.0)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=None)
    return parser.parse_args()


def outage(workdir: Path, args: argparse.Namespace, cache: Path) -> list[str]:
    r = broker_outage(workdir, frames=args.frames, outage_s=args.outage_s, numba_cache=cache)
    d = r.delivery
    ok = d.sequences == list(range(args.frames)) and r.exit_code == 0 and r.spool_left == 0
    return [
        f"broker SIGKILLed {r.outage_s:.0f} s at message {r.killed_after_messages}",
        f"{args.frames} frames, {d.received} received, {len(d.unique)} unique, {d.duplicates} duplicates, "
        f"in order: {d.sequences == sorted(d.sequences)}, agent connects {r.connects}, spool left {r.spool_left}",
        "PASS" if ok else "FAIL",
    ]


def kill(workdir: Path, args: argparse.Namespace, cache: Path) -> list[str]:
    r = agent_sigkill(workdir, frames=150, run_s=4.0, numba_cache=cache)
    ids = {m["message_id"]: m for m in r.delivery.unique}
    delivered = [m for m in r.spooled_at_kill if m["message_id"] in ids and ids[m["message_id"]]["replayed"]]
    gap_free = [m["sequence"] for m in r.spooled_at_kill] == list(range(len(r.spooled_at_kill)))
    ok = len(delivered) == len(r.spooled_at_kill) > 0 and gap_free and r.second_run_exit == 0
    return [
        "agent SIGKILLed with the broker down, restarted with it up",
        f"{len(r.spooled_at_kill)} messages in the spool at the kill (gap-free from 0: {gap_free}), "
        f"{len(delivered)} delivered after restart with replayed=true; second run exit {r.second_run_exit}",
        "PASS" if ok else "FAIL",
    ]


def camera(workdir: Path, args: argparse.Namespace, cache: Path) -> list[str]:
    r = camera_faults(workdir, numba_cache=cache)
    seqs = r.sequences_before + r.sequences_after
    ok = r.states[-1] == "open" and "stalled" in r.lost_reasons and seqs == sorted(set(seqs))
    return [
        "MJPEG camera killed 3 s then restarted; later paused (up, silent)",
        f"stats states {' > '.join(r.states)}; lost reasons {r.lost_reasons}; reconnects {r.reconnects}; "
        f"inspection back {r.recovery_s:.1f} s after the camera; /healthz while down: {r.health_while_down.get('status')}",
        "PASS" if ok else "FAIL",
    ]


def commands(workdir: Path, args: argparse.Namespace, cache: Path) -> list[str]:
    bundle, folder = contract_setup(workdir, 50)
    with LocalMosquitto(workdir / "commands-broker") as broker:
        subscriber = Subscriber(broker, "uflow/cam1/#")
        values = agent_config(
            workdir / "commands-state", bundle, str(folder), broker.port, source={"loop": True, "fps_limit": 25.0}
        )
        agent = AgentProcess(write_toml(workdir / "commands.toml", values), workdir / "commands-agent.log", cache)
        try:
            subscriber.wait_for(lambda ms: len(ms) > 5, timeout=120)
            bad = [
                ("threshold", b"{oops"),
                ("threshold", b"[]"),
                ("threshold", json.dumps({"log10_epsilon": "x"})),
                ("nope", b"{}"),
                ("reload", b"x" * (MAX_COMMAND_BYTES + 1)),
                ("snapshot", b"\xff\xfe"),
            ]
            before = len(subscriber.on("/inspection"))
            for name, payload in bad:
                send_command(broker, name, payload)
            subscriber.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/result")]) >= len(bad), 30)
            time.sleep(2.0)
            after = len(subscriber.on("/inspection"))
            replies = [m.json() for m in subscriber.on("/result")]
            alive = agent.process.poll() is None
            agent.terminate()
        finally:
            agent.kill()
            subscriber.close()
    ok = len(replies) == len(bad) and not any(r["ok"] for r in replies) and alive and after > before
    return [
        f"{len(bad)} bad commands (not JSON, not an object, bad field, unknown, {MAX_COMMAND_BYTES + 1} bytes, binary)",
        f"{len(replies)} error replies; agent alive: {alive}; inspections during the 2 s after: {after - before}",
        "PASS" if ok else "FAIL",
    ]


SCENARIOS = {"outage": outage, "kill": kill, "camera": camera, "commands": commands}


def main() -> int:
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="faults-"))
    cache = REPO / ".numba-cache"
    rows = []
    for name in args.only.split(","):
        started = time.monotonic()
        print(f"running {name} ...", flush=True)
        rows.append((name, *SCENARIOS[name](workdir / name, args, cache), time.monotonic() - started))
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; work directory {workdir}")
    print("| scenario | fault | outcome | result | seconds |")
    print("|---|---|---|---|---|")
    for name, fault, outcome, result, seconds in rows:
        print(f"| {name} | {fault} | {outcome} | {result} | {seconds:.0f} |")
    return 0 if all(row[3] == "PASS" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
