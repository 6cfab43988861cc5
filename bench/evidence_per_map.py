"""One evidence factor for every map, or one per map: a study on a finished run (issue 20).

Training chooses ONE evidence factor by cross-fitting (training/nfa_null.py ``calibrate``): every map's
null is scaled by it, so the map whose null fits worst decides how softly all the others speak. This
compares, on a run's own maps (exactly as training/finish.py computes them: the flow's validation maps,
the heads' out-of-sample maps):

- ``one factor``: today's calibration;
- ``per map``: each map first calibrated alone by the same rule (its own factor F_k), then the joint
  factor chosen by the same rule on the nulls weighted by F_k (``calibrate(weights=...)``).

For each: the factor(s), the planted check (training's label-free criterion: defects planted on the
validation images, heads that did not see them), and on the test split (reporting only) defective and
good images flagged and the NFA evidence's image AUROC.

    nice .venv/bin/python bench/evidence_per_map.py --run runs/magnetic_tile [--data SPLIT]
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

from edge_agent.inspection.scoring import log_nfa_map_of
from training import metrics
from training.data import load_images, open_dataset
from training.finish import DEFAULT_LOG10_EPSILON, backbone_features, evidence_maps, fit_nulls, planted_maps
from training.heads import fit_heads
from training.nfa_null import calibrate
from training.rundir import load_model


def decide(maps: list[np.ndarray], channels: list[int], heads: list[str], size: tuple[int, int], nulls) -> np.ndarray:
    """Per image: the lowest log10 NFA (as the agent computes it)."""
    return np.array(
        [float(log_nfa_map_of([m[i] for m in maps], channels, heads, size, nulls).min()) for i in range(len(maps[0]))]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--data", help="the run's data (default: what its config.json records)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, info = load_model(args.run)
    splits = open_dataset(
        args.data or str(info.data_summary["root"]), float(info.train_config.get("val_fraction", 0.1))
    )
    height, width = model.config.image_height, model.config.image_width
    size = (height, width)
    val, train = load_images(splits.val, height, width), load_images(splits.train, height, width)
    good = np.concatenate([train, val])
    with torch.no_grad():
        cross = fit_heads(model.heads, backbone_features(model, good, args.batch_size), seed=model.config.seed)
    every = evidence_maps(model, good, args.batch_size, cross, np.arange(len(good)))
    head_maps = every[len(model.flow_scales) :]
    owners = len(train) + np.arange(len(val))
    maps = evidence_maps(model, val, args.batch_size, cross, owners)
    channels = [s.channels for s in model.scales]
    heads = [s.head for s in model.scales]
    names = [s.name for s in model.scales]
    envelope = fit_nulls(model, maps, head_maps)
    eps = DEFAULT_LOG10_EPSILON

    one = calibrate(maps, channels, size, eps, envelope=envelope)
    alone = [calibrate([maps[k]], [channels[k]], size, eps, envelope=(envelope[k],)).factor for k in range(len(maps))]
    joint = calibrate(maps, channels, size, eps, envelope=envelope, weights=alone)
    variants = {"one factor": one.nulls, "per map": joint.nulls}
    print(f"\n{args.run}: {len(val)} calibration images, maps {' '.join(names)}")
    print(f"one factor: {one.factor:g}; alone: {dict(zip(names, alone, strict=True))}; joint factor {joint.factor:g}")

    # The very defects and maps of training's planted check (heads that did not see the source image).
    samples, planted = planted_maps(model, val, args.batch_size, cross=cross, first_owner=len(train))

    test_images = load_images(splits.test, height, width)
    labels = np.array([r.label for r in splits.test], dtype=bool)
    test = evidence_maps(model, test_images, args.batch_size)  # the deployed heads (fitted on every good image)

    print(
        "\n| variant | factors (map: dof multiplier) | planted found | val good flagged | test defective flagged | "
        "test good flagged | image AUROC (NFA evidence) |\n|---|---|---|---|---|---|---|"
    )
    for label, nulls in variants.items():
        found = np.mean(
            [
                bool(((log_nfa_map_of([m[i] for m in planted], channels, heads, size, nulls) < eps) & s.mask).any())
                for i, s in enumerate(samples)
            ]
        )
        val_flag = (decide(maps, channels, heads, size, nulls) < eps).mean()
        scores = decide(test, channels, heads, size, nulls)
        flagged = scores < eps
        factors = " ".join(f"{n}:{b.dof / e.dof:.2f}" for n, b, e in zip(names, nulls, envelope, strict=True))
        print(
            f"| {label} | {factors} | {found:.1%} | {val_flag:.1%} | {flagged[labels].mean():.1%} | "
            f"{flagged[~labels].mean():.1%} | {metrics.image_auroc(-scores, labels):.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
