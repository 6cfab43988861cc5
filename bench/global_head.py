"""Would an image-level head see what the maps miss? A study on a finished run (issue 20).

The maps test regions. Some real defects are not regions a local test can see: magnetic tile's largest
escapes are "uneven" tiles whose upper 40 % is a slightly different texture (docs/results.md, "What limits
the decision"). An image-level statistic sees such a change as a whole: here, per backbone scale, the
channel means and standard deviations of the features over the image (its texture statistics), one
vector per image, scored by its Mahalanobis distance to the good images (Ledoit-Wolf covariance,
``training.heads.shrunk_covariance``; fitted on the run's training and validation images).

``--with-nfa`` puts the score into the run's own NFA as one more map of 1x1 pixel (the machinery needs
nothing else: its null is fitted like a map's, it adds one test, and a detection on it is the whole frame)
and re-runs training's cross-fitted calibration: the evidence factor, the planted check and the test
split's decision, beside today's maps alone.

Label-free first, as defaults are chosen: fitted on the training images only, the validation images
against training's planted defects on them (``--planted-seeds``; their image AUROC, and the share of
planted defects above the 1 % / 2 % most suspicious validation images). Then, reporting only, on the test
split (fitted on training and validation images): the image AUROC, overall and per defect type, and the
share of each type above the 1 % / 2 % most suspicious good test images (the oracle of
bench/decision_limit.py). Nothing here is a default; it says whether such a head is worth building.

    nice .venv/bin/python bench/global_head.py --run runs/magnetic_tile --data ../shared/data/magnetic_tile/split.json
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_maps import above_good, add_run_arguments, decision_cells, load_run_maps, planted_found, separation

from training.data import load_images
from training.finish import DEFAULT_LOG10_EPSILON, PLANTED_IMAGES, backbone_features, min_log_nfa
from training.heads import shrunk_covariance
from training.nfa_null import calibrate, fit_scale_null
from training.planted import planted_set
from training.rundir import load_model


def texture_statistics(features: list[torch.Tensor]) -> np.ndarray:
    """Per image, the channel means and standard deviations of every scale's features (N x 2 sum C_s)."""
    parts = []
    for f in features:
        flat = f.double().flatten(2)
        parts += [flat.mean(dim=2), flat.std(dim=2)]
    return torch.cat(parts, dim=1).numpy()


def mahalanobis(good: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each ``query`` row to the rows of ``good`` (shrunk covariance)."""
    mean, covariance, _ = shrunk_covariance(torch.from_numpy(good))
    centred = torch.from_numpy(query).double() - mean
    solved = torch.linalg.solve(covariance, centred.T).T
    return (centred * solved).sum(dim=1).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--planted-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--with-nfa", action="store_true", help="also the decision with the score in the NFA")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, info = load_model(args.run)
    model.eval()
    splits = info.splits(args.data)
    height, width = model.config.image_height, model.config.image_width

    def statistics(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return texture_statistics(backbone_features(model, images, args.batch_size))

    val_images = load_images(splits.val, height, width)
    train, val = statistics(load_images(splits.train, height, width)), statistics(val_images)
    planted = [p.image for seed in args.planted_seeds for p in planted_set(val_images[:PLANTED_IMAGES], seed=seed)]
    val_scores, planted_scores = mahalanobis(train, val), mahalanobis(train, statistics(np.stack(planted)))
    print(
        f"\nlabel-free: {len(train)} training images fit; {len(val_scores)} validation images against "
        f"{len(planted_scores)} planted defects: image AUROC {separation(val_scores, planted_scores):.3f}, "
        f"planted above the 1 % / 2 % most suspicious validation images "
        f"{above_good(val_scores, planted_scores, 0.01):.1%} / {above_good(val_scores, planted_scores, 0.02):.1%}"
    )
    good, test = np.concatenate([train, val]), statistics(load_images(splits.test, height, width))
    score = mahalanobis(good, test)
    labels = np.array([r.label == 1 for r in splits.test])
    types = np.array([r.defect_type for r in splits.test])
    good_scores = score[~labels]
    print(f"\ntest (reporting only): {len(good)} good images fit, {good.shape[1]} statistics per image\n")
    print("| test images | n | image AUROC | above the 1 % / 2 % most suspicious good |\n|---|---|---|---|")
    for kind in ["all defective", *sorted(set(types[labels]))]:
        chosen = labels if kind == "all defective" else types == kind
        defective = score[chosen]
        print(
            f"| {kind} | {int(chosen.sum())} | {separation(good_scores, defective):.3f} | "
            f"{above_good(good_scores, defective, 0.01):.1%} / {above_good(good_scores, defective, 0.02):.1%} |"
        )
    if args.with_nfa:
        in_the_nfa(args, statistics, train, val_scores, score)
    return 0


def in_the_nfa(
    args: argparse.Namespace,
    statistics: Callable[[np.ndarray], np.ndarray],
    train: np.ndarray,
    val_scores: np.ndarray,
    test_score: np.ndarray,
) -> None:
    """Today's maps, and today's maps plus the score as a 1x1 map, through training's calibration and check.

    The validation and planted images are scored by the statistics of the training images only (out of
    sample, as the heads' cross-fit); the test images by those of every good image (as the deployed heads).
    """
    run = load_run_maps(args.run, args.data, args.batch_size, planted_seeds=args.planted_seeds)
    assert run.test is not None and run.test_labels is not None
    one_pixel = [
        val_scores[:, None, None],
        mahalanobis(train, statistics(np.stack([p.image for p in run.planted])))[:, None, None],
        test_score[:, None, None],
    ]
    eps, labels = DEFAULT_LOG10_EPSILON, run.test_labels
    print(
        f"\nin the NFA ({len(run.planted)} planted defects):\n\n| maps | evidence factor | planted found | "
        "test: defective / good flagged | oracle at 1 % / 2 % good | image AUROC (NFA) |\n|---|---|---|---|---|---|"
    )
    for label, extra in (("today", []), ("today + global", [one_pixel])):
        val_maps = run.val + [e[0] for e in extra]
        envelope = (*run.envelope, *(fit_scale_null(e[0]) for e in extra))
        channels = [1] * len(val_maps)  # unused under a fitted null
        cal = calibrate(val_maps, channels, run.size, eps, envelope=envelope)
        found = planted_found(run.planted_maps + [e[1] for e in extra], run.planted, run.size, cal.nulls, eps)
        test_maps = run.test + [e[2] for e in extra]
        evidence = -np.array(min_log_nfa(test_maps, channels, run.size, cal.nulls))
        print(f"| {label} | {cal.factor:g} | {found:.1%} | {decision_cells(evidence, labels, eps)} |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
