"""Does a shadow model slow the live one? Live fps and latency with ``[model] shadow`` off vs on.

    nice -n 10 .venv/bin/python bench/shadow.py [--bundle BUNDLE_DIR] [--frames 300] [--share 0.1] [--repeat 3]

The real agent (``Agent.serve``, as in bench/pipeline.py) inspects, with a copy of the same bundle as the
shadow candidate (same cost as a real candidate of the same architecture). Rows, alternated within each
repeat so that a change of machine load hits all of them alike:

- ``folder``: every frame of a PNG folder, as fast as the agent goes (the live stages are saturated: the
  shadow only gets frames while no frame waits for inference, which is rare here).
- ``live x0.5``: a camera-like source at half the engine's rate (spare time: the shadow gets its share).
- ``live x2``: a camera at twice the engine's rate (latest frame wins; the live stages are saturated).

"shadow compared" is how many frames the candidate judged; "skipped" how many due frames it did not
take because it was busy or the live pipeline had a backlog. fps is first to last published frame (live rows
run for the same time from their first published frame); the change is against the ``off`` row of the
same source and repeat. The goal (issue 16): within 5 % at a
10 % share on a CPU box. On a shared machine the fps change is mostly load noise, so the table also gives
the shadow's own cost, measured where it runs: the CPU time of its thread, and that as a share of the
whole process's CPU during the run.

Without ``--bundle`` a 256x256 bundle is looked for in bundles/bench-256 (trained if missing, see
bench/pipeline.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from pipeline import DEFAULT_BUNDLE, PacedCamera, make_frames, prepared_bundle, run_agent_once  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help=f"model bundle (default {DEFAULT_BUNDLE})")
    parser.add_argument("--frames", type=int, default=300, help="frames per measurement")
    parser.add_argument("--threads", type=int, default=0, help="live ONNX Runtime threads (0 = all cores)")
    parser.add_argument("--share", type=float, default=0.1, help="model.shadow_share")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sources", nargs="+", default=["folder", "live0.5", "live2"])
    parser.add_argument("--train-epochs", type=int, default=30, help="epochs when a bundle has to be trained")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    bundle_dir, bundle = prepared_bundle(args.bundle, args.train_epochs)
    from edge_agent.config import ModelConfig, load_settings
    from edge_agent.demo.local_broker import LocalMosquitto
    from edge_agent.engines import create_engine
    from edge_agent.inspection.preprocess import model_input

    spec = bundle.manifest.input
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        candidate = Path(tmp) / "candidate"
        shutil.copytree(bundle_dir, candidate)
        frames_dir = Path(tmp) / "frames"
        frames_dir.mkdir()
        paths = make_frames(frames_dir, args.frames, spec.width)
        bgr = [cv2.imread(str(p)) for p in paths]
        engine = create_engine(bundle, ModelConfig(backend="onnxruntime", threads=args.threads))
        images = [model_input(b, spec.height, spec.width) for b in bgr]
        for image in images[:5]:
            engine.infer(image)
        started = time.perf_counter()
        for image in images[:50]:
            engine.infer(image)
        engine_fps = 50 / (time.perf_counter() - started)
        engine.close()
        with LocalMosquitto(Path(tmp) / "broker") as broker:
            for repeat in range(args.repeat):
                for source_name in args.sources:
                    # Alternate the order, so a load that rises during a pair hits "on" and "off" alike.
                    for shadow in (False, True) if repeat % 2 == 0 else (True, False):
                        name = f"{source_name}-{'on' if shadow else 'off'}-{repeat}"
                        model: dict[str, Any] = {"bundle": str(bundle_dir), "backend": "onnxruntime",
                                                 "threads": args.threads}  # fmt: skip
                        if shadow:
                            model |= {"shadow": str(candidate), "shadow_share": args.share}
                        source: dict[str, Any] = {"uri": str(frames_dir)} if source_name == "folder" else {"uri": "0"}
                        settings = load_settings(None, device_id="bench", state_dir=str(Path(tmp) / f"state-{name}"),
                                                 model=model, source=source, mqtt={"port": broker.port},
                                                 http={"enabled": False}, drift={"enabled": False})  # fmt: skip
                        agents: list[Any] = []
                        raw, duration = None, None
                        if source_name != "folder":
                            live_fps = float(source_name.removeprefix("live")) * engine_fps
                            raw = lambda live_fps=live_fps: PacedCamera(bgr, live_fps)  # noqa: E731
                            duration = max(5.0, args.frames / min(live_fps, engine_fps))
                        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
                        hook = agents.append if duration is None else _stop_after(duration, agents)
                        run = run_agent_once(settings, None, raw=raw, on_agent=hook)
                        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
                        process_cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (
                            cpu_before.ru_utime + cpu_before.ru_stime
                        )
                        report = agents[0].loop.parts.shadow.snapshot() if shadow else None
                        p50, p99 = np.percentile(run.latencies_ms, [50, 99])
                        rows.append({"source": source_name, "shadow": shadow, "fps": run.fps, "p50": p50, "p99": p99,
                                     "frames": run.frames, "repeat": repeat, "load": os.getloadavg()[0],
                                     "compared": report.compared if report else 0,
                                "shadow_cpu": report.cpu_s if report else 0.0, "process_cpu": process_cpu,
                                     "skipped": (report.skipped_busy + report.skipped_backlog) if report else 0})  # fmt: skip
    _print(bundle_dir, args, engine_fps, rows)
    return 0


def _stop_after(seconds: float, agents: list[Any]) -> Callable[[Any], None]:
    """An on_agent hook stopping a live run ``seconds`` after its first published frame.

    Timing from the first publish, not from the start: loading the shadow model takes a few seconds
    before the pipeline starts, which must not shorten the live rows that have it (a shorter run weighs
    the slow first frames more and reads as lower fps).
    """

    def hook(agent: Any) -> None:
        agents.append(agent)

        def watch() -> None:
            while agent.pipeline.stats.frames_inspected == 0:
                time.sleep(0.01)
            time.sleep(seconds)
            agent.pipeline.request_stop()

        threading.Thread(target=watch, daemon=True).start()

    return hook


def _print(bundle_dir: Path, args: argparse.Namespace, engine_fps: float, rows: list[dict[str, Any]]) -> None:
    print(f"bundle {bundle_dir}; live threads {args.threads or 'all'}; shadow share {args.share:.0%}; "
          f"engine alone {engine_fps:.1f} fps; {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| source | shadow | repeat | frames | live fps | change | p50 ms | p99 ms | shadow compared | skipped "
          "| shadow CPU s | of process CPU | load |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    baseline = {(r["source"], r["repeat"]): r["fps"] for r in rows if not r["shadow"]}
    for r in rows:
        change = "" if not r["shadow"] else f"{100 * (r['fps'] / baseline[(r['source'], r['repeat'])] - 1):+.1f} %"
        print(f"| {r['source']} | {'on' if r['shadow'] else 'off'} | {r['repeat']} | {r['frames']} | {r['fps']:.1f} | "
              f"{change} | {r['p50']:.1f} | {r['p99']:.1f} | {r['compared']} | {r['skipped']} | "
              f"{r['shadow_cpu']:.2f} | {100 * r['shadow_cpu'] / max(r['process_cpu'], 1e-9):.1f} % | {r['load']:.2f} |")  # fmt: skip
    print("\nmedian change of live fps with the shadow on, per source:")
    for source in dict.fromkeys(r["source"] for r in rows):
        changes = [
            r["fps"] / baseline[(source, r["repeat"])] - 1 for r in rows if r["source"] == source and r["shadow"]
        ]
        print(f"- {source}: {100 * float(np.median(changes)):+.1f} %")


if __name__ == "__main__":
    raise SystemExit(main())
