"""FP32 vs INT8 (Q/DQ) vs FP16 with ONNX Runtime on this CPU: speed and accuracy on a test split.

Usage (the magnetic tile numbers in docs/precision.md):

    nice -n 10 .venv/bin/python bench/precision.py --bundle bundles/mt256 \
        --data /work/shared/data/magnetic_tile/split.json --threads 2 [--sweep] \
        [--cpu-formats u8s8-qdq u8s8-qoperator] [--sensitivity] [--json reports/precision.json]

For each variant in the bundle (model.onnx, model.int8.onnx, model.fp16.onnx) and, with ``--sweep``,
for INT8 models made on the fly with other calibration methods and other conv groups kept in FP32
(written to a temporary directory; the bundle is not changed), it measures the models below.
``--cpu-formats`` adds CPU-only INT8 forms (uint8 activations, QOperator; TensorRT still gets the
bundle's symmetric S8S8 Q/DQ model) with the backbone kept FP32 and fully quantized.
``--sensitivity`` adds one S8S8 Q/DQ model per conv group with only that group quantized (backbone by
output stride, the flow's subnet/coupling/permutation convs per scale), to find the layers that cost
accuracy and what quantizing each one buys in speed. For every model it measures:

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
from calibration.int8 import FORMATS, TENSORRT_FORMAT, Int8Settings, conv_groups, preprocess_model, quantize_int8
from edge_agent.bundle import Bundle, load_bundle
from edge_agent.inspection.scoring import log_nfa_map_of, scale_nulls
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


def cpu_format_candidates(
    bundle: Bundle, data: Path, workdir: Path, images: int, formats: list[str]
) -> list[Candidate]:
    """CPU-only INT8 forms, backbone FP32 and fully quantized, per-channel and per-tensor weights."""
    configs = [
        Int8Settings(format=fmt, keep_fp32=keep, per_channel=per_channel, images=images)
        for fmt in formats
        for keep in (("backbone",), ())
        for per_channel in (True, False)
    ]
    return [_quantized(bundle, data, workdir, settings, _label(settings)) for settings in configs]


def _label(settings: Int8Settings, groups: str | None = None) -> str:
    groups = groups or f"fp32:{'+'.join(settings.keep_fp32) or 'none'}"
    weights = "" if settings.per_channel else " per-tensor"
    return f"int8 {settings.format} {settings.method} {groups}{weights}"


def _quantized(bundle: Bundle, data: Path, workdir: Path, settings: Int8Settings, label: str) -> Candidate:
    spec = bundle.manifest.input
    path = workdir / (label.replace(" ", "_").replace(":", "-").replace("/", "_") + ".onnx")
    started = time.monotonic()
    calibration = select_images(data, settings.images, "train")
    quantize_int8(bundle.onnx_path, path, calibration, spec.height, spec.width, settings, spec.name)
    log.info("quantized %s in %.0f s", label, time.monotonic() - started)
    record = {
        "method": settings.method,
        "keep_fp32": list(settings.keep_fp32),
        "per_channel": settings.per_channel,
        "format": settings.format,
        "quantized_convs": None if not settings.exclude_nodes else "only the named group",
    }
    return Candidate(label, path, "int8", record)


def sensitivity_groups(model_path: Path, input_height: int) -> dict[str, tuple[str, ...]]:
    """Conv node names per group: stem, backbone by output stride, flow roles per scale stride."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="precision-groups-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        preprocess_model(model_path, prepared)  # the same node names quantize_int8 sees
        model = onnx.load(str(prepared))
    heights = {
        v.name: v.type.tensor_type.shape.dim[2].dim_value
        for v in model.graph.value_info
        if len(v.type.tensor_type.shape.dim) == 4
    }
    roles = conv_groups(model).groups
    stem = set(roles["stem"])
    found: dict[str, list[str]] = {"stem": sorted(stem)}
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name in stem:
            continue
        height = heights.get(node.output[0])
        stride = f"1/{input_height // height}" if height else "?"
        role = next((r for r in ("coupling", "subnet", "permutation", "backbone") if node.name in roles[r]), "?")
        found.setdefault(f"{role} {stride}", []).append(node.name)
    return {label: tuple(nodes) for label, nodes in found.items()}


def sensitivity_candidates(bundle: Bundle, data: Path, workdir: Path, images: int) -> list[Candidate]:
    """One S8S8 Q/DQ model per group with only that group's convs quantized."""
    groups = sensitivity_groups(bundle.onnx_path, bundle.manifest.input.height)
    every = {node for nodes in groups.values() for node in nodes}
    found = []
    for name, nodes in groups.items():
        settings = Int8Settings(keep_fp32=(), exclude_nodes=tuple(sorted(every - set(nodes))), images=images)
        candidate = _quantized(bundle, data, workdir, settings, _label(settings, f"only {name} ({len(nodes)} convs)"))
        candidate.settings["quantized_convs"] = list(nodes)
        found.append(candidate)
    return found


def kept_set_candidates(
    bundle: Bundle, data: Path, workdir: Path, images: int, kept_sets: list[str], formats: list[str]
) -> list[Candidate]:
    """Everything INT8 except the named sensitivity groups (comma-separated), in each format."""
    groups = sensitivity_groups(bundle.onnx_path, bundle.manifest.input.height)
    found = []
    for kept in kept_sets:
        names = [name.strip() for name in kept.split(",") if name.strip()]
        unknown = [name for name in names if name not in groups]
        if unknown:
            raise SystemExit(f"--keep-fp32-set: unknown group(s) {unknown}; groups are {sorted(groups)}")
        excluded = tuple(sorted({node for name in names for node in groups[name]}))
        for fmt in dict.fromkeys([TENSORRT_FORMAT, *formats]):
            settings = Int8Settings(format=fmt, keep_fp32=(), exclude_nodes=excluded, images=images)
            candidate = _quantized(bundle, data, workdir, settings, _label(settings, f"fp32:{'+'.join(names)}"))
            candidate.settings["keep_fp32"] = names
            candidate.settings["quantized_convs"] = None
            found.append(candidate)
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
    """All the metrics of docs/design.md section 6 for one model on the test records, at the model size."""
    spec = bundle.manifest.input
    session = cpu_session(candidate.path, threads)
    channels = [s.channels for s in bundle.manifest.scales]
    heads = [s.head for s in bundle.manifest.scales]
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
        log_nfa = log_nfa_map_of(
            [o[0] for o in outputs[1:]], channels, heads, (spec.height, spec.width), scale_nulls(bundle.manifest)
        )
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
    parser.add_argument(
        "--cpu-formats",
        nargs="*",
        default=[],
        choices=[f for f in FORMATS if f != TENSORRT_FORMAT] + [TENSORRT_FORMAT],
        help="also CPU-only INT8 forms (not what TensorRT gets), backbone FP32 and fully quantized",
    )
    parser.add_argument("--sensitivity", action="store_true", help="also one model per conv group, only it INT8")
    parser.add_argument(
        "--keep-fp32-set",
        action="append",
        default=[],
        help="also models with everything INT8 but these sensitivity groups, comma-separated "
        "(e.g. 'stem,backbone 1/2'), in S8S8 Q/DQ and each --cpu-formats form; repeatable",
    )
    parser.add_argument("--skip-bundle-variants", action="store_true", help="measure FP32 and the added models only")
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
        if args.skip_bundle_variants:
            candidates = candidates[:1]
        if args.sweep:
            candidates += sweep_candidates(bundle, args.data, Path(tmp), args.sweep_images)
        if args.cpu_formats:
            candidates += cpu_format_candidates(bundle, args.data, Path(tmp), args.sweep_images, args.cpu_formats)
        if args.sensitivity:
            candidates += sensitivity_candidates(bundle, args.data, Path(tmp), args.sweep_images)
        if args.keep_fp32_set:
            candidates += kept_set_candidates(
                bundle, args.data, Path(tmp), args.sweep_images, args.keep_fp32_set, args.cpu_formats
            )
        if args.only:
            candidates = [c for c in candidates if c.label == "fp32" or any(c.label.startswith(o) for o in args.only)]
        frames = [load_image(r.image, spec.height, spec.width) for r in pick_evenly(records, args.timing_frames)]  # type: ignore[arg-type]
        log.info(
            "timing %d models x %d frames x %d rounds, load average %.2f",
            len(candidates),
            len(frames),
            args.rounds,
            os.getloadavg()[0],
        )
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
        f"{args.threads} ONNX Runtime thread(s), {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end\n"
    )
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
