"""After training: score the validation good images, fit the NFA null, check detection power.

Everything here uses good validation images only (never the test split):

1. the best checkpoint scores them (image scores for the bundle's reference threshold);
2. the ``fitted`` NFA null is fitted on their m_s maps and its evidence factor chosen by cross-fitting,
   with the 95 % bound of the false-alarm rate it gives (training/nfa_null.py ``calibrate``); with fewer
   than ``MIN_CALIBRATION_IMAGES`` of them the bundle keeps the paper's polyomino NFA at epsilon 1;
3. defects are planted on them (training/planted.py) and the deployed decision (fitted NFA at the
   default epsilon) says how many it flags: the label-free check of detection power that
   ``uflow export`` warns on and the manifest records;
4. a few are kept as the bundle's self-test images;
5. the drift reference (edge_agent/inspection/drift.py): brightness, contrast and sharpness of the
   training and validation images, and the model's scores and mean m_0 on the validation images.

All of it is written to ``val_scores.json`` in the run directory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.inspection import nfa
from edge_agent.inspection.drift import build_reference
from edge_agent.inspection.promise import shortfall
from training.data import DatasetSplits, Record
from training.model import UFlow, predict
from training.nfa_null import MIN_CALIBRATION_IMAGES, calibrate, null_to_dict
from training.planted import planted_set
from training.rundir import SELFTEST_DIR, VAL_SCORES_NAME, write_json

log = logging.getLogger(__name__)

# The deployed decision's default: at most one false region per 100 good images on average under the
# fitted null (docs/nfa.md: a plant counts false rejects per part, and epsilon is an expected count).
DEFAULT_LOG10_EPSILON = -2.0
PLANTED_IMAGES = 48  # at most this many validation images get a defect each
PLANTED_MIN = 24  # small validation sets get several defects per image to reach this many


def _write_selftest(run_dir: Path, records: Sequence[Record], images: np.ndarray, count: int) -> list[str]:
    folder = run_dir / SELFTEST_DIR
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (record, image) in enumerate(zip(records[:count], images[:count], strict=False)):
        name = f"{i:02d}_{record.image.stem}.png"
        cv2.imwrite(str(folder / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        names.append(f"{SELFTEST_DIR}/{name}")
    return names


def min_log_nfa(
    maps: list[np.ndarray], channels: Sequence[int], size: tuple[int, int], nulls: Sequence[nfa.ScaleNull] | None
) -> list[float]:
    """Per image, the smallest log10 NFA (maps finest first, each N x H_s x W_s)."""
    return [float(nfa.log_nfa_map([m[i] for m in maps], channels, size, nulls).min()) for i in range(len(maps[0]))]


def planted_check(
    model: UFlow,
    images: np.ndarray,
    nulls: Sequence[nfa.ScaleNull] | None,
    log10_epsilon: float,
    batch_size: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Share of defects planted on ``images`` that the NFA decision finds (a region touching the defect)."""
    chosen = images[:PLANTED_IMAGES]
    per_image = max(1, -(-PLANTED_MIN // max(len(chosen), 1)))
    samples = planted_set(chosen, seed=seed, per_image=per_image)
    if not samples:
        return {"count": 0}
    stack = np.stack([s.image for s in samples])
    _, maps = predict(model, stack, batch_size)
    channels = [s.channels for s in model.scales]
    size = (model.config.image_height, model.config.image_width)
    hits: dict[str, list[bool]] = {}
    for i, sample in enumerate(samples):
        log_nfa = nfa.log_nfa_map([m[i] for m in maps], channels, size, nulls)
        found = bool(((log_nfa < log10_epsilon) & sample.mask).any())
        hits.setdefault(sample.kind, []).append(found)
        hits.setdefault(f"size_{sample.size}", []).append(found)
    every = [h for kind, values in hits.items() if not kind.startswith("size_") for h in values]
    return {
        "count": len(every),
        "log10_epsilon": log10_epsilon,
        "detection_rate": float(np.mean(every)),
        "per_kind": {kind: float(np.mean(values)) for kind, values in sorted(hits.items())},
    }


def finish_run(
    run_dir: Path,
    splits: DatasetSplits,
    val_images: np.ndarray,
    train_images: np.ndarray,
    selftest_count: int,
    batch_size: int,
) -> dict[str, Any]:
    """Write ``val_scores.json`` (scores, fitted null, NFA on good images, planted check) and self-tests."""
    from training.rundir import load_model

    model, _ = load_model(run_dir)
    source, images = ("val", val_images) if len(val_images) else ("train", train_images)
    records = splits.val if len(val_images) else splits.train
    amaps, maps = predict(model, images, batch_size)
    scores = amaps.reshape(len(amaps), -1).max(axis=1)
    channels = [s.channels for s in model.scales]
    size = (model.config.image_height, model.config.image_width)
    calibration = None
    if len(images) >= MIN_CALIBRATION_IMAGES:
        # Cross-fitted: every validation image is counted by a null fitted without it (training/nfa_null.py).
        calibration = calibrate(maps, channels, size, DEFAULT_LOG10_EPSILON)
        nulls, evidence_scale = calibration.nulls, calibration.factor
        epsilon = DEFAULT_LOG10_EPSILON
        message = shortfall(calibration.check)
        if message:
            log.warning(message, extra={"event": "train.promise_unsupported", "images": len(images)})
    else:
        # A null fitted on a handful of images does not know its own tail: the paper's conservative NFA.
        nulls, evidence_scale, epsilon = None, None, 0.0
        log.warning(
            "too few validation images to fit the NFA null: the bundle will use the paper's polyomino NFA",
            extra={"event": "train.nfa_null_skipped", "images": len(images), "needed": MIN_CALIBRATION_IMAGES},
        )
    fitted = min_log_nfa(maps, channels, size, nulls)
    polyomino = min_log_nfa(maps, channels, size, None)
    planted = planted_check(model, images, nulls, epsilon, batch_size)
    nll = maps[0].reshape(len(maps[0]), -1).mean(axis=1)
    drift = build_reference(np.concatenate([train_images, val_images]), scores.tolist(), nll.tolist())
    result = {
        "source": source,
        "images": [str(r.image) for r in records],
        "scores": [float(s) for s in scores],
        "nfa_null": null_to_dict(nulls) if nulls is not None else None,
        "nfa_evidence_scale": evidence_scale,
        "nfa_calibration": calibration.to_dict() if calibration is not None else None,
        "log10_epsilon": epsilon,
        "min_log_nfa": fitted,
        "nfa_flagged": [v < epsilon for v in fitted],
        "min_log_nfa_polyomino": polyomino,
        "planted": planted,
        "drift_reference": drift.model_dump(mode="json"),
    }
    write_json(run_dir / VAL_SCORES_NAME, result)
    _write_selftest(run_dir, records, images, selftest_count)
    log.info(
        "validation scored",
        extra={
            "event": "train.finish",
            "source": source,
            "images": len(images),
            "nfa_null": result["nfa_null"],
            "log10_epsilon": epsilon,
            "flagged_good": int(sum(result["nfa_flagged"])),
            "evidence_scale": evidence_scale,
            "calibration_false_regions": None if calibration is None else calibration.check.false_regions,
            "false_regions_upper95": None if calibration is None else calibration.check.regions_upper,
            "planted_detection_rate": planted.get("detection_rate"),
        },
    )
    return result
