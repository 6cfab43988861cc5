"""``edge-agent demo``: the whole product on a machine with no camera and no model, in a few minutes.

The demo itself (train on good parts, render a conveyor video, a private broker, the real agent and reject
relay, a summary against the ground truth) is edge_agent/demo/flow.py; this module only parses its arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path


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


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edge-agent demo``."""
    from edge_agent.cli.run import run_agent
    from edge_agent.demo.flow import DemoOptions, run_demo

    options = DemoOptions(
        workdir=args.workdir,
        bundle=args.bundle,
        image_size=args.image_size,
        epochs=args.epochs,
        train_images=args.train_images,
        frame_size=args.frame_size,
        parts=args.parts,
        threads=args.threads,
        seed=args.seed,
        mode=args.mode,
    )
    return run_demo(options, run_agent)
