"""The NFA null models side by side on the saved maps of an ablation run (bench/ablate.py).

For each run: the paper's polyomino NFA and the fitted null (fitted on the run's validation good
maps only) on the test split: defective images flagged, good images flagged, false regions per good
image at log10 epsilon = 0 (the promise: <= 1), and mIoU of the NFA mask, at several epsilons.
Prints one table.

    .venv/bin/python bench/nfa_null.py runs/abl/*/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.inspection import nfa
from training import metrics
from training.nfa_null import fit_null


def load(run: Path) -> dict[str, object]:
    data = np.load(run / "maps.npz")
    scales = sorted(int(k.split("_")[1]) for k in data.files if k.startswith("val_"))
    amaps = data["amaps"].astype(np.float32)
    size = amaps.shape[1:]
    masks = np.unpackbits(data["masks"], axis=-1)[..., : size[1]].astype(bool)
    return {
        "val": [data[f"val_{s}"] for s in scales],
        "test": [data[f"test_{s}"] for s in scales],
        "channels": [int(c) for c in data["channels"]],
        "labels": data["labels"].astype(bool),
        "masks": masks,
        "size": size,
    }


def evaluate(run: dict, nulls, epsilons: list[float]) -> list[dict[str, float]]:
    test, channels, size = run["test"], run["channels"], run["size"]
    labels, masks = run["labels"], run["masks"]
    log_nfa = np.stack([nfa.log_nfa_map([m[i] for m in test], channels, size, nulls) for i in range(len(labels))])
    rows = []
    for eps in epsilons:
        predicted = log_nfa < eps
        flagged = predicted.reshape(len(labels), -1).any(axis=1)
        good_regions = [len(nfa.regions_from_log_nfa(log_nfa[i], eps)) for i in np.flatnonzero(~labels)]
        rows.append(
            {
                "log10_epsilon": eps,
                "defect_flagged": float(flagged[labels].mean()),
                "good_flagged": float(flagged[~labels].mean()),
                "good_regions_per_image": float(np.mean(good_regions)),
                "miou": float(metrics.iou_per_image(predicted, masks).mean()),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.0, -1.0, -2.0, -3.0])
    args = parser.parse_args(argv)
    print(
        "| run | null | fit (mean / dof / area per scale) | log10 eps | defective flagged | good flagged | "
        "false regions / good image | mIoU NFA |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for path in args.runs:
        run = load(path)
        fitted = fit_null(run["val"])
        described = "; ".join(f"{n.mean:.2f} / {n.dof:.1f} / {n.area:.1f}" for n in fitted)
        for name, nulls, eps in (("polyomino", None, [0.0]), ("fitted", fitted, args.epsilons)):
            for row in evaluate(run, nulls, eps):
                print(
                    f"| {path.name} | {name} | {described if nulls else ''} | {row['log10_epsilon']:g} | "
                    f"{row['defect_flagged']:.1%} | {row['good_flagged']:.1%} | "
                    f"{row['good_regions_per_image']:.3f} | {row['miou']:.3f} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
