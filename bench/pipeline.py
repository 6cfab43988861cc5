"""Agent throughput and latency on the CPU: engine only vs the full agent, same bundle and frames.

    nice -n 10 .venv/bin/python bench/pipeline.py [--bundle BUNDLE_DIR] [--frames 300] [--threads 0] [--repeat 3]
        [--engine-only]

Rows (each repeated ``--repeat`` times, with the load average, to show the noise of a shared machine):
- ``engine only``: ``Engine.infer`` on preloaded model-size RGB frames, back to back (the ceiling).
- ``engine + NFA, one thread``: infer then score in one loop: what a naive agent does.
- ``agent, folder, spool``: the real agent (``Agent.serve``): PNG folder source (decode, every frame),
  resize, infer, NFA, JSON message, QoS 1 publish to a real mosquitto, SQLite spool; fps from the first
  to the last published frame; capture-to-publish latency percentiles.
- ``agent, folder, no spool``: the same with the in-memory outbox (what the spool costs).
- ``agent, live x0.5`` / ``live x2``: a camera-like source delivering frames at half / twice the engine's
  rate (latest-frame policy: frames the pipeline cannot take are replaced and counted as dropped).
  At half rate the latency is the pipeline's own; at twice the rate it shows that latency stays bounded.

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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from edge_agent.bundle import Bundle
    from edge_agent.config import AgentSettings
    from edge_agent.engines import Engine
    from edge_agent.inspection.pipeline import FrameJob
    from edge_agent.inspection.scoring import FrameScorer
    from edge_agent.publish.outbox import Outbox
    from edge_agent.service.agent import Agent

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "bundles" / "bench-256"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help=f"model bundle (default {DEFAULT_BUNDLE})")
    parser.add_argument("--frames", type=int, default=300, help="frames per measurement")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    parser.add_argument("--repeat", type=int, default=3, help="repeat every measurement this many times")
    parser.add_argument(
        "--engine-only", action="store_true", help="only the engine and engine + NFA rows (no agent, no broker)"
    )
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
    subprocess.run(
        [
            *nice,
            *uflow,
            "train",
            "--data",
            str(work / "data"),
            "--out",
            str(work / "run"),
            "--image-size",
            "256",
            "--epochs",
            str(epochs),
            "--threads",
            "2",
            "--quiet",
        ],
        check=True,
    )
    subprocess.run([*nice, *uflow, "export", "--run", str(work / "run"), "--out", str(DEFAULT_BUNDLE)], check=True)
    return DEFAULT_BUNDLE


def make_frames(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` conveyor frames (good parts and a few defects) as PNG files at ``size`` x ``size``."""
    from edge_agent.demo.conveyor import Conveyor, ConveyorSpec

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


class PacedCamera:
    """A camera-like raw source: preloaded BGR frames delivered at a fixed rate, forever (kind "camera")."""

    kind = "camera"
    description = "paced camera (benchmark)"

    def __init__(self, frames: list[np.ndarray], fps: float) -> None:
        self.frames = frames
        self.interval = 1.0 / fps
        self._next = 0.0
        self._index = 0

    def open(self) -> None:
        self._next = time.monotonic()

    def grab(self) -> np.ndarray:
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next = max(self._next + self.interval, time.monotonic() - self.interval)
        self._index += 1
        return self.frames[self._index % len(self.frames)]

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class AgentRun:
    frames: int  # published
    seconds: float  # first to last publish
    latencies_ms: list[float]
    dropped: int

    @property
    def fps(self) -> float:
        return (self.frames - 1) / self.seconds if self.seconds > 0 else 0.0


def run_agent_once(
    settings: AgentSettings,
    outbox_factory: Callable[[AgentSettings], Outbox] | None,
    raw: Callable[[], object] | None = None,
    duration_s: float | None = None,
    on_agent: Callable[[Agent], None] | None = None,
) -> AgentRun:
    """The real Agent on the settings' source (or ``raw``), until the folder ends or ``duration_s`` passed."""
    from edge_agent.inspection.frame_source import FrameSource
    from edge_agent.inspection.loaded_model import load_model
    from edge_agent.service.agent import Agent

    stamps: list[float] = []
    latencies: list[float] = []

    def record(job: FrameJob) -> None:
        stamps.append(time.perf_counter())
        assert job.message is not None
        latencies.append(job.message.latency_ms.total)

    model = load_model(settings.model.bundle, settings.model, settings.nfa)  # type: ignore[arg-type]
    source = FrameSource(settings.source, raw=raw() if raw else None, raw_factory=raw)  # type: ignore[arg-type]
    source.open()
    outbox = outbox_factory(settings) if outbox_factory else None
    agent = Agent(settings, model, source, on_result=record, outbox=outbox)
    if on_agent is not None:
        on_agent(agent)
    stop = threading.Event()
    if duration_s is not None:
        timer = threading.Timer(duration_s, stop.set)
        timer.daemon = True
        timer.start()
    code = agent.serve(stop)
    if code != 0:
        raise SystemExit(f"the agent failed with exit {code}")
    return AgentRun(len(stamps), stamps[-1] - stamps[0], latencies, agent.pipeline.frames_dropped)


def prepared_bundle(bundle: Path | None, train_epochs: int) -> tuple[Path, Bundle]:
    """Quiet logs, the repo's Numba cache, the bundle to measure (trained if missing) and the NFA JIT warmed."""
    logging.basicConfig(level="WARNING")
    os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba-cache"))
    from edge_agent.bundle import load_bundle
    from edge_agent.inspection import nfa

    bundle_dir = ensure_bundle(bundle, train_epochs)
    loaded = load_bundle(bundle_dir)
    nfa.warm_up()
    return bundle_dir, loaded


def main() -> int:
    args = parse_args()
    bundle_dir, bundle = prepared_bundle(args.bundle, args.train_epochs)
    from edge_agent.config import ModelConfig, load_settings
    from edge_agent.demo.local_broker import LocalMosquitto
    from edge_agent.engines import create_engine
    from edge_agent.inspection.preprocess import model_input
    from edge_agent.inspection.scoring import FrameScorer

    spec = bundle.manifest.input
    engine = create_engine(bundle, ModelConfig(backend="onnxruntime", threads=args.threads))
    scorer = FrameScorer(bundle.manifest)
    rows: list[tuple[str, int, float, float, float, float, float, int]] = []
    with tempfile.TemporaryDirectory(prefix="bench-frames-") as tmp:
        frames_dir = Path(tmp) / "frames"
        frames_dir.mkdir()
        paths = make_frames(frames_dir, args.frames, spec.width)
        bgr = [cv2.imread(str(p)) for p in paths]
        images = [model_input(b, spec.height, spec.width) for b in bgr]
        for image in images[:5]:  # warm-up: ORT allocations, NFA JIT at these shapes
            scorer.score(engine.infer(image), (spec.width, spec.height))
        with LocalMosquitto(Path(tmp) / "broker") as broker:
            for repeat in range(args.repeat):
                load = os.getloadavg()[0]
                engine_s = bench_engine(engine, images)
                engine_fps = len(images) / engine_s
                rows.append(("engine only", len(images), engine_fps, load, 0, 0, 0, repeat))
                sequential_s = bench_sequential(engine, scorer, images)
                rows.append(
                    ("engine + NFA, one thread", len(images), len(images) / sequential_s, load, 0, 0, 0, repeat)
                )
                if args.engine_only:
                    continue

                def settings_for(name: str, source: dict[str, object], repeat: int = repeat) -> AgentSettings:
                    return load_settings(
                        None,
                        device_id="bench",
                        state_dir=str(Path(tmp) / f"state-{name}-{repeat}"),
                        model={"bundle": str(bundle_dir), "backend": "onnxruntime", "threads": args.threads},
                        source=source,
                        mqtt={"port": broker.port},
                        http={"enabled": False},
                    )

                folder = {"uri": str(frames_dir)}
                for name, factory in (("agent, folder, spool", None), ("agent, folder, no spool", _memory)):
                    run = run_agent_once(settings_for(name.replace(" ", "").replace(",", "-"), folder), factory)
                    p50, p99 = np.percentile(run.latencies_ms, [50, 99])
                    rows.append((name, run.frames, run.fps, os.getloadavg()[0], p50, p99, run.dropped, repeat))
                for factor in (0.5, 2.0):
                    live_fps = factor * engine_fps
                    duration = max(5.0, args.frames / min(live_fps, engine_fps))
                    run = run_agent_once(
                        settings_for(f"live{factor}", {"uri": "0"}),
                        None,
                        raw=lambda live_fps=live_fps: PacedCamera(bgr, live_fps),
                        duration_s=duration,
                    )
                    p50, p99 = np.percentile(run.latencies_ms, [50, 99])
                    rows.append(
                        (
                            f"agent, live x{factor:g} ({live_fps:.0f} fps)",
                            run.frames,
                            run.fps,
                            os.getloadavg()[0],
                            p50,
                            p99,
                            run.dropped,
                            repeat,
                        )
                    )
        engine.close()
    _print(bundle_dir, bundle, args, rows)
    return 0


def _memory(settings: AgentSettings) -> Outbox:
    from edge_agent.publish.outbox import MemoryOutbox

    return MemoryOutbox(settings.spool.max_messages)


def _print(bundle_dir: Path, bundle, args: argparse.Namespace, rows: list) -> None:  # type: ignore[no-untyped-def]
    spec = bundle.manifest.input
    print(
        f"\nbundle {bundle_dir} ({bundle.manifest.name} {bundle.manifest.version}, {bundle.manifest.backbone}, "
        f"{spec.width}x{spec.height}, scales {[(s.height, s.width) for s in bundle.manifest.scales]})"
    )
    print(f"CPU cores {os.cpu_count()}, ONNX Runtime threads {args.threads or 'all'}, {args.frames} frames per row")
    header = f"| {'run':>3} | {'mode':<30} | {'frames':>6} | {'fps':>7} | {'% of engine':>11} | {'p50 ms':>7} | {'p99 ms':>7} | {'dropped':>7} | {'load':>5} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    engine_fps: dict[int, float] = {}
    for name, frames, fps, load, p50, p99, dropped, repeat in rows:
        if name == "engine only":
            engine_fps[repeat] = fps
        share = 100 * fps / engine_fps[repeat]
        lat = f"{p50:7.1f} | {p99:7.1f}" if p50 else f"{'':>7} | {'':>7}"
        print(
            f"| {repeat + 1:>3} | {name:<30} | {frames:>6} | {fps:>7.1f} | {share:>10.1f}% | {lat} | {dropped:>7} | {load:>5.1f} |"
        )
    print("\nlatency: capture-to-publish (frame in memory -> message handed to the MQTT client), ms")


if __name__ == "__main__":
    sys.exit(main())
