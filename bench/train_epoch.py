"""Seconds per training epoch: cached vs fresh backbone features, threads, channels_last, batch size.

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python bench/train_epoch.py \\
        --data /work/shared/data/magnetic_tile/split.json --image-size 256 --strides 8 16

The backbone is frozen and nothing is augmented, so ``training.train`` extracts features once and
trains the norms + flow on the cache. This measures each way on the same images and model, and prints
one row per setting (median of ``--epochs`` epochs; the first epoch of each setting is a warm-up).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from training.data import load_images, open_dataset
from training.model import UFlow, UFlowConfig
from training.train import FeatureBatches, TrainConfig, placement, train_epoch


def _measure(
    config: UFlowConfig, images: np.ndarray, cache: bool, batch_size: int, epochs: int, channels_last: bool
) -> tuple[float, float]:
    where = placement(TrainConfig(channels_last=channels_last))
    model = UFlow(config).to(where.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    tick = time.perf_counter()
    batches = FeatureBatches(model, images, cache, 16, progress=False, label="bench", where=where)
    setup = time.perf_counter() - tick
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    times = []
    for epoch in range(epochs + 1):
        tick = time.perf_counter()
        train_epoch(model, batches, optimiser, batch_size, generator, epoch)
        times.append(time.perf_counter() - tick)
    return setup, float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--hypercolumn", action="store_true")
    parser.add_argument("--images", type=int, default=96, help="training images to use (first N)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per setting (median reported)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--skip-uncached", action="store_true", help="leave out the slow backbone-every-step rows")
    args = parser.parse_args()

    size = args.image_size
    records = open_dataset(args.data).train[: args.images]
    images = load_images(records, size, size)
    config = UFlowConfig(image_height=size, image_width=size, strides=tuple(args.strides), hypercolumn=args.hypercolumn)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch_sizes:
            for channels_last in (False, True):
                setup, epoch = _measure(config, images, True, batch, args.epochs, channels_last)
                rows.append(("cached", threads, batch, channels_last, setup, epoch))
        if not args.skip_uncached:
            setup, epoch = _measure(config, images, False, args.batch_sizes[0], args.epochs, False)
            rows.append(("backbone every step", threads, args.batch_sizes[0], False, setup, epoch))
    print(
        f"{len(images)} images {size}x{size}, strides {args.strides}{' hypercolumn' if args.hypercolumn else ''}, "
        f"median of {args.epochs} epochs after one warm-up, device {placement(TrainConfig()).device}"
    )
    print(f"{'features':<22}{'threads':>8}{'batch':>7}{'NHWC':>6}{'setup s':>9}{'epoch s':>9}{'ms/image':>10}")
    for mode, threads, batch, nhwc, setup, epoch in rows:
        print(
            f"{mode:<22}{threads:>8}{batch:>7}{'yes' if nhwc else 'no':>6}{setup:>9.1f}{epoch:>9.2f}"
            f"{1000 * epoch / len(images):>10.1f}"
        )
    for threads in args.threads:
        same = [r for r in rows if r[1] == threads and r[2] == args.batch_sizes[0] and not r[3]]
        if len(same) == 2:
            print(f"speed-up of cached features, {threads} threads: {same[1][5] / same[0][5]:.1f}x per epoch")


if __name__ == "__main__":
    main()
