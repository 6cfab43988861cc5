"""Engine frame rate against the model's input geometry: what a non-square input costs.

    nice .venv/bin/python bench/geometry.py [--shapes 256x256 256x352 ...] [--threads 2] [--frames 60]

For each HxW: the default recipe's model (efficientnet_lite0 with its ImageNet weights, the recipe's
strides; the flow untrained, which does not change its cost) exported with ``training.export.export_onnx``
and run by ONNX Runtime FP32 with the agent engine's session options (all graph optimisations, one
inter-op thread, ``--threads`` intra-op threads), engine only: one uint8 frame at a time, back to back.
The shapes are timed in rounds, each shape in turn, so that the load of a shared machine hits them
alike. Prints one Markdown row per shape (pixels and time relative to the first shape, median ms per
frame and fps), then the shape the geometry rule (training/geometry.py) picks for each data set in
``--data-root``. Absolute fps follow the machine's load: read the time ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_SHAPES = ("256x256", "320x256", "256x352", "192x480", "288x384", "256x640")
DATA_ROOT = REPO.parent / "shared" / "data"


def parse_shape(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be HxW (e.g. 256x352), got {text!r}") from None
    return height, width


def build_session(height: int, width: int, threads: int, work: Path) -> tuple[Any, list[str]]:
    """An ONNX Runtime FP32 session (the agent engine's options) on the default model exported at HxW."""
    import onnxruntime as ort
    import torch

    from training.export import export_onnx
    from training.model import UFlow, UFlowConfig

    torch.manual_seed(0)
    model = UFlow(UFlowConfig(image_height=height, image_width=width)).eval()
    path = work / f"model_{height}x{width}.onnx"
    names = export_onnx(model, path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return session, names


def time_frames(session: Any, names: list[str], height: int, width: int, frames: int) -> list[float]:
    """Seconds per frame of ``frames`` back-to-back runs (after three warm-up runs)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8) for _ in range(4)]
    for image in images[:3]:
        session.run(names, {"image": image})
    times = []
    for index in range(frames):
        tick = time.perf_counter()
        session.run(names, {"image": images[index % len(images)]})
        times.append(time.perf_counter() - tick)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--frames", type=int, default=20, help="frames per shape per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT, help="folders with a split.json each")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    times: dict[tuple[int, int], list[float]] = {shape: [] for shape in args.shapes}
    with tempfile.TemporaryDirectory(prefix="bench-geometry-") as tmp:
        sessions = {shape: build_session(*shape, args.threads, Path(tmp)) for shape in args.shapes}
        # Rounds over every shape in turn: a change of the machine's load hits all shapes alike.
        for _ in range(args.rounds):
            for shape, (session, names) in sessions.items():
                times[shape] += time_frames(session, names, *shape, args.frames)
    base = float(np.median(times[args.shapes[0]]))
    print(
        f"\n| input HxW | pixels | x {args.shapes[0][0]}x{args.shapes[0][1]} pixels | median ms/frame | time x | fps (median) |"
    )
    print("|---|---|---|---|---|---|")
    for (height, width), values in times.items():
        ms = 1000 * float(np.median(values))
        pixels = height * width
        print(
            f"| {height}x{width} | {pixels} | {pixels / (args.shapes[0][0] * args.shapes[0][1]):.2f} | {ms:.1f} | "
            f"{ms / 1000 / base:.2f} | {1000 / ms:.1f} |"
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    from training.catalog import DEFAULT_RECIPE
    from training.data import open_dataset
    from training.geometry import choose_geometry

    print("\n| data set | median aspect (w/h) | chosen HxW |")
    print("|---|---|---|")
    for split in sorted(args.data_root.glob("*/split.json")):
        splits = open_dataset(split)
        geometry = choose_geometry(
            [r.image for r in splits.train],
            DEFAULT_RECIPE.image_size,
            max(DEFAULT_RECIPE.strides),
            DEFAULT_RECIPE.max_pixels,
        )
        print(f"| {split.parent.name} | {geometry.data_aspect:.3f} | {geometry.height}x{geometry.width} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
