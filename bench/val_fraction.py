"""How many of a folder's good images should calibrate the NFA: the validation fraction, end to end.

A user with a folder of good images (issue 20's held-out product: 210 of them) gets ``uflow train
--data FOLDER``: a share of the folder is held out, never trains the flow, and calibrates the null and
the evidence factor (docs/nfa.md, "The false-alarm promise"). A larger share gives the calibration more
images (the checkable epsilon 3 / n falls, the recorded bound tightens) and the flow fewer. This bench
measures both sides on a data set with a large test split: for each seed it draws a folder of
``--folder-size`` good images from the split's train + val lists, holds out each ``--fractions`` share of
it at random, runs ``uflow train`` (no other flag), ``uflow export`` and ``uflow evaluate --bundle``
(ONNX Runtime, the device's engine) on the split's whole test lists, and prints one row per run and one
pooled row per fraction (good test images flagged, summed over the seeds, with its exact 95 % interval).

Every run is cached under ``--out`` (delete a run's folder to redo it):

    nice .venv/bin/python bench/val_fraction.py --data ../shared/data/magnetic_tile/split.json \\
        --out /tmp/vf --folder-size 210 --fractions 0.1 0.2 0.3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edge_agent.promise import binomial_interval  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One run: a seed's folder at one validation fraction, through the bundle."""

    seed: int
    fraction: float
    train_images: int
    calibration_images: int
    evidence_factor: float
    recorded_bound: float
    planted_found: float
    pixel_auroc: float
    aupro: float
    image_auroc: float
    image_auroc_nfa: float
    defective_flagged: int
    defective: int
    good_flagged: int
    good: int
    train_seconds: float


def draw_split(source: Path, folder_size: int, fraction: float, seed: int, out: Path) -> Path:
    """A split.json whose train + val are a ``folder_size`` draw of the source's good images, ``fraction`` held out.

    The folder is the same for every fraction of a seed; the held-out share is a random one of it (as the
    folder layout's hash split is), and the test lists are the source's, as absolute stems.
    """
    split = json.loads(source.read_text(encoding="utf-8"))
    root = source.parent
    good = list(split["train"]) + list(split["val"])
    if folder_size > len(good):
        raise SystemExit(f"{source} has {len(good)} good train + val images, fewer than --folder-size {folder_size}")
    folder = random.Random(seed).sample(good, folder_size)
    order = folder[:]
    random.Random(1000 + seed).shuffle(order)
    held = round(folder_size * fraction)

    def absolute(stems: list[str]) -> list[str]:
        return [str(root / s) for s in stems]

    data = {
        "train": absolute(sorted(order[held:])),
        "val": absolute(sorted(order[:held])),
        "test_good": absolute(split["test_good"]),
        "test_defect": {k: absolute(v) for k, v in split["test_defect"].items()},
        "note": f"{source}: a {folder_size}-image folder drawn with seed {seed}, validation fraction {fraction}",
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "split.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def uflow(*args: str, log: Path) -> None:
    """One ``uflow`` command in a child process, its output into ``log``; a failure stops the bench."""
    with log.open("w", encoding="utf-8") as handle:
        done = subprocess.run([sys.executable, "-m", "training.cli", *args], stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"uflow {args[0]} failed (exit {done.returncode}); see {log}")


def run_one(source: Path, out: Path, folder_size: int, fraction: float, seed: int) -> Row:
    """Train, export and evaluate one draw (each step skipped when its result is cached)."""
    where = out / f"s{seed}_f{fraction:g}"
    split = draw_split(source, folder_size, fraction, seed, where)
    run, bundle, report = where / "run", where / "bundle", where / "report"
    timing = where / "train_seconds.txt"
    if not (run / "val_scores.json").is_file():
        start = time.monotonic()
        uflow("train", "--data", str(split), "--out", str(run), "--quiet", log=where / "train.log")
        timing.write_text(f"{time.monotonic() - start:.1f}\n", encoding="utf-8")
    if not (bundle / "model.json").is_file():
        uflow("export", "--run", str(run), "--out", str(bundle), "--version", "1.0.0", log=where / "export.log")
    if not (report / "metrics.json").is_file():
        uflow("evaluate", "--bundle", str(bundle), "--data", str(split), "--out", str(report), log=where / "eval.log")
    manifest = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
    metrics = json.loads((report / "metrics.json").read_text(encoding="utf-8"))["overall"]
    calibration = manifest["nfa"]["calibration"]
    images = int(metrics["images"])
    defective = int(metrics["defect_images"])
    return Row(
        seed=seed,
        fraction=fraction,
        train_images=len(json.loads(split.read_text(encoding="utf-8"))["train"]),
        calibration_images=int(calibration["images"]),
        evidence_factor=float(calibration["evidence_scale"]),
        recorded_bound=float(calibration["false_regions_per_image_upper95"]),
        planted_found=float(manifest["validation_metrics"].get("planted_detection_rate", float("nan"))),
        pixel_auroc=float(metrics["pixel_auroc"]),
        aupro=float(metrics["aupro"]),
        image_auroc=float(metrics["image_auroc"]),
        image_auroc_nfa=float(metrics["image_auroc_nfa"]),
        defective_flagged=int(metrics["nfa_flagged_defect"]),
        defective=defective,
        good_flagged=int(metrics["nfa_flagged_good"]),
        good=images - defective,
        train_seconds=float(timing.read_text(encoding="utf-8")) if timing.is_file() else float("nan"),
    )


def share(count: int, total: int) -> str:
    low, high = binomial_interval(count, total)
    return f"{count}/{total} = {count / total:.1%} [{low:.1%}, {high:.1%}]"


def print_table(rows: list[Row]) -> None:
    print(
        "| seed | fraction | train / calibration images | factor | recorded bound | planted found | pixel AUROC "
        "| AUPRO | image AUROC (map / NFA) | defective flagged | good flagged [95 %] | train s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r.fraction, r.seed)):
        print(
            f"| {r.seed} | {r.fraction:g} | {r.train_images} / {r.calibration_images} | {r.evidence_factor:g} "
            f"| {r.recorded_bound:.3f} | {r.planted_found:.0%} | {r.pixel_auroc:.3f} | {r.aupro:.3f} "
            f"| {r.image_auroc:.3f} / {r.image_auroc_nfa:.3f} | {r.defective_flagged / r.defective:.1%} "
            f"| {share(r.good_flagged, r.good)} | {r.train_seconds:.0f} |"
        )
    print("\nPooled over the seeds (each seed's folder is the same at every fraction):\n")
    print(
        "| fraction | runs | mean factor | mean pixel AUROC / AUPRO / image AUROC | defective flagged | good flagged [95 %] |"
    )
    print("|---|---|---|---|---|---|")
    for fraction in sorted({r.fraction for r in rows}):
        group = [r for r in rows if r.fraction == fraction]
        n = len(group)
        print(
            f"| {fraction:g} | {n} | {sum(r.evidence_factor for r in group) / n:.2f} "
            f"| {sum(r.pixel_auroc for r in group) / n:.3f} / {sum(r.aupro for r in group) / n:.3f} / "
            f"{sum(r.image_auroc for r in group) / n:.3f} "
            f"| {sum(r.defective_flagged for r in group) / sum(r.defective for r in group):.1%} "
            f"| {share(sum(r.good_flagged for r in group), sum(r.good for r in group))} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="a split.json with train, val and test lists")
    parser.add_argument("--out", required=True, type=Path, help="cache folder: one sub-folder per run")
    parser.add_argument("--folder-size", type=int, default=210)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        for fraction in args.fractions:
            rows.append(run_one(args.data.resolve(), args.out, args.folder_size, fraction, seed))
            print(f"done: seed {seed}, fraction {fraction:g}", file=sys.stderr, flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
