"""The false-alarm promise before and after cross-fitting, on a trained run's unseen good images.

For a run (``uflow train`` on a split.json): the validation good images' maps calibrate the fitted
null twice, the way training did before (evidence factor chosen in-sample: the largest factor whose
false regions on the same validation images stay within the promise) and the way it does now
(training/nfa_null.py ``calibrate``: cross-fitted, fixed-sequence rule on the 95 % upper bound). Both
are then run on ``test_good`` (never used to fit anything) and ``test_defect``: false regions per good
image at the deployed epsilon and at log10 epsilon = 0 with exact 95 % intervals, the share of good
images flagged, and the share of defective images flagged (what the honesty costs). Prints one
markdown table per run. ``--refinish`` also rewrites the run's val_scores.json with the current code
(training/finish.py), so that ``uflow export`` ships the new calibration for a run trained before it.

    PYTHONPATH=$PWD nice .venv/bin/python bench/promise.py --data /work/shared/data/mvtec_bottle/split.json \\
        --run runs/mvtec_bottle [--refinish] [--calibration-images 21 --subsets 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.inspection import nfa
from edge_agent.promise import binomial_interval, poisson_interval
from training.data import load_images
from training.finish import DEFAULT_LOG10_EPSILON
from training.model import predict
from training.nfa_null import EVIDENCE_SCALES, PROMISE_MARGIN, calibrate, false_regions_per_image, fit_null, scaled
from training.rundir import load_model

BEFORE_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)  # the old in-sample search


def in_sample_factor(maps: list[np.ndarray], channels: list[int], size: tuple[int, int], eps: float) -> float:
    """The evidence factor as training chose it before: in-sample on the very images it was fitted on."""
    envelope, best = fit_null(maps), BEFORE_SCALES[0]
    for factor in BEFORE_SCALES:
        candidate = scaled(envelope, factor)
        if (
            false_regions_per_image(maps, channels, size, candidate, eps) > 10.0**eps
            or false_regions_per_image(maps, channels, size, candidate, 0.0) > PROMISE_MARGIN
        ):
            break
        best = factor
    return best


def measure(maps: list[np.ndarray], channels: list[int], size: tuple[int, int], nulls, eps: float) -> list[list[int]]:
    """Per image: regions at ``eps`` and at 0."""
    rows = []
    for i in range(len(maps[0])):
        log_nfa = nfa.log_nfa_map([m[i] for m in maps], channels, size, nulls)
        rows.append([len(nfa.regions_from_log_nfa(log_nfa, eps)), len(nfa.regions_from_log_nfa(log_nfa, 0.0))])
    return rows


def cell_rate(counts: list[int]) -> str:
    low, high = poisson_interval(int(sum(counts)), len(counts))
    return f"{np.mean(counts):.3f} [{low:.3f}, {high:.3f}]"


def cell_share(counts: list[int]) -> str:
    flagged = int(sum(c > 0 for c in counts))
    low, high = binomial_interval(flagged, len(counts))
    return f"{flagged}/{len(counts)} = {flagged / len(counts):.1%} [{low:.1%}, {high:.1%}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="the run's split.json")
    parser.add_argument("--refinish", action="store_true", help="rewrite val_scores.json with the current code")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--calibration-images", type=int, help="calibrate on this many validation images only")
    parser.add_argument("--subsets", type=int, default=4, help="random draws of --calibration-images")
    parser.add_argument("--sweep", action="store_true", help="also every factor on test_good, and the maps' shift")
    args = parser.parse_args()
    model, info = load_model(args.run)
    height, width = model.config.image_height, model.config.image_width
    splits = info.splits(args.data)
    val_images = load_images(splits.val, height, width)
    if args.refinish:
        from training.finish import finish_run

        finish_run(Path(args.run), splits, val_images, load_images(splits.train, height, width), 3, args.batch_size)
    if tuple(model.config.heads) != ("flow",):
        # The heads are fitted on the validation images too, so this bench's validation maps would be
        # in-sample for them (training/finish.py gives them out-of-sample maps). --refinish above is valid.
        raise SystemExit(
            f"{args.run}: a run with evidence heads {model.config.heads}: measure its bundle instead "
            "(uflow export, then uflow calibrate nfa --split test_good and bench/decision_limit.py)"
        )
    good = [r for r in splits.test if r.label == 0]
    defect = [r for r in splits.test if r.label == 1]
    channels = [s.channels for s in model.scales]
    size = (height, width)
    eps = DEFAULT_LOG10_EPSILON
    cache = Path(args.run) / "promise_maps.npz"  # the maps of one checkpoint: rerunning the rules is fast
    if cache.is_file():
        saved = np.load(cache)
        count = len(model.scales)
        all_val, good_maps = [saved[f"val_{k}"] for k in range(count)], [saved[f"good_{k}"] for k in range(count)]
        defect_maps = [saved[f"defect_{k}"] for k in range(count)] if "defect_0" in saved.files else None
    else:
        all_val = predict(model, val_images, args.batch_size)[1]
        good_maps = predict(model, load_images(good, height, width), args.batch_size)[1]
        defect_maps = predict(model, load_images(defect, height, width), args.batch_size)[1] if defect else None
        arrays = {f"val_{k}": m for k, m in enumerate(all_val)} | {f"good_{k}": m for k, m in enumerate(good_maps)}
        if defect_maps is not None:
            arrays |= {f"defect_{k}": m for k, m in enumerate(defect_maps)}
        np.savez_compressed(cache, **arrays)
    if args.sweep:
        sweep(fit_null(all_val), good_maps, defect_maps, channels, size, eps)
        shift(all_val, good_maps)
    subsets: list[np.ndarray] = [np.arange(len(all_val[0]))]
    if args.calibration_images:
        # Several random draws of a small calibration set (the held-out product had 21 images).
        subsets = [
            np.sort(np.random.default_rng(seed).permutation(len(all_val[0]))[: args.calibration_images])
            for seed in range(args.subsets)
        ]
    print(
        f"\n{args.run} ({args.data}): {len(all_val[0])} validation images, calibration on "
        f"{len(subsets[0])} of them ({len(subsets)} draw(s)), {len(good)} test_good, {len(defect)} test_defect; "
        f"promise at log10 eps {eps:g}: {10**eps:g} / image\n"
    )
    print(
        "| draw | calibration | evidence factor | recorded 95 % upper bound, regions / image | test_good regions / "
        f"image at log10 eps {eps:g} [95 %] | good images flagged [95 %] | regions / image at log10 eps 0 [95 %] "
        "| defective images flagged |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for draw, chosen in enumerate(subsets):
        val_maps = [m[chosen] for m in all_val]
        envelope = fit_null(val_maps)
        factor_before = in_sample_factor(val_maps, channels, size, eps)
        after = calibrate(val_maps, channels, size, eps)
        for name, nulls, factor, bound in (
            ("in-sample (before)", scaled(envelope, factor_before), factor_before, "none"),
            ("cross-fit (now)", after.nulls, after.factor, f"{after.check.regions_upper:.3f}"),
        ):
            rows = measure(good_maps, channels, size, nulls, eps)
            at_eps, at_0 = [r[0] for r in rows], [r[1] for r in rows]
            flagged = "n/a"
            if defect_maps is not None:
                hits = [r[0] > 0 for r in measure(defect_maps, channels, size, nulls, eps)]
                flagged = f"{np.mean(hits):.1%}"
            print(
                f"| {draw} | {name} | {factor:g} | {bound} | {cell_rate(at_eps)} | {cell_share(at_eps)} "
                f"| {cell_rate(at_0)} | {flagged} |"
            )
        counts = ", ".join(
            f"{c.factor:g}: {c.false_regions}/{c.images_flagged}/{c.regions_at_0}/{c.regions_at_check}"
            for c in after.counts
        )
        print(
            f"<!-- draw {draw}: out-of-fold counts (factor: regions at eps / images flagged / regions at 0 / "
            f"regions at the checkable log10 eps {after.check_log10_epsilon:.2f}): {counts} -->"
        )


def sweep(envelope, good_maps, defect_maps, channels, size, eps: float) -> None:
    """Every factor from the all-image envelope on test_good, and how far test_good's maps sit from val's."""
    print(f"\n| factor | good images flagged at log10 eps {eps:g} | defective flagged |\n|---|---|---|")
    for factor in EVIDENCE_SCALES:
        nulls = scaled(envelope, factor)
        good = [r[0] > 0 for r in measure(good_maps, channels, size, nulls, eps)]
        bad = [r[0] > 0 for r in measure(defect_maps, channels, size, nulls, eps)] if defect_maps else [False]
        print(f"| {factor:g} | {cell_share([int(g) for g in good])} | {np.mean(bad):.1%} |")


def shift(val_maps, good_maps) -> None:
    """Mean m_s and the 99th percentile of the per-image maximum, validation vs test_good."""
    print("\n| map | mean m, val | mean m, test_good | p99 of image max, val | p99 of image max, test_good |")
    print("|---|---|---|---|---|")
    for k, (v, g) in enumerate(zip(val_maps, good_maps, strict=True)):
        vmax, gmax = v.reshape(len(v), -1).max(axis=1), g.reshape(len(g), -1).max(axis=1)
        print(
            f"| {k} | {v.mean():.3f} | {g.mean():.3f} | {np.percentile(vmax, 99):.2f} | {np.percentile(gmax, 99):.2f} |"
        )


if __name__ == "__main__":
    main()
