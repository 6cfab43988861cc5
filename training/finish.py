"""After training: score the validation good images, fit the NFA null, check detection power.

Everything here uses good validation images only (never the test split):

1. the best checkpoint scores them (image scores for the bundle's reference threshold);
2. the heads (training/heads.py) are fitted on the training and validation good images, and their
   maps of those images are computed out of sample (k folds for the Gaussian, the image's own bank rows
   left out for the memory bank);
3. the ``fitted`` NFA null is fitted per map (the flow's m_s on the validation images, each head's map
   on the out-of-sample maps of every good image) and its evidence factor chosen by cross-fitting on the
   validation images, with the 95 % bound of the false-alarm rate it gives (training/nfa_null.py
   ``calibrate``); with fewer than ``MIN_CALIBRATION_IMAGES`` of them the bundle keeps the paper's
   polyomino NFA at epsilon 1 (and export drops the heads);
4. defects are planted on them (training/planted.py) and the deployed decision (fitted NFA at the
   default epsilon) says how many it flags: the label-free check of detection power that
   ``uflow export`` warns on and the manifest records;
5. a few are kept as the bundle's self-test images;
6. the drift reference (edge_agent/inspection/drift.py): brightness, contrast and sharpness of the
   training and validation images, and the model's scores and mean m_0 on the validation images.

All of it is written to ``val_scores.json`` in the run directory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from edge_agent.bundle import MIN_GOOD_SCORES, ImageTestSpec
from edge_agent.inspection import nfa
from edge_agent.inspection.drift import build_reference
from edge_agent.inspection.image_test import ImageTest
from edge_agent.inspection.scoring import log_nfa_map_of
from edge_agent.promise import shortfall
from training.catalog import DETAIL_AUTO
from training.data import DatasetSplits, Record
from training.detail_choice import DetailChoice, choose_detail_share
from training.heads import CrossFit, fit_heads, out_of_sample_maps
from training.mask_choice import MaskChoice, choose_mask_fraction
from training.model import UFlow, fused_arrays, scale_maps, to_float_nchw, without_heads
from training.nfa_null import (
    DEFAULT_REACH,
    MIN_CALIBRATION_IMAGES,
    Reach,
    calibrate,
    fit_null,
    fit_scale_null,
    null_to_dict,
)
from training.planted import Planted, planted_set
from training.rundir import SELFTEST_DIR, VAL_SCORES_NAME, save_checkpoint, save_model, write_json

log = logging.getLogger(__name__)

# The deployed decision's default: at most one false region per 100 good images on average under the
# fitted null (docs/nfa.md: a plant counts false rejects per part, and epsilon is an expected count).
DEFAULT_LOG10_EPSILON = -2.0
PLANTED_IMAGES = 48  # at most this many validation images get a defect each
PLANTED_MIN = 24  # small validation sets get several defects per image to reach this many
# The image test's share of epsilon (edge_agent/inspection/image_test.py): chosen on the planted defects of
# every data set (docs/results.md, "The image test"); the regions keep the rest.
DEFAULT_IMAGE_SHARE = 0.1
# Where a detected defect is: each region keeps the pixels where the anomaly map reaches this fraction of
# the region's peak (edge_agent/inspection/delineation.py). Chosen on the planted defects of every data set
# (docs/results.md, "Where the defect is": bench/mask_fraction.py); the decision does not change. Each run
# now chooses its own on its planted defects (training/mask_choice.py); this one wins a tie.
DEFAULT_MASK_FRACTION = 0.8


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
    maps: list[np.ndarray],
    channels: Sequence[int],
    size: tuple[int, int],
    nulls: Sequence[nfa.ScaleNull] | None,
    heads: Sequence[str] = (),
    image_test: ImageTest | None = None,
) -> list[float]:
    """Per image, the smallest log10 NFA (maps in ``model.scales`` order, each N x H_s x W_s)."""
    return [
        float(log_nfa_map_of([m[i] for m in maps], channels, heads, size, nulls, image_test).min())
        for i in range(len(maps[0]))
    ]


def fit_image_test(model: UFlow, head_maps: list[np.ndarray], share: float = DEFAULT_IMAGE_SHARE) -> ImageTest | None:
    """The image test from the texture head's out-of-sample scores of every good image (None: no texture
    head, or too few images to place its tail)."""
    heads = [s.head for s in model.scales[len(model.flow_scales) :]]
    if "texture" not in heads:
        return None
    scores = head_maps[heads.index("texture")].reshape(-1).astype(np.float64)
    if len(scores) < MIN_GOOD_SCORES or not (np.isfinite(scores).all() and (scores > 0).all()):
        log.warning(
            "no image test: the texture head needs at least %d good images with finite, positive scores",
            MIN_GOOD_SCORES,
            extra={"event": "train_image_test_skipped", "images": len(scores), "needed": MIN_GOOD_SCORES},
        )
        return None
    return ImageTest(tuple(float(v) for v in scores), share)


def region_maps(model: UFlow, maps: list[np.ndarray]) -> list[np.ndarray]:
    """The maps the region tests read: all but the texture head's 1 x 1 score."""
    return [maps[i] for i in model.region_indices]


def backbone_features(model: UFlow, images: np.ndarray, batch_size: int) -> list[torch.Tensor]:
    """The frozen backbone's features (finest first, N x C x H x W each) of uint8 RGB ``images``."""
    chunks = [model.extract(to_float_nchw(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return [torch.cat([c[s] for c in chunks]) for s in range(len(chunks[0]))]


def evidence_maps(
    model: UFlow,
    images: np.ndarray,
    batch_size: int,
    cross: CrossFit | None = None,
    owners: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Every map of ``model.scales`` (N x H_s x W_s each); with ``cross``, the heads' maps come from heads
    that did not see ``owners[i]`` (the fitting image that image i is, or was planted on)."""
    model.eval()
    with torch.no_grad():
        features = backbone_features(model, images, batch_size)
        flow = [
            scale_maps(model.encode([f[i : i + batch_size] for f in features]).latents)
            for i in range(0, len(images), batch_size)
        ]
        maps = [torch.cat([chunk[s] for chunk in flow]).numpy() for s in range(len(model.flow_scales))]
        if cross is not None and owners is not None:
            heads = out_of_sample_maps(model.heads, cross, features, owners)
            maps += [heads[key] for key in model.heads]
        else:
            maps += [m.numpy() for m in model.head_maps(features)]
    return maps


def fused_scores(model: UFlow, maps: list[np.ndarray]) -> np.ndarray:
    """Image scores (max of the fused anomaly map, as the graph computes it) of per-map arrays."""
    amap = fused_arrays(model, maps, model.fusion_weights())
    return amap.reshape(len(amap), -1).max(axis=1)


def planted_maps(
    model: UFlow,
    images: np.ndarray,
    batch_size: int,
    seed: int = 0,
    cross: CrossFit | None = None,
    first_owner: int = 0,
) -> tuple[list[Planted], list[np.ndarray]]:
    """The defects training plants on (the first ``PLANTED_IMAGES`` of) ``images``, with every map of them.

    With ``cross``, the heads' maps of a defect planted on image j come from heads that did not see
    fitting image ``first_owner + j``. No defect (nothing changed a pixel): ``([], [])``.
    """
    chosen = images[:PLANTED_IMAGES]
    samples = planted_samples(images, seed)
    if not samples:
        return [], []
    stack = np.stack([s.image for s in samples])
    owners = first_owner + np.array([planted_source(chosen, s.image, s.mask) for s in samples])
    return samples, evidence_maps(model, stack, batch_size, cross, owners)


def planted_samples(images: np.ndarray, seed: int = 0) -> list[Planted]:
    """The defects training plants on the first ``PLANTED_IMAGES`` of ``images`` (several per image when
    they are few, to reach ``PLANTED_MIN``)."""
    chosen = images[:PLANTED_IMAGES]
    return planted_set(chosen, seed=seed, per_image=max(1, -(-PLANTED_MIN // max(len(chosen), 1))))


def planted_check(
    model: UFlow,
    images: np.ndarray,
    nulls: Sequence[nfa.ScaleNull] | None,
    log10_epsilon: float,
    batch_size: int,
    seed: int = 0,
    cross: CrossFit | None = None,
    first_owner: int = 0,
    image_test: ImageTest | None = None,
    planted: tuple[list[Planted], list[np.ndarray]] | None = None,
    log_nfa: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Share of defects planted on ``images`` that the NFA decision finds (a region touching the defect).

    ``cross`` and ``first_owner``: as :func:`planted_maps`. With ``image_test``, a detection of the image test
    (the whole frame) finds the defect too. ``planted``: the defects and their maps, and ``log_nfa``: the
    decision's maps of them (:func:`decision_maps`), when already computed.
    """
    samples, maps = planted or planted_maps(model, images, batch_size, seed, cross, first_owner)
    if not samples:
        return {"count": 0}
    if log_nfa is None:
        log_nfa = decision_maps(model, maps, nulls, image_test, log10_epsilon)
    hits: dict[str, list[bool]] = {}
    for sample, decided in zip(samples, log_nfa, strict=True):
        found = bool(((decided < log10_epsilon) & sample.mask).any())
        hits.setdefault(sample.kind, []).append(found)
        hits.setdefault(f"size_{sample.size}", []).append(found)
    every = [h for kind, values in hits.items() if not kind.startswith("size_") for h in values]
    return {
        "count": len(every),
        "log10_epsilon": log10_epsilon,
        "detection_rate": float(np.mean(every)),
        "per_kind": {kind: float(np.mean(values)) for kind, values in sorted(hits.items())},
    }


def decision_maps(
    model: UFlow,
    maps: list[np.ndarray],
    nulls: Sequence[nfa.ScaleNull] | None,
    image_test: ImageTest | None,
    log10_epsilon: float,
) -> list[np.ndarray]:
    """Per image, the deployed decision's log10 NFA map at the model size (maps in ``model.scales`` order)."""
    channels = [s.channels for s in model.scales]
    heads = [s.head for s in model.scales]
    size = (model.config.image_height, model.config.image_width)
    return [
        log_nfa_map_of([m[i] for m in maps], channels, heads, size, nulls, image_test, log10_epsilon)
        for i in range(len(maps[0]))
    ]


def planted_mask_choice(
    model: UFlow,
    planted: tuple[list[Planted], list[np.ndarray]],
    log_nfa: Sequence[np.ndarray],
    log10_epsilon: float,
) -> MaskChoice:
    """The mask fraction for this run (training/mask_choice.py): the decision's regions of the planted defects
    (``log_nfa``: :func:`decision_maps`), tightened on the run's own anomaly map, against the defects' pixels."""
    samples, maps = planted
    amaps = fused_arrays(model, maps, model.fusion_weights())
    detected = [decided < log10_epsilon for decided in log_nfa]
    return choose_mask_fraction(detected, amaps, np.stack([s.mask for s in samples]), DEFAULT_MASK_FRACTION)


def planted_source(images: np.ndarray, planted: np.ndarray, mask: np.ndarray) -> int:
    """The index of the good image a defect was planted on: the one equal to it outside the defect."""
    outside = ~mask
    errors = [float(np.abs(img[outside].astype(np.int16) - planted[outside]).mean()) for img in images]
    return int(np.argmin(errors))


def fit_nulls(
    model: UFlow,
    val_maps: list[np.ndarray],
    head_maps: list[np.ndarray],
    reach: Reach = DEFAULT_REACH,
) -> tuple[nfa.ScaleNull, ...]:
    """The flow's nulls from its validation maps, each head's from its out-of-sample maps of every good image."""
    flow = fit_null(val_maps[: len(model.flow_scales)], reach)
    first = len(model.flow_scales)
    return (*flow, *(fit_scale_null(head_maps[i - first], reach) for i in model.region_indices if i >= first))


def _choose_detail(
    run_dir: Path,
    model: UFlow,
    meta: dict[str, Any],
    maps: list[np.ndarray],
    head_maps: list[np.ndarray],
    planted: tuple[list[Planted], list[np.ndarray]],
) -> tuple[UFlow, DetailChoice | None, list[np.ndarray], list[np.ndarray], tuple[list[Planted], list[np.ndarray]]]:
    """Resolve ``detail_share="auto"`` on the planted defects (training/detail_choice.py) and write the run's new
    model: the chosen share, or the model without the detail head (its map dropped from every list)."""
    samples, planted_list = planted
    if not samples:
        return model, None, maps, head_maps, planted
    choice = choose_detail_share(model, planted_list, np.stack([s.mask for s in samples]), maps)
    if choice.drops_the_head:
        detail = next(i for i, s in enumerate(model.scales) if s.head == "detail")
        first = len(model.flow_scales)
        model = without_heads(model, {"detail"})
        maps = [m for i, m in enumerate(maps) if i != detail]
        head_maps = [m for i, m in enumerate(head_maps) if i != detail - first]
        planted = (samples, [m for i, m in enumerate(planted_list) if i != detail])
    else:
        model.config = replace(model.config, detail_share=choice.share)
    save_model(run_dir, model, meta)
    return model, choice, maps, head_maps, planted


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

    model, info = load_model(run_dir)
    source, images = ("val", val_images) if len(val_images) else ("train", train_images)
    records = splits.val if len(val_images) else splits.train
    cross, first_owner, head_maps = None, 0, []
    if model.heads:
        # The heads memorise every good image they may (training + validation); their nulls then need
        # maps of images they did not see: the cross-fit gives each image such maps.
        good = np.concatenate([train_images, val_images]) if len(val_images) else train_images
        with torch.no_grad():
            cross = fit_heads(model.heads, backbone_features(model, good, batch_size), seed=model.config.seed)
        first_owner = len(train_images) if len(val_images) else 0
        every = evidence_maps(model, good, batch_size, cross, np.arange(len(good)))
        head_maps = every[len(model.flow_scales) :]
    owners = first_owner + np.arange(len(images))
    maps = evidence_maps(model, images, batch_size, cross, owners)
    if model.heads:
        means = [float(np.mean(m)) for m in (*maps[: len(model.flow_scales)], *head_maps)]
        model.map_means.copy_(torch.tensor(means))
        save_checkpoint(run_dir, model, info.checkpoint_meta)  # the fitted heads and the fusion's means
    planted_pair = planted_maps(model, images, batch_size, cross=cross, first_owner=first_owner)
    detail_choice = None
    if model.config.detail_share == DETAIL_AUTO and any(s.head == "detail" for s in model.scales):
        model, detail_choice, maps, head_maps, planted_pair = _choose_detail(
            run_dir, model, info.checkpoint_meta, maps, head_maps, planted_pair
        )
    channels = [s.channels for s in model.scales]  # the scales of the model as chosen
    heads = [s.head for s in model.scales]
    size = (model.config.image_height, model.config.image_width)
    scores = fused_scores(model, maps)
    calibration, image_test = None, None
    if len(images) >= MIN_CALIBRATION_IMAGES:
        # Cross-fitted: every validation image is counted by a null fitted without it (training/nfa_null.py).
        # The shipped null: the flow's from the validation maps, each head's from its out-of-sample maps.
        envelope = fit_nulls(model, maps, head_maps) if model.heads else None
        image_test = fit_image_test(model, head_maps)
        # The regions keep 1 - share of epsilon; the image test's share rests on its own null (image_test.py).
        regions_epsilon = DEFAULT_LOG10_EPSILON - (image_test.region_shift if image_test else 0.0)
        region_channels = [channels[i] for i in model.region_indices]
        calibration = calibrate(region_maps(model, maps), region_channels, size, regions_epsilon, envelope=envelope)
        nulls, evidence_scale = calibration.nulls, calibration.factor
        epsilon = DEFAULT_LOG10_EPSILON
        message = shortfall(calibration.check)
        if message:
            log.warning(message, extra={"event": "train_promise_unsupported", "images": len(images)})
    else:
        # A null fitted on a handful of images does not know its own tail: the paper's conservative NFA.
        nulls, evidence_scale, epsilon = None, None, 0.0
        log.warning(
            "too few validation images to fit the NFA null: the bundle will use the paper's polyomino NFA",
            extra={"event": "train_nfa_null_skipped", "images": len(images), "needed": MIN_CALIBRATION_IMAGES},
        )
    fitted = min_log_nfa(maps, channels, size, nulls, heads, image_test)
    polyomino = min_log_nfa(maps, channels, size, None, heads)
    # The decision's maps of the planted defects: read by the planted check and the mask fraction's choice.
    planted_log_nfa = decision_maps(model, planted_pair[1], nulls, image_test, epsilon) if planted_pair[0] else []
    planted = planted_check(
        model,
        images,
        nulls,
        epsilon,
        batch_size,
        cross=cross,
        first_owner=first_owner,
        image_test=image_test,
        planted=planted_pair,
        log_nfa=planted_log_nfa,
    )
    mask_fraction, mask_choice = (DEFAULT_MASK_FRACTION if nulls is not None else 0.0), None
    if nulls is not None and planted_pair[0]:
        mask_choice = planted_mask_choice(model, planted_pair, planted_log_nfa, epsilon)
        mask_fraction = mask_choice.fraction
    nll = maps[0].reshape(len(maps[0]), -1).mean(axis=1)
    drift = build_reference(np.concatenate([train_images, val_images]), scores.tolist(), nll.tolist())
    result: dict[str, Any] = {  # the selftest JSON
        "source": source,
        "images": [str(r.image) for r in records],
        "scores": [float(s) for s in scores],
        "nfa_null": null_to_dict(nulls) if nulls is not None else None,
        "nfa_evidence_scale": evidence_scale,
        "nfa_calibration": calibration.to_dict() if calibration is not None else None,
        "image_test": None
        if image_test is None
        else ImageTestSpec(share=image_test.share, tail=image_test.tail, scores=image_test.scores).model_dump(),
        "log10_epsilon": epsilon,
        "mask_fraction": mask_fraction,
        "mask_fraction_choice": None if mask_choice is None else mask_choice.to_dict(),
        "min_log_nfa": fitted,
        "nfa_flagged": [v < epsilon for v in fitted],
        "min_log_nfa_polyomino": polyomino,
        "planted": planted,
        "detail_share": None if detail_choice is None else detail_choice.to_dict(),
        "drift_reference": drift.model_dump(mode="json"),
    }
    write_json(run_dir / VAL_SCORES_NAME, result)
    _write_selftest(run_dir, records, images, selftest_count)
    log.info(
        "validation scored",
        extra={
            "event": "train_finish",
            "source": source,
            "images": len(images),
            "nfa_null": result["nfa_null"],
            "log10_epsilon": epsilon,
            "flagged_good": int(sum(result["nfa_flagged"])),
            "evidence_scale": evidence_scale,
            "calibration_false_regions": None if calibration is None else calibration.check.false_regions,
            "false_regions_upper95": None if calibration is None else calibration.check.regions_upper,
            "planted_detection_rate": planted.get("detection_rate"),
            "image_test_images": None if image_test is None else image_test.images,
        },
    )
    return result
