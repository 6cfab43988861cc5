"""The image-level head as a second family of tests in the one NFA, with its own share of epsilon (issue 20).

bench/global_head.py measured that the texture statistics' Mahalanobis distance ranks magnetic tile's real
defects best of anything tried (image AUROC 0.967), and that as one more 1x1 map in the NFA it is drowned:
its null, fitted like a map's on 100 validation scores, let the calibration's factor fall.

Here the image test gets its own null and its own share w of the false-alarm budget, the a-contrario way of
joining two families of tests: the regions' NFA is counted over the maps' tests divided by (1 - w), the
image test's over one test divided by w, so the expected number of false detections of both together stays
below epsilon. The image test's probability under the null comes from the good images themselves: every good
image (training and validation) scored out of fold (K folds of the Mahalanobis fit), so the deployed head,
fitted on every good image, sees new good images as those scores saw theirs. Two readings of that sample:

- ``conformal``: p = (1 + #{good >= s}) / (n + 1), exact under exchangeability, floored at 1 / (n + 1);
- ``lognormal``: a normal law on the log scores, which goes past the sample's largest score (a ranking) but
  rests on the fit's tail.

Label-free first, as defaults are chosen: training's planted defects (``--planted-seeds``), each scored by the
fold that left its source image out, found when a region touches the defect or the image test fires. Then,
reporting only, the test split. Nothing here is a default.

    nice .venv/bin/python bench/image_family.py --run runs/magnetic_tile --data ../shared/data/magnetic_tile/split.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from global_head import mahalanobis, texture_statistics
from run_maps import add_run_arguments, decision_cells, load_run_maps, separation

from edge_agent.inspection import nfa
from training.data import DatasetSplits, load_images
from training.finish import (
    DEFAULT_LOG10_EPSILON,
    PLANTED_IMAGES,
    backbone_features,
    min_log_nfa,
    planted_samples,
    planted_source,
)
from training.nfa_null import calibrate
from training.planted import Planted
from training.rundir import load_model

SHARES = (0.0, 0.1, 0.25, 0.5)
READINGS = ("conformal", "lognormal", "pareto")
TAIL = 0.1


def out_of_fold(good: np.ndarray, folds: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fold of each good row, each row's score by the Mahalanobis fit on the other folds)."""
    fold = np.random.default_rng(seed).permutation(len(good)) % folds
    scores = np.empty(len(good))
    for k in range(folds):
        held = fold == k
        scores[held] = mahalanobis(good[~held], good[held])
    return fold, scores


def log10_p(scores: np.ndarray, good: np.ndarray, reading: str) -> np.ndarray:
    """log10 of each score's probability under the good images' out-of-fold scores ``good``.

    ``conformal``: the rank among them; ``lognormal``: a normal law on the log scores; ``pareto``: the rank up
    to the top ``TAIL`` share, an exponential law on the log scores of that top beyond it (peaks over a
    threshold: a Pareto tail, heavier than the lognormal's).
    """
    above = (good[None, :] >= scores[:, None]).sum(axis=1)
    rank = np.log10((1.0 + above) / (len(good) + 1.0))
    if reading == "conformal":
        return rank
    logs, log_scores = np.log(good), np.log(np.maximum(scores, 1e-300))
    if reading == "lognormal":
        z = (log_scores - logs.mean()) / logs.std(ddof=1)
        return np.array([math.log10(max(0.5 * math.erfc(v / math.sqrt(2.0)), 1e-300)) for v in z])
    k = max(5, math.ceil(TAIL * len(good)))
    top = np.sort(logs)[-k:]
    u, beta = float(top[0]), float(np.mean(top - top[0]))
    tail = math.log10(k / (len(good) + 1.0)) - (log_scores - u) / beta / math.log(10.0)
    return np.where(log_scores > u, np.minimum(tail, rank), rank)


def cross_checked(good: np.ndarray, fold: np.ndarray, reading: str, log10_alpha: float) -> float:
    """Share of good images whose p, read from the other folds' scores, is below ``log10_alpha``."""
    hits = 0
    for k in np.unique(fold):
        held = fold == k
        hits += int((log10_p(good[held], good[~held], reading) < log10_alpha).sum())
    return hits / len(good)


def min_in_masks(maps: list[np.ndarray], planted: list, size: tuple[int, int], nulls: tuple) -> np.ndarray:
    """Per planted defect, the lowest log10 NFA of the maps' regions on the defect's pixels."""
    channels = [1] * len(maps)
    return np.array(
        [
            float(nfa.log_nfa_map([m[i] for m in maps], channels, size, nulls)[p.mask].min())
            for i, p in enumerate(planted)
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--planted-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--cache", type=Path, help="an .npz of the scores: written when absent, read when present")
    parser.add_argument("--grid", type=int, default=1, help="texture statistics per cell of a G x G grid (1: today)")
    parser.add_argument(
        "--regions-from", type=Path, help="a --cache of the same run: its region scores, new image scores only"
    )
    args = parser.parse_args(argv)
    if args.cache is not None and args.cache.exists():
        cached = dict(np.load(args.cache))
    elif args.regions_from is not None:
        regions = dict(np.load(args.regions_from))
        model, info = load_model(args.run)
        splits = info.splits(args.data)
        size = (model.config.image_height, model.config.image_width)
        val_images = load_images(splits.val, *size)
        planted = [p for seed in args.planted_seeds for p in planted_samples(val_images, seed)]
        cached = {**regions, **image_scores(args, model, splits, planted, size)}
    else:
        cached = scores_of(args)
        if args.cache is not None:
            np.savez(args.cache, **cached)  # type: ignore[arg-type]  # numpy types **kwds as allow_pickle
    report(cached, args.folds)
    return 0


def scores_of(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Every score the tables read: the image test's (out of fold) and the regions' lowest log10 NFA."""
    torch.set_num_threads(args.threads)
    run = load_run_maps(args.run, args.data, args.batch_size, planted_seeds=args.planted_seeds)
    assert run.test is not None and run.test_labels is not None
    eps = DEFAULT_LOG10_EPSILON
    cal = calibrate(run.val, [1] * len(run.val), run.size, eps, envelope=run.envelope)
    return {
        **image_scores(args, run.model, run.splits, run.planted, run.size),
        "labels": run.test_labels,
        "region_planted": min_in_masks(run.planted_maps, run.planted, run.size, cal.nulls),
        "region_test": np.array(min_log_nfa(run.test, [1] * len(run.test), run.size, cal.nulls)),
        "factor": np.array(cal.factor),
    }


def image_scores(
    args: argparse.Namespace, model: Any, splits: DatasetSplits, planted: list[Planted], size: tuple[int, int]
) -> dict[str, np.ndarray]:
    """The texture score of every good image out of fold, of each planted defect by the fold that left out
    the validation image it was planted on, and of the test images by a fit on every good image."""
    torch.set_num_threads(args.threads)
    height, width = size

    def statistics(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            features = backbone_features(model, images, args.batch_size)
        return texture_statistics(features) if args.grid == 1 else grid_statistics(features, args.grid)

    val_images = load_images(splits.val, height, width)
    good = np.concatenate([statistics(load_images(splits.train, height, width)), statistics(val_images)])
    n_train = len(splits.train)
    fold, good_scores = out_of_fold(good, args.folds)
    # Each planted defect is scored by the fold that left out the validation image it was planted on.
    owner = np.array([n_train + planted_source(val_images[:PLANTED_IMAGES], p.image, p.mask) for p in planted])
    planted_stats = statistics(np.stack([p.image for p in planted]))
    planted_scores = np.empty(len(planted))
    for k in range(args.folds):
        mine = fold[owner] == k
        if mine.any():
            planted_scores[mine] = mahalanobis(good[fold != k], planted_stats[mine])
    return {
        "good": good_scores,
        "fold": fold,
        "n_train": np.array(n_train),
        "planted": planted_scores,
        "test": mahalanobis(good, statistics(load_images(splits.test, height, width))),
    }


def grid_statistics(features: list[torch.Tensor], grid: int) -> np.ndarray:
    """Per image, every scale's channel means and standard deviations in each cell of a grid x grid split."""
    parts = []
    for f in features:
        f = f.double()
        mean = F.adaptive_avg_pool2d(f, grid)
        square = F.adaptive_avg_pool2d(f * f, grid)
        parts += [mean.flatten(1), (square - mean * mean).clamp_min(0.0).sqrt().flatten(1)]
    return torch.cat(parts, dim=1).numpy()


def report(scores: dict[str, np.ndarray], folds: int) -> None:
    """The tables: the promise of each reading on good images out of fold, then each share's decision."""
    good_scores, fold, n_train = scores["good"], scores["fold"], int(scores["n_train"])
    planted_scores, test_scores, labels = scores["planted"], scores["test"], scores["labels"].astype(bool)
    region_planted, region_test = scores["region_planted"], scores["region_test"]
    eps = DEFAULT_LOG10_EPSILON
    print(
        f"\n{len(good_scores)} good images scored out of {folds} folds; {len(planted_scores)} planted defects; "
        f"evidence factor {float(scores['factor']):g}; image test alone: planted AUROC "
        f"{separation(good_scores[n_train:], planted_scores):.3f}, test AUROC "
        f"{separation(test_scores[~labels], test_scores[labels]):.3f}\n"
    )
    print("| reading | good images with p below 10 % / 1 % / 0.1 %, p read from the other folds |\n|---|---|")
    for reading in READINGS:
        shares = [cross_checked(good_scores, fold, reading, a) for a in (-1.0, -2.0, -3.0)]
        print(f"| {reading} | " + " / ".join(f"{v:.2%}" for v in shares) + " |")
    print(
        "\n| image test | share w | planted found | of them by the image test only | good flagged (out of fold, image "
        "test) | test: defective / good flagged | oracle at 1 % / 2 % good | image AUROC (evidence) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for reading in READINGS:
        p_planted = log10_p(planted_scores, good_scores, reading)
        p_test = log10_p(test_scores, good_scores, reading)
        p_good = log10_p(good_scores, good_scores, reading)
        for share in SHARES:
            if share == 0.0 and reading != "conformal":
                continue
            regions = -math.log10(1.0 - share)
            image = -math.log10(share) if share > 0 else math.inf
            by_region = region_planted + regions < eps
            by_image = p_planted + image < eps
            evidence = -np.minimum(region_test + regions, p_test + image)
            print(
                f"| {reading if share else 'none (today)'} | {share:g} | {(by_region | by_image).mean():.1%} | "
                f"{(by_image & ~by_region).mean():.1%} | {np.mean(p_good + image < eps):.1%} | "
                f"{decision_cells(evidence, labels, eps)} |",
                flush=True,
            )


if __name__ == "__main__":
    raise SystemExit(main())
