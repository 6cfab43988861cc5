"""training.metrics against scikit-learn and brute-force definitions on small random cases."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from training import metrics


def _random_set(seed: int, n: int = 4, size: int = 12, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n - 1):  # the last image stays defect-free
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, size - 3, 2)
            h, w = rng.integers(1, 4, 2)
            masks[i, y : y + h, x : x + w] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    if ties:
        maps = np.round(maps, 1)  # many equal scores
    return maps.astype(np.float32), masks


def _brute_force_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """The definition, threshold by threshold: mean per-region overlap against FPR."""
    regions = []
    for i, mask in enumerate(masks):
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        regions += [(i, labels == k) for k in range(1, count)]
    free = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & free).sum() / free.sum()
        pro = np.mean([(pred[i] & region).sum() / region.sum() for i, region in regions])
        points.append((fpr, pro))
    x, y = np.array(points).T
    # Integrate up to max_fpr, interpolating the last segment.
    area = 0.0
    for j in range(1, len(x)):
        if x[j - 1] >= max_fpr:
            break
        x1, y1 = x[j], y[j]
        if x1 > max_fpr:
            y1 = y[j - 1] + (y[j] - y[j - 1]) * (max_fpr - x[j - 1]) / (x[j] - x[j - 1])
            x1 = max_fpr
        area += (x1 - x[j - 1]) * (y1 + y[j - 1]) / 2
    return area / max_fpr


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_auroc_matches_sklearn(seed: int, ties: bool) -> None:
    maps, masks = _random_set(seed, ties=ties)
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_image_auroc_matches_sklearn_with_ties() -> None:
    scores = np.array([0.1, 0.4, 0.4, 0.35, 0.8, 0.8, 0.2])
    labels = np.array([0, 0, 1, 1, 1, 0, 0], dtype=bool)
    assert metrics.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        metrics.image_auroc([0.1, 0.2], [True, True])


@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 3, 7])
def test_aupro_matches_brute_force(seed: int, ties: bool, max_fpr: float) -> None:
    maps, masks = _random_set(seed, ties=ties)
    assert metrics.aupro(maps, masks, max_fpr=max_fpr) == pytest.approx(
        _brute_force_aupro(maps, masks, max_fpr), abs=1e-9
    )


def test_aupro_weighs_regions_not_pixels() -> None:
    # One big region found perfectly, one small region missed entirely: PRO is 1/2 per region,
    # whereas a pixel-weighted overlap would be close to 1.
    masks = np.zeros((1, 20, 20), dtype=bool)
    masks[0, 0:10, 0:10] = True  # 100 px
    masks[0, 15, 15] = True  # 1 px
    maps = np.zeros((1, 20, 20), dtype=np.float32)
    maps[0, 0:10, 0:10] = 1.0
    curve = metrics.pro_curve(maps, masks)
    assert curve.y[1] == pytest.approx(0.5)  # first threshold: the big region only, no false positive
    assert curve.x[1] == 0.0
    # Then the only other threshold takes every pixel: (FPR 1, PRO 1). The curve from (0, 0.5) to
    # (1, 1) is 0.65 at FPR 0.3, so the normalised area is (0.5 + 0.65) / 2.
    assert metrics.aupro(maps, masks) == pytest.approx(0.575)


def test_perfect_and_inverted_maps() -> None:
    _, masks = _random_set(5)
    perfect = masks.astype(np.float32)
    assert metrics.pixel_auroc(perfect, masks) == 1.0
    assert metrics.aupro(perfect, masks) == pytest.approx(1.0)
    assert metrics.pixel_auroc(-perfect, masks) == 0.0
    assert metrics.aupro(-perfect, masks) == pytest.approx(0.0)


def test_mean_iou_counts_empty_on_empty_as_one() -> None:
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0, 0:2, 0:2] = True  # 4 px
    predictions = np.zeros_like(masks)
    predictions[0, 0:2, 0:3] = True  # 6 px, 4 shared -> 2/3
    predictions[2, 3, 3] = True  # a false alarm on a good image -> 0
    per_image = metrics.iou_per_image(predictions, masks)
    np.testing.assert_allclose(per_image, [4 / 6, 1.0, 0.0])
    assert metrics.mean_iou(predictions, masks) == pytest.approx((4 / 6 + 1.0) / 3)
    # All-empty predictions score the fraction of good images (the floor of a model that never fires).
    assert metrics.mean_iou(np.zeros_like(masks), masks) == pytest.approx(2 / 3)


def test_mean_iou_curve_matches_thresholding() -> None:
    maps, masks = _random_set(11, ties=True)
    thresholds = np.array([-1.0, 0.0, 0.7, 1.3, 2.0, 5.0])
    expected = [metrics.mean_iou(maps >= t, masks) for t in thresholds]
    np.testing.assert_allclose(metrics.mean_iou_curve(maps, masks, thresholds), expected, atol=1e-12)
    best = metrics.best_mean_iou(maps, masks, thresholds)
    assert best.miou == pytest.approx(max(expected))
    assert best.threshold == thresholds[int(np.argmax(expected))]


def test_best_mean_iou_default_thresholds_find_the_separating_level() -> None:
    _, masks = _random_set(2)
    separated = np.where(masks, 5.0, 0.0) + np.random.default_rng(0).uniform(0, 1, masks.shape)
    best = metrics.best_mean_iou(separated, masks)
    assert best.miou == pytest.approx(1.0)
    assert 1.0 <= best.threshold <= 5.0


def test_shape_mismatch_and_nan_are_rejected() -> None:
    with pytest.raises(ValueError, match="same shape"):
        metrics.pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5), bool))
    bad = np.zeros((1, 4, 4))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.pixel_auroc(bad, np.eye(4, dtype=bool)[None])


def test_segmentation_report_uses_folder_labels_when_given() -> None:
    maps, masks = _random_set(4, n=5)
    masks[3] = False  # a defect image whose mask is empty (as four MT_Uneven masks are)
    labels = np.array([True, True, True, True, False])
    report = metrics.segmentation_report(maps, masks, image_labels=labels, predicted_masks=maps > 1.0)
    scores = maps.reshape(5, -1).max(axis=1)
    assert report["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert report["miou"] == pytest.approx(metrics.mean_iou(maps > 1.0, masks))
    assert set(report) >= {"pixel_auroc", "aupro", "best_miou", "best_miou_threshold"}
