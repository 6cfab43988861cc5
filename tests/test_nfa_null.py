"""The fitted NFA null (training/nfa_null.py, edge_agent.inspection.nfa.ScaleNull) and the planted-defect check.

The promise of the a-contrario decision is measured, not assumed: maps drawn from a correlated,
over-dispersed field (what real latents look like: mean above 1, variance above chi^2's, neighbours
correlated) break the paper's independent chi^2 null, and the fitted null keeps the false regions
per image at log10 epsilon = 0 under one on fresh maps of the same field.
"""

from __future__ import annotations

import itertools
import math

import cv2
import numpy as np
import pytest

from edge_agent.inspection import nfa
from edge_agent.promise import poisson_upper
from training.nfa_null import (
    EVIDENCE_SCALES,
    Reach,
    calibrate,
    calibrate_evidence,
    correlation_area,
    correlation_profile,
    false_regions_per_image,
    fit_null,
    fit_scale_null,
    fold_slices,
    null_from_dict,
    null_to_dict,
    scaled,
    tail_dof,
)
from training.planted import PLANTED_KINDS, SIZES, plant, planted_set

CHANNELS = [8, 16]
SHAPES = [(32, 32), (16, 16)]


def correlated_field(rng: np.random.Generator, count: int, shape: tuple[int, int], channels: int) -> np.ndarray:
    """m = mean over channels of z^2 with z spatially smoothed (correlated) and scaled by 1.2."""
    z = rng.standard_normal((count, channels, shape[0] + 4, shape[1] + 4)).astype(np.float32)
    smoothed = np.empty((count, channels, *shape), dtype=np.float32)
    for i in range(count):
        for c in range(channels):
            blurred = cv2.GaussianBlur(z[i, c], (0, 0), 0.8)
            smoothed[i, c] = blurred[2:-2, 2:-2] / blurred.std()
    return (1.2 * smoothed**2).mean(axis=1).astype(np.float64)


def two_scale_field(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Maps of a 32x32 scale with 8 channels and a 16x16 scale with 16, finest first."""
    return [correlated_field(rng, count, shape, c) for shape, c in zip(SHAPES, CHANNELS, strict=True)]


def test_tail_dof_of_chi2_samples_is_near_the_true_dof() -> None:
    rng = np.random.default_rng(0)
    channels = 24
    t = rng.chisquare(channels, size=200_000) / channels
    dof = tail_dof(t)
    # Chernoff's bound is loose by a polynomial factor, so a somewhat larger dof still dominates the
    # observed tail; the fit is the largest that does, and it stays of the order of C.
    assert channels * 0.7 < dof <= channels * 2.0


def test_tail_dof_bound_dominates_the_empirical_tail() -> None:
    rng = np.random.default_rng(1)
    t = rng.gamma(shape=3.0, scale=1 / 3.0, size=50_000) * rng.choice([1.0, 1.6], size=50_000, p=[0.95, 0.05])
    t = t / t.mean()
    dof = tail_dof(t)
    for level in (1.5, 2.0, 3.0, 4.0):
        empirical = float((t >= level).mean())
        bound = math.exp(-dof / 2 * (level - 1 - math.log(level)))
        assert bound >= empirical


def test_correlation_area_is_one_for_independent_pixels_and_grows_with_smoothing() -> None:
    rng = np.random.default_rng(2)
    independent = rng.chisquare(8, size=(20, 32, 32)) / 8
    assert correlation_area(independent) == pytest.approx(1.0, abs=0.15)
    correlated = correlated_field(rng, 20, (32, 32), 8)
    assert correlation_area(correlated) > 2.0


def test_correlation_area_reaches_far_correlations_but_not_far_noise() -> None:
    """A long reach with the noise floor finds correlation that lag 2 misses and adds nothing for independent
    pixels; without the floor, the positive parts of hundreds of noisy far lags would read several times 1."""
    rng = np.random.default_rng(3)
    independent = rng.chisquare(8, size=(20, 32, 32)) / 8
    assert correlation_area(independent, Reach(16, 3.0)) == pytest.approx(1.0, abs=0.2)
    assert correlation_area(independent, Reach(16, 0.0)) > 3.0
    blobs = np.stack([cv2.GaussianBlur(rng.standard_normal((32, 32)), (0, 0), 3.0) ** 2 for _ in range(20)])
    near, far = correlation_area(blobs), correlation_area(blobs, Reach(16, 3.0))
    assert far > 1.5 * near > 1.5


def test_correlation_profile_grows_with_the_region_from_one_pixel_to_the_whole_reach() -> None:
    """One pixel is one observation; the inflation grows with the square's side, past lag 2's area for large
    regions of a far-correlated map, and stays near 1 for independent pixels (the noise floor)."""
    rng = np.random.default_rng(5)
    independent = rng.chisquare(8, size=(20, 32, 32)) / 8
    assert max(correlation_profile(independent, Reach(16, 3.0, by_size=True))) < 1.3
    blobs = np.stack([cv2.GaussianBlur(rng.standard_normal((32, 32)), (0, 0), 3.0) ** 2 for _ in range(20)])
    profile = correlation_profile(blobs, Reach(16, 3.0, by_size=True))
    assert profile[0] == 1.0 and len(profile) == 17
    assert all(b >= a for a, b in itertools.pairwise(profile))
    assert correlation_area(blobs) < profile[-1] <= correlation_area(blobs, Reach(16, 3.0))
    null = fit_scale_null(blobs, Reach(16, 3.0, by_size=True))
    assert null.profile == profile and fit_scale_null(blobs).profile == ()
    assert null_from_dict(null_to_dict((null,))) == (null,)
    assert "profile" not in null_to_dict((fit_scale_null(blobs),))[0]  # old runs' and bundles' form


def test_the_default_correlation_area_sums_every_positive_lag_up_to_two() -> None:
    """The default reach is the estimator every bundle so far was fitted with: lags |dy|, |dx| <= 2, each
    correlation's positive part, written here as a plain loop."""
    rng = np.random.default_rng(4)
    maps = np.stack([cv2.GaussianBlur(rng.standard_normal((9, 13)), (0, 0), 1.0) ** 2 for _ in range(6)])
    centred = maps - maps.mean(axis=(1, 2), keepdims=True)
    var, want = float((centred**2).mean()), 0.0
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            a = centred[:, max(dy, 0) : 9 + min(dy, 0), max(dx, 0) : 13 + min(dx, 0)]
            b = centred[:, max(-dy, 0) : 9 + min(-dy, 0), max(-dx, 0) : 13 + min(-dx, 0)]
            want += max(float((a * b).mean()) / var, 0.0)
    assert correlation_area(maps) == pytest.approx(max(want, 1.0), rel=1e-9)


def test_fit_rejects_bad_maps() -> None:
    with pytest.raises(ValueError, match="N x H x W"):
        fit_scale_null(np.ones((4, 4)))
    with pytest.raises(ValueError, match="non-negative"):
        fit_scale_null(-np.ones((2, 4, 4)))
    with pytest.raises(ValueError):
        fit_scale_null(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="area"):
        nfa.ScaleNull(mean=1.0, dof=4.0, area=0.5)


def test_the_promise_holds_on_fresh_maps_with_the_fitted_null_and_breaks_with_the_tree_count_alone() -> None:
    rng = np.random.default_rng(3)
    val, fresh = two_scale_field(rng, 40), two_scale_field(rng, 40)
    nulls = fit_null(val)
    assert all(n.mean > 1.1 for n in nulls)  # the field is over-dispersed on purpose
    assert false_regions_per_image(fresh, CHANNELS, (32, 32), nulls) <= 1.0
    # The paper's chi^2 null with the small tree-node count (no fit) floods: the null is what matters.
    naive = tuple(nfa.ScaleNull(1.0, float(c), 1.0) for c in CHANNELS)
    assert false_regions_per_image(fresh, CHANNELS, (32, 32), naive) > 1.0


def test_the_fitted_null_finds_a_planted_bright_region() -> None:
    rng = np.random.default_rng(4)
    nulls = fit_null(two_scale_field(rng, 40))
    maps = two_scale_field(rng, 1)
    maps[0][0, 10:16, 10:16] *= 3.0
    maps[1][0, 5:8, 5:8] *= 3.0
    log_nfa = nfa.log_nfa_map([m[0] for m in maps], CHANNELS, (32, 32), nulls)
    regions = nfa.regions_from_log_nfa(log_nfa, -2.0)
    assert regions
    x, y, w, h = regions[0].bbox
    assert x <= 15 and x + w >= 10 and y <= 15 and y + h >= 10


def test_unit_null_keeps_the_papers_evidence_and_swaps_only_the_number_of_tests() -> None:
    rng = np.random.default_rng(5)
    maps = [rng.chisquare(6, size=(12, 10)) / 6, rng.chisquare(10, size=(6, 5)) / 10]
    paper = nfa.log_nfa_map(maps, [6, 10], (24, 20))
    unit = nfa.log_nfa_map(maps, [6, 10], (24, 20), [nfa.ScaleNull(1.0, 6.0), nfa.ScaleNull(1.0, 10.0)])
    shift = nfa.log10_number_of_tests([(12, 10), (6, 5)]) - nfa.log10_tree_tests([(12, 10), (6, 5)])
    np.testing.assert_allclose(paper - unit, shift, atol=1e-3)
    assert nfa.log10_tree_tests([(12, 10), (6, 5)]) == pytest.approx(math.log10(150))


def test_log_nfa_map_wants_one_null_per_scale() -> None:
    maps = [np.ones((4, 4)), np.ones((2, 2))]
    with pytest.raises(ValueError, match="null models"):
        nfa.log_nfa_map(maps, [4, 4], (4, 4), [nfa.ScaleNull(1.0, 4.0)])


def test_planted_defects_change_the_image_only_where_the_mask_says_and_cover_every_kind() -> None:
    rng = np.random.default_rng(6)
    images = (rng.normal(90, 12, size=(6, 96, 96, 3))).clip(0, 255).astype(np.uint8)
    samples = planted_set(images, seed=0, per_image=2)
    assert {s.kind for s in samples} == set(PLANTED_KINDS)
    assert {s.size for s in samples} <= set(SIZES)
    for sample in samples:
        assert sample.mask.any()
        assert sample.image.shape == images[0].shape and sample.image.dtype == np.uint8
    # Deterministic from the seed.
    again = planted_set(images, seed=0, per_image=2)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(samples, again, strict=True))


def test_plant_names_bad_kind_and_size() -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="kind"):
        plant(image, np.random.default_rng(0), "melt", "small")
    with pytest.raises(ValueError, match="size"):
        plant(image, np.random.default_rng(0), "blob", "huge")


def test_evidence_calibration_keeps_the_promise_at_the_deployed_epsilon_on_its_images_and_fresh_ones() -> None:
    rng = np.random.default_rng(7)
    val, fresh = two_scale_field(rng, 40), two_scale_field(rng, 40)
    channels = CHANNELS
    envelope = fit_null(val)
    nulls, factor = calibrate_evidence(envelope, val, channels, (32, 32), log10_epsilon=-1.0)
    assert factor in EVIDENCE_SCALES
    assert all(n.dof == pytest.approx(e.dof * factor) for n, e in zip(nulls, envelope, strict=True))
    assert false_regions_per_image(val, channels, (32, 32), nulls, -1.0) <= 0.1
    assert false_regions_per_image(fresh, channels, (32, 32), nulls, 0.0) <= 1.0
    # Too few validation images to count a rate of 1 in 10: the envelope is kept as it is.
    few = [m[:5] for m in val]
    assert calibrate_evidence(envelope, few, channels, (32, 32), log10_epsilon=-1.0)[1] == 1.0


def test_cross_fitting_counts_every_image_once_with_a_null_that_never_saw_it() -> None:
    rng = np.random.default_rng(8)
    maps = two_scale_field(rng, 23)
    slices = fold_slices(23, 10)
    covered = [i for s in slices for i in range(s.start, s.stop)]
    assert covered == list(range(23)) and all(s.stop - s.start in (2, 3) for s in slices)
    result = calibrate(maps, CHANNELS, (32, 32), log10_epsilon=-1.0, folds=10)
    # The first factor's counts, recomputed by hand: each block judged by a null fitted on the others.
    first = EVIDENCE_SCALES[0]
    regions = 0
    for block in slices:
        keep = np.ones(23, dtype=bool)
        keep[block] = False
        nulls = scaled(fit_null([m[keep] for m in maps]), first)
        regions += round(
            false_regions_per_image([m[block] for m in maps], CHANNELS, (32, 32), nulls, -1.0)
            * (block.stop - block.start)
        )
    assert result.counts[0].factor == first and result.counts[0].false_regions == regions
    assert result.folds == 10 and result.images == 23
    with pytest.raises(ValueError, match="at least 2 images"):
        fold_slices(1, 10)


def test_the_factor_is_the_last_that_passes_before_the_first_that_fails_and_its_bound_is_recorded() -> None:
    rng = np.random.default_rng(9)
    maps = two_scale_field(rng, 30)
    result = calibrate(maps, CHANNELS, (32, 32), log10_epsilon=-1.0)
    factors = [c.factor for c in result.counts]
    assert factors == list(EVIDENCE_SCALES[: len(factors)])  # tried smallest first, stopped at the first failure
    totals = [c.false_regions for c in result.counts]
    assert totals == sorted(totals)  # more evidence never removes a region
    chosen = next(c for c in result.counts if c.factor == result.factor)
    assert result.check.false_regions == chosen.false_regions and result.check.images == 30
    # 30 images and the promise 0.1 per image: 0 out-of-fold regions is needed (any count's bound is above it)
    if result.factor != EVIDENCE_SCALES[0]:
        assert chosen.false_regions == 0
    assert result.check.regions_upper == pytest.approx(poisson_upper(chosen.false_regions, 30))
    assert result.check.supported == (result.check.regions_upper <= 0.1)
    record = result.to_dict()
    assert record["images"] == 30 and record["false_regions_per_image_upper95"] == result.check.regions_upper
    assert all(n.dof == pytest.approx(e.dof * result.factor) for n, e in zip(result.nulls, fit_null(maps), strict=True))


def test_fresh_images_stay_within_the_recorded_bound() -> None:
    # The cross-fitted bound is a statement about images the fit never saw: check it on 200 of them.
    rng = np.random.default_rng(10)
    val, fresh = two_scale_field(rng, 40), two_scale_field(rng, 200)
    result = calibrate(val, CHANNELS, (32, 32), log10_epsilon=-1.0)
    rate = false_regions_per_image(fresh, CHANNELS, (32, 32), result.nulls, -1.0)
    assert rate <= result.check.regions_upper


def test_too_few_images_for_the_promise_are_counted_at_the_loosest_rate_they_can_vouch_for() -> None:
    rng = np.random.default_rng(11)
    maps = two_scale_field(rng, 21)
    result = calibrate(maps, CHANNELS, (32, 32), log10_epsilon=-2.0)
    # 21 images vouch at best for 3 / 21 = 0.143 per image: the rule counts at log10 0.143 = -0.85.
    assert result.check_log10_epsilon == pytest.approx(math.log10(poisson_upper(0, 21)))
    assert all(c.regions_at_check >= c.false_regions for c in result.counts)
    chosen = next(c for c in result.counts if c.factor == result.factor)
    assert chosen.regions_at_check == 0 or result.factor == EVIDENCE_SCALES[0]
    assert not result.check.supported and result.check.needed == 300
    # 40 images can vouch for 1 in 10 with none flagged (30 suffice): the rule counts at the deployed epsilon.
    assert calibrate(two_scale_field(rng, 40), CHANNELS, (32, 32), log10_epsilon=-1.0).check_log10_epsilon == -1.0


def test_per_map_weights_scale_each_maps_null_before_the_one_factor() -> None:
    """``calibrate(weights=...)`` (bench/evidence_per_map.py): unit weights change nothing; a weight
    multiplies its map's dof in the shipped null, and a map that speaks louder never lets the factor grow."""
    maps = two_scale_field(np.random.default_rng(9), 30)
    plain = calibrate(maps, CHANNELS, (32, 32), log10_epsilon=-1.0)
    unit = calibrate(maps, CHANNELS, (32, 32), log10_epsilon=-1.0, weights=[1.0, 1.0])
    assert unit.factor == plain.factor and unit.nulls == plain.nulls
    louder = calibrate(maps, CHANNELS, (32, 32), log10_epsilon=-1.0, weights=[4.0, 1.0])
    envelope = fit_null(maps)
    assert louder.nulls[0].dof == pytest.approx(envelope[0].dof * 4.0 * louder.factor)
    assert louder.nulls[1].dof == pytest.approx(envelope[1].dof * louder.factor)
    assert louder.factor <= plain.factor
    with pytest.raises(ValueError, match="weights"):
        calibrate(maps, CHANNELS, (32, 32), log10_epsilon=-1.0, weights=[1.0])
