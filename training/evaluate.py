"""``uflow evaluate``: a trained run (torch) or its exported bundle (ONNX Runtime) on a dataset's test split.

What is measured (docs/design.md section 6, all at the model input size, masks resized with nearest neighbour):
pixel AUROC, AUPRO (FPR up to 0.3, normalised), image AUROC (map maximum), mIoU of the NFA mask
(log10 NFA < 0, the agent's decision with epsilon = 1; over ALL test images, an empty prediction on a
good image scores 1) and the best mIoU of ``anomaly map >= t`` over thresholds (the "oracle"),
overall and per defect type. Per type, the AUROCs and AUPRO use that type's images plus every good
test image; the mIoUs average over that type's images only, at the overall oracle threshold.

Two paths, the same NFA (``edge_agent.inspection.nfa.log_nfa_map``, what the agent runs):
- ``--run`` alone: the run's best checkpoint through torch (fast, batched).
- ``--bundle``: the exported ``model.onnx`` through the agent's ``OnnxRuntimeEngine`` (what the
  device runs). Both are written in ``metrics.json`` under ``source``; ``tests/test_evaluate.py``
  checks that they agree.

Also in ``metrics.json``: the latent statistics that decide whether the NFA can fire (m_s on good
pixels vs defect pixels per scale, the per-image minimum log10 NFA), the numbers the analysis in
docs/results.md is made of.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm.auto import tqdm

from edge_agent.inspection import nfa
from edge_agent.inspection.delineation import tighten
from edge_agent.inspection.image_test import ImageTest
from edge_agent.inspection.scoring import log_nfa_map_of, nfa_inputs
from training import metrics
from training.data import GOOD, DatasetSplits, Record, load_image, load_mask, open_dataset

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
QUANTILES = (0.5, 0.9, 0.99)


class EvaluationError(ValueError):
    """The evaluation cannot run (no test split, no defects, nothing to compare); the message says why."""


@dataclass
class Predictions:
    """Model outputs on the test images, at the model size (scale maps at their own sizes)."""

    source: str  # "torch" or "onnxruntime"
    anomaly_maps: np.ndarray  # float32 (N, H, W)
    scale_maps: list[np.ndarray]  # per scale float32 (N, H_s, W_s)
    channels: tuple[int, ...]
    seconds_per_image: float
    nulls: tuple[nfa.ScaleNull, ...] | None = None  # None: the paper's polyomino NFA
    log10_epsilon: float = 0.0
    heads: tuple[str, ...] = ()  # the head of each map (empty: all flow); the polyomino NFA reads the flow's
    image_test: ImageTest | None = None  # the fitted NFA's image test (the texture map's), when shipped
    mask_fraction: float = 0.0  # each detected region tightened to this fraction of its peak (0: as the NFA gives it)


@dataclass
class TestSet:
    """The test records with their images, masks and labels at the model size."""

    records: tuple[Record, ...]
    images: np.ndarray  # uint8 (N, H, W, 3)
    masks: np.ndarray  # bool (N, H, W)
    labels: np.ndarray  # bool (N,)

    @property
    def types(self) -> list[str]:
        """Defect types, sorted, ``good`` first."""
        found = sorted({r.defect_type for r in self.records} - {GOOD})
        return [GOOD, *found] if any(r.defect_type == GOOD for r in self.records) else found


def load_test_set(splits: DatasetSplits, height: int, width: int, limit_per_type: int | None = None) -> TestSet:
    """Images and masks of the test split at the model size (optionally the first N of each type)."""
    records = list(splits.test)
    if limit_per_type is not None:
        kept: dict[str, int] = {}
        chosen = []
        for record in records:
            if kept.get(record.defect_type, 0) < limit_per_type:
                kept[record.defect_type] = kept.get(record.defect_type, 0) + 1
                chosen.append(record)
        records = chosen
    if not records:
        raise EvaluationError(f"dataset {splits.root} ({splits.layout}) has no test split to evaluate on")
    labels = np.array([r.label == 1 for r in records])
    if labels.all() or not labels.any():
        raise EvaluationError(f"the test split of {splits.root} needs both good and defect images")
    images = np.stack([load_image(r.image, height, width) for r in tqdm(records, desc="load test", unit="img")])
    masks = np.stack([load_mask(r.mask, height, width) for r in records])
    return TestSet(tuple(records), images, masks, labels)


def predict_torch(run_dir: Path, images: np.ndarray, batch_size: int = 16, threads: int = 2) -> Predictions:
    """The run's best checkpoint through torch."""
    import torch

    from training.rundir import load_model
    from training.train import predict

    torch.set_num_threads(threads)
    model, _ = load_model(run_dir)
    amaps: list[np.ndarray] = []
    maps: list[list[np.ndarray]] = [[] for _ in model.scales]
    chunks = range(0, len(images), batch_size)
    tick = time.perf_counter()
    for start in tqdm(chunks, desc="torch", unit="batch"):
        a, m = predict(model, images[start : start + batch_size], batch_size)
        amaps.append(a)
        for s, values in enumerate(m):
            maps[s].append(values)
    seconds = (time.perf_counter() - tick) / len(images)
    channels = tuple(s.channels for s in model.scales)
    heads = tuple(s.head for s in model.scales)
    maps_out = [np.concatenate(m) for m in maps]
    return Predictions("torch", np.concatenate(amaps), maps_out, channels, seconds, heads=heads)


def predict_bundle(bundle_dir: Path, images: np.ndarray, threads: int = 2) -> Predictions:
    """The bundle's model.onnx through the agent's ONNX Runtime engine, one frame at a time."""
    from edge_agent.bundle import load_bundle
    from edge_agent.engines.onnxruntime import OnnxRuntimeEngine

    bundle = load_bundle(bundle_dir)
    engine = OnnxRuntimeEngine(bundle, threads=threads)
    amaps: list[np.ndarray] = []
    maps: list[list[np.ndarray]] = [[] for _ in bundle.manifest.scales]
    tick = time.perf_counter()
    try:
        for image in tqdm(images, desc="onnxruntime", unit="img"):
            output = engine.infer(image)
            amaps.append(output.anomaly_map)
            for s, values in enumerate(output.scale_maps):
                maps[s].append(values)
    finally:
        engine.close()
    seconds = (time.perf_counter() - tick) / len(images)
    channels = tuple(s.channels for s in bundle.manifest.scales)
    heads = tuple(s.head for s in bundle.manifest.scales)
    return Predictions("onnxruntime", np.stack(amaps), [np.stack(m) for m in maps], channels, seconds, heads=heads)


def log_nfa_maps(predictions: Predictions, size: tuple[int, int]) -> np.ndarray:
    """float32 (N, H, W) log10 NFA at the model size, exactly as the agent computes it."""
    count = len(predictions.anomaly_maps)
    out = np.empty((count, *size), dtype=np.float32)
    for i in tqdm(range(count), desc="NFA", unit="img"):
        maps = [m[i] for m in predictions.scale_maps]
        out[i] = log_nfa_map_of(
            maps,
            predictions.channels,
            predictions.heads,
            size,
            predictions.nulls,
            predictions.image_test,
            predictions.log10_epsilon,  # the decision's segmentation: regions where there are any
        )
    return out


def decision_masks(predictions: Predictions, log_nfa: np.ndarray) -> np.ndarray:
    """bool (N, H, W): where the decision says the defect is, as the agent reports it (the NFA's regions,
    each tightened to ``predictions.mask_fraction`` of its peak on the anomaly map; the same images flagged)."""
    detected = log_nfa < predictions.log10_epsilon
    if predictions.mask_fraction == 0.0:
        return detected
    return np.stack(
        [tighten(d, a, predictions.mask_fraction) for d, a in zip(detected, predictions.anomaly_maps, strict=True)]
    )


def _quantiles(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return {"count": 0}
    stats = {"count": int(values.size), "mean": float(values.mean())}
    stats |= {f"p{round(q * 100)}": float(np.quantile(values, q)) for q in QUANTILES}
    stats["max"] = float(values.max())
    return stats


def _cell_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Defect masks on a scale's grid: a cell is defective when more than half of its pixels are."""
    return np.stack(
        [cv2.resize(m.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA) > 0.5 for m in masks]
    )


def latent_statistics(predictions: Predictions, test: TestSet) -> list[dict[str, Any]]:
    """Per scale: m_s on good images, on defect cells and on the defect-free cells of defect images."""
    stats = []
    for s, m in enumerate(predictions.scale_maps):
        cells = _cell_masks(test.masks, m.shape[1], m.shape[2])
        defect_images = test.labels[:, None, None] & np.ones_like(cells)
        stats.append(
            {
                "scale": f"m_{s}",
                "head": predictions.heads[s] if predictions.heads else "flow",
                "channels": int(predictions.channels[s]),
                "height": int(m.shape[1]),
                "width": int(m.shape[2]),
                "good_images": _quantiles(m[~test.labels]),
                "defect_cells": _quantiles(m[cells]),
                "clean_cells_of_defect_images": _quantiles(m[defect_images & ~cells]),
                "defect_cells_max_per_image": _quantiles(
                    np.asarray([m[i][cells[i]].max() for i in range(len(m)) if cells[i].any()])
                ),
            }
        )
    return stats


def _subset_metrics(
    amaps: np.ndarray, masks: np.ndarray, labels: np.ndarray, predicted: np.ndarray, log_nfa: np.ndarray
) -> dict[str, Any]:
    scores = amaps.reshape(len(amaps), -1).max(axis=1)
    flagged = np.asarray(predicted.reshape(len(predicted), -1).any(axis=1))
    result: dict[str, Any] = {"images": len(amaps), "defect_images": int(labels.sum())}
    if masks.any() and (~masks).any():
        result["pixel_auroc"] = metrics.pixel_auroc(amaps, masks)
        result["aupro"] = metrics.aupro(amaps, masks)
    if labels.any() and not labels.all():
        result["image_auroc"] = metrics.image_auroc(scores, labels)
        # The decision's own ranking: an image's strongest region evidence (lowest log10 NFA). The map's
        # maximum above is what peers report; this is what the deployed threshold acts on.
        result["image_auroc_nfa"] = metrics.image_auroc(-log_nfa.reshape(len(log_nfa), -1).min(axis=1), labels)
    result["nfa_flagged_defect"] = int(flagged[labels].sum())
    result["nfa_flagged_good"] = int(flagged[~labels].sum())
    return result


def compute_metrics(
    predictions: Predictions, test: TestSet, log_nfa: np.ndarray, predicted: np.ndarray
) -> dict[str, Any]:
    """Overall and per-type metrics, the NFA statistics and the latent statistics; ``predicted``: the
    decision's masks (:func:`decision_masks`)."""
    amaps, masks, labels = predictions.anomaly_maps, test.masks, test.labels
    best = metrics.best_mean_iou(amaps, masks)
    iou_nfa = metrics.iou_per_image(predicted, masks)
    iou_oracle = metrics.iou_per_image(amaps >= best.threshold, masks)
    overall = _subset_metrics(amaps, masks, labels, predicted, log_nfa)
    overall |= {
        "miou_nfa": float(iou_nfa.mean()),
        "miou_oracle": best.miou,
        "oracle_threshold": best.threshold,
        "miou_all_empty": float(metrics.iou_per_image(np.zeros_like(masks), masks).mean()),
        "nfa_detection_rate": float(predicted[labels].reshape(labels.sum(), -1).any(axis=1).mean()),
        "nfa_false_alarm_rate": float(predicted[~labels].reshape((~labels).sum(), -1).any(axis=1).mean()),
    }
    types = np.array([r.defect_type for r in test.records])
    per_type: dict[str, Any] = {}
    for kind in test.types:
        inside = types == kind
        if kind == GOOD:
            per_type[kind] = {
                "images": int(inside.sum()),
                "nfa_flagged_good": int(predicted[inside].any(axis=(1, 2)).sum()),
            }
        else:
            subset = inside | ~labels
            per_type[kind] = _subset_metrics(
                amaps[subset], masks[subset], labels[subset], predicted[subset], log_nfa[subset]
            )
        per_type[kind]["miou_nfa"] = float(iou_nfa[inside].mean())
        per_type[kind]["miou_oracle"] = float(iou_oracle[inside].mean())
    min_log_nfa = log_nfa.reshape(len(log_nfa), -1).min(axis=1)
    # The maps the region tests read (scoring.nfa_inputs: not the texture score, not the detail map): what N counts.
    heads = predictions.heads or ("flow",) * len(predictions.scale_maps)
    tested, _ = nfa_inputs(predictions.scale_maps, list(predictions.channels), heads, predictions.nulls)
    shapes = [m.shape[1:] for m in tested]
    nfa_stats = {
        "null_model": "polyomino" if predictions.nulls is None else "fitted",
        "log10_epsilon": predictions.log10_epsilon,
        "log10_number_of_tests": nfa.log10_number_of_tests(shapes)
        if predictions.nulls is None
        else nfa.log10_tree_tests(shapes),
        "min_log_nfa_good": _quantiles(min_log_nfa[~labels]),
        "min_log_nfa_defect": _quantiles(min_log_nfa[labels]),
        "min_log_nfa_defect_per_type": {
            kind: _quantiles(min_log_nfa[types == kind]) for kind in test.types if kind != GOOD
        },
    }
    return {
        "overall": overall,
        "per_type": per_type,
        "nfa": nfa_stats,
        "latents": latent_statistics(predictions, test),
    }


def evaluate(
    data: Path | str | DatasetSplits,
    out_dir: Path | str,
    *,
    run_dir: Path | str | None = None,
    bundle_dir: Path | str | None = None,
    threads: int = 2,
    samples_per_type: int = 4,
    limit_per_type: int | None = None,
    null_model: str = "bundle",
) -> dict[str, Any]:
    """Evaluate a run (torch) or a bundle (ONNX Runtime) on the test split; write metrics.json + report.

    With both ``run_dir`` and ``bundle_dir`` the bundle is what runs; the run only names the model.
    """
    from training.report import write_report
    from training.rundir import write_json

    if run_dir is None and bundle_dir is None:
        raise EvaluationError("give a run directory (--run) or a bundle (--bundle) to evaluate")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    height, width, model_info = _model_size(run_dir, bundle_dir)
    splits = data if isinstance(data, DatasetSplits) else open_dataset(data)
    test = load_test_set(splits, height, width, limit_per_type)
    if bundle_dir is not None:
        predictions = predict_bundle(Path(bundle_dir), test.images, threads)
    else:
        predictions = predict_torch(Path(run_dir), test.images, threads=threads)  # type: ignore[arg-type]
    predictions.nulls, predictions.log10_epsilon, predictions.image_test = _decision(run_dir, bundle_dir, null_model)
    predictions.mask_fraction = _mask_fraction(run_dir, bundle_dir, null_model)
    log_nfa = log_nfa_maps(predictions, (height, width))
    decided = decision_masks(predictions, log_nfa)
    result = {
        "source": predictions.source,
        "run": None if run_dir is None else str(run_dir),
        "bundle": None if bundle_dir is None else str(bundle_dir),
        "data": splits.summary(),
        "model": model_info,
        "image_size": [height, width],
        **compute_metrics(predictions, test, log_nfa, decided),
        "seconds_per_image_inference": predictions.seconds_per_image,
    }
    result["planted"] = _planted(run_dir, bundle_dir)
    result["seconds"] = time.perf_counter() - started
    result["report"] = write_report(out_dir, result, test, predictions, log_nfa, samples_per_type, decided)
    write_json(out_dir / METRICS_NAME, result)
    log.info("evaluation done", extra={"event": "evaluate_done", "out": str(out_dir), **_headline(result)})
    return result


def _decision(
    run_dir: Path | str | None, bundle_dir: Path | str | None, null_model: str
) -> tuple[tuple[nfa.ScaleNull, ...] | None, float, ImageTest | None]:
    """The NFA null, log10 epsilon and image test to evaluate with: the bundle's, else the run's fitted one.

    ``null_model``: ``bundle`` (what the bundle or run ships), ``polyomino`` (the paper's exact NFA at
    log10 epsilon 0) or ``fitted``.
    """
    if null_model == "polyomino":
        return None, 0.0, None
    if bundle_dir is not None:
        from edge_agent.bundle import load_bundle
        from edge_agent.inspection.scoring import image_test_of, scale_nulls

        manifest = load_bundle(Path(bundle_dir)).manifest
        return scale_nulls(manifest, null_model), manifest.nfa.log10_epsilon, image_test_of(manifest, null_model)
    from training.nfa_null import null_from_dict
    from training.rundir import read_run

    val = read_run(Path(run_dir)).val_scores  # type: ignore[arg-type]
    if val.get("nfa_null"):
        from edge_agent.bundle import ImageTestSpec
        from edge_agent.inspection.scoring import image_test_from

        raw = val.get("image_test")
        image_test = None if not raw else image_test_from(ImageTestSpec.model_validate(raw))
        return null_from_dict(val["nfa_null"]), float(val.get("log10_epsilon", 0.0)), image_test
    if null_model == "fitted":
        raise EvaluationError(f"run {run_dir} has no fitted NFA null (val_scores.json); train it again")
    return None, 0.0, None


def _mask_fraction(run_dir: Path | str | None, bundle_dir: Path | str | None, null_model: str) -> float:
    """The decision's mask fraction: the bundle's by the agent's own rule (scoring.default_mask_fraction),
    or the run's; the paper's polyomino NFA keeps its regions."""
    if bundle_dir is not None:
        from edge_agent.bundle import load_bundle
        from edge_agent.config import NfaConfig
        from edge_agent.inspection.scoring import default_mask_fraction

        manifest = load_bundle(Path(bundle_dir)).manifest
        return default_mask_fraction(manifest, NfaConfig(null_model=null_model))  # type: ignore[arg-type]
    if null_model == "polyomino":
        return 0.0
    from training.rundir import read_run

    return float(read_run(Path(run_dir)).val_scores.get("mask_fraction", 0.0))  # type: ignore[arg-type]


def _planted(run_dir: Path | str | None, bundle_dir: Path | str | None) -> dict[str, Any]:
    """The label-free planted-defect check recorded at training (run) or in the manifest (bundle)."""
    if bundle_dir is not None:
        from edge_agent.bundle import load_bundle

        values = load_bundle(Path(bundle_dir)).manifest.validation_metrics
        if "planted_detection_rate" not in values:
            return {}
        return {"detection_rate": values["planted_detection_rate"], "count": int(values.get("planted_count", 0))}
    from training.rundir import read_run

    return dict(read_run(Path(run_dir)).val_scores.get("planted") or {})  # type: ignore[arg-type]


def _headline(result: dict[str, Any]) -> dict[str, float]:
    keys = ("pixel_auroc", "aupro", "image_auroc", "image_auroc_nfa", "miou_nfa", "miou_oracle")
    return {k: float(result["overall"][k]) for k in keys if k in result["overall"]}


def _model_size(run_dir: Path | str | None, bundle_dir: Path | str | None) -> tuple[int, int, dict[str, Any]]:
    if bundle_dir is not None:
        from edge_agent.bundle import load_bundle

        manifest = load_bundle(Path(bundle_dir)).manifest
        info: dict[str, Any] = {"backbone": manifest.backbone, "name": manifest.name, "version": manifest.version}
        info |= {"model_config": manifest.training_data.get("model_config")}
        return manifest.input.height, manifest.input.width, info
    from training.rundir import read_run

    if run_dir is None:
        raise ValueError("evaluate needs a run directory or a bundle directory")
    run = read_run(Path(run_dir))
    info = {"backbone": run.model_config.backbone, "model_config": run.model_config.to_dict()}
    info |= {"train_config": run.train_config, "best_epoch": _best_epoch(run.history)}
    return run.model_config.image_height, run.model_config.image_width, info


def _best_epoch(history: Sequence[dict[str, Any]]) -> int | None:
    best = [row["epoch"] for row in history if row.get("best")]
    return best[-1] if best else None


def headline_table(result: dict[str, Any]) -> str:
    """One Markdown table row set: overall metrics then each type (for terminals and docs)."""
    rows = [
        "| subset | pixel AUROC | AUPRO | image AUROC | image AUROC (NFA) | mIoU (NFA) | mIoU (oracle) | NFA flagged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, values in [("overall", result["overall"]), *result["per_type"].items()]:
        cells = [
            f"{values[k]:.3f}" if k in values else ""
            for k in ("pixel_auroc", "aupro", "image_auroc", "image_auroc_nfa", "miou_nfa", "miou_oracle")
        ]
        if name == GOOD:
            flagged = f"{values['nfa_flagged_good']}/{values['images']} good"
        else:
            flagged = f"{values.get('nfa_flagged_defect', 0)}/{values.get('defect_images', 0)} defect"
            if name == "overall":
                flagged += f", {values['nfa_flagged_good']}/{values['images'] - values['defect_images']} good"
        rows.append(f"| {name} | {' | '.join(cells)} | {flagged} |")
    return "\n".join(rows)
