"""Engine cost of bundles in CPU time per frame: the heads' price, measurable on a busy machine.

bench/pipeline.py measures wall-clock fps, which on a shared 2-core machine at load 14 says more about the
other jobs than about the model. This runs each bundle's model.onnx with ONNX Runtime on ONE intra-op
thread without spinning (the calling thread does all the work) and reads that thread's CPU time per
frame, which other jobs barely change. ``2-core fps bound`` = 2000 / CPU ms: two frames in flight, one
per core, no other work (the engine-only ceiling bench/pipeline.py approaches on an idle box).

    nice .venv/bin/python bench/heads_cost.py BUNDLE [BUNDLE ...] [--frames 60]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.bundle import load_bundle


def cpu_ms_per_frame(bundle_dir: Path, frames: int) -> tuple[float, float]:
    """(median, fastest) CPU ms of one inference on one thread."""
    import onnxruntime as ort

    bundle = load_bundle(bundle_dir)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(bundle.onnx_path), options, providers=["CPUExecutionProvider"])
    spec = bundle.manifest.input
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (1, spec.height, spec.width, 3), dtype=np.uint8) for _ in range(8)]
    for image in images[:3]:
        session.run(None, {spec.name: image})
    times = []
    for i in range(frames):
        tick = time.thread_time()
        session.run(None, {spec.name: images[i % len(images)]})
        times.append((time.thread_time() - tick) * 1000)
    return float(np.median(times)), float(np.min(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--frames", type=int, default=60)
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f}, {args.frames} frames per bundle, ONNX Runtime 1 thread")
    print("| bundle | maps | CPU ms / frame (median) | fastest | 1-core fps bound | 2-core fps bound |")
    print("|---|---|---|---|---|---|")
    for path in args.bundles:
        median, fastest = cpu_ms_per_frame(path, args.frames)
        maps = " ".join(f"{s.name}" for s in load_bundle(path).manifest.scales)
        print(f"| {path.name} | {maps} | {median:.1f} | {fastest:.1f} | {1000 / median:.1f} | {2000 / median:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
