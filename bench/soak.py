"""Soak: ``edge-agent run`` for 100k frames (or a time limit) with a broker outage in the middle; is memory flat?

    nice -n 10 .venv/bin/python bench/soak.py [--frames 100000] [--max-minutes 60] [--outage-s 30]

The agent runs as its own process (niced) on a 64x64 contract bundle (tests/contract_bundle.py, ONNX
Runtime, 1 thread) over a looping folder of 200 frames, publishing to a local mosquitto with persistence;
a subscriber with a persistent session counts unique message ids. Halfway, mosquitto is SIGKILLed for
``--outage-s`` seconds (the spool fills to disk, then drains). Every ``--every`` seconds one line: frames,
fps, resident memory (VmRSS of the agent), spool depth, load average. At the end, a table with the
memory at start (after the first 5 % of frames), at the end and its peak, and whether every frame was
delivered.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from agent_harness import AgentProcess, agent_config, http_get, write_frames, write_toml  # noqa: E402
from contract_bundle import build_contract_bundle  # noqa: E402
from fault_scenarios import relay_subscriber  # noqa: E402

from edge_agent.demo.local_broker import LocalMosquitto, free_port  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--max-minutes", type=float, default=60.0, help="stop earlier if the frames take longer")
    parser.add_argument("--outage-s", type=float, default=30.0, help="broker SIGKILLed this long at half way; 0 = none")
    parser.add_argument(
        "--outage-signal",
        choices=("term", "kill"),
        default="term",
        help="how the broker goes away: term (it saves its persistence file) or kill (SIGKILL: mosquitto loses "
        "what it acknowledged since its last autosave, up to 1 s here; the agent cannot see that)",
    )
    parser.add_argument("--every", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--workdir", type=Path, default=None)
    return parser.parse_args()


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(port: int) -> dict[str, float]:
    """Some /metrics values (empty when the agent does not answer)."""
    try:
        _, _, text = http_get(port, "/metrics", timeout=5)
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def main() -> int:
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    bundle = build_contract_bundle(workdir / "bundle")
    frames = write_frames(workdir / "frames", 200)
    # As docs/reject_relay.md asks of a plant broker: mosquitto's default of 1000 queued messages per client
    # drops QoS 1 messages to a relay that falls behind while a 20k-message spool drains.
    broker = LocalMosquitto(workdir / "broker", persistence=True, options="max_queued_messages 1000000\n").start()
    subscriber = relay_subscriber(broker)
    http_port = free_port()
    values = agent_config(
        workdir / "state",
        bundle,
        str(frames),
        broker.port,
        http_port,
        source={"loop": True},
        mqtt={"stats_interval_s": 10.0, "drain_timeout_s": 60, "reconnect_max_s": 2},
    )
    config = write_toml(workdir / "agent.toml", values)
    agent = AgentProcess(config, workdir / "agent.log", REPO / ".numba-cache")
    print(f"workdir {workdir}; agent pid {agent.process.pid}; {os.cpu_count()} CPUs", flush=True)
    print(
        f"| {'min':>5} | {'frames':>8} | {'fps':>6} | {'RSS MiB':>8} | {'spool':>6} | {'received':>8} | {'load':>5} | note"
    )
    samples: list[tuple[int, float]] = []
    started = time.monotonic()
    last_print = 0.0
    last_frames, last_time = 0, started
    outage_at = args.frames // 2 if args.outage_s > 0 else None
    outage_until: float | None = None
    killed_at_frame = -1
    note = ""
    try:
        while True:
            time.sleep(1.0)
            if agent.process.poll() is not None:
                print("the agent exited early:\n" + agent.tail(), flush=True)
                return 1
            metrics = scrape(http_port)
            inspected = int(metrics.get("edge_agent_frames_inspected_total", 0))
            rss = rss_mb(agent.process.pid)
            samples.append((inspected, rss))
            now = time.monotonic()
            if outage_at is not None and inspected >= outage_at and outage_until is None:
                if args.outage_signal == "kill":
                    broker.kill()
                else:
                    broker.stop()
                killed_at_frame = inspected
                outage_until = now + args.outage_s
                note = f"broker {args.outage_signal}ed for {args.outage_s:.0f} s"
            if outage_until is not None and now >= outage_until and not broker.running:
                broker.start()
                note += ", back"
            if now - last_print >= args.every or inspected >= args.frames:
                fps = (inspected - last_frames) / (now - last_time)
                last_frames, last_time, last_print = inspected, now, now
                print(
                    f"| {(now - started) / 60:5.1f} | {inspected:8d} | {fps:6.1f} | {rss:8.1f} | "
                    f"{int(metrics.get('edge_agent_spool_depth', -1)):6d} | {len(subscriber.messages):8d} | "
                    f"{os.getloadavg()[0]:5.1f} | {note}",
                    flush=True,
                )
                note = ""
            if inspected >= args.frames or now - started > args.max_minutes * 60:
                break
        if not broker.running:
            broker.start()
        code = agent.terminate(timeout=120)
    finally:
        agent.kill()
    stopped = agent.events("agent_stopped")
    inspected = int(stopped[-1]["frames"]) if stopped else samples[-1][0]
    # QoS 1 delivers duplicates after an outage: wait for distinct frames, not for a message count.
    subscriber.wait_for(lambda ms: len({m.json()["sequence"] for m in ms}) >= inspected, timeout=60)
    received = [m.json() for m in subscriber.messages]
    unique = len({m["message_id"] for m in received})
    missing = sorted(set(range(inspected)) - {int(m["sequence"]) for m in received})
    subscriber.close()
    broker.stop()
    broker_drops = [line for line in broker.log.read_text().splitlines() if "dropped" in line]
    warm = next((rss for frames_done, rss in samples if frames_done >= 0.05 * inspected), samples[0][1])
    end = samples[-1][1]
    peak = max(rss for _, rss in samples)
    minutes = (time.monotonic() - started) / 60
    print(f"\nsoak: {inspected} frames in {minutes:.1f} min, exit {code}, load average now {os.getloadavg()[0]:.1f}")
    print("| RSS at 5 % (MiB) | RSS at end (MiB) | peak (MiB) | end - start | frames published | unique received |")
    print("|---|---|---|---|---|---|")
    print(f"| {warm:.1f} | {end:.1f} | {peak:.1f} | {end - warm:+.1f} | {inspected} | {unique} |")
    print(
        f"\nmessages received {len(received)} (duplicates {len(received) - unique}); outage at frame "
        f"{killed_at_frame} ({args.outage_signal})"
    )
    for line in broker_drops[:3]:
        print(f"mosquitto: {line}")
    if missing:
        print(f"missing {len(missing)} frames, sequences {missing[0]}..{missing[-1]}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
