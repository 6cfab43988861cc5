"""Where a detected defect is drawn: the mask fraction, chosen per run on its own planted defects.

Each detected region keeps the pixels where the anomaly map reaches a fraction of the region's peak
(edge_agent/inspection/delineation.py ``tighten``); the decision does not change. The right fraction
follows the anomaly map's sharpness: 0.8 was chosen for the default map on every data set
(docs/results.md, "Where the defect is"), but a run whose map weighs the sharp detail map heavily needs a
lower one (the bottle at half the weight: mIoU 0.32 at 0.8, while the map's best threshold reaches 0.65).
So training's finish chooses it for each run: the fraction whose masks overlap the defects planted on the
validation images best (mean IoU), the deployed decision's own regions tightened as the agent tightens
them. On a tie the one nearest the default wins.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.inspection.delineation import tighten
from training import metrics

log = logging.getLogger(__name__)

FRACTIONS: tuple[float, ...] = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class MaskChoice:
    """The chosen fraction and the planted mean IoU of every candidate."""

    fraction: float
    miou: dict[float, float]
    planted: int

    def to_dict(self) -> dict[str, object]:
        return {
            "chosen": self.fraction,
            "planted": self.planted,
            "planted_miou": {f"{f:g}": round(v, 5) for f, v in self.miou.items()},
        }


def choose_mask_fraction(
    detected: Sequence[np.ndarray], anomaly_maps: np.ndarray, truth: np.ndarray, default: float
) -> MaskChoice:
    """The fraction in ``FRACTIONS`` whose tightened masks of the planted images match ``truth`` best.

    ``detected``: the decision's masks (log10 NFA below epsilon) of the planted images, H x W each;
    ``anomaly_maps``: their fused anomaly maps (N x H x W); ``truth``: the planted defects' pixels.
    """
    if not len(detected) or len(detected) != len(anomaly_maps) or len(detected) != len(truth):
        raise ValueError(
            f"need as many masks as maps and defects, got {len(detected)}, {len(anomaly_maps)}, {len(truth)}"
        )
    miou = {}
    for fraction in FRACTIONS:
        masks = np.stack([tighten(d, a, fraction) for d, a in zip(detected, anomaly_maps, strict=True)])
        miou[fraction] = float(metrics.iou_per_image(masks, truth).mean())
    best = max(FRACTIONS, key=lambda f: (round(miou[f], 9), -abs(f - default)))
    log.info(
        "mask fraction chosen on the planted defects",
        extra={"event": "train_mask_fraction", "chosen": best, "planted_miou": round(miou[best], 4)},
    )
    return MaskChoice(best, miou, len(detected))
