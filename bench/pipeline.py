"""What users get from the agent on the CPU, against the best the engine can do, over ONNX Runtime thread settings.

    nice -n 10 .venv/bin/python bench/pipeline.py [--bundle BUNDLE_DIR] [--frames 300] [--repeat 5]

Thread settings (``--engine-threads``, ``--agent-threads``): ``auto`` is the agent's default (``model.threads
= 0``, ``model.spinning = auto``: edge_agent/engines/threads.py); ``N`` / ``N:on`` / ``N:off`` set the intra-op
threads and spinning; ``ort`` is ONNX Runtime's own default (a thread per core, spinning), the agent's
default before issue 25.

Rows, every repeat, in alternating order (reversed on odd repeats: this machine is shared and its speed
drifts, so the table shows medians over repeats and every row's spread):
- ``engine only`` for each engine setting: ``Engine.infer`` on preloaded model-size frames (the ceiling).
- ``engine + NFA, sequential`` for each engine setting: infer then score in one loop.
  Every agent row is shown against the best of each over the settings ("% best engine", "% best seq").
- ``agent, <source>`` for each agent setting: the real agent (``Agent.serve``: capture, resize, infer, NFA,
  JSON message, QoS 1 publish to a real mosquitto, SQLite spool), default features (drift on: the bundle
  carries a reference):
  - ``folder``: a PNG folder (decode, every frame);
  - ``camera x2`` / ``camera x0.5``: a Python camera-like source paced at twice / half the best engine-only
    rate (latest frame wins, the others are counted as dropped);
  - ``stream x2``: a real network camera: ffmpeg serving MJPEG over HTTP at twice the best engine rate,
    read by the agent's stream source (OpenCV/FFmpeg, JPEG decode in the capture thread).
- ``camera x2, drift off`` / ``, parts tracked`` / ``, drift+keep+parts`` (``auto`` only): what the features
  cost against the default row (drift on): parts tracked, and keeping flagged frames and 1 % of good ones.

fps runs from the first to the last published frame; latency is capture-to-publish (frame in memory ->
message handed to the MQTT client); CPU ms per frame per stage is the kernel's per-thread accounting
(bench/stage_cpu.py; ``pool`` is ONNX Runtime's intra-op threads, ``other`` the MQTT, spool, drift and
keep threads and the agent's supervisor).

Without ``--bundle`` a 256x256 bundle is looked for in bundles/bench-256; if missing, one is trained on
synthetic good images with the `uflow` CLI (niced; a few minutes) and exported there.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_cpu import GROUPS, MjpegStream, StageCpu, write_mjpeg_video

if TYPE_CHECKING:
    from edge_agent.bundle import Bundle
    from edge_agent.config import AgentSettings
    from edge_agent.engines import Engine
    from edge_agent.engines.threads import Spinning
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
    parser.add_argument("--repeat", type=int, default=5, help="repeat every measurement this many times")
    parser.add_argument(
        "--engine-threads", nargs="+", default=None, help="settings of the engine-only and sequential rows"
    )
    parser.add_argument("--agent-threads", nargs="+", default=["auto", "ort", "1"], help="settings of the agent rows")
    parser.add_argument(
        "--sources",
        nargs="+",
        default=["folder", "camera2", "camera0.5", "stream2"],
        choices=["folder", "camera2", "camera0.5", "stream2"],
    )
    parser.add_argument("--no-features", action="store_true", help="skip the drift off / drift+keep+parts rows")
    parser.add_argument("--raw", action="store_true", help="also print every single measurement")
    parser.add_argument("--train-epochs", type=int, default=30, help="epochs when a bundle has to be trained")
    return parser.parse_args()


@dataclass(frozen=True)
class Threads:
    """One ONNX Runtime thread setting: the ``model.threads`` and ``model.spinning`` it sets."""

    label: str
    threads: int
    spinning: Spinning
    pin: bool = False  # agent rows: the inference thread on the first core, every other thread on the rest

    @property
    def model(self) -> dict[str, object]:
        return {"threads": self.threads, "spinning": self.spinning}


def parse_threads(text: str, cores: int) -> Threads:
    """``auto``, ``ort`` (a thread per core, spinning), ``N``, ``N:on``, ``N:off``, or ``1:pin``."""
    if text == "1:pin":
        return Threads("1 pinned", 1, "auto", pin=True)
    if text == "auto":
        return Threads("auto", 0, "auto")
    if text == "ort":
        return Threads(f"ort ({cores} spin)", cores, "on")
    count, _, spin = text.partition(":")
    if not count.isdigit() or int(count) < 1 or spin not in ("", "on", "off"):
        raise SystemExit(f"bad thread setting {text!r}: auto, ort, N, N:on or N:off")
    label = count + {"": "", "on": " spin", "off": " no spin"}[spin]
    return Threads(label, int(count), "on" if spin == "on" else "off" if spin == "off" else "auto")


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
    cpu_s: dict[str, float] = field(default_factory=dict)  # by stage (bench/stage_cpu.py)

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
        latencies.append(job.message.latency_ms.total)

    source = FrameSource(settings.source, raw=raw() if raw else None, raw_factory=raw)  # type: ignore[arg-type]
    # As `edge-agent run` does: the engine's threads are chosen for this source (live or not).
    model = load_model(settings.model.bundle, settings.model, settings.nfa, live=source.live)  # type: ignore[arg-type]
    _open_with_retries(source)
    outbox = outbox_factory(settings) if outbox_factory else None
    agent = Agent(settings, model, source, on_result=record, outbox=outbox)
    if on_agent is not None:
        on_agent(agent)
    stop = threading.Event()
    if duration_s is not None:
        timer = threading.Timer(duration_s, stop.set)
        timer.daemon = True
        timer.start()
    cpu = StageCpu().start()
    code = agent.serve(stop)
    cpu_s = cpu.stop()
    if code != 0:
        raise SystemExit(f"the agent failed with exit {code}")
    return AgentRun(len(stamps), stamps[-1] - stamps[0], latencies, agent.pipeline.frames_dropped, cpu_s)


def _open_with_retries(source: Any, within_s: float = 15.0) -> None:
    """Open the source; a live one that is not up yet (ffmpeg starting its server) is retried."""
    from edge_agent.inspection.drivers import SourceError

    deadline = time.monotonic() + within_s
    while True:
        try:
            source.open()
            return
        except SourceError:
            if not source.live or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


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


@dataclass
class Row:
    """One measurement."""

    mode: str
    setting: str
    repeat: int
    frames: int
    fps: float
    load: float
    p50: float | None = None
    p99: float | None = None
    dropped: int = 0
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per published frame, by stage


FEATURES: dict[str, dict[str, Any]] = {
    "": {},  # the defaults: drift on (the bundle carries a reference)
    ", drift off": {"drift": {"enabled": False}},
    ", parts tracked": {"parts": {"mode": "tracked"}},
    ", drift+keep+parts": {"keep": {"flagged": True, "good_rate": 0.01}, "parts": {"mode": "tracked"}},
}


def main() -> int:
    args = parse_args()
    bundle_dir, bundle = prepared_bundle(args.bundle, args.train_epochs)
    from edge_agent.config import ModelConfig, load_settings
    from edge_agent.demo.local_broker import LocalMosquitto, free_port
    from edge_agent.engines import create_engine
    from edge_agent.engines.threads import available_cores
    from edge_agent.inspection.preprocess import model_input
    from edge_agent.inspection.scoring import FrameScorer

    cores = available_cores()
    engine_settings = [parse_threads(t, cores) for t in (args.engine_threads or ["1", f"{cores}:on", f"{cores}:off"])]
    agent_settings = [parse_threads(t, cores) for t in args.agent_threads]
    spec = bundle.manifest.input
    scorer = FrameScorer(bundle.manifest)
    rows: list[Row] = []
    uptime_before = _uptime()
    with tempfile.TemporaryDirectory(prefix="bench-frames-") as tmp:
        frames_dir = Path(tmp) / "frames"
        frames_dir.mkdir()
        paths = make_frames(frames_dir, args.frames, spec.width)
        bgr: list[np.ndarray] = [cv2.imread(str(p)) for p in paths]  # type: ignore[misc]
        images = [model_input(b, spec.height, spec.width) for b in bgr]
        engines = {
            t: create_engine(bundle, ModelConfig(backend="onnxruntime", threads=t.threads, spinning=t.spinning))
            for t in engine_settings
        }
        for engine in engines.values():  # warm-up: ORT allocations, NFA JIT at these shapes
            for image in images[:5]:
                scorer.score(engine.infer(image), (spec.width, spec.height))
        # The live sources' rates are fixed once, from the best engine-only rate: every row sees the same.
        reference_fps = max(len(images) / bench_engine(e, images) for e in engines.values())
        print(f"best engine-only rate {reference_fps:.1f} fps: live sources at 2x and 0.5x of it", flush=True)
        video = (
            write_mjpeg_video(Path(tmp) / "camera.avi", bgr, 2 * reference_fps) if "stream2" in args.sources else None
        )
        cases = _agent_cases(args, agent_settings)
        with LocalMosquitto(Path(tmp) / "broker") as broker:
            for repeat in range(args.repeat):
                forward = repeat % 2 == 0
                for setting in engine_settings if forward else engine_settings[::-1]:
                    engine = engines[setting]
                    load = os.getloadavg()[0]
                    rows.append(
                        Row(
                            "engine only",
                            setting.label,
                            repeat,
                            len(images),
                            len(images) / bench_engine(engine, images),
                            load,
                        )
                    )
                    seconds = bench_sequential(engine, scorer, images)
                    rows.append(
                        Row("engine + NFA, sequential", setting.label, repeat, len(images), len(images) / seconds, load)
                    )
                for setting, source, suffix in cases if forward else cases[::-1]:
                    name = f"{source}{suffix}"
                    settings = load_settings(
                        None,
                        device_id="bench",
                        state_dir=str(Path(tmp) / f"state-{len(rows)}"),
                        model={"bundle": str(bundle_dir), "backend": "onnxruntime", **setting.model},
                        mqtt={"port": broker.port},
                        http={"enabled": False},
                        **_source_settings(source, frames_dir),
                        **FEATURES[suffix],
                    )
                    print(f"repeat {repeat + 1}: agent, {name}, threads {setting.label} ...", flush=True)
                    with _live_source(source, bgr, reference_fps, video, free_port()) as (raw, uri):
                        if uri is not None:
                            settings.source.uri = uri
                        duration = (
                            None
                            if source == "folder"
                            else max(5.0, args.frames / min(_rate(source), 1.0) / reference_fps)
                        )
                        hook = _pin_stages if setting.pin else None
                        all_cores = os.sched_getaffinity(0)
                        run = run_agent_once(settings, None, raw=raw, duration_s=duration, on_agent=hook)
                        os.sched_setaffinity(0, all_cores)  # the pinned run narrowed this (main) thread too
                    p50, p99 = np.percentile(run.latencies_ms, [50, 99])
                    cpu = {k: 1000 * v / max(1, run.frames) for k, v in run.cpu_s.items()}
                    rows.append(
                        Row(
                            f"agent, {name}",
                            setting.label,
                            repeat,
                            run.frames,
                            run.fps,
                            os.getloadavg()[0],
                            float(p50),
                            float(p99),
                            run.dropped,
                            cpu,
                        )
                    )
        for engine in engines.values():
            engine.close()
    _print(bundle_dir, bundle, args, rows, cores, reference_fps, uptime_before, _uptime())
    return 0


def _pin_stages(agent: Agent) -> None:
    """Once the stage threads run: inference on the first core, every other thread of the process on the rest.

    Measures whether the engine and the other stages are better off on their own cores (with one intra-op
    thread, ONNX Runtime computes in the inference thread itself).
    """
    cores = sorted(os.sched_getaffinity(0))
    engine_core, rest = {cores[0]}, set(cores[1:]) or {cores[0]}

    def pin() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stages = {t.name: t for t in threading.enumerate() if t.name.startswith("stage-")}
            if len(stages) == 4 and all(t.native_id for t in stages.values()):
                break
            time.sleep(0.01)
        for thread in threading.enumerate():
            if thread.native_id is not None and thread is not threading.current_thread():
                with contextlib.suppress(OSError):  # a thread that ended meanwhile
                    os.sched_setaffinity(thread.native_id, engine_core if thread.name == "stage-infer" else rest)

    threading.Thread(target=pin, name="bench-pin", daemon=True).start()


def _rate(source: str) -> float:
    """A live source's rate as a multiple of the best engine-only rate (1 for the folder)."""
    for prefix in ("camera", "stream"):
        if source.startswith(prefix):
            return float(source.removeprefix(prefix))
    return 1.0


def _agent_cases(args: argparse.Namespace, agent_settings: list[Threads]) -> list[tuple[Threads, str, str]]:
    """(thread setting, source, features suffix) of every agent row of one repeat."""
    cases = [(t, s, "") for t in agent_settings for s in args.sources]
    if not args.no_features:
        auto = next((t for t in agent_settings if t.label == "auto"), agent_settings[0])
        cases += [(auto, "camera2", suffix) for suffix in FEATURES if suffix]
    return cases


def _source_settings(source: str, frames_dir: Path) -> dict[str, Any]:
    if source == "folder":
        return {"source": {"uri": str(frames_dir)}}
    if source.startswith("camera"):
        return {"source": {"uri": "0"}}  # replaced by the paced camera (kind "camera": live)
    return {"source": {"uri": "http://127.0.0.1:1/cam.mjpg", "kind": "stream"}}  # the URI is set per run


@contextlib.contextmanager
def _live_source(
    source: str, bgr: list[np.ndarray], reference_fps: float, video: Path | None, port: int
) -> Iterator[tuple[Callable[[], object] | None, str | None]]:
    """(raw source factory, stream URI) for one agent run: a paced camera, a fresh ffmpeg server, or neither."""
    if source.startswith("camera"):
        fps = _rate(source) * reference_fps
        yield (lambda: PacedCamera(bgr, fps)), None
    elif source.startswith("stream"):
        assert video is not None
        # No probe: ffmpeg -listen serves one client, and a probe would be it. The agent's open is retried.
        with MjpegStream(video, port) as stream:
            yield None, stream.url
    else:
        yield None, None


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def _print(  # type: ignore[no-untyped-def]
    bundle_dir: Path,
    bundle,
    args: argparse.Namespace,
    rows: list[Row],
    cores: int,
    reference_fps: float,
    before: str,
    after: str,
) -> None:
    spec = bundle.manifest.input
    print(
        f"\nbundle {bundle_dir} ({bundle.manifest.name} {bundle.manifest.version}, {bundle.manifest.backbone}, "
        f"{spec.width}x{spec.height}, scales {[(s.height, s.width) for s in bundle.manifest.scales]})"
    )
    print(
        f"{cores} cores, {args.frames} frames per row, {args.repeat} repeats (alternating order); live rates from {reference_fps:.1f} fps"
    )
    print(f"uptime before: {before}\nuptime after:  {after}")
    if args.raw:
        print(
            "\n| repeat | mode | threads | fps | p50 ms | p99 ms | dropped | load |\n|---|---|---|---|---|---|---|---|"
        )
        for r in rows:
            lat = f"{r.p50:.1f} | {r.p99:.1f}" if r.p50 is not None else " | "
            print(f"| {r.repeat + 1} | {r.mode} | {r.setting} | {r.fps:.1f} | {lat} | {r.dropped} | {r.load:.1f} |")
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.mode, r.setting), []).append(r)
    fps = {key: _median([r.fps for r in rs]) for key, rs in groups.items()}
    best_engine = max(v for (m, _), v in fps.items() if m == "engine only")
    best_seq = max(v for (m, _), v in fps.items() if m.startswith("engine + NFA"))
    print(
        f"\nmedians over repeats; best engine only {best_engine:.1f} fps, best engine + NFA sequential {best_seq:.1f} fps"
    )
    cpu_cols = "/".join(GROUPS)
    print(
        f"\n| mode | threads | fps | min-max | % best engine | % best seq | p50 ms | p99 ms | dropped | CPU ms/frame {cpu_cols} | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (mode, setting), rs in groups.items():
        f = fps[(mode, setting)]
        lat = (
            " | ".join(f"{_median([getattr(r, k) for r in rs]):.1f}" for k in ("p50", "p99"))
            if rs[0].p50 is not None
            else " | "
        )
        cpu = " / ".join(f"{_median([r.cpu_ms.get(g, 0.0) for r in rs]):.1f}" for g in GROUPS) if rs[0].cpu_ms else ""
        loads = [r.load for r in rs]
        print(
            f"| {mode} | {setting} | {f:.1f} | {min(r.fps for r in rs):.1f}-{max(r.fps for r in rs):.1f} | "
            f"{100 * f / best_engine:.0f}% | {100 * f / best_seq:.0f}% | {lat} | {_median([r.dropped for r in rs]):.0f} | {cpu} | "
            f"{min(loads):.1f}-{max(loads):.1f} |"
        )
    _print_goals(rows, fps, best_seq)
    print("\nlatency: capture-to-publish (frame in memory -> message handed to the MQTT client), ms")


def _paired(rows: list[Row], a: tuple[str, str], b: tuple[str, str] | None) -> list[float]:
    """Per repeat, fps of row ``a`` over row ``b`` (or over the best sequential row of that repeat)."""
    ratios = []
    for repeat in sorted({r.repeat for r in rows}):
        here = [r for r in rows if r.repeat == repeat]
        num = [r.fps for r in here if (r.mode, r.setting) == a]
        if b is None:
            den = [max((r.fps for r in here if r.mode.startswith("engine + NFA")), default=0.0)]
        else:
            den = [r.fps for r in here if (r.mode, r.setting) == b]
        if num and den and den[0] > 0:
            ratios.append(num[0] / den[0])
    return ratios


def _print_goals(rows: list[Row], fps: dict[tuple[str, str], float], best_seq: float) -> None:
    keys = {key for key in fps}
    print("\ngoals (auto = the defaults; paired ratios are per repeat, then the median):")
    for source in ("stream2", "camera2"):
        key = (f"agent, {source}", "auto")
        if key in keys:
            ratios = _paired(rows, key, None)
            if not ratios:
                continue
            print(
                f"- {source}: {fps[key]:.1f} fps = {100 * fps[key] / best_seq:.0f}% of the best sequential median "
                f"(paired median {100 * _median(ratios):.0f}%, range {100 * min(ratios):.0f}-{100 * max(ratios):.0f}%); goal >= 95%"
            )
    half = [r for r in rows if (r.mode, r.setting) == ("agent, camera0.5", "auto")]
    engine_auto = fps.get(("engine only", "auto")) or max(v for (m, _), v in fps.items() if m == "engine only")
    if half:
        p99 = _median([r.p99 or 0.0 for r in half])
        print(
            f"- camera0.5 p99 {p99:.1f} ms vs 2 x engine frame time {2000 / engine_auto:.1f} ms (engine {engine_auto:.1f} fps)"
        )
    base = ("agent, camera2, drift off", "auto")
    for other in ("agent, camera2", "agent, camera2, parts tracked", "agent, camera2, drift+keep+parts"):
        ratios = _paired(rows, (other, "auto"), base)
        if ratios:
            cpu = _cpu_total(rows, (other, "auto")) / _cpu_total(rows, base) - 1
            print(
                f"- {other.removeprefix('agent, ')} vs drift off: fps {100 * (_median(ratios) - 1):+.1f}% "
                f"(paired, range {100 * (min(ratios) - 1):+.1f}..{100 * (max(ratios) - 1):+.1f}%), "
                f"CPU per frame {100 * cpu:+.1f}%; goal cost <= 5%"
            )


def _cpu_total(rows: list[Row], key: tuple[str, str]) -> float:
    """Median over repeats of the process's CPU ms per published frame (all stages and threads)."""
    return _median([sum(r.cpu_ms.values()) for r in rows if (r.mode, r.setting) == key])


if __name__ == "__main__":
    sys.exit(main())
