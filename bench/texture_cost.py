"""What the texture head (the image test's score) costs training: its fit and its cross-fit, in seconds.

The head reads the backbone features training already extracted, so its price is the statistics of every
image and one Ledoit-Wolf fit of D = 2 sum C_s dimensions per fold plus the deployed one
(training/heads.py ``fit_heads``, ``out_of_sample_maps``). Random features of a run's shapes stand in for
real ones (the cost does not depend on the values). Its engine price is bench/heads_cost.py's, on two
bundles of the same run with and without it.

    nice .venv/bin/python bench/texture_cost.py --images 700 --size 320x256
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.backbones import create_backbone
from training.catalog import DEFAULT_BACKBONE, DEFAULT_STRIDES
from training.heads import TEXTURE_KEY, TextureHead, fit_heads, out_of_sample_maps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=700, help="good training + validation images")
    parser.add_argument("--size", default="320x256", help="model input WIDTHxHEIGHT")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    backbone = create_backbone(DEFAULT_BACKBONE, DEFAULT_STRIDES, None, input_size=(height, width), random_weights=True)
    generator = torch.Generator().manual_seed(0)
    features = [
        torch.randn(args.images, c, height // s, width // s, generator=generator)
        for c, s in zip(backbone.channels, DEFAULT_STRIDES, strict=True)
    ]
    dims = 2 * sum(backbone.channels)
    times: dict[str, list[float]] = {"fit (deployed head + 5 folds)": [], "out-of-fold scores": []}
    for _ in range(args.repeat):
        heads = torch.nn.ModuleDict({TEXTURE_KEY: TextureHead(dims)})
        started = time.perf_counter()
        with torch.no_grad():
            cross = fit_heads(heads, features)
            fitted = time.perf_counter()
            out_of_sample_maps(heads, cross, features, np.arange(args.images))
        times["fit (deployed head + 5 folds)"].append(fitted - started)
        times["out-of-fold scores"].append(time.perf_counter() - fitted)
    print(f"\n{args.images} images at {width}x{height}, D = {dims} statistics, {args.threads} threads\n")
    print("| step | min s | median s | max s |\n|---|---|---|---|")
    for step, values in times.items():
        print(f"| {step} | {min(values):.2f} | {float(np.median(values)):.2f} | {max(values):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
