"""Where a detected defect is: the NFA's region, or the part of it where the anomaly map nears its peak.

The NFA decides whether a region is anomalous; the region itself is the level set of the map that won,
and a coarse map's (stride 32) region is a blob much wider than a small defect. This bench keeps, in
each detected region (4-connected), the pixels whose fused anomaly map reaches ``fraction`` of the
region's peak (``edge_agent.inspection.delineation.tighten``; 0 keeps the region as the NFA gives it).
The decision does not change: every region keeps its peak.

Chosen on training's label-free criterion, the defects planted on the validation images (heads that did
not see the source image; ``--seeds`` plants more on the same images): the mean IoU of the mask with the
planted defect. The test split reports: mIoU over every test image (good images count 1 when nothing is
flagged, as ``uflow evaluate`` reports it) and over the defective ones.

    nice .venv/bin/python bench/mask_fraction.py --run runs/magnetic_tile --data ../shared/data/magnetic_tile/split.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_maps import add_run_arguments, load_run_maps

from edge_agent.inspection import nfa
from edge_agent.inspection.delineation import tighten
from training import metrics
from training.finish import DEFAULT_LOG10_EPSILON
from training.mask_choice import FRACTIONS
from training.nfa_null import null_from_dict
from training.rundir import read_run


def masks_at(
    maps: list[np.ndarray],
    amaps: np.ndarray,
    nulls: tuple[nfa.ScaleNull, ...],
    eps: float,
    fractions: tuple[float, ...],
) -> dict[float, np.ndarray]:
    """fraction -> N x H x W decision masks of the images whose region maps are ``maps``."""
    size = amaps.shape[1:]
    detected = np.stack(
        [nfa.log_nfa_map([m[i] for m in maps], [1] * len(maps), size, nulls) < eps for i in range(len(amaps))]
    )
    return {f: np.stack([tighten(d, a, f) for d, a in zip(detected, amaps, strict=True)]) for f in fractions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--seeds", type=int, default=6, help="planted seeds (training's check is seed 0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = load_run_maps(args.run, args.data, args.batch_size, test=True, planted_seeds=range(args.seeds))
    val = read_run(args.run).val_scores
    nulls, eps = null_from_dict(val["nfa_null"]), float(val.get("log10_epsilon", DEFAULT_LOG10_EPSILON))
    planted_amaps = run.anomaly_maps("planted")
    planted_truth = np.stack([s.mask for s in run.planted])
    planted = masks_at(run.planted_maps, planted_amaps, nulls, eps, FRACTIONS)
    assert run.test is not None and run.test_masks is not None and run.test_labels is not None
    test_amaps = run.anomaly_maps("test")
    test = masks_at(run.test, test_amaps, nulls, eps, FRACTIONS)
    labels = run.test_labels
    print(f"\n{args.run}: {len(run.planted)} planted defects, {len(labels)} test images ({labels.sum()} defective)")
    print("| fraction | planted mIoU | test mIoU (every image) | test mIoU (defective) |\n|---|---|---|---|")
    for f in FRACTIONS:
        p = metrics.iou_per_image(planted[f], planted_truth).mean()
        t = metrics.iou_per_image(test[f], run.test_masks)
        print(f"| {f:g} | {p:.3f} | {t.mean():.3f} | {t[labels].mean():.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
