"""A detail map at stride 4, PaDiM's resolution: a study on a finished run (issue 20, bsdata against PaDiM).

The default's detail map (training/heads.py, the ``detail`` head) is a positional Gaussian on the backbone's
stride-8 features: the anomaly map reads it, no test does. PaDiM, which leads bsdata's localisation columns
(its pits cover a median 11 pixels of the 192x480 input, a sixth of a stride-8 cell), fits its Gaussians at
stride 4 on a hypercolumn of the stride-4, 8 and 16 stages (100 random channels). This bench builds that map
the cheap way the detail head is built (a mean per position, one shrunk covariance of the residuals:
``training.heads.positional_parameters``) and puts it in the run's anomaly map in place of the stride-8
detail map, at several weights:

- fitted on the training images only, so the validation images (clean) and the defects planted on them
  (training's check, seed 0) are out of sample, as the test split is;
- columns: pixel AUROC / AUPRO / image AUROC of the map maximum, on the planted defects against the clean
  validation images (what may choose, as bench/fusion.py) and on the test split (reporting only).

    nice .venv/bin/python bench/detail_stride.py --run runs/bsdata --data ../shared/data/bsdata/split.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fusion import columns
from run_maps import add_run_arguments, fused_map, load_run_maps

from training.backbones import create_backbone
from training.data import load_images
from training.heads import per_position_parameters, positional_parameters, whitened_square_mean
from training.model import to_float_nchw


def hypercolumn(model: Any, extractor: torch.nn.Module, images: np.ndarray, pick: np.ndarray) -> torch.Tensor:
    """N x len(pick) x H/4 x W/4: the stride-8 and 16 stages upsampled to stride 4, concatenated, channels picked."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 16):
            features = extractor(model.normalise(to_float_nchw(images[i : i + 16])))
            size = features[0].shape[-2:]
            up = [
                features[0],
                *(F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features[1:]),
            ]
            out.append(torch.cat(up, dim=1)[:, torch.from_numpy(pick)])
    return torch.cat(out)


def detail_maps(features: torch.Tensor, mean: torch.Tensor, inverse: torch.Tensor) -> np.ndarray:
    """The positional Gaussian's map (mean over channels of the whitened square) of N x C x H x W features."""
    with torch.no_grad():
        return torch.cat(
            [whitened_square_mean(features[i : i + 32], mean, inverse) for i in range(0, len(features), 32)]
        ).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--channels", type=int, default=100, help="random hypercolumn channels kept (PaDiM: 100)")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument(
        "--strides", type=int, nargs="+", default=[4, 8, 16], help="the hypercolumn's stages, finest first"
    )
    parser.add_argument(
        "--per-position", action="store_true", help="one covariance per position (PaDiM), not one shared"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = load_run_maps(args.run, args.data, args.batch_size, planted_seeds=[0])
    assert run.test is not None and run.test_masks is not None and run.test_labels is not None
    model, size = run.model, run.size
    extractor = create_backbone(model.config.backbone, args.strides, input_size=size).eval()
    fit = per_position_parameters if args.per_position else positional_parameters
    tick = time.perf_counter()
    train = load_images(run.splits.train, *size)
    width = sum(f.shape[1] for f in extractor(torch.zeros(1, 3, *size)))
    pick = np.sort(np.random.default_rng(0).choice(width, size=min(args.channels, width), replace=False))
    train_f = hypercolumn(model, extractor, train, pick)
    mean, inverse = fit(train_f)
    del train_f
    fit_s = time.perf_counter() - tick
    images = {
        "val": load_images(run.splits.val, *size),
        "planted": np.stack([s.image for s in run.planted]),
        "test": load_images(run.splits.test, *size),
    }
    d4 = {k: detail_maps(hypercolumn(model, extractor, v, pick), mean, inverse) for k, v in images.items()}
    print(
        f"\n{args.run}: {len(train)} training images fit D{args.strides[0]} ({len(pick)} of {width} hypercolumn channels, "
        f"{'a covariance per position' if args.per_position else 'one shared covariance'}, "
        f"{d4['val'].shape[1]}x{d4['val'].shape[2]}) in {fit_s:.0f} s; {len(run.planted)} planted defects on "
        f"{len(images['val'])} validation images; the run's maps {' '.join(run.fusion_names)}"
    )
    names = run.fusion_names
    means = [n.mean for n in run.envelope] + run.fusion_means()[len(run.envelope) :]
    geometric = model.config.map_fusion == "geometric"
    others = [k for k, n in enumerate(names) if not n.startswith("D")]
    val_count = len(images["val"])
    masks = {
        "planted": np.concatenate([np.stack([s.mask for s in run.planted]), np.zeros((val_count, *size), bool)]),
        "test": run.test_masks,
    }
    labels = {"planted": np.r_[np.ones(len(run.planted)), np.zeros(val_count)], "test": run.test_labels}

    def maps_of(which: str) -> tuple[list[np.ndarray], np.ndarray]:
        if which == "planted":
            run_maps = [
                np.concatenate([p, v]) for p, v in zip(run.fusion_maps("planted"), run.fusion_maps("val"), strict=True)
            ]
            return run_maps, np.concatenate([d4["planted"], d4["val"]])
        return run.fusion_maps("test"), d4["test"]

    d4_mean = float(d4["val"].mean())
    print("\n| anomaly map | planted: pixel AUROC / AUPRO / image AUROC | test (report only): pixel / AUPRO / image |")
    print("|---|---|---|")
    candidates: dict[str, tuple[list[int], float | None]] = {"the run's own": (list(range(len(names))), None)}
    for share in args.shares:
        candidates[f"D4 weighs {share:g} (in place of D8)"] = (others, share)
    candidates["D4 alone"] = ([], 1.0)
    for label, (pick_maps, share) in candidates.items():
        cells = []
        for which in ("planted", "test"):
            run_maps, d4_maps = maps_of(which)
            if share is None:
                amaps = fused_map(run_maps, means, size, geometric, model.fusion_weights())
            else:
                chosen = [run_maps[k] for k in pick_maps] + [d4_maps]
                weights = torch.tensor([(1 - share) / max(len(pick_maps), 1)] * len(pick_maps) + [share])
                amaps = fused_map(chosen, [means[k] for k in pick_maps] + [d4_mean], size, geometric, weights)
            cells.append(columns(amaps, masks[which], labels[which]))
        print(f"| {label} | {cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
