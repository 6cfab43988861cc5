"""How the anomaly map fuses the maps of a run: a study on planted defects (choice) and the test split (report).

The anomaly map (pixel AUROC, AUPRO, image score, the overlay a person sees) is a fusion of every map of the
bundle, each divided by its null's mean. The NFA decision does not read it: it tests every map under its own
null. So the fusion can be chosen for localisation alone. This compares fusions on a finished run:

- on the **planted defects** of training's check (defects planted on the validation images, heads that did not
  see the source image): pixel AUROC and AUPRO over the planted images, and the image AUROC of the map's
  maximum, planted against the clean validation images (out-of-sample maps). This is what may choose;
- on the **test split** (the deployed heads), the same three columns, for reporting only.

A run with a detail head (training/heads.py: fused, never tested) adds its map ``D8`` to the candidates: the
candidate "every map but D8" is the same run's fusion without it, and "D8 weighs w" the geometric mean in
which the detail map carries a share w of the log (counted several times).

    nice .venv/bin/python bench/fusion.py --run runs/magnetic_tile [--data SPLIT] [--max-test 200]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_maps import add_run_arguments, fused_map, run_maps_of

from training import metrics

Fusion = tuple[list[int], bool]  # the maps it reads (indices), and whether it is the geometric mean


def fusions(names: list[str]) -> dict[str, Fusion]:
    """The candidates, by the maps they read (names like F8, G16, M32: head kind and stride)."""
    every = list(range(len(names)))
    heads = [k for k, n in enumerate(names) if not n.startswith("F")]
    fine_heads = [k for k in heads if names[k].endswith("16") or names[k].endswith("8")]
    not_32 = [k for k, n in enumerate(names) if not n.endswith("32")]
    out: dict[str, Fusion] = {"mean, every map (today)": (every, False), "geometric mean, every map": (every, True)}
    if heads:
        out["mean, heads"] = (heads, False)
    if fine_heads:
        out["mean, heads at stride <= 16"] = (fine_heads, False)
        out["geometric mean, heads at stride <= 16"] = (fine_heads, True)
    if not_32 and not_32 != every:
        out["mean, maps at stride <= 16"] = (not_32, False)
        out["geometric mean, maps at stride <= 16"] = (not_32, True)
    if "G8" in names:  # a stride-8 Gaussian (e.g. a positional one): what it adds to the map a person sees
        out["geometric mean, every map but G8"] = ([k for k in every if names[k] != "G8"], True)
    if "D8" in names:  # the detail map (read by the anomaly map only): the run's fusion without it
        others = [k for k in every if names[k] != "D8"]
        out["geometric mean, every map but D8"] = (others, True)
        # A weighted geometric mean: D8 counted n times among the K others weighs n / (K + n) of the log.
        for n in (max(1, round(len(others) / 3)), len(others), 3 * len(others)):
            out[f"geometric mean, D8 weighs {n / (len(others) + n):.2f}"] = (others + [names.index("D8")] * n, True)
    for k in every:
        out[f"{names[k]} alone"] = ([k], False)
    return out


def fuse(fusion: Fusion, maps: list[np.ndarray], means: list[float], size: tuple[int, int]) -> np.ndarray:
    """One candidate's anomaly maps, computed by the graph's own fusion over the maps it reads."""
    pick, geometric = fusion
    return fused_map([maps[k] for k in pick], [means[k] for k in pick], size, geometric)


def columns(amaps: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> str:
    """pixel AUROC / AUPRO / image AUROC of the map maximum, over every image (as ``uflow evaluate``)."""
    peaks = amaps.reshape(len(amaps), -1).max(axis=1)
    return (
        f"{metrics.pixel_auroc(amaps, masks):.3f} / {metrics.aupro(amaps, masks):.3f} / "
        f"{metrics.image_auroc(peaks, labels.astype(bool)):.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--no-test", action="store_true", help="planted columns only")
    args = parser.parse_args(argv)
    run = run_maps_of(args, test=not args.no_test)
    # The region maps' null means; the detail map has no null: its mean is the graph's.
    means = [n.mean for n in run.envelope] + run.fusion_means()[len(run.envelope) :]
    names = run.fusion_names
    val_count, planted_count = len(run.val[0]), len(run.planted)
    planted = [np.concatenate([p, v]) for p, v in zip(run.fusion_maps("planted"), run.fusion_maps("val"), strict=True)]
    planted_masks = np.concatenate([np.stack([s.mask for s in run.planted]), np.zeros((val_count, *run.size), bool)])
    planted_labels = np.r_[np.ones(planted_count), np.zeros(val_count)]
    candidates = fusions(names)
    test_cols: dict[str, str] = {}
    if run.test is not None and run.test_masks is not None and run.test_labels is not None:
        test = run.fusion_maps("test")
        test_cols = {
            n: columns(fuse(f, test, means, run.size), run.test_masks, run.test_labels) for n, f in candidates.items()
        }
    print(f"\n{args.run}: maps {' '.join(names)}; {planted_count} planted defects on {val_count} validation images")
    print("\n| fusion | planted: pixel AUROC / AUPRO / image AUROC | test (report only): pixel / AUPRO / image |")
    print("|---|---|---|")
    for label, fusion in candidates.items():
        row = columns(fuse(fusion, planted, means, run.size), planted_masks, planted_labels)
        print(f"| {label} | {row} | {test_cols.get(label, '-')} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
