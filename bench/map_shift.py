"""Do a run's maps shift between the images its nulls were fitted on and unseen good images? (issue 20)

Per map: the mean of the maps training fits the null on (validation images; the heads' maps out of sample,
as training/finish.py computes them), the same images in sample (the deployed heads), and the unseen good
test images through the deployed model, with the ratio unseen / out of sample.

    nice .venv/bin/python bench/map_shift.py --run runs/m8/magnetic_tile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_maps import add_run_arguments

from training.data import load_images
from training.finish import backbone_features, evidence_maps
from training.heads import fit_heads
from training.rundir import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, info = load_model(args.run)
    splits = info.splits(args.data)
    height, width = model.config.image_height, model.config.image_width
    val, train = load_images(splits.val, height, width), load_images(splits.train, height, width)
    with torch.no_grad():
        cross = fit_heads(
            model.heads, backbone_features(model, np.concatenate([train, val]), args.batch_size), seed=model.config.seed
        )
    out_of_sample = evidence_maps(model, val, args.batch_size, cross, len(train) + np.arange(len(val)))
    in_sample = evidence_maps(model, val, args.batch_size)
    unseen = evidence_maps(model, load_images([r for r in splits.test if r.label == 0], height, width), args.batch_size)
    print(
        f"\n{args.run}\n\n| map | validation, out of sample | validation, in sample | unseen good (test) | "
        "unseen / out of sample |\n|---|---|---|---|---|"
    )
    for scale, a, b, c in zip(model.scales, out_of_sample, in_sample, unseen, strict=True):
        print(f"| {scale.name} | {a.mean():.3f} | {b.mean():.3f} | {c.mean():.3f} | {c.mean() / a.mean():.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
