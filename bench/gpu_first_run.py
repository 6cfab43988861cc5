"""The first run on a real GPU: build FP32, FP16 and INT8 TensorRT plans from a real bundle and check them.

    .venv/bin/python bench/gpu_first_run.py [--bundle BUNDLE_DIR] [--frames 200] [--budget-s 420]

Needs TensorRT >= 10 and cuda-python or pycuda on a machine with an NVIDIA GPU (docs/tensorrt.md); on a
machine without one it stops at once with exit 3 (not installed) or 4 (no GPU reachable), saying which.
Runs in under 8 minutes (``--budget-s``, default 7 min, is checked between steps; what is skipped says so).

Steps, in a scratch copy of the bundle (the bundle itself is never modified):

1. FP16 and INT8 variants: the bundle's own when it has them, else made here with ``uflow calibrate``
   on synthetic good images (and ``--data`` if given).
2. The TensorRT graph check on each model (the same as ``build-engine`` runs), then a plan per precision
   through ``ensure_plan`` (the agent's recipe, cache, timing cache); build time per plan.
3. Frames: good images, synthetic defects, and large-z frames (saturated blocks and noise, the frames
   where z² in FP16 would overflow: the table prints the largest m_s ONNX Runtime sees, m_s > 65504
   means |z| > 256 somewhere).
4. Per precision, TensorRT against ONNX Runtime on the same frames: anomaly map max |diff| against the
   same ONNX file and against FP32, NaN/inf count, NFA mask IoU (the agent's FrameScorer on both
   outputs; 1.0 when both masks are empty), image decision agreement.
5. Speed: engine-only fps (``infer`` back to back) and agent fps (bench/pipeline.py's real agent on a
   folder source with a local mosquitto when the ``mosquitto`` binary exists, else infer + NFA in one
   thread, labelled as such).

Without ``--bundle``: bundles/bench-256 (bench/pipeline.py trains one there when missing; that needs
the `train` extra and takes minutes more than the budget).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

PRECISIONS = ("fp32", "fp16", "int8")
FP16_MAX = 65504.0


@dataclass
class Row:
    precision: str
    recipe: str = "-"
    build_s: float = float("nan")
    max_diff_same: float = float("nan")
    max_diff_fp32: float = float("nan")
    nonfinite: int = 0
    mask_iou_min: float = float("nan")
    decisions_agree: str = "-"
    engine_fps: float = float("nan")
    agent_fps: float = float("nan")
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default bundles/bench-256)")
    parser.add_argument("--data", type=Path, default=None, help="good images for making missing FP16/INT8 variants")
    parser.add_argument("--frames", type=int, default=200, help="frames per speed measurement")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new steps after this")
    parser.add_argument("--workspace-mb", type=int, default=1024)
    parser.add_argument("--train-epochs", type=int, default=20, help="only when no bundle exists")
    return parser.parse_args(argv)


def gpu_or_exit() -> tuple[object, object]:
    """TensorRT and an opened CUDA device, or a clear message and exit 3/4 (build-engine's statuses)."""
    from edge_agent.cli.build_engine import EXIT_NO_GPU, EXIT_UNAVAILABLE
    from edge_agent.engines import EngineUnavailable, GpuUnreachable
    from edge_agent.engines.tensorrt.cuda_buffers import open_cuda
    from edge_agent.engines.tensorrt.runtime import import_tensorrt

    try:
        trt = import_tensorrt()
        cuda = open_cuda(str(trt.__version__))
    except GpuUnreachable as exc:
        print(f"gpu_first_run: no GPU reachable: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_NO_GPU) from exc
    except EngineUnavailable as exc:
        print(f"gpu_first_run: cannot run TensorRT here: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_UNAVAILABLE) from exc
    return trt, cuda


def with_variants(source: Path, work: Path, data: Path | None) -> tuple[Path, dict[str, str]]:
    """A scratch copy of the bundle with model.fp16.onnx and model.int8.onnx (made here when missing), and why
    a variant was refused (``uflow calibrate`` refuses one that does not decide as FP32 on good images)."""
    from calibration.fp16 import Fp16Error, Fp16Settings
    from calibration.fp16 import calibrate_bundle as calibrate_fp16
    from calibration.int8 import Int8Settings, QuantizationError
    from calibration.int8 import calibrate_bundle as calibrate_int8
    from edge_agent.bundle import load_bundle
    from training.synthetic import good_image

    root = Path(shutil.copytree(source, work / "bundle"))
    manifest = load_bundle(root).manifest
    good = data
    if good is None:
        good = work / "good"
        good.mkdir()
        for seed in range(24):
            image = good_image(1000 + seed, manifest.input.height, manifest.input.width)
            cv2.imwrite(str(good / f"good_{seed:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    refused: dict[str, str] = {}
    if manifest.variant("int8") is None:
        print("making model.int8.onnx (uflow calibrate int8) ...", flush=True)
        try:
            calibrate_int8(root, good, Int8Settings(images=16))
        except QuantizationError as exc:  # a result of this run: the table says why
            refused["int8"] = str(exc)
    if manifest.variant("fp16") is None:
        print("making model.fp16.onnx (uflow calibrate fp16) ...", flush=True)
        try:
            calibrate_fp16(root, good, Fp16Settings(images=4))
        except Fp16Error as exc:
            refused["fp16"] = str(exc)
    return root, refused


def test_frames(height: int, width: int) -> tuple[list[np.ndarray], list[str]]:
    """Good, defective and large-z frames (uint8 RGB at the model size) and their labels."""
    from training.synthetic import DEFECT_KINDS, defect_image, good_image

    frames, labels = [], []
    for seed in range(4):
        frames.append(good_image(seed, height, width))
        labels.append("good")
    for seed, kind in enumerate(DEFECT_KINDS * 2):
        frames.append(defect_image(100 + seed, height, width, kind=kind).image)
        labels.append(kind)
    rng = np.random.default_rng(7)
    base = good_image(9, height, width)
    for value in (0, 255):
        block = base.copy()
        block[height // 4 : height // 2, width // 4 : width // 2] = value
        frames.append(block)
        labels.append(f"block {value}")
    frames.append(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    labels.append("noise")
    return frames, labels


def nfa_mask(scorer: object, output: object, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    verdict = scorer.score(output, size)  # type: ignore[attr-defined]
    return verdict.log_nfa <= verdict.log10_epsilon, verdict.anomalous


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def agent_fps(
    bundle_root: Path, precision: str, engines: Path, frames: list[np.ndarray], count: int
) -> tuple[float, str]:
    """The real agent's fps on a folder of frames (local mosquitto), else infer + NFA in one thread."""
    from pipeline import bench_sequential, run_agent_once

    from edge_agent.bundle import load_bundle
    from edge_agent.config import ModelConfig, load_settings
    from edge_agent.engines import create_engine
    from edge_agent.inspection.scoring import FrameScorer

    model = {
        "bundle": str(bundle_root),
        "backend": "tensorrt",
        "precision": precision,
        "engine_cache_dir": str(engines),
    }
    if shutil.which("mosquitto") is None:
        bundle = load_bundle(bundle_root)
        engine = create_engine(bundle, ModelConfig(**model))
        try:
            images = [frames[i % len(frames)] for i in range(count)]
            seconds = bench_sequential(engine, FrameScorer(bundle.manifest), images)
        finally:
            engine.close()
        return count / seconds, "infer+NFA (no mosquitto)"
    from edge_agent.demo.local_broker import LocalMosquitto

    with tempfile.TemporaryDirectory(prefix="gpu-first-agent-") as tmp:
        folder = Path(tmp) / "frames"
        folder.mkdir()
        for i in range(count):
            cv2.imwrite(str(folder / f"{i:05d}.png"), cv2.cvtColor(frames[i % len(frames)], cv2.COLOR_RGB2BGR))
        with LocalMosquitto(Path(tmp) / "broker") as broker:
            settings = load_settings(
                None,
                device_id="gpu-first-run",
                state_dir=str(Path(tmp) / "state"),
                model=model,
                source={"uri": str(folder)},
                mqtt={"port": broker.port},
                http={"enabled": False},
            )
            run = run_agent_once(settings, None)
    return run.fps, "agent"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    trt, cuda = gpu_or_exit()
    from pipeline import bench_engine, prepared_bundle

    from edge_agent.bundle import load_bundle
    from edge_agent.config import ModelConfig
    from edge_agent.engines.onnxruntime import OnnxRuntimeEngine
    from edge_agent.engines.tensorrt.build import ensure_plan
    from edge_agent.engines.tensorrt.cache import EngineCache
    from edge_agent.engines.tensorrt.runtime import TensorRTEngine
    from edge_agent.inspection.scoring import FrameScorer

    print(f"TensorRT {trt.__version__}, {cuda.name}, {cuda.identity.describe()}", flush=True)  # type: ignore[attr-defined]
    source, _ = prepared_bundle(args.bundle, args.train_epochs)
    work = Path(tempfile.mkdtemp(prefix="gpu-first-run-"))
    root, refused = with_variants(source, work, args.data)
    made = [p for p in PRECISIONS if p not in refused]
    bundle = load_bundle(root)
    spec = bundle.manifest.input
    size = (spec.width, spec.height)
    frames, labels = test_frames(spec.height, spec.width)
    scorer = FrameScorer(bundle.manifest)
    reference = {p: OnnxRuntimeEngine(bundle, precision=p) for p in made}
    ort = {p: [reference[p].infer(f) for f in frames] for p in made}
    largest_m = max(float(m.max()) for out in ort["fp32"] for m in out.scale_maps)
    engines = work / "engines"
    rows = []
    for precision in PRECISIONS:
        row = Row(precision)
        rows.append(row)
        if precision in refused:
            row.note = f"refused by uflow calibrate: {refused[precision][:160]}"
            continue
        if time.monotonic() - started > args.budget_s:
            row.note = "skipped: time budget"
            continue
        try:
            with cuda.current():  # type: ignore[attr-defined]
                result = ensure_plan(
                    trt,
                    bundle,
                    precision,
                    cuda.identity,
                    EngineCache(engines),  # type: ignore[attr-defined]
                    workspace_mb=args.workspace_mb,
                    force=True,
                )
        except Exception as exc:  # report every failure in the table and go on with the next precision
            row.note = f"build failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        row.recipe, row.build_s = result.key.recipe, result.seconds
        config = ModelConfig(backend="tensorrt", precision=precision, engine_cache_dir=engines)
        engine = TensorRTEngine(bundle, config)
        try:
            outs = [engine.infer(f) for f in frames]
            row.nonfinite = sum(int((~np.isfinite(o.anomaly_map)).sum()) for o in outs)
            row.max_diff_same = max(
                float(np.abs(o.anomaly_map - r.anomaly_map).max()) for o, r in zip(outs, ort[precision], strict=True)
            )
            row.max_diff_fp32 = max(
                float(np.abs(o.anomaly_map - r.anomaly_map).max()) for o, r in zip(outs, ort["fp32"], strict=True)
            )
            ious, agree = [], 0
            for o, r in zip(outs, ort[precision], strict=True):
                mine, decided = nfa_mask(scorer, o, size)
                theirs, expected = nfa_mask(scorer, r, size)
                ious.append(iou(mine, theirs))
                agree += decided == expected
            row.mask_iou_min = min(ious)
            row.decisions_agree = f"{agree}/{len(frames)}"
            for image in frames[:5]:
                engine.infer(image)  # warm-up
            timed = [frames[i % len(frames)] for i in range(args.frames)]
            row.engine_fps = len(timed) / bench_engine(engine, timed)
        except Exception as exc:  # keep the table: a failing precision is a result of this run
            row.note = f"run failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        finally:
            engine.close()
        if time.monotonic() - started > args.budget_s:
            row.note = "agent fps skipped: time budget"
            continue
        try:
            row.agent_fps, how = agent_fps(root, precision, engines, frames, args.frames)
            row.note = how
        except Exception as exc:  # the engine rows stand even if the agent run fails
            row.note = f"agent failed: {type(exc).__name__}: {str(exc)[:120]}"
    cuda.release()  # type: ignore[attr-defined]
    print_table(rows, bundle, labels, largest_m, time.monotonic() - started)
    _work_note(work)
    return 0 if all(r.nonfinite == 0 and r.recipe != "-" for r in rows) else 1


def print_table(rows: list[Row], bundle: object, labels: list[str], largest_m: float, seconds: float) -> None:
    manifest = bundle.manifest  # type: ignore[attr-defined]
    print(
        f"\nbundle {manifest.name} {manifest.version} ({manifest.backbone}, {manifest.input.width}x{manifest.input.height}); "
        f"{len(labels)} frames: {', '.join(sorted(set(labels)))}"
    )
    print(
        f"largest m_s under ONNX Runtime FP32: {largest_m:.1f} ({'|z| > 256 reached' if largest_m > FP16_MAX else 'below the FP16 overflow'})"
    )
    header = (
        "precision",
        "recipe",
        "build s",
        "max|d| same",
        "max|d| fp32",
        "non-finite",
        "NFA IoU min",
        "decisions",
        "engine fps",
        "agent fps",
        "note",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = (
            r.precision,
            r.recipe,
            f"{r.build_s:.1f}",
            f"{r.max_diff_same:.2e}",
            f"{r.max_diff_fp32:.2e}",
            str(r.nonfinite),
            f"{r.mask_iou_min:.3f}",
            r.decisions_agree,
            f"{r.engine_fps:.1f}",
            f"{r.agent_fps:.1f}",
            r.note,
        )
        print("| " + " | ".join(cells) + " |")
    print(f"\ntotal {seconds:.0f} s")


def _work_note(work: Path) -> None:
    print(f"scratch bundle, plans and timing cache kept in {work} (delete when done)")


if __name__ == "__main__":
    sys.exit(main())
