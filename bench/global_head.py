"""Would an image-level head see what the maps miss? A study on a finished run (issue 20).

The maps test regions. Some real defects are not regions a local test can see: magnetic tile's largest
escapes are "uneven" tiles whose upper 40 % is a slightly different texture (docs/results.md, "What limits
the decision"). An image-level statistic sees such a change as a whole: here, per backbone scale, the
channel means and standard deviations of the features over the image (its texture statistics), one
vector per image, scored by its Mahalanobis distance to the good images (Ledoit-Wolf covariance,
``training.heads.shrunk_covariance``; fitted on the run's training and validation images).

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
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import metrics
from training.data import load_images, open_dataset
from training.finish import PLANTED_IMAGES, backbone_features
from training.heads import shrunk_covariance
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
    parser.add_argument("--run", required=True, type=Path, help="a finished run directory")
    parser.add_argument("--data", help="the run's data (default: what its config.json records)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--planted-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, info = load_model(args.run)
    model.eval()
    splits = open_dataset(
        args.data or str(info.data_summary["root"]), float(info.train_config.get("val_fraction", 0.1))
    )
    height, width = model.config.image_height, model.config.image_width

    def statistics(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return texture_statistics(backbone_features(model, images, args.batch_size))

    val_images = load_images(splits.val, height, width)
    train, val = statistics(load_images(splits.train, height, width)), statistics(val_images)
    planted = [p.image for seed in args.planted_seeds for p in planted_set(val_images[:PLANTED_IMAGES], seed=seed)]
    val_scores, planted_scores = mahalanobis(train, val), mahalanobis(train, statistics(np.stack(planted)))
    val_oracle = {rate: float(np.quantile(val_scores, 1.0 - rate)) for rate in (0.01, 0.02)}
    planted_auroc = metrics.image_auroc(
        np.r_[val_scores, planted_scores], np.r_[np.zeros(len(val_scores)), np.ones(len(planted_scores))].astype(bool)
    )
    print(
        f"\nlabel-free: {len(train)} training images fit; {len(val_scores)} validation images against "
        f"{len(planted_scores)} planted defects: image AUROC {planted_auroc:.3f}, planted above the 1 % / 2 % "
        f"most suspicious validation images {np.mean(planted_scores > val_oracle[0.01]):.1%} / "
        f"{np.mean(planted_scores > val_oracle[0.02]):.1%}"
    )
    good, test = np.concatenate([train, val]), statistics(load_images(splits.test, height, width))
    score = mahalanobis(good, test)
    labels = np.array([r.label == 1 for r in splits.test])
    types = np.array([r.defect_type for r in splits.test])
    good_scores = score[~labels]
    oracle = {rate: float(np.quantile(good_scores, 1.0 - rate)) for rate in (0.01, 0.02)}
    print(f"\ntest (reporting only): {len(good)} good images fit, {good.shape[1]} statistics per image\n")
    print("| test images | n | image AUROC | above the 1 % / 2 % most suspicious good |\n|---|---|---|---|")
    for kind in ["all defective", *sorted(set(types[labels]))]:
        chosen = labels if kind == "all defective" else types == kind
        auroc = metrics.image_auroc(
            np.r_[good_scores, score[chosen]], np.r_[np.zeros(len(good_scores)), np.ones(chosen.sum())].astype(bool)
        )
        print(
            f"| {kind} | {int(chosen.sum())} | {auroc:.3f} | "
            f"{np.mean(score[chosen] > oracle[0.01]):.1%} / {np.mean(score[chosen] > oracle[0.02]):.1%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
