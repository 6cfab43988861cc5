"""The demo's frames mode (``edge-agent demo --mode frames``): a verdict per frame, no tracking, no relay process.

The agent runs on the conveyor video while a watcher (line.py's ``LineWatcher``) subscribes as a reject
relay would and prints every flagged frame; the summary compares what it received with the ground truth.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2

from edge_agent.config import load_settings
from edge_agent.demo.conveyor import ConveyorSpec, ConveyorTruth
from edge_agent.demo.line import DEVICE_ID, LineWatcher, RunAgent, say
from edge_agent.demo.local_broker import LocalMosquitto
from edge_agent.logs import setup_logging


def run_frames(
    threads: int,
    bundle: Path,
    video: Path,
    broker: LocalMosquitto,
    truth: ConveyorTruth,
    spec: ConveyorSpec,
    workdir: Path,
    started: float,
    run_agent: RunAgent,
) -> int:
    """Step 5: the agent on the video with the relay listening; then the summary.

    ``run_agent`` is ``edge_agent.cli.run.run_agent`` (passed in: the demo's floor does not import the CLI's).
    """
    # Imported here, as run_agent does, so that NUMBA_CACHE_DIR is set before Numba loads (scoring imports the NFA).
    from edge_agent.inspection.overlay import draw_overlay
    from edge_agent.inspection.pipeline import FrameJob
    from edge_agent.inspection.scoring import resize_map

    config = workdir / "agent.toml"
    config.write_text(
        f'device_id = "{DEVICE_ID}"\nstate_dir = "{workdir / "state"}"\nlog_format = "json"\n\n'
        f'[model]\nbundle = "{bundle}"\nbackend = "onnxruntime"\nthreads = {threads}\n\n'
        f'[source]\nuri = "{video}"\n\n[mqtt]\nport = {broker.port}\n'
    )
    overlays = workdir / "overlays"
    overlays.mkdir(exist_ok=True)
    for old in overlays.glob("*.png"):
        old.unlink()
    timing: dict[str, float] = {}

    def save_overlay(job: FrameJob) -> None:
        timing.setdefault("first", time.monotonic())
        timing["last"] = time.monotonic()
        verdict, frame = job.verdict, job.frame
        if not (verdict.anomalous or frame.sequence in truth.defect_frames[:1]):
            return
        height, width = frame.image.shape[:2]
        picture = draw_overlay(
            frame.image,
            resize_map(verdict.anomaly_map, width, height),
            resize_map(verdict.log_nfa, width, height),
            verdict.log10_epsilon,
            verdict.regions,
            f"frame {frame.sequence}  score {verdict.image_score:.3f}  {'REJECT' if verdict.anomalous else 'pass'}",
        )
        cv2.imwrite(str(overlays / f"frame_{frame.sequence:05d}.png"), picture)

    relay = LineWatcher(broker.host, broker.port, DEVICE_ID, say=say, label="relay", print_rejects=True)
    relay.start()
    say(
        "Step 5/5: running the agent on the video (ONNX Runtime on the CPU); a separate MQTT client subscribes "
        f"to uflow/{DEVICE_ID}/# like a reject relay and prints what it receives."
    )
    say(f"   (the same run from a shell: edge-agent run --config {config})")
    agent_log = workdir / "agent.log"
    settings = load_settings(config)
    with agent_log.open("w") as stream:
        setup_logging("INFO", "json", stream=stream)
        agent_started = time.monotonic()
        code = run_agent(settings, on_result=save_overlay)
        agent_seconds = time.monotonic() - agent_started
    setup_logging("WARNING", "text")
    relay.wait_for_status("stopped", 10)
    relay.stop()
    if code != 0:
        say(f"The agent failed (exit {code}); see {agent_log}")
        return code
    paths = {"bundle": bundle, "video": video, "overlays of flagged frames": overlays, "agent log": agent_log}
    _summary(relay, truth, spec, timing, agent_seconds, started, paths)
    return 0


def frame_ranges(frames: list[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` -> ``"1-3, 7, 9-10"``."""
    runs: list[list[int]] = []
    for frame in sorted(frames):
        if runs and frame == runs[-1][1] + 1:
            runs[-1][1] = frame
        else:
            runs.append([frame, frame])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _summary(
    relay: LineWatcher,
    truth: ConveyorTruth,
    spec: ConveyorSpec,
    timing: dict[str, float],
    agent_seconds: float,
    started: float,
    paths: dict[str, Path],
) -> None:
    """What the relay received against the ground truth, throughput, wall time and where things are."""
    flagged = {m["sequence"] for m in relay.frames if m["anomalous"]}
    full, partial, clean = set(truth.defect_frames), set(truth.partial_frames), set(truth.clean_frames)
    caught, missed = sorted(flagged & full), sorted(full - flagged)
    false_alarms = sorted(flagged & clean)
    span = timing.get("last", 0.0) - timing.get("first", 0.0)
    fps = (len(relay.frames) - 1) / span if span > 0 and len(relay.frames) > 1 else 0.0
    say("\nSummary")
    say(f"   frames in the video ............ {truth.frames}")
    say(
        f"   inspection messages received ... {len(relay.frames)} (one per frame, in order: "
        f"{[m['sequence'] for m in relay.frames] == list(range(truth.frames))})"
    )
    say(f"   frames flagged (REJECT) ........ {len(flagged)}")
    say(
        f"   defect entirely in view ........ {len(full)} frames, caught {len(caught)}, missed {len(missed)}"
        + (f" ({frame_ranges(missed)})" if missed else "")
    )
    for part in truth.parts:
        if part.kind:
            frames = [
                f for f in truth.defect_frames if truth.defect_part_in_frame(f, spec.speed_px, spec.width) == part
            ]
            hit = sum(f in flagged for f in frames)
            say(
                f"      part #{part.index + 1} ({part.kind}): flagged in {hit} of {len(frames)} frames"
                f" -> {'REJECTED' if hit else 'MISSED'}"
            )
    say(f"   defect partly in view .......... {len(partial)} frames, flagged {len(flagged & partial)} (not scored)")
    say(
        f"   frames with no defect .......... {len(clean)}, false alarms {len(false_alarms)}"
        + (f" ({frame_ranges(false_alarms)})" if false_alarms else "")
    )
    say(f"   agent throughput ............... {fps:.1f} frames/s (run incl. start-up: {agent_seconds:.1f} s)")
    cpu = os.times()
    say(
        f"   demo wall time ................. {time.monotonic() - started:.1f} s (CPU time "
        f"{cpu.user + cpu.system + cpu.children_user + cpu.children_system:.0f} s; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    for what, path in paths.items():
        say(f"   {what}: {path}")
