"""The false-alarm promise of a bundle measured on good images: counts, exact 95 % intervals, a verdict.

Part of ``uflow calibrate nfa`` (calibration/nfa_check.py): on good images that fitted nothing (a
split.json's ``test_good``, or new recordings), how many false regions per image the decision raises at
the bundle's epsilon and at log10 epsilon = 0, with the exact two-sided 95 % interval of the rate
(Garwood) and of the share of images flagged (Clopper-Pearson), next to what the bundle promised and
recorded at training.
"""

from __future__ import annotations

from typing import Any

from edge_agent.promise import binomial_interval, poisson_interval


def promise_row(log10_epsilon: float, regions: list[int]) -> dict[str, Any]:
    """False regions per good image and the share of good images flagged at one epsilon, with exact
    two-sided 95 % intervals (Garwood, Clopper-Pearson), against the promise of epsilon per image.

    ``verdict``: ``kept`` when the interval's top is within the promise, ``broken`` when its bottom is
    above it, else ``not contradicted`` (too few images to tell).
    """
    images = len(regions)
    total, flagged = int(sum(regions)), int(sum(n > 0 for n in regions))
    promised = 10.0**log10_epsilon
    low, high = poisson_interval(total, images)
    flagged_low, flagged_high = binomial_interval(flagged, images)
    verdict = "kept" if high <= promised else "broken" if low > promised else "not contradicted"
    return {
        "log10_epsilon": log10_epsilon,
        "promised_regions_per_image": promised,
        "images": images,
        "false_regions": total,
        "regions_per_image": total / images,
        "regions_per_image_interval95": [low, high],
        "images_flagged": flagged,
        "flagged_share": flagged / images,
        "flagged_share_interval95": [flagged_low, flagged_high],
        "verdict": verdict,
    }


def format_promise(rows: list[dict[str, Any]]) -> str:
    """The promise rows as a markdown table."""
    lines = [
        "| log10 eps | promise (regions / image) | false regions | per image [95 % interval] "
        "| good images flagged [95 % interval] | promise |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, high = row["regions_per_image_interval95"]
        flow, fhigh = row["flagged_share_interval95"]
        lines.append(
            f"| {row['log10_epsilon']:g} | {row['promised_regions_per_image']:.3g} | {row['false_regions']} "
            f"| {row['regions_per_image']:.3f} [{low:.3f}, {high:.3f}] "
            f"| {row['images_flagged']} of {row['images']}: {row['flagged_share']:.1%} [{flow:.1%}, {fhigh:.1%}] "
            f"| {row['verdict']} |"
        )
    return "\n".join(lines)


def recorded_calibration(calibration: dict[str, Any] | None) -> list[str]:
    """Lines on what the bundle recorded at training (its manifest's ``nfa.calibration``), if anything."""
    if not calibration:
        return []
    return [
        "",
        f"recorded at training: {calibration['images']} good calibration images, {calibration['false_regions']} "
        f"out-of-fold false regions at log10 eps {float(calibration['log10_epsilon']):g}, 95 % upper bound "
        f"{float(calibration['false_regions_per_image_upper95']):.3f} regions / image and "
        f"{float(calibration['flagged_share_upper95']):.1%} of images flagged",
    ]
