"""Engine frame rate against the model's input geometry: what a non-square input costs.

    nice .venv/bin/python bench/geometry.py [--shapes 256x256 256x352 ...] [--threads 2] [--frames 60]

For each HxW: the default recipe's model (efficientnet_lite0 with its ImageNet weights, the recipe's
strides; the flow untrained, which does not change its cost) exported with ``training.export.export_onnx``
and run by ONNX Runtime FP32 with the agent engine's session options (all graph optimisations, one
inter-op thread, ``--threads`` intra-op threads), engine only: one uint8 frame at a time, back to back.
Prints one Markdown row per shape (pixels, pixels relative to 256x256, fps, ms per frame, load
average), then the shape the geometry rule (training/geometry.py) picks for each data set in
../shared/data. The fps of a shared machine vary with its load: compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_SHAPES = ("256x256", "256x352", "288x384", "192x480", "224x544", "256x640", "320x256")
DATA_ROOT = REPO.parent / "shared" / "data"


def parse_shape(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be HxW (e.g. 256x352), got {text!r}") from None
    return height, width


def engine_fps(height: int, width: int, threads: int, frames: int, work: Path) -> tuple[float, float]:
    """(fps, median ms) of ONNX Runtime FP32 on the default model exported at HxW."""
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
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8) for _ in range(8)]
    for image in images[:3]:
        session.run(names, {"image": image})
    times = []
    started = time.perf_counter()
    for index in range(frames):
        tick = time.perf_counter()
        session.run(names, {"image": images[index % len(images)]})
        times.append(time.perf_counter() - tick)
    return frames / (time.perf_counter() - started), 1000 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--frames", type=int, default=60)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print("| input HxW | pixels | x 256x256 | engine fps | ms/frame (median) | load |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-geometry-") as tmp:
        for height, width in args.shapes:
            fps, ms = engine_fps(height, width, args.threads, args.frames, Path(tmp))
            pixels = height * width
            print(
                f"| {height}x{width} | {pixels} | {pixels / 65536:.2f} | {fps:.1f} | {ms:.1f} | "
                f"{os.getloadavg()[0]:.1f} |",
                flush=True,
            )
    from training.catalog import DEFAULT_RECIPE
    from training.data import open_dataset
    from training.geometry import choose_geometry

    print("\n| data set | median aspect (w/h) | chosen HxW |")
    print("|---|---|---|")
    for split in sorted(DATA_ROOT.glob("*/split.json")):
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
