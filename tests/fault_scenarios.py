"""Fault scenarios against a real ``edge-agent run`` process: broker killed, agent SIGKILLed, camera lost.

Each scenario builds what it needs under a work directory (contract bundle, frames, mosquitto, ffmpeg),
runs it, and returns a report of what the subscriber received. tests/test_agent_faults.py asserts on
the reports; bench/faults.py runs them at full length and prints a table.

What is guaranteed and checked: every inspection message reaches the broker at least once (the spool
keeps it until PUBACK, across broker outages and agent restarts); a subscriber with a persistent session
on a broker with persistence therefore receives every one, possibly twice; deduplicated by
``message_id`` they are one per inspected frame, in frame order.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_harness import AgentProcess, agent_config, http_get, write_frames, write_toml
from contract_bundle import build_contract_bundle
from mqtt_broker import Subscriber
from stream_server import MjpegServer, camera_video

from edge_agent.demo.local_broker import LocalMosquitto, free_port

RELAY_CLIENT_ID = "reject-relay-test"


@dataclass
class Delivery:
    """What a subscriber got, deduplicated by message id (first arrival kept)."""

    received: int
    unique: list[dict[str, Any]]
    duplicates: int

    @property
    def sequences(self) -> list[int]:
        return [m["sequence"] for m in self.unique]

    @property
    def replayed(self) -> int:
        return sum(bool(m.get("replayed")) for m in self.unique)


def deduplicate(payloads: list[dict[str, Any]]) -> Delivery:
    seen: set[str] = set()
    unique = []
    for payload in payloads:
        if payload["message_id"] not in seen:
            seen.add(payload["message_id"])
            unique.append(payload)
    return Delivery(len(payloads), unique, len(payloads) - len(unique))


def inspections_of(subscriber: Subscriber) -> list[dict[str, Any]]:
    return [m.json() for m in subscriber.on("/inspection")]


def spool_rows(path: Path) -> list[dict[str, Any]]:
    """The inspection payloads in a spool file (read while no agent runs), oldest first."""
    if not path.exists():
        return []
    with sqlite3.connect(str(path)) as connection:
        rows = connection.execute("SELECT payload FROM messages ORDER BY seq").fetchall()
    return [json.loads(bytes(row[0])) for row in rows]


def relay_subscriber(broker: LocalMosquitto) -> Subscriber:
    """A subscriber set up as a reject relay must be: QoS 1, fixed client id, persistent session."""
    return Subscriber(broker, "uflow/cam1/inspection", client_id=RELAY_CLIENT_ID, session_expiry_s=3600)


def contract_setup(workdir: Path, frames: int) -> tuple[Path, Path]:
    """A 64x64 contract bundle and ``frames`` PNG frames under ``workdir``."""
    bundle = workdir / "bundle"
    if not (bundle / "model.json").exists():
        build_contract_bundle(bundle)
    folder = workdir / f"frames-{frames}"
    if not folder.exists():
        write_frames(folder, frames)
    return bundle, folder


# -- broker outage ----------------------------------------------------------------------------------------


@dataclass
class OutageReport:
    frames: int
    outage_s: float
    killed_after_messages: int
    exit_code: int
    delivery: Delivery
    spool_left: int
    connects: int
    seconds: float
    log_tail: str = ""


def broker_outage(
    workdir: Path,
    frames: int = 500,
    fps: float = 25.0,
    kill_after_s: float = 3.0,
    outage_s: float = 20.0,
    numba_cache: Path | None = None,
) -> OutageReport:
    """``frames`` frames at ``fps`` through the agent; mosquitto SIGKILLed ``kill_after_s`` in, back ``outage_s`` later."""
    bundle, folder = contract_setup(workdir, frames)
    state = workdir / "outage-state"
    broker = LocalMosquitto(workdir / "outage-broker", persistence=True).start()
    subscriber = relay_subscriber(broker)
    values = agent_config(
        state,
        bundle,
        str(folder),
        broker.port,
        source={"fps_limit": fps},
        mqtt={"drain_timeout_s": 60, "reconnect_max_s": 2},
    )
    started = time.monotonic()
    agent = AgentProcess(write_toml(workdir / "outage.toml", values), workdir / "outage-agent.log", numba_cache)
    try:
        if not subscriber.wait_for(lambda ms: len(ms) >= 10, timeout=120):
            raise RuntimeError(f"the agent never published: {agent.tail()}")
        time.sleep(kill_after_s)
        killed_after = len(subscriber.messages)
        broker.kill()
        time.sleep(outage_s)
        broker.start()
        exit_code = agent.process.wait(timeout=frames / fps + outage_s + 120)
        subscriber.wait_for(lambda ms: len(deduplicate(inspections_of_messages(ms)).unique) >= frames, timeout=60)
    finally:
        agent.kill()
        subscriber.close()
        broker.stop()
    return OutageReport(
        frames=frames,
        outage_s=outage_s,
        killed_after_messages=killed_after,
        exit_code=exit_code,
        delivery=deduplicate(inspections_of(subscriber)),
        spool_left=len(spool_rows(state / "spool.sqlite")),
        connects=len(agent.events("mqtt_connected")),
        seconds=time.monotonic() - started,
        log_tail=agent.tail(),
    )


def inspections_of_messages(messages: list[Any]) -> list[dict[str, Any]]:
    return [m.json() for m in messages if m.topic.endswith("/inspection")]


# -- agent SIGKILL ----------------------------------------------------------------------------------------


@dataclass
class KillReport:
    spooled_at_kill: list[dict[str, Any]]  # read from the spool file right after the SIGKILL
    inspected_before_kill: int  # sequences 0..n-1 made before the kill (from the spool: no gap)
    delivery: Delivery  # everything the subscriber got from both runs
    second_run_exit: int
    expired_dropped: int
    log_tail: str = ""


def agent_sigkill(
    workdir: Path, frames: int = 300, fps: float = 25.0, run_s: float = 4.0, numba_cache: Path | None = None
) -> KillReport:
    """The agent inspects with the broker down (so its spool fills), is SIGKILLed, restarted with the broker up."""
    bundle, folder = contract_setup(workdir, frames)
    state = workdir / "kill-state"
    port = free_port()
    values = agent_config(state, bundle, str(folder), port, source={"fps_limit": fps}, mqtt={"drain_timeout_s": 30})
    config = write_toml(workdir / "kill.toml", values)
    log = workdir / "kill-agent.log"
    first = AgentProcess(config, log, numba_cache)
    try:
        if not first.wait_for_event("agent_ready", timeout=120):
            raise RuntimeError(f"the agent did not start: {first.tail()}")
        time.sleep(run_s)
    finally:
        first.kill()
    spooled = spool_rows(state / "spool.sqlite")
    broker = LocalMosquitto(workdir / "kill-broker", port=port, persistence=True).start()
    subscriber = relay_subscriber(broker)
    second = AgentProcess(config, log, numba_cache)
    try:
        exit_code = second.process.wait(timeout=frames / fps + 120)
        ids = {m["message_id"] for m in spooled}
        subscriber.wait_for(lambda ms: ids <= {m["message_id"] for m in inspections_of_messages(ms)}, timeout=30)
    finally:
        second.kill()
        subscriber.close()
        broker.stop()
    opened = second.events("spool_opened")
    return KillReport(
        spooled_at_kill=spooled,
        inspected_before_kill=len(spooled),
        delivery=deduplicate(inspections_of(subscriber)),
        second_run_exit=exit_code,
        expired_dropped=int(opened[-1]["expired_dropped"]) if opened else -1,
        log_tail=second.tail(),
    )


# -- camera lost and back ---------------------------------------------------------------------------------


@dataclass
class CameraReport:
    states: list[str]  # source_state of every stats message, in order (repeats collapsed)
    sequences_before: list[int]
    sequences_after: list[int]
    reconnects: int
    lost_reasons: list[str]  # "reason" of every source_lost log event
    health_while_down: dict[str, Any]
    recovery_s: float  # server back -> first new inspection
    log_tail: str = ""


def camera_faults(
    workdir: Path, numba_cache: Path | None = None, down_s: float = 3.0, stall_timeout_s: float = 3.0
) -> CameraReport:
    """A live MJPEG camera (ffmpeg) that crashes and comes back, then stays up but stops sending."""
    bundle, _ = contract_setup(workdir, 1)
    video = camera_video(workdir / "camera.avi", frames=100, size=(64, 64))
    server = MjpegServer(video).start()
    broker = LocalMosquitto(workdir / "camera-broker").start()
    subscriber = Subscriber(broker, "uflow/cam1/#")
    http_port = free_port()
    values = agent_config(
        workdir / "camera-state",
        bundle,
        server.url,
        broker.port,
        http_port,
        source={
            "read_timeout_s": 30.0,
            "stall_timeout_s": stall_timeout_s,
            "reconnect_initial_s": 0.5,
            "reconnect_max_s": 2.0,
            "open_timeout_s": 2.0,
        },
        mqtt={"stats_interval_s": 1.0},
    )
    agent = AgentProcess(write_toml(workdir / "camera.toml", values), workdir / "camera-agent.log", numba_cache)
    health_down: dict[str, Any] = {}
    try:
        if not subscriber.wait_for(lambda ms: len(inspections_of_messages(ms)) >= 20, timeout=120):
            raise RuntimeError(f"no inspections from the stream: {agent.tail()}")
        before = [m["sequence"] for m in inspections_of(subscriber)]
        # 1. The camera crashes and comes back.
        server.kill()
        if not subscriber.wait_for(lambda ms: _last_state(ms) == "reconnecting", timeout=30):
            raise RuntimeError(f"stats never said reconnecting: {agent.tail()}")
        _, _, body = http_get(http_port, "/healthz")
        health_down = json.loads(body)
        time.sleep(down_s)
        count = len(inspections_of(subscriber))
        server.start()
        back = time.monotonic()
        if not subscriber.wait_for(lambda ms: len(inspections_of_messages(ms)) >= count + 10, timeout=60):
            raise RuntimeError(f"inspection did not resume: {agent.tail()}")
        recovery = time.monotonic() - back
        # 2. The camera stays up but sends nothing: the stall watchdog reopens it.
        server.pause()
        lost = len(agent.events("source_lost"))
        agent.wait_for_event("source_lost", timeout=stall_timeout_s + 30, count=lost + 1)
        server.resume()
        server.restart()
        count = len(inspections_of(subscriber))
        subscriber.wait_for(lambda ms: len(inspections_of_messages(ms)) >= count + 10, timeout=60)
        subscriber.wait_for(lambda ms: _last_state(ms) == "open", timeout=10)
        agent.terminate()
    finally:
        agent.kill()
        server.kill()
        subscriber.close()
        broker.stop()
    sequences = [m["sequence"] for m in inspections_of(subscriber)]
    return CameraReport(
        states=_collapse([m.json()["source_state"] for m in subscriber.on("/stats")]),
        sequences_before=before,
        sequences_after=sequences[len(before) :],
        reconnects=len(agent.events("source_reconnected")),
        lost_reasons=[str(e.get("reason")) for e in agent.events("source_lost")],
        health_while_down=health_down,
        recovery_s=recovery,
        log_tail=agent.tail(),
    )


def _last_state(messages: list[Any]) -> str | None:
    stats = [m for m in messages if m.topic.endswith("/stats")]
    return stats[-1].json()["source_state"] if stats else None


def _collapse(values: list[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        if not out or out[-1] != value:
            out.append(value)
    return out
