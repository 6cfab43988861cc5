"""The exact confidence bounds behind the false-alarm promise (edge_agent/promise.py) and its words.

The bounds are checked against scipy's distributions (the device has no scipy, so the module has its
own); the warning text is checked by the facts it must carry: the promise, the images it needs, the
images it had and how many more to record.
"""

from __future__ import annotations

import math

import pytest

from edge_agent.promise import (
    FOLDER_CALIBRATION_SHARE,
    binomial_interval,
    binomial_upper,
    check_promise,
    describe,
    images_needed,
    per_parts,
    poisson_interval,
    poisson_upper,
    shortfall,
)

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize(("count", "images"), [(0, 1), (0, 21), (0, 300), (1, 21), (3, 100), (5, 25), (40, 252)])
def test_bounds_match_the_exact_distributions(count: int, images: int) -> None:
    assert poisson_upper(count, images) == pytest.approx(stats.chi2.ppf(0.95, 2 * count + 2) / (2 * images), rel=1e-6)
    low, high = poisson_interval(count, images)
    assert high == pytest.approx(stats.chi2.ppf(0.975, 2 * count + 2) / (2 * images), rel=1e-6)
    assert low == (pytest.approx(stats.chi2.ppf(0.025, 2 * count) / (2 * images), rel=1e-6) if count else 0.0)
    if count < images:
        assert binomial_upper(count, images) == pytest.approx(stats.beta.ppf(0.95, count + 1, images - count), rel=1e-6)
        low, high = binomial_interval(count, images)
        assert high == pytest.approx(stats.beta.ppf(0.975, count + 1, images - count), rel=1e-6)
        assert low == (pytest.approx(stats.beta.ppf(0.025, count, images - count + 1), rel=1e-6) if count else 0.0)


def test_zero_events_bound_is_the_rule_of_three_and_sets_the_images_needed() -> None:
    assert poisson_upper(0, 100) == pytest.approx(-math.log(0.05) / 100)
    assert images_needed(0.01) == 300  # -ln 0.05 / 0.01 = 299.6
    assert images_needed(0.1) == 30
    # false regions seen at half the promise: many more images to tell them apart from it
    assert images_needed(0.01, observed_rate=0.005) > 1000
    # seen above the promise: no number of images of the same kind supports it
    assert images_needed(0.01, observed_rate=0.02) is None
    with pytest.raises(ValueError, match="positive"):
        images_needed(0.0)
    with pytest.raises(ValueError, match="count"):
        poisson_upper(-1, 10)


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="positive total"):
        binomial_upper(0, 0)


def test_a_handful_of_images_cannot_support_one_in_a_hundred_and_the_text_says_what_is_missing() -> None:
    check = check_promise(0.01, images=21, false_regions=0, images_flagged=0)
    assert not check.supported and check.needed == 300
    assert check.regions_upper == pytest.approx(0.1427, abs=1e-4)
    message = shortfall(check)
    assert message is not None
    for fact in ("1 per 100 parts", "300", "21", "279 more good images", "14 per 100 parts"):
        assert fact in message
    # a folder holds out only its calibration share, so it needs more than the missing images themselves
    assert f"add about {math.ceil(279 / FOLDER_CALIBRATION_SHARE)} to a folder" in message


def test_enough_clean_images_support_the_promise() -> None:
    check = check_promise(0.01, images=320, false_regions=0, images_flagged=0)
    assert check.supported and shortfall(check) is None
    assert "320 good calibration images" in describe(check, folds=10)


def test_a_model_that_flags_good_parts_too_often_is_told_so_not_to_record_more() -> None:
    check = check_promise(0.01, images=25, false_regions=5, images_flagged=5)
    message = shortfall(check)
    assert message is not None and check.needed is None
    assert "5 false regions" in message and "20 per 100 parts" in message and "not met" in message
    assert "record" not in message


def test_rates_in_plant_words() -> None:
    assert per_parts(0.01) == "1 per 100 parts"
    assert per_parts(0.1427) == "14 per 100 parts"
    assert per_parts(0.0299) == "3 per 100 parts"
    assert per_parts(0.001) == "1 per 1,000 parts"
    assert per_parts(1.0) == "1 per part"
