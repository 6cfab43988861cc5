"""How far the fitted null's correlation area reaches: a study on a finished run (issue 20).

Each map's null counts a region of |R| pixels as |R| / area independent observations, ``area`` being the
sum of the map's spatial autocorrelation over lags up to 2 (training/nfa_null.py ``Reach``). Where a map's
correlation reaches further than that (the stride-8 flow map: 16 image pixels at lag 2), its
large regions are counted as many more independent observations than they are, and one such map's
good-image blobs (glare, texture patches) set the evidence factor that every map shares.

For today's reach (row "today") and each ``--lags`` value (with the noise floor ``--noise-z`` that a long
reach needs, ``Reach``) this refits every null exactly as training's finish does (the flow's on the
validation maps, the heads' on their out-of-sample maps of every good image), re-runs training's
cross-fitted calibration with the same reach in its folds, and reports:

- the areas and the evidence factor;
- the planted check (training's label-free criterion) on ``--planted-seeds`` (seed 0 is training's own
  defects; more seeds plant more on the same validation images, so the criterion is less noisy);
- on the test split (reporting only): defective / good images flagged at the deployed epsilon, the
  share of defective images above the evidence of the 1 % / 2 % most suspicious good ones (the "oracle"
  of bench/decision_limit.py) and the NFA evidence's image AUROC.

    nice .venv/bin/python bench/correlation_lag.py --run runs/magnetic_tile --lags 2 8 16 --planted-seeds 0 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_maps import above_good, add_run_arguments, load_run_maps, planted_hits

from edge_agent.inspection import nfa
from edge_agent.inspection.overlay import draw_overlay, heat_map
from edge_agent.inspection.scoring import log_nfa_map_of
from training import metrics
from training.finish import DEFAULT_LOG10_EPSILON, fit_nulls, min_log_nfa
from training.nfa_null import DEFAULT_REACH, Reach, calibrate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--lags", type=int, nargs="*", default=[2, 16])
    parser.add_argument("--noise-z", type=float, default=3.0, help="the noise floor of the --lags rows")
    parser.add_argument(
        "--by-size",
        type=int,
        nargs="*",
        default=[],
        help="rows whose nulls count a region's correlation by its size (nfa.ScaleNull.profile), up to these lags",
    )
    parser.add_argument(
        "--by-size-floored",
        type=int,
        nargs="*",
        default=[],
        help="the same, never below today's (lag 2) area: small regions count as today",
    )
    parser.add_argument("--planted-seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--picture",
        nargs=2,
        metavar=("NAME", "OUT"),
        help="write OUT: the test image whose file name contains NAME, its strongest map, and the NFA mask "
        "at each reach",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = load_run_maps(args.run, args.data, args.batch_size, planted_seeds=args.planted_seeds)
    assert run.test is not None and run.test_labels is not None
    maps, channels, heads, size = run.val, run.channels, run.heads, run.size
    labels, eps = run.test_labels, DEFAULT_LOG10_EPSILON
    print(
        f"\n{args.run}: {len(maps[0])} calibration images, {len(run.planted)} planted defects "
        f"(seeds {args.planted_seeds}), maps {' '.join(run.names)}, today's reach {DEFAULT_REACH}"
    )
    # A diagnostic, nothing is chosen on it: how the planted defects' sizes compare with the real ones.
    quantiles = (0.1, 0.25, 0.5, 0.75, 0.9)
    planted_area = np.quantile([p.mask.mean() for p in run.planted], quantiles)
    assert run.test_masks is not None
    real_area = np.quantile(run.test_masks[labels].mean(axis=(1, 2)), quantiles)
    print(
        "defect area, % of the image at the 10/25/50/75/90th percentiles: planted "
        f"{' '.join(f'{100 * v:.2f}' for v in planted_area)}; test {' '.join(f'{100 * v:.2f}' for v in real_area)}"
    )
    print(
        "\n| reach (lags) | areas | factor | planted found | test: defective / good flagged | "
        "oracle at 1 % / 2 % good | image AUROC (NFA) |\n|---|---|---|---|---|---|---|"
    )
    kinds = [*sorted({p.kind for p in run.planted}), "small", "medium", "large"]
    of_kind = {k: np.array([k in (p.kind, p.size) for p in run.planted]) for k in kinds}
    by_kind: dict[str, list[str]] = {}
    reaches = {
        "today": DEFAULT_REACH,
        **{str(lag): Reach(lag, args.noise_z) for lag in args.lags},
        **{f"by size, {lag}": Reach(lag, args.noise_z, by_size=True) for lag in args.by_size},
        **{f"by size >= today, {lag}": Reach(lag, args.noise_z, True, True) for lag in args.by_size_floored},
    }
    shipped: dict[str, tuple[nfa.ScaleNull, ...]] = {}
    for label, reach in reaches.items():
        envelope = fit_nulls(run.model, maps, run.head_every, reach)
        cal = calibrate(maps, channels, size, eps, envelope=envelope, reach=reach)
        shipped[label] = cal.nulls
        hits = planted_hits(run.planted_maps, run.planted, size, cal.nulls, eps)
        found = float(hits.mean())
        by_kind[label] = [f"{hits[chosen].mean():.1%}" if chosen.any() else "-" for chosen in of_kind.values()]
        scores = np.array(min_log_nfa(run.test, channels, size, cal.nulls, heads))
        flagged, evidence = scores < eps, -scores
        good, defective = evidence[~labels], evidence[labels]
        print(
            f"| {label} | {' '.join(f'{n}:{e.area:.1f}' for n, e in zip(run.names, envelope, strict=True))} | "
            f"{cal.factor:g} | {found:.1%} | {flagged[labels].mean():.1%} / {flagged[~labels].mean():.1%} | "
            f"{above_good(good, defective, 0.01):.1%} / {above_good(good, defective, 0.02):.1%} | "
            f"{metrics.image_auroc(evidence, labels):.3f} |",
            flush=True,
        )
    # Which planted defects a reach gains or loses: thin scratches live in the fine maps, large soft
    # blobs and textures in the coarse ones.
    print(f"\n| reach | {' | '.join(kinds)} |\n|---|{'---|' * len(kinds)}")
    for label, cells in by_kind.items():
        print(f"| {label} | {' | '.join(cells)} |")
    if args.picture:
        write_picture(run, shipped, args.picture[0], Path(args.picture[1]))
    return 0


def write_picture(run: Any, shipped: dict[str, tuple[nfa.ScaleNull, ...]], name: str, out: Path) -> None:
    """The test image whose file name contains ``name``; the map with its strongest evidence under today's
    nulls (over that null's mean, log colour scale); the NFA mask (white) of every reach over it."""
    index = next((i for i, r in enumerate(run.splits.test) if name in r.image.name), None)
    if index is None:
        raise SystemExit(f"--picture: no test image's file name contains {name!r}")
    height, width = run.size
    bgr = cv2.imread(str(run.splits.test[index].image), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"cannot read {run.splits.test[index].image}")
    image = cv2.resize(bgr, (width, height))
    today = shipped["today"]
    strongest = int(np.argmin([nfa.log_prob_map(m[index], 1, n).min() for m, n in zip(run.test, today, strict=True)]))
    level = np.log1p(cv2.resize(run.test[strongest][index] / today[strongest].mean, (width, height)))
    heat = level / max(float(level.max()), 1e-6)
    panels = [image, heat_map(heat)]
    for label, nulls in shipped.items():
        log_nfa = log_nfa_map_of([m[index] for m in run.test], run.channels, run.heads, run.size, nulls)
        title = f"reach {label}: {run.names[strongest]}"
        panels.append(draw_overlay(image, heat, log_nfa, DEFAULT_LOG10_EPSILON, title=title, legend=False))
    panels = [cv2.resize(p, (width, height)) for p in panels]
    cv2.imwrite(str(out), np.hstack(panels))
    print(f"\nwrote {out}: {run.splits.test[index].image.name}, strongest map {run.names[strongest]}")


if __name__ == "__main__":
    raise SystemExit(main())
