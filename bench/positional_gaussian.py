"""A Gaussian whose mean depends on the position (PaDiM's idea, one shared covariance): a study on cached features.

The default's Gaussian head (training/heads.py ``GaussianHead``) has one mean and one covariance per
scale, shared by every position: a texture model. On an object (a bottle seen from above, a spindle in
its fixture) a feature that is normal at the rim is abnormal at the centre, which that head cannot say;
PaDiM fits one Gaussian per position. This bench fits the cheap half of that: a mean per position
(C x H x W, one Sub in the graph) and one covariance of the residuals, shrunk as the head's is, so the
head stays one 1x1 convolution: ``training.heads.positional_parameters``, what ``--gaussian-positional``
trains. Maps ``P<stride>``, cross-fitted exactly like the Gaussian's (5 folds of
the good images; a planted defect is scored by the folds that left its source image out), cached beside
bench/heads.py's maps and evaluated by its ``evaluate`` (the deployed decision after the cross-fitted
calibration, planted defects found; test columns for reporting only).

    nice .venv/bin/python bench/positional_gaussian.py --features /tmp/heads20/mvtec_bottle.npz \
        --rows G16+G32+M16+M32 P16+P32+M16+M32 P8+P16+P32+M16+M32
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import heads
import heads_rows

from training.heads import by_fold, fold_of, positional_parameters, whitened_square_mean

SCALE_OF = {"P8": 0, "P16": 1, "P32": 2}
POOL = 3  # the ``Q`` maps: features averaged over 3 x 3 first (the memory bank's aggregation)


def _pooled(f: torch.Tensor, pool: int) -> torch.Tensor:
    return f if pool <= 1 else F.avg_pool2d(f, pool, stride=1, padding=pool // 2, count_include_pad=False)


def positional_maps(data: np.lib.npyio.NpzFile, scale: int, pool: int = 1) -> heads.MapSet:
    """One P map (Q with ``pool`` > 1), fitted and cross-fitted as training fits the Gaussian head."""

    def features(split: str) -> torch.Tensor:
        return _pooled(heads._features(data, split, scale, False), pool)

    good = torch.cat([features("train"), features("val")])
    n_train = len(data[f"train_{scale}"])
    tick = time.perf_counter()
    full = positional_parameters(good)
    fold = fold_of(len(good))
    per_fold = [positional_parameters(good[torch.from_numpy(fold != k)]) for k in range(fold.max() + 1)]
    seconds = time.perf_counter() - tick

    def oos(f: torch.Tensor, owners: np.ndarray) -> np.ndarray:
        return by_fold(f, fold[owners], per_fold, whitened_square_mean).numpy()

    good_maps = oos(good, np.arange(len(good)))
    planted = oos(features("planted"), n_train + data["planted_source"])
    test = whitened_square_mean(features("test"), *full).numpy()
    name = f"{'Q' if pool > 1 else 'P'}{heads.STRIDES[scale]}"
    return heads.MapSet(name, good.shape[1], seconds, good_maps, good_maps[n_train:], planted, test)


def cached(path: Path, data: np.lib.npyio.NpzFile, name: str) -> heads.MapSet:
    """A P map from ``<features>.maps/positional_<scale>.npz``, computed once."""
    if name.replace("Q", "P", 1) in SCALE_OF:
        scale, pool = SCALE_OF[name.replace("Q", "P", 1)], POOL if name.startswith("Q") else 1
        file = path.with_suffix(".maps") / f"positional_{scale}{f'_pool{pool}' if pool > 1 else ''}.npz"
        if file.is_file():
            z = np.load(file)
            return heads.MapSet(name, int(z["channels"]), float(z["fit_seconds"]), *(z[k] for k in heads._MAP_KEYS))
        m = positional_maps(data, scale, pool)
        file.parent.mkdir(exist_ok=True)
        np.savez(file, channels=m.channels, fit_seconds=m.fit_seconds, **{k: getattr(m, k) for k in heads._MAP_KEYS})
        return m
    key = heads_rows.map_key(name)
    if key is None:
        raise SystemExit(f"unknown map {name}: use {sorted(SCALE_OF)} (Q: pooled) or {sorted(heads_rows.MAPS)}")
    return heads.cached_head_maps(path, data, *key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True, type=Path, help="bench/heads_features.py's file")
    parser.add_argument("--rows", nargs="+", required=True, help="maps joined by +")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = np.load(args.features)
    heads_rows.print_rows(args.rows, data, lambda name: cached(args.features, data, name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
