"""How much the detail map weighs in the anomaly map: chosen per run on its own planted defects.

The detail head (training/heads.py) is a stride-8 positional Gaussian that the anomaly map fuses and no NFA
test reads, so its weight moves the map a person sees (pixel AUROC, AUPRO, the image score, the masks) and
never the decision. Which weight helps depends on the product: on objects and spindles a heavy weight
sharpens the map (the bottle's AUPRO 0.80 -> 0.94 at half the weight), on a texture like magnetic tile any
weight lowers the ranking of images by the map's maximum (docs/results.md, "The detail map"). No one weight
holds across the data sets, so training's finish chooses it for each run the way the defaults are chosen
for all of them: on the defects planted on the validation images (heads that did not see the image they
were planted on), against the clean validation images.

The candidates are the fusion without the detail map (the head is then dropped from the run: the bundle
is what it would have been without it), the same weight as every map, and shares of 0.25, 0.5 and 0.75.
Each is scored by the mean of three columns on the planted set (pixel AUROC and AUPRO over the planted and
clean images, the image AUROC of the map's maximum, planted against clean); the highest mean wins, the
earlier candidate on a tie, so a weight has to earn its place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training import metrics
from training.catalog import DETAIL_AUTO
from training.model import UFlow, fused_arrays

log = logging.getLogger(__name__)

__all__ = ["CANDIDATES", "DETAIL_AUTO", "DetailChoice", "choose_detail_share", "parse_detail_share"]

WITHOUT = "without"
EQUAL = "equal"
# The weights tried, by label (0.0: the detail map not fused; None: the same weight as every map), in order
# of preference on a tie: the fewest changes to the anomaly map first.
CANDIDATES: tuple[tuple[str, float | None], ...] = (
    (WITHOUT, 0.0),
    (EQUAL, None),
    ("0.25", 0.25),
    ("0.5", 0.5),
    ("0.75", 0.75),
)


def parse_detail_share(text: str) -> float | str | None:
    """``--detail-share``: "auto" (chosen at training's finish), "equal" (the same as every map's) or a share."""
    if text in (DETAIL_AUTO, EQUAL):
        return None if text == EQUAL else DETAIL_AUTO
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--detail-share takes {DETAIL_AUTO}, {EQUAL} or a share in (0, 1), got {text!r}") from None


@dataclass(frozen=True)
class DetailChoice:
    """The chosen candidate and every candidate's planted columns (pixel AUROC, AUPRO, image AUROC, mean)."""

    label: str
    share: float | None  # the chosen weight (0.0: without the detail map; None: the same as every map's)
    scores: dict[str, tuple[float, float, float, float]]
    planted: int
    clean: int

    @property
    def drops_the_head(self) -> bool:
        return self.label == WITHOUT

    def to_dict(self) -> dict[str, object]:
        return {
            "chosen": self.label,
            "share": self.share,
            "planted": self.planted,
            "clean": self.clean,
            "columns": "pixel AUROC, AUPRO, image AUROC of the map maximum, their mean",
            "scores": {k: [round(v, 5) for v in values] for k, values in self.scores.items()},
        }


def _columns(amaps: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> tuple[float, float, float, float]:
    peaks = amaps.reshape(len(amaps), -1).max(axis=1)
    values = (
        metrics.pixel_auroc(amaps, masks),
        metrics.aupro(amaps, masks),
        metrics.image_auroc(peaks, labels),
    )
    return (*values, float(np.mean(values)))


def choose_detail_share(
    model: UFlow, planted_maps: Sequence[np.ndarray], planted_masks: np.ndarray, clean_maps: Sequence[np.ndarray]
) -> DetailChoice:
    """Score every candidate weight of the detail map on planted defects against clean images; the best wins.

    ``planted_maps`` and ``clean_maps``: every map of ``model.scales`` (N x H_s x W_s), of the planted images
    and of the clean validation images; ``planted_masks``: the planted defects' pixels (N x H x W).
    """
    if not any(s.head == "detail" for s in model.scales):
        raise ValueError("the run has no detail head: there is no detail share to choose")
    maps = [np.concatenate([p, c]) for p, c in zip(planted_maps, clean_maps, strict=True)]
    clean = len(clean_maps[0])
    masks = np.concatenate([planted_masks.astype(bool), np.zeros((clean, *planted_masks.shape[1:]), bool)])
    labels = np.r_[np.ones(len(planted_masks), bool), np.zeros(clean, bool)]
    scores = {
        label: _columns(fused_arrays(model, maps, model.detail_weights(share)), masks, labels)
        for label, share in CANDIDATES
    }
    best = CANDIDATES[0]
    for candidate in CANDIDATES[1:]:
        if scores[candidate[0]][3] > scores[best[0]][3]:
            best = candidate
    choice = DetailChoice(best[0], best[1], scores, len(planted_masks), clean)
    log.info(
        "detail map weight chosen on the planted defects",
        extra={"event": "train_detail_share", "chosen": best[0], **{k: round(v[3], 4) for k, v in scores.items()}},
    )
    return choice
