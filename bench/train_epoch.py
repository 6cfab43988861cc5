"""Seconds per training epoch with and without cached backbone features; prints a table.

    nice -n 10 .venv/bin/python bench/train_epoch.py --data /work/shared/data/magnetic_tile --image-size 256

The backbone is frozen and nothing is augmented, so ``training.train`` extracts features once and
trains the norms + flow on the cache. This measures both ways on the same images and model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from training.data import load_images, open_dataset
from training.model import UFlow, UFlowConfig
from training.train import FeatureBatches, train_epoch


def _measure(model: UFlow, images: np.ndarray, cache: bool, batch_size: int, epochs: int) -> tuple[float, float]:
    tick = time.perf_counter()
    batches = FeatureBatches(model, images, cache, batch_size, progress=False, label="bench")
    setup = time.perf_counter() - tick
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    times = []
    for epoch in range(epochs):
        tick = time.perf_counter()
        train_epoch(model, batches, optimiser, batch_size, generator, epoch)
        times.append(time.perf_counter() - tick)
    return setup, float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--strides", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=200, help="training images to use (first N)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per mode (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    size = args.image_size
    records = open_dataset(args.data).train[: args.images]
    images = load_images(records, size, size)
    model = UFlow(UFlowConfig(image_height=size, image_width=size, strides=tuple(args.strides)))
    rows = [
        ("cached features", *_measure(model, images, True, args.batch_size, args.epochs)),
        ("backbone every step", *_measure(model, images, False, args.batch_size, args.epochs)),
    ]
    print(
        f"{len(images)} images {size}x{size}, strides {args.strides}, batch {args.batch_size}, "
        f"{args.threads} threads, median of {args.epochs} epochs"
    )
    print(f"{'mode':<22}{'setup s':>10}{'epoch s':>10}{'ms/image':>10}")
    for name, setup, epoch in rows:
        print(f"{name:<22}{setup:>10.1f}{epoch:>10.1f}{1000 * epoch / len(images):>10.1f}")
    print(f"speed-up per epoch: {rows[1][2] / rows[0][2]:.1f}x")


if __name__ == "__main__":
    main()
