"""Drift statistics and the sliding-window test (edge_agent/inspection/drift.py) on synthetic surfaces."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent.bundle import DriftStat
from edge_agent.config import DriftConfig
from edge_agent.demo.synthetic import good_image
from edge_agent.inspection.drift import (
    DriftMonitor,
    build_reference,
    image_statistics,
    ks_distance,
    reference_stat,
)

SIZE = 96


def _surfaces(count: int, start: int = 0) -> np.ndarray:
    return np.stack([good_image(seed, SIZE, SIZE) for seed in range(start, start + count)])


def _brighter(image: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(np.rint(image.astype(np.float32) * gain), 0, 255).astype(np.uint8)


def _defocus(image: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigma)


def test_statistics_separate_light_from_focus() -> None:
    image = good_image(3, SIZE, SIZE)
    brightness, contrast, sharpness = image_statistics(image)
    b2, c2, s2 = image_statistics(_brighter(image, 1.15))
    assert b2 == pytest.approx(brightness * 1.15, rel=0.02)
    # A gain is a brightness change only: contrast and sharpness are normalised by it.
    assert c2 == pytest.approx(contrast, rel=0.02)
    assert s2 == pytest.approx(sharpness, rel=0.05)
    b3, _, s3 = image_statistics(_defocus(image))
    assert b3 == pytest.approx(brightness, rel=0.01)
    assert s3 < 0.5 * sharpness


def test_ks_distance_is_exact_with_ties() -> None:
    assert ks_distance(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert ks_distance(np.array([5.0, 6.0]), np.array([1.0, 2.0])) == 1.0
    assert ks_distance(np.array([1.0, 1.0, 3.0, 3.0]), np.array([1.0, 3.0])) == 0.0
    assert ks_distance(np.array([1.0, 2.0, 3.0, 4.0]), np.array([3.0, 4.0])) == pytest.approx(0.5)


def test_reference_stat_validates() -> None:
    stat = reference_stat([3.0, 1.0, 2.0])
    assert stat.count == 3 and stat.quantiles[0] == 1.0 and stat.quantiles[-1] == 3.0
    with pytest.raises(ValueError, match="finite"):
        reference_stat([float("nan")])
    with pytest.raises(ValidationError, match="sorted"):
        DriftStat(quantiles=(2.0, 1.0), count=2)


def _monitor(window: int = 40) -> DriftMonitor:
    reference = build_reference(_surfaces(40), scores=np.linspace(0.2, 0.3, 40), nll=np.linspace(1.0, 1.1, 40))
    return DriftMonitor(reference, DriftConfig(window=window, min_frames=10, sample_every_s=0.0))


def _feed(monitor: DriftMonitor, images: np.ndarray) -> list[list[str]]:
    reasons = []
    for image in images:
        monitor.add(image, passed=True, model_stats=(0.25, 1.05))
        reasons.append(monitor.report().reasons)
    return reasons


def test_same_images_do_not_drift() -> None:
    monitor = _monitor()
    history = _feed(monitor, _surfaces(60, start=100))
    assert all(r == [] for r in history)
    report = monitor.report()
    assert report.enabled and {s.name for s in report.stats} == {"brightness", "contrast", "sharpness", "score", "nll"}


@pytest.mark.parametrize(
    ("change", "reason", "not_reason"),
    [(lambda im: _brighter(im, 1.15), "brightness", "blur"), (_defocus, "blur", "brightness")],
)
def test_a_step_raises_its_reason_within_the_window(change, reason: str, not_reason: str) -> None:
    window = 40
    monitor = _monitor(window)
    _feed(monitor, _surfaces(window, start=100))
    after = _feed(monitor, np.stack([change(im) for im in _surfaces(window, start=200)]))
    first = next(i for i, r in enumerate(after) if reason in r)
    assert first < window  # found inside one window of changed frames
    assert first >= window // 4  # and not from a single frame: the window has to fill
    assert not any(not_reason in r for r in after)
    problems = monitor.report().problems
    assert any(f"drift ({reason})" in p for p in problems)


def test_score_only_from_passed_frames() -> None:
    monitor = _monitor()
    images = _surfaces(40, start=100)
    for image in images:
        monitor.add(image, passed=False, model_stats=(0.9, 5.0))
    by_name = {s.name: s for s in monitor.report().stats}
    assert by_name["score"].frames == 0 and by_name["brightness"].frames == 40
    for image in images:
        monitor.add(image, passed=True, model_stats=(0.9, 5.0))
    assert monitor.report().reasons == ["score"]


def test_without_reference_the_check_is_off_and_says_so() -> None:
    monitor = DriftMonitor(None)
    monitor.add(good_image(0, SIZE, SIZE), passed=True, model_stats=(0.1, 1.0))
    report = monitor.report()
    assert not report.enabled and "off" in report.note and report.reasons == []
    assert not monitor.due()


def test_sampling_interval() -> None:
    monitor = DriftMonitor(build_reference(_surfaces(4)), DriftConfig(window=10, min_frames=2, sample_every_s=1.0))
    assert monitor.due(now=100.0)
    monitor.add(good_image(0, SIZE, SIZE), passed=True, now=100.0)
    assert not monitor.due(now=100.5)
    assert monitor.due(now=101.0)
    assert monitor.frames_sampled == 1


def test_tiny_bundle_ships_a_reference_and_old_bundles_load(tiny_bundle, contract_bundle) -> None:
    from edge_agent.bundle import load_bundle

    reference = load_bundle(tiny_bundle).manifest.drift_reference
    assert reference is not None and reference.score is not None and reference.nll is not None
    assert reference.brightness.count >= 40 and 0.0 < reference.brightness.quantiles[32] < 1.0
    assert load_bundle(contract_bundle).manifest.drift_reference is None
