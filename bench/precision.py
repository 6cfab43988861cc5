"""FP32 vs INT8 (Q/DQ) vs FP16 with ONNX Runtime on this CPU: speed and accuracy on a test split.

Usage (the magnetic tile numbers in docs/precision.md):

    nice -n 10 .venv/bin/python bench/precision.py --bundle bundles/mt256 \
        --data /work/shared/data/magnetic_tile/split.json --threads 2 [--sweep] [--json reports/precision.json]

For each variant in the bundle (model.onnx, model.int8.onnx, model.fp16.onnx) and, with ``--sweep``,
for INT8 models made on the fly with other calibration methods and other conv groups kept in FP32
(written to a temporary directory; the bundle is not changed), it measures:

- speed: the same frames through every model in interleaved rounds (so a busy machine slows all
  models alike), median latency per frame -> frames per second, and the speed-up over FP32;
- accuracy on the whole test split at the model size: pixel AUROC, AUPRO@0.3, image AUROC, mIoU of
  the a-contrario mask (log10 NFA < 0, no tuned threshold; an empty mask on a good image scores 1)
  and the best mIoU over thresholds of the anomaly map.

It prints one table (markdown) and can write everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.agreement import cpu_session
from calibration.data import pick_evenly, select_images
from calibration.int8 import Int8Settings, quantize_int8
from edge_agent import nfa
from edge_agent.bundle import Bundle, load_bundle
from training.data import Record, load_image, load_mask, open_dataset
from training.metrics import segmentation_report

log = logging.getLogger("bench.precision")

# (label, settings) of the INT8 sweep: calibration methods with the default groups, then which conv
# groups cost accuracy (kept in FP32 one family at a time) with the default method.
SWEEP_METHODS = ("minmax", "entropy", "percentile")
SWEEP_GROUPS: tuple[tuple[str, ...], ...] = (
    (),
    ("coupling",),
    ("coupling", "subnet", "permutation"),
    ("stem",),
    ("backbone",),
    ("backbone", "coupling"),
)


@dataclass
class Candidate:
    """One model to measure."""

    label: str
    path: Path
    precision: str
    settings: dict[str, object] = field(default_factory=dict)


@dataclass
class Row:
    """One line of the table."""

    label: str
    precision: str
    file: str
    ms_median: float
    ms_p90: float
    fps: float
    speedup: float
    metrics: dict[str, float]
    settings: dict[str, object]


def candidates_in_bundle(bundle: Bundle) -> list[Candidate]:
    """model.onnx and every recorded variant."""
    found = [Candidate("fp32", bundle.onnx_path, "fp32")]
    for variant in bundle.manifest.variants:
        settings = {k: v for k, v in variant.settings.items() if k in ("method", "keep_fp32", "per_channel")}
        found.append(
            Candidate(f"{variant.precision} (bundle)", bundle.root / variant.file, variant.precision, settings)
        )
    return found


def sweep_candidates(bundle: Bundle, data: Path, workdir: Path, images: int) -> list[Candidate]:
    """INT8 models with other methods and other FP32 groups, made in ``workdir``."""
    spec = bundle.manifest.input
    calibration = select_images(data, images, "train")
    configs = [Int8Settings(method=m, images=images) for m in SWEEP_METHODS]
    configs += [Int8Settings(keep_fp32=groups, images=images) for groups in SWEEP_GROUPS]
    configs.append(Int8Settings(per_channel=False, images=images))  # ORT's CPU kernels favour per-tensor
    configs.append(Int8Settings(per_channel=False, keep_fp32=(), images=images))
    seen: set[tuple[str, tuple[str, ...], bool]] = set()
    found = []
    for settings in configs:
        key = (settings.method, settings.keep_fp32, settings.per_channel)
        if key in seen:
            continue
        seen.add(key)
        groups = "+".join(settings.keep_fp32) or "none"
        weights = "" if settings.per_channel else " per-tensor"
        label = f"int8 {settings.method} fp32:{groups}{weights}"
        path = workdir / f"int8-{settings.method}-{groups}{'-pt' if weights else ''}.onnx"
        started = time.monotonic()
        quantize_int8(bundle.onnx_path, path, calibration, spec.height, spec.width, settings, spec.name)
        log.info("quantized %s in %.0f s", label, time.monotonic() - started)
        record = {"method": settings.method, "keep_fp32": list(settings.keep_fp32), "per_channel": settings.per_channel}
        found.append(Candidate(label, path, "int8", record))
    return found


def time_models(
    candidates: list[Candidate], frames: list[np.ndarray], threads: int, rounds: int
) -> dict[str, list[float]]:
    """Milliseconds per frame of each model, measured in interleaved rounds."""
    sessions = {c.label: cpu_session(c.path, threads) for c in candidates}
    name = "image"
    for session in sessions.values():  # warm-up: allocations, thread pools
        for frame in frames[:3]:
            session.run(None, {name: frame[None]})  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for round_index in range(rounds):
        order = list(sessions.items())
        if round_index % 2:
            order.reverse()
        for label, session in order:
            for frame in frames:
                started = time.perf_counter()
                session.run(None, {name: frame[None]})  # type: ignore[attr-defined]
                times[label].append((time.perf_counter() - started) * 1000.0)
    return times


def evaluate(candidate: Candidate, bundle: Bundle, records: list[Record], threads: int) -> dict[str, float]:
    """All DESIGN.md metrics of one model on the test records, at the model size."""
    spec = bundle.manifest.input
    session = cpu_session(candidate.path, threads)
    channels = [s.channels for s in bundle.manifest.scales]
    n = len(records)
    maps = np.empty((n, spec.height, spec.width), dtype=np.float32)
    masks = np.empty((n, spec.height, spec.width), dtype=bool)
    nfa_masks = np.empty((n, spec.height, spec.width), dtype=bool)
    labels = np.array([r.label for r in records], dtype=bool)
    for i, record in enumerate(records):
        image = load_image(record.image, spec.height, spec.width)
        outputs = session.run(None, {spec.name: image[None]})  # type: ignore[attr-defined]
        maps[i] = outputs[0][0]
        masks[i] = load_mask(record.mask, spec.height, spec.width)
        log_nfa = nfa.log_nfa_map([o[0] for o in outputs[1:]], channels, (spec.height, spec.width))
        nfa_masks[i] = log_nfa < bundle.manifest.nfa.log10_epsilon
        if (i + 1) % 100 == 0:
            log.info("%s: %d/%d test images", candidate.label, i + 1, n)
    report = segmentation_report(maps, masks, image_labels=labels, predicted_masks=nfa_masks)
    report["nfa_empty_fraction"] = float((~nfa_masks.reshape(n, -1).any(axis=1)).mean())
    return report


def format_table(rows: list[Row]) -> str:
    """Markdown table, FP32 first; deltas in AUROC points against FP32."""
    base = rows[0].metrics
    header = (
        "| model | ms/frame (median) | fps | speed-up | pixel AUROC | Δ pts | AUPRO@0.3 | image AUROC "
        "| mIoU NFA<0 | best mIoU |"
    )
    lines = [header, "|" + "---|" * 10]
    for row in rows:
        m = row.metrics
        delta = 100.0 * (m["pixel_auroc"] - base["pixel_auroc"])
        lines.append(
            f"| {row.label} | {row.ms_median:.1f} | {row.fps:.1f} | {row.speedup:.2f}x | {m['pixel_auroc']:.4f} "
            f"| {delta:+.2f} | {m['aupro']:.4f} | {m.get('image_auroc', float('nan')):.4f} | {m['miou']:.4f} "
            f"| {m['best_miou']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="dataset with a test split (split.json, MVTec dir)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--timing-frames", type=int, default=10, help="distinct test frames per timing round")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on this many test images (evenly picked)")
    parser.add_argument("--sweep", action="store_true", help="also INT8 models with other methods and FP32 groups")
    parser.add_argument("--sweep-images", type=int, default=64, help="calibration images for the sweep models")
    parser.add_argument("--only", nargs="*", default=None, help="measure only these labels (prefix match)")
    parser.add_argument("--json", type=Path, default=None, help="write rows and settings here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    bundle = load_bundle(args.bundle)
    records = list(open_dataset(args.data).test)
    if args.limit:
        records = pick_evenly(records, args.limit)  # type: ignore[arg-type]
    spec = bundle.manifest.input
    with tempfile.TemporaryDirectory(prefix="precision-sweep-") as tmp:
        candidates = candidates_in_bundle(bundle)
        if args.sweep:
            candidates += sweep_candidates(bundle, args.data, Path(tmp), args.sweep_images)
        if args.only:
            candidates = [c for c in candidates if c.label == "fp32" or any(c.label.startswith(o) for o in args.only)]
        frames = [load_image(r.image, spec.height, spec.width) for r in pick_evenly(records, args.timing_frames)]  # type: ignore[arg-type]
        log.info("timing %d models x %d frames x %d rounds", len(candidates), len(frames), args.rounds)
        times = time_models(candidates, frames, args.threads, args.rounds)
        rows = []
        base_ms = float(np.median(times[candidates[0].label]))
        for candidate in candidates:
            log.info("evaluating %s on %d test images", candidate.label, len(records))
            metrics = evaluate(candidate, bundle, records, args.threads)
            ms = float(np.median(times[candidate.label]))
            rows.append(
                Row(
                    candidate.label,
                    candidate.precision,
                    candidate.path.name,
                    ms,
                    float(np.percentile(times[candidate.label], 90)),
                    1000.0 / ms,
                    base_ms / ms,
                    metrics,
                    candidate.settings,
                )
            )
    print(
        f"\n{bundle.manifest.name} {bundle.manifest.version}: {len(records)} test images, "
        f"{args.threads} ONNX Runtime thread(s), {os.cpu_count()} CPUs\n"
    )
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
