"""``edge-agent demo``: the whole product on a machine with no camera and no model, in a few minutes.

1. Generates images of good parts on a conveyor belt (synthetic textures, edge_agent/demo/synthetic.py).
2. Trains a small U-Flow on them and exports a model bundle (needs the ``train`` extra: torch). The
   device package never imports ``training``: this step runs training/demo_model.py as a child process.
3. Renders a conveyor video in which some parts carry a planted defect (known frames).
4. Starts a private mosquitto on a free loopback port.
5. Runs the real agent (the same code as ``edge-agent run``, ONNX Runtime on the CPU) on the video while
   a separate MQTT client subscribes as a reject relay would, printing every detection it receives.
Then it prints a summary against the ground truth, the wall time and where everything was written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE
from edge_agent.config import load_settings
from edge_agent.demo.conveyor import Conveyor, ConveyorSpec, ConveyorTruth, good_training_frames, write_video
from edge_agent.demo.local_broker import BrokerError, LocalMosquitto
from edge_agent.logs import setup_logging

log = logging.getLogger(__name__)

TRAIN_HINT = "the demo trains a model, which needs the training extra: pip install '.[train]' (torch, timm, FrEIA)"
DEVICE_ID = "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent demo``."""
    parser.add_argument("--workdir", type=Path, default=Path("edge-agent-demo"), help="where everything is written")
    parser.add_argument("--bundle", type=Path, default=None, help="use this bundle instead of training one")
    parser.add_argument("--image-size", type=int, default=128, help="model input size (square)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument("--train-images", type=int, default=120, help="good conveyor frames to train on")
    parser.add_argument("--frame-size", type=int, default=256, help="camera frame size (square)")
    parser.add_argument("--parts", type=int, default=10, help="parts on the belt in the video")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for training and inference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mode",
        choices=("tracked", "frames"),
        default="tracked",
        help="tracked: one verdict per part and the real reject relay (default); frames: a verdict per frame",
    )


def say(text: str) -> None:
    """One line for the person watching."""
    print(text, flush=True)


@dataclass
class RejectRelay:
    """A separate MQTT client that listens to the agent like a reject actuator would, printing detections."""

    host: str
    port: int
    prefix: str = "uflow"
    frames: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    client: paho.Client | None = None

    def start(self) -> None:
        subscribed = threading.Event()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="demo-reject-relay")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{self.prefix}/{DEVICE_ID}/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise BrokerError(f"the reject relay could not subscribe on {self.host}:{self.port}")

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        topic, payload = message.topic, message.payload
        if topic.endswith("/status"):
            with self._cond:
                self.statuses.append(payload.decode())
                self._cond.notify_all()
            say(f"   [relay] agent status: {payload.decode()}")
            return
        if not topic.endswith("/inspection"):
            return
        data = json.loads(payload)
        with self._cond:
            self.frames.append(data)
            self._cond.notify_all()
        if data["anomalous"]:
            regions = "; ".join(
                f"bbox {r['bbox']} area {r['area']} px log10 NFA {r['log_nfa']:.1f}" for r in data["regions"]
            )
            say(f"   [relay] frame {data['sequence']:4d}  REJECT  score {data['image_score']:.3f}  {regions}")

    def wait_for_status(self, status: str, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: status in self.statuses, timeout)

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edge-agent demo``."""
    started = time.monotonic()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    setup_logging("WARNING", "text")
    say("U-Flow edge agent demo: train on good parts, then watch a conveyor for defects and publish to MQTT.")
    say(f"Everything goes to {workdir}\n")

    if args.bundle is None and not _training_available():
        say(f"Cannot run the demo: {TRAIN_HINT}.\nOr pass --bundle DIR to run it with an existing model bundle.")
        return EXIT_UNAVAILABLE
    try:
        broker = LocalMosquitto(workdir / "broker")
    except BrokerError as exc:
        say(f"Cannot run the demo: {exc}.")
        return EXIT_UNAVAILABLE

    spec = ConveyorSpec(
        width=args.frame_size,
        height=args.frame_size,
        parts=args.parts,
        speed_px=max(1, args.frame_size // 32),
        defect_parts=tuple(i for i in (2, 6, 8) if i < args.parts),
        defect_kinds=("crack", "dark_blob", "bright_blob"),
        seed=args.seed,
    )
    bundle = args.bundle.resolve() if args.bundle else _train_bundle(args, spec, workdir)
    if bundle is None:
        return EXIT_FAILURE
    step_started = time.monotonic()
    video = workdir / "conveyor.avi"
    say(
        f"Step 3/5: rendering the conveyor video: {spec.parts} parts pass the camera, defects planted on parts "
        f"{', '.join(f'#{i + 1}' for i in spec.defect_parts)} ..."
    )
    conveyor = Conveyor(spec)
    truth = conveyor.truth()
    codec = write_video(video, iter(conveyor), spec.fps, (spec.width, spec.height))
    for part in truth.parts:
        if part.kind:
            frames = [
                f for f in truth.defect_frames if truth.defect_part_in_frame(f, spec.speed_px, spec.width) == part
            ]
            say(f"   part #{part.index + 1}: {part.kind}, entirely in view in frames {frames[0]}..{frames[-1]}")
    say(
        f"   {truth.frames} frames ({truth.frames / spec.fps:.1f} s at {spec.fps:g} fps, {codec}) -> {video} "
        f"[{time.monotonic() - step_started:.1f} s]\n"
    )

    say(f"Step 4/5: starting a private MQTT broker (mosquitto) on 127.0.0.1:{broker.port} ...")
    with broker:
        say(f"   broker up; its log is {broker.log}\n")
        if args.mode == "tracked":
            return _run_tracked(args, bundle, video, broker, truth, spec, workdir, started)
        return _run_agent(args, bundle, video, broker, truth, spec, workdir, started)


def _run_tracked(
    args: argparse.Namespace,
    bundle: Path,
    video: Path,
    broker: LocalMosquitto,
    truth: ConveyorTruth,
    spec: ConveyorSpec,
    workdir: Path,
    started: float,
) -> int:
    """Step 5 in tracked mode (edge_agent/demo/line.py), then its summary."""
    from edge_agent.cli.run import run_agent
    from edge_agent.demo.line import run_tracked, say_tracked_summary

    agent_started = time.monotonic()
    try:
        code, numbers = run_tracked(
            bundle, video, broker.host, broker.port, truth, spec, workdir, args.threads, say, run_agent
        )
    except BrokerError as exc:
        say(f"Cannot run the demo: {exc}.")
        return EXIT_UNAVAILABLE
    if code != 0:
        say(f"The agent failed (exit {code}); see {workdir / 'agent.log'}")
        return code
    say_tracked_summary(numbers, say)
    say(
        f"   agent run ....................... {time.monotonic() - agent_started:.1f} s; demo wall time "
        f"{time.monotonic() - started:.1f} s"
    )
    for what, path in {
        "bundle": bundle,
        "video": video,
        "agent log": workdir / "agent.log",
        "relay log": workdir / "relay.log",
    }.items():
        say(f"   {what}: {path}")
    return EXIT_OK


def _training_available() -> bool:
    """Whether torch and the training package are installed (looked up, not imported: see the docstring)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("torch", "training"))
    except (ImportError, ValueError):  # a finder may refuse outright instead of finding nothing
        return False


def _train_bundle(args: argparse.Namespace, spec: ConveyorSpec, workdir: Path) -> Path | None:
    """Steps 1 and 2: the good frames, then the model trained on them in a child process; None if it failed."""
    step_started = time.monotonic()
    data = workdir / "train_images" / "good"
    data.mkdir(parents=True, exist_ok=True)
    say(f"Step 1/5: generating {args.train_images} camera frames of GOOD parts on the belt (no defects) ...")
    for index, frame in enumerate(good_training_frames(spec, args.train_images, seed=args.seed + 1000)):
        cv2.imwrite(str(data / f"{index:04d}.png"), frame)
    say(f"   -> {data} [{time.monotonic() - step_started:.1f} s]\n")

    step_started = time.monotonic()
    say(
        f"Step 2/5: training U-Flow (EfficientNet-Lite0 features, normalizing flow) on them at "
        f"{args.image_size}x{args.image_size}, {args.epochs} epochs, {args.threads} threads, then exporting "
        "the model bundle ..."
    )

    command = [
        sys.executable,
        "-m",
        "training.demo_model",
        "--data",
        str(data.parent),
        "--run",
        str(workdir / "run"),
        "--bundle",
        str(workdir / "bundle"),
        "--image-size",
        str(args.image_size),
        "--epochs",
        str(args.epochs),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    bundle: Path | None = None
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        for line in child.stdout:  # progress lines as they come; the last one names the bundle
            if line.startswith("bundle "):
                bundle = Path(line[len("bundle ") :].strip())
            else:
                say(line.rstrip("\n"))
    if child.returncode != 0 or bundle is None:
        say(f"Cannot run the demo: training the model failed (exit status {child.returncode}, see above).")
        return None
    say(f"   bundle -> {bundle} [{time.monotonic() - step_started:.1f} s]\n")
    return bundle


def _run_agent(
    args: argparse.Namespace,
    bundle: Path,
    video: Path,
    broker: LocalMosquitto,
    truth: ConveyorTruth,
    spec: ConveyorSpec,
    workdir: Path,
    started: float,
) -> int:
    """Step 5: the agent on the video with the relay listening; then the summary."""
    from edge_agent.cli.run import run_agent
    from edge_agent.inspection.overlay import draw_overlay
    from edge_agent.inspection.pipeline import FrameJob
    from edge_agent.inspection.scoring import resize_map

    config = workdir / "agent.toml"
    config.write_text(
        f'device_id = "{DEVICE_ID}"\nstate_dir = "{workdir / "state"}"\nlog_format = "json"\n\n'
        f'[model]\nbundle = "{bundle}"\nbackend = "onnxruntime"\nthreads = {args.threads}\n\n'
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

    relay = RejectRelay(broker.host, broker.port)
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
    return EXIT_OK


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
    relay: RejectRelay,
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
