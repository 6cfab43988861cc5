"""``edge-agent demo``: the whole product on a machine with no camera and no model, in a few minutes.

1. Generates images of good parts on a conveyor belt (synthetic textures, edge_agent/demo/synthetic.py).
2. Trains a small U-Flow on them and exports a model bundle (needs the ``train`` extra: torch). The
   device package never imports ``training``: this step runs training/demo_model.py as a child process.
3. Renders a conveyor video in which some parts carry a planted defect (known frames).
4. Starts a private mosquitto on a free loopback port.
5. Runs the real agent (the same code as ``edge-agent run``, ONNX Runtime on the CPU) on the video: in
   tracked mode (line.py) with the real reject relay and a watcher standing where the PLC would, in
   frames mode (frames.py) with a watcher subscribed as a reject relay would, printing every detection.
Then it prints a summary against the ground truth, the wall time and where everything was written.
The command itself (edge_agent/cli/demo.py) only parses its arguments into ``DemoOptions``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2

from edge_agent.demo.conveyor import Conveyor, ConveyorSpec, ConveyorTruth, good_training_frames, write_video
from edge_agent.demo.frames import run_frames
from edge_agent.demo.line import RunAgent, run_tracked, say, say_tracked_summary
from edge_agent.demo.local_broker import BrokerError, LocalMosquitto
from edge_agent.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE
from edge_agent.logs import setup_logging

TRAIN_HINT = "the demo trains a model, which needs the training extra: pip install '.[train]' (torch, timm, FrEIA)"


@dataclass(frozen=True)
class DemoOptions:
    """What ``edge-agent demo`` was asked (its arguments, edge_agent/cli/demo.py)."""

    workdir: Path
    bundle: Path | None = None
    image_size: int = 128
    epochs: int = 30
    train_images: int = 120
    frame_size: int = 256
    parts: int = 10
    threads: int = 2
    seed: int = 0
    mode: Literal["tracked", "frames"] = "tracked"


def run_demo(args: DemoOptions, run_agent: RunAgent) -> int:
    """The whole demo (module docstring); returns the exit status of ``edge-agent demo``."""
    started = time.monotonic()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    setup_logging("WARNING", "text")
    say("U-Flow edge agent demo: train on good parts, then watch a conveyor for defects and publish to MQTT.")
    say(f"Everything goes to {workdir}\n")

    if args.bundle is None and not training_available():
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
            return _run_tracked(args, bundle, video, broker, truth, spec, workdir, started, run_agent)
        return run_frames(args.threads, bundle, video, broker, truth, spec, workdir, started, run_agent)


def _run_tracked(
    args: DemoOptions,
    bundle: Path,
    video: Path,
    broker: LocalMosquitto,
    truth: ConveyorTruth,
    spec: ConveyorSpec,
    workdir: Path,
    started: float,
    run_agent: RunAgent,
) -> int:
    """Step 5 in tracked mode (edge_agent/demo/line.py), then its summary."""
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


def training_available() -> bool:
    """Whether torch and the training package are installed (looked up, not imported: see the docstring)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("torch", "training"))
    except (ImportError, ValueError):  # a finder may refuse outright instead of finding nothing
        return False


def _train_bundle(args: DemoOptions, spec: ConveyorSpec, workdir: Path) -> Path | None:
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
