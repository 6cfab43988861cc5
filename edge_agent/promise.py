"""How far a bundle's false-alarm promise is backed by data: exact confidence bounds of counts (numpy-free).

The NFA decision promises at most epsilon false regions per good part on average. Whether the good
images a bundle was calibrated on can vouch for that is a counting question: ``k`` false regions seen
on ``n`` good images that took no part in fitting the flow. Regions per image are treated as a Poisson
rate and "this image has a region" as a binomial share; the bounds are the exact ones (Garwood's for
Poisson, Clopper-Pearson's for the binomial), so they hold at any count, zero included.

The one number a plant engineer needs follows: with none flagged, ``n`` images support a rate down to
about ``3 / n`` (``-ln 0.05 / n``), so a promise of 1 in 100 needs about 300 good calibration images.
Used by training (calibration, the manifest), ``uflow export`` (its warning), ``uflow calibrate nfa``
(the interval of a measurement) and ``edge-agent doctor``; standard library only, as the device has no
scipy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

CONFIDENCE = 0.95
# How many of a folder's good images calibrate the promise: training holds them out of a folder
# (training.data.DEFAULT_VAL_FRACTION says why), the data loop's export puts them in val, and the shortfall
# below tells a user how many to add. 333: enough to vouch for the regions' share of the default promise.
FOLDER_CALIBRATION_SHARE = 0.3
FOLDER_CALIBRATION_MAX = 333
_BISECTIONS = 200


def _check_counts(count: int, total: float, what: str) -> None:
    if count < 0 or not total > 0 or not math.isfinite(total):
        raise ValueError(f"{what}: need a count >= 0 and a positive total, got {count} of {total}")


def _poisson_cdf(count: int, mean: float) -> float:
    """P(X <= count) for X ~ Poisson(mean), summed in log space (stable for large means)."""
    if mean <= 0.0:
        return 1.0
    log_terms = [-mean + i * math.log(mean) - math.lgamma(i + 1) for i in range(count + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def _binomial_cdf(count: int, n: int, p: float) -> float:
    """P(X <= count) for X ~ Binomial(n, p)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if count >= n else 0.0
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
        for i in range(min(count, n) + 1)
    ]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def _solve_decreasing(function: Callable[[float], float], target: float, low: float, high: float) -> float:
    """x in [low, high] with function(x) = target for a function decreasing in x (bisection)."""
    for _ in range(_BISECTIONS):
        middle = 0.5 * (low + high)
        if function(middle) > target:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def _poisson_mean_bound(count: int, alpha: float) -> float:
    """The Poisson mean mu with P(X <= count; mu) = alpha (the upper bound of a count)."""
    high = count + 10.0 * math.sqrt(count + 1.0) + 50.0
    return _solve_decreasing(lambda mu: _poisson_cdf(count, mu), alpha, 0.0, high)


def poisson_upper(count: int, images: int, confidence: float = CONFIDENCE) -> float:
    """One-sided exact upper confidence bound of a rate per image: ``count`` events on ``images`` images."""
    _check_counts(count, images, "poisson_upper")
    return _poisson_mean_bound(count, 1.0 - confidence) / images


def poisson_interval(count: int, images: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided exact (Garwood) confidence interval of a rate per image."""
    _check_counts(count, images, "poisson_interval")
    alpha = (1.0 - confidence) / 2.0
    upper = _poisson_mean_bound(count, alpha) / images
    if count == 0:
        return 0.0, upper
    # P(X >= count; mu_low) = alpha, i.e. P(X <= count - 1; mu_low) = 1 - alpha
    lower = _poisson_mean_bound(count - 1, 1.0 - alpha) / images
    return lower, upper


def binomial_upper(count: int, total: int, confidence: float = CONFIDENCE) -> float:
    """One-sided exact (Clopper-Pearson) upper confidence bound of a share: ``count`` of ``total``."""
    _check_counts(count, total, "binomial_upper")
    if count >= total:
        return 1.0
    return _solve_decreasing(lambda p: _binomial_cdf(count, total, p), 1.0 - confidence, 0.0, 1.0)


def binomial_interval(count: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) confidence interval of a share."""
    _check_counts(count, total, "binomial_interval")
    alpha = (1.0 - confidence) / 2.0
    upper = 1.0 if count >= total else _solve_decreasing(lambda p: _binomial_cdf(count, total, p), alpha, 0.0, 1.0)
    if count == 0:
        return 0.0, upper
    lower = _solve_decreasing(lambda p: _binomial_cdf(count - 1, total, p), 1.0 - alpha, 0.0, 1.0)
    return lower, upper


def images_needed(rate: float, confidence: float = CONFIDENCE, observed_rate: float = 0.0) -> int | None:
    """Good calibration images needed for the upper bound of false regions per image to reach ``rate``.

    With ``observed_rate`` 0 this is the count with none flagged (about 3 / rate at 95 %). With false
    regions seen at ``observed_rate`` per image, the count at which that rate would be supported; None
    when ``observed_rate >= rate`` (more images of the same kind cannot support the promise).
    """
    if not rate > 0.0:
        raise ValueError(f"images_needed: the promised rate must be positive, got {rate}")
    if observed_rate >= rate:
        return None
    # Upper bound grows with the count; the smallest n with poisson_upper(round(r n), n) <= rate.
    low = max(1, math.floor(-math.log(1.0 - confidence) / rate) - 1)
    n = low
    while poisson_upper(round(observed_rate * n), n, confidence) > rate:
        n = max(n + 1, int(n * 1.02))
        if n > 10**8:
            return None
    # step back to the smallest that works (the loop may have jumped by 2 %)
    while n > 1 and poisson_upper(round(observed_rate * (n - 1)), n - 1, confidence) <= rate:
        n -= 1
    return n


@dataclass(frozen=True)
class PromiseCheck:
    """What the calibration images say about a promise of ``promised`` false regions per good image."""

    promised: float  # false regions per good image (10 ** log10 epsilon)
    images: int  # good calibration images, none used to fit the flow
    false_regions: int
    images_flagged: int
    regions_upper: float  # one-sided 95 % upper bound of false regions per image
    flagged_upper: float  # one-sided 95 % upper bound of the share of good images flagged
    needed: int | None  # calibration images that would support the promise (None: more cannot)

    @property
    def supported(self) -> bool:
        """True when the 95 % upper bound of false regions per image is within the promise."""
        return self.regions_upper <= self.promised * (1.0 + 1e-9)


def check_promise(promised: float, images: int, false_regions: int, images_flagged: int) -> PromiseCheck:
    """The bounds of one calibration count (out-of-sample false regions and flagged images)."""
    observed = false_regions / images if images else 0.0
    return PromiseCheck(
        promised=promised,
        images=images,
        false_regions=false_regions,
        images_flagged=images_flagged,
        regions_upper=poisson_upper(false_regions, images),
        flagged_upper=binomial_upper(images_flagged, images),
        needed=images_needed(promised, observed_rate=observed),
    )


def per_parts(rate: float) -> str:
    """A rate per image in plant words: 0.01 -> '1 per 100 parts', 0.14 -> '14 per 100 parts'."""
    if rate >= 0.95:
        return f"{rate:.2g} per part"
    for parts in (100, 1000, 10000, 100000):
        if rate * parts >= 0.95:
            value = rate * parts
            shown = f"{value:.0f}" if value >= 9.5 else f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{shown} per {parts:,} parts"
    return f"{rate * 1_000_000:.2g} per 1,000,000 parts"


def shortfall(check: PromiseCheck) -> str | None:
    """Plain words when the calibration images cannot support the promise (None when they do)."""
    if check.supported:
        return None
    promise = per_parts(check.promised)
    seen = f"{check.false_regions} false region{'s' if check.false_regions != 1 else ''}"
    vouch = f"they vouch for at most {per_parts(check.regions_upper)} at 95 % confidence"
    if check.needed is None:
        return (
            f"the promise of at most {promise} is not met: on {check.images} good calibration images the decision "
            f"raised {seen} ({per_parts(check.false_regions / check.images)}); {vouch}. More images will not fix "
            "this: the model flags good parts too often; train longer, add good images to training, or check the "
            "camera set-up"
        )
    more = check.needed - check.images
    condition = "with none flagged" if check.false_regions == 0 else f"at the rate seen ({seen} in {check.images})"
    return (
        f"the promise of at most {promise} needs about {check.needed} good calibration images {condition}; "
        f"this bundle had {check.images} ({'none flagged' if check.false_regions == 0 else seen}, so {vouch}): "
        f"record about {more} more good images for calibration (the validation split: a folder holds out "
        f"{round(100 * FOLDER_CALIBRATION_SHARE)} % of its images, at most {FOLDER_CALIBRATION_MAX}, so add about "
        f"{math.ceil(more / FOLDER_CALIBRATION_SHARE)} to a folder)"
    )


def describe(check: PromiseCheck, folds: int | None = None, regions_only: bool = False) -> str:
    """One line: the promise, the calibration count and the 95 % upper bounds it gives; ``regions_only``:
    the promise is the regions' share (the image test takes the rest, :func:`image_test_words`)."""
    how = f" (cross-fitted, {folds} folds)" if folds else ""
    whose = "the regions' share of the promise: " if regions_only else ""
    return (
        f"{whose}promise at most {per_parts(check.promised)}; {check.images} good calibration images{how}: "
        f"{check.false_regions} false regions ({check.images_flagged} images flagged), 95 % upper bound "
        f"{per_parts(check.regions_upper)} and {check.flagged_upper:.1%} of good parts flagged"
    )


class ImageTestSummary(Protocol):
    """What :func:`image_test_words` reads of a bundle's image test (edge_agent.bundle.ImageTestSpec)."""

    @property
    def share(self) -> float: ...

    @property
    def scores(self) -> tuple[float, ...]: ...


def image_test_words(spec: ImageTestSummary | None, log10_epsilon: float) -> str:
    """The image test's part of the promise in plant words ('' without one): its share, the good images its
    null rests on, and how many more would let their rank alone place it (docs/nfa.md, "The image test")."""
    if spec is None:
        return ""
    images, rate = len(spec.scores), spec.share * 10.0**log10_epsilon
    text = (
        f"; the image test (the frame's texture) takes {spec.share:.0%} of the promise, {per_parts(rate)}, "
        f"on the out-of-fold scores of {images} good images"
    )
    needed = math.ceil(1.0 / rate) - 1 - images
    if needed > 0:
        text += f" (below 1 in {images + 1} it rests on its tail law; {needed} more good images would rank it)"
    return text
