"""Agent frames per second on the CPU: engine only vs the full pipeline, same bundle and frames.

    .venv/bin/python bench/agent_fps.py [--bundle BUNDLE_DIR] [--frames 300] [--threads 0]

Rows:
- ``engine only``: ``Engine.infer`` on preloaded model-size RGB frames, back to back (the ceiling).
- ``engine + NFA, one thread``: infer then score (log NFA map, regions) in one loop: what a naive agent does.
- ``pipeline (agent)``: the real agent path, one thread per stage: PNG folder source (decode, every
  frame), resize, infer, NFA, JSON message, QoS 1 publish to a real mosquitto on loopback; measured from
  the first to the last published frame. Plus capture-to-publish latency percentiles.

Without ``--bundle`` a 256x256 bundle is looked for in bundles/bench-256; if missing, one is trained on
synthetic good images with the `uflow` CLI (niced; a few minutes) and exported there.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from edge_agent.engines import Engine
    from edge_agent.pipeline import FrameJob
    from edge_agent.scoring import FrameScorer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "bundles" / "bench-256"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help=f"model bundle (default {DEFAULT_BUNDLE})")
    parser.add_argument("--frames", type=int, default=300, help="frames per measurement")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    parser.add_argument("--train-epochs", type=int, default=30, help="epochs when a bundle has to be trained")
    return parser.parse_args()


def ensure_bundle(path: Path | None, epochs: int) -> Path:
    """The bundle to measure; trains and exports one at 256x256 with the uflow CLI when none exists."""
    if path is not None:
        return path
    if (DEFAULT_BUNDLE / "model.json").is_file():
        return DEFAULT_BUNDLE
    from training.synthetic import write_synthetic_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    print(f"no bundle at {DEFAULT_BUNDLE}: training one on synthetic images in {work} (niced) ...", flush=True)
    write_synthetic_dataset(work / "data", train_good=60, test_good=0, defects_per_kind=0, height=256, width=256)
    uflow = [sys.executable, "-m", "training.cli"]
    nice = ["nice", "-n", "10"]
    subprocess.run([*nice, *uflow, "train", "--data", str(work / "data"), "--out", str(work / "run"),
                    "--image-size", "256", "--epochs", str(epochs), "--threads", "2", "--quiet"], check=True)  # fmt: skip
    subprocess.run([*nice, *uflow, "export", "--run", str(work / "run"), "--out", str(DEFAULT_BUNDLE)], check=True)
    return DEFAULT_BUNDLE


def make_frames(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` conveyor frames (good parts and a few defects) as PNG files at ``size`` x ``size``."""
    from edge_agent.conveyor import Conveyor, ConveyorSpec

    conveyor = Conveyor(ConveyorSpec(width=size, height=size, parts=max(4, count // 30), speed_px=size // 32))
    paths = []
    for index in range(count):
        path = folder / f"{index:05d}.png"
        cv2.imwrite(str(path), conveyor.frame(index % conveyor.frames))
        paths.append(path)
    return paths


def bench_engine(engine: Engine, images: list[np.ndarray]) -> float:
    """Seconds for ``Engine.infer`` over the images."""
    started = time.perf_counter()
    for image in images:
        engine.infer(image)
    return time.perf_counter() - started


def bench_sequential(engine: Engine, scorer: FrameScorer, images: list[np.ndarray]) -> float:
    """Seconds for infer + score (log NFA map, regions) over the images, in one thread."""
    height, width = images[0].shape[:2]
    started = time.perf_counter()
    for image in images:
        scorer.score(engine.infer(image), (width, height))
    return time.perf_counter() - started


def bench_pipeline(bundle_dir: Path, frames_dir: Path, threads: int, state: Path) -> tuple[float, int, list[float]]:
    """Seconds from first to last publish, frames published, and their capture-to-publish latencies."""
    from edge_agent.config import load_settings
    from edge_agent.local_broker import LocalMosquitto
    from edge_agent.run import run_agent

    stamps: list[float] = []
    latencies: list[float] = []

    def record(job: FrameJob) -> None:
        stamps.append(time.perf_counter())
        latencies.append(job.message.latency_ms.total)

    with LocalMosquitto(state / "broker") as broker:
        settings = load_settings(
            None,
            device_id="bench",
            state_dir=str(state),
            model={"bundle": str(bundle_dir), "backend": "onnxruntime", "threads": threads},
            source={"uri": str(frames_dir)},
            mqtt={"port": broker.port},
        )
        code = run_agent(settings, on_result=record)
    if code != 0:
        raise SystemExit(f"the agent failed with exit {code}")
    # The first frame's time is the start of the interval, so n frames give n - 1 intervals.
    return stamps[-1] - stamps[0], len(stamps) - 1, latencies


def main() -> int:
    args = parse_args()
    logging.basicConfig(level="WARNING")
    os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba-cache"))
    from edge_agent import nfa
    from edge_agent.bundle import load_bundle
    from edge_agent.config import ModelConfig
    from edge_agent.engines import create_engine
    from edge_agent.preprocess import model_input
    from edge_agent.scoring import FrameScorer

    bundle_dir = ensure_bundle(args.bundle, args.train_epochs)
    bundle = load_bundle(bundle_dir)
    spec = bundle.manifest.input
    engine = create_engine(bundle, ModelConfig(backend="onnxruntime", threads=args.threads))
    scorer = FrameScorer(bundle.manifest)
    nfa.warm_up()
    with tempfile.TemporaryDirectory(prefix="bench-frames-") as tmp:
        frames_dir = Path(tmp) / "frames"
        frames_dir.mkdir()
        paths = make_frames(frames_dir, args.frames, spec.width)
        images = [model_input(cv2.imread(str(p)), spec.height, spec.width) for p in paths]
        for image in images[:5]:  # warm-up: ORT allocations, NFA JIT at these shapes
            scorer.score(engine.infer(image), (spec.width, spec.height))
        engine_s = bench_engine(engine, images)
        sequential_s = bench_sequential(engine, scorer, images)
        engine.close()
        pipeline_s, pipeline_n, latencies = bench_pipeline(bundle_dir, frames_dir, args.threads, Path(tmp) / "state")

    engine_fps = len(images) / engine_s
    rows = [
        ("engine only", len(images), engine_s, engine_fps),
        ("engine + NFA, one thread", len(images), sequential_s, len(images) / sequential_s),
        ("pipeline (agent, MQTT)", pipeline_n, pipeline_s, pipeline_n / pipeline_s),
    ]
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    print(f"\nbundle {bundle_dir} ({bundle.manifest.name} {bundle.manifest.version}, {bundle.manifest.backbone}, "
          f"{spec.width}x{spec.height}, scales {[(s.height, s.width) for s in bundle.manifest.scales]})")  # fmt: skip
    print(f"CPU cores {os.cpu_count()}, ONNX Runtime threads {args.threads or 'all'}, load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"| {'mode':<26} | {'frames':>6} | {'seconds':>8} | {'fps':>7} | {'% of engine':>11} |")
    print(f"|{'-' * 28}|{'-' * 8}|{'-' * 10}|{'-' * 9}|{'-' * 13}|")
    for name, frames, seconds, fps in rows:
        print(f"| {name:<26} | {frames:>6} | {seconds:>8.2f} | {fps:>7.1f} | {100 * fps / engine_fps:>10.1f}% |")
    print(f"\npipeline capture-to-publish latency ms: p50 {p50:.1f}, p90 {p90:.1f}, p99 {p99:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
