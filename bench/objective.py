"""The objective study (issue 20 item 3): what the feature LayerNorm's affine does to the NLL and the latents.

    .venv/bin/python bench/objective.py runs/obj/default runs/obj/frozen [...]

Reads runs of bench/ablate.py (history.json with the NLL's parts per epoch, maps.npz, val_scores.json,
ablation.json; nothing is trained) and prints two tables:

1. per run, at the kept checkpoint's epoch: the validation NLL as trained and the NLL of the
   LayerNorm-standardised features with the affine counted (the one number comparable across
   objectives), its parts per latent dimension (0.5 z^2, the flow's log|det|, the norm affine's
   log|det|), the norm weights' mean |w|, the latents' RMS on validation good images, the mean m_0 on
   defect cells of the test images over that on good test images (how far defects stand out), the
   planted-defect check, the test metrics and the deployed decision (the run's calibrated fitted NFA at
   its epsilon) on the test images;
2. per run, every few epochs: the same parts, to show where the loss's fall comes from;
3. with ``--data SPLIT --planted-seeds N``: the planted-defect check again with N seeds (N x 48
   defects on the same validation good images, each run's own calibrated NFA), for a finer label-free
   comparison than one draw of 48.

The selection-relevant numbers (NLL, planted) come from validation good images; the test columns are
for reporting only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.inspection import nfa
from training.nfa_null import null_from_dict


def _load_maps(run: Path) -> dict[str, Any]:
    data = np.load(run / "maps.npz")
    scales = sorted(int(k.split("_")[1]) for k in data.files if k.startswith("val_"))
    size = data["amaps"].shape[1:]
    masks = np.unpackbits(data["masks"], axis=-1)[..., : size[1]].astype(bool)
    return {
        "val": [data[f"val_{s}"] for s in scales],
        "test": [data[f"test_{s}"] for s in scales],
        "channels": [int(c) for c in data["channels"]],
        "labels": data["labels"].astype(bool),
        "masks": masks,
        "size": tuple(size),
    }


def defect_contrast(maps: dict[str, Any]) -> float:
    """Mean m_0 over the finest scale's cells that touch a defect, over mean m_0 on good test images."""
    m0 = maps["test"][0]
    labels, masks = maps["labels"], maps["masks"]
    n, h, w = m0.shape
    size = maps["size"]
    cells = masks.reshape(n, h, size[0] // h, w, size[1] // w).any(axis=(2, 4))
    defect = m0[labels][cells[labels]]
    good = m0[~labels]
    return float(defect.mean() / good.mean()) if defect.size and good.size else float("nan")


def deployed(run: Path, maps: dict[str, Any]) -> tuple[float, float]:
    """(defective, good) test images flagged by the run's calibrated fitted NFA at its epsilon."""
    scores = json.loads((run / "val_scores.json").read_text())
    nulls = null_from_dict(scores["nfa_null"]) if scores.get("nfa_null") else None
    epsilon = float(scores.get("log10_epsilon", 0.0))
    test, labels = maps["test"], maps["labels"]
    flagged = np.array(
        [
            (nfa.log_nfa_map([m[i] for m in test], maps["channels"], maps["size"], nulls) < epsilon).any()
            for i in range(len(labels))
        ]
    )
    return float(flagged[labels].mean()), float(flagged[~labels].mean())


def _weights(terms: dict[str, Any]) -> str:
    values = [w for w in terms["norm_weight_abs"] if w is not None]
    return "/".join(f"{w:.3f}" for w in values) if values else "none"


def summary_row(run: Path) -> str:
    """Table 1's row of one run."""
    history = json.loads((run / "history.json").read_text())
    ablation = json.loads((run / "ablation.json").read_text())
    config = json.loads((run / "config.json").read_text())["model"]
    best = min(history, key=lambda r: r["val_nll"])
    terms = best["val_terms"]
    standardised = terms["half_sq_per_dim"] - terms["flow_log_det_per_dim"] - terms["norm_log_det_per_dim"]
    maps = _load_maps(run)
    defect_share, good_share = deployed(run, maps)
    planted = ablation.get("planted") or {}
    norm = (
        "frozen (no affine)"
        if not config.get("norm_affine", True)
        else ("affine, counted" if config.get("norm_in_jacobian") else "affine, not counted")
    )
    cells = [
        run.name,
        norm,
        f"{best['epoch']}/{len(history)}",
        f"{best['val_nll_per_dim']:.3f}",
        f"{standardised:.3f}",
        f"{terms['half_sq_per_dim']:.3f}",
        f"{terms['flow_log_det_per_dim']:.3f}",
        f"{terms['norm_log_det_per_dim']:.3f}",
        _weights(terms),
        f"{terms['latent_rms']:.3f}",
        f"{defect_contrast(maps):.2f}",
        f"{planted.get('detection_rate', float('nan')):.0%} of {planted.get('count', 0)}",
        f"{ablation['pixel_auroc']:.3f}",
        f"{ablation['aupro']:.3f}",
        f"{ablation['image_auroc']:.3f}",
        f"{defect_share:.1%}",
        f"{good_share:.1%}",
        f"{ablation['train_s']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def epoch_rows(run: Path, every: int) -> list[str]:
    """Table 2's rows of one run."""
    history = json.loads((run / "history.json").read_text())
    rows = []
    for row in history:
        if row["epoch"] % every and row["epoch"] not in (1, len(history)):
            continue
        t = row["val_terms"]
        rows.append(
            f"| {run.name} | {row['epoch']} | {row['val_nll_per_dim']:.3f} | "
            f"{t['half_sq_per_dim'] - t['flow_log_det_per_dim'] - t['norm_log_det_per_dim']:.3f} | "
            f"{t['half_sq_per_dim']:.3f} | {t['flow_log_det_per_dim']:.3f} | {t['norm_log_det_per_dim']:.3f} | "
            f"{_weights(t)} | {t['latent_rms']:.3f} |"
        )
    return rows


def planted_rows(run: Path, data: Path, seeds: int) -> list[str]:
    """Table 3's rows: the planted check of ``run`` with seeds 0..seeds-1 and their total."""
    from training.data import load_images, open_dataset
    from training.finish import planted_check
    from training.rundir import load_model

    model, _ = load_model(run)
    scores = json.loads((run / "val_scores.json").read_text())
    nulls = null_from_dict(scores["nfa_null"]) if scores.get("nfa_null") else None
    images = load_images(open_dataset(data).val, model.config.image_height, model.config.image_width)
    rows, found, count = [], 0, 0
    for seed in range(seeds):
        result = planted_check(model, images, nulls, float(scores["log10_epsilon"]), 16, seed=seed)
        hits = round(result["detection_rate"] * result["count"])
        found, count = found + hits, count + result["count"]
        small = result["per_kind"].get("size_small", float("nan"))
        rows.append(f"| {run.name} | {seed} | {hits} of {result['count']} | {small:.0%} |")
    rows.append(f"| {run.name} | all | **{found} of {count} ({found / max(count, 1):.0%})** | |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--every", type=int, default=5, help="table 2: one row every N epochs")
    parser.add_argument("--data", type=Path, help="the runs' data (split.json): for --planted-seeds")
    parser.add_argument("--planted-seeds", type=int, default=0, help="table 3: the planted check with N seeds")
    args = parser.parse_args(argv)
    print(
        "| run | feature norm | best epoch | val NLL/dim as trained | NLL/dim, affine counted | 0.5 z^2 | "
        "flow log-det | norm log-det | norm mean abs(w) per scale | latent RMS (val) | m_0 defect/good (test) | "
        "planted found (val) | pixel AUROC | AUPRO | image AUROC | defective flagged | good flagged | train s |"
    )
    print("|" + "---|" * 18)
    for run in args.runs:
        print(summary_row(run))
    print(
        "\n| run | epoch | val NLL/dim as trained | NLL/dim, affine counted | 0.5 z^2 | flow log-det | "
        "norm log-det | norm mean abs(w) | latent RMS |"
    )
    print("|" + "---|" * 9)
    for run in args.runs:
        print("\n".join(epoch_rows(run, args.every)))
    if args.planted_seeds:
        if args.data is None:
            parser.error("--planted-seeds needs --data (the split the runs were trained on)")
        print("\n| run | planting seed | planted found (val) | small defects found |")
        print("|---|---|---|---|")
        for run in args.runs:
            print("\n".join(planted_rows(run, args.data, args.planted_seeds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
