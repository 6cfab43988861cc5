"""Every map of a finished run, as training's finish computes them: the studies' common ground.

bench/fusion.py, bench/evidence_per_map.py and bench/fused_nfa.py compare choices on the same maps: the flow's
maps of the validation images (none fitted the flow), the heads' out-of-sample maps (cross-fitted over every
good image, training/heads.py), the per-map null envelope, the defects training plants on the validation
images (heads that did not see the source image), and the test split through the deployed heads.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from edge_agent.inspection import nfa
from training import metrics
from training.data import DatasetSplits, load_images, load_mask
from training.finish import backbone_features, evidence_maps, fit_nulls, planted_maps
from training.heads import fit_heads
from training.model import fused_anomaly_map
from training.planted import Planted
from training.rundir import load_model


@dataclass
class RunMaps:
    """One run's maps (one N x H_s x W_s array per map each), in the run's map order."""

    model: Any  # training.model.UFlow
    splits: DatasetSplits
    size: tuple[int, int]  # (height, width)
    names: list[str]  # F8, G16, M32, ...: head kind and stride
    channels: list[int]
    heads: list[str]
    val: list[np.ndarray]  # the calibration images: flow maps and out-of-sample head maps
    envelope: tuple[Any, ...]  # training's per-map null (nfa.ScaleNull), before the evidence factor
    head_every: list[np.ndarray]  # the heads' out-of-sample maps of every good image (their nulls' data)
    planted: list[Planted]
    planted_maps: list[np.ndarray]
    test: list[np.ndarray] | None = None  # the deployed heads
    test_labels: np.ndarray | None = None
    test_masks: np.ndarray | None = None
    # The detail map (the anomaly map reads it, no test does) of "val", "planted" and "test", when the run has one.
    detail: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def fusion_names(self) -> list[str]:
        """The names of the maps the anomaly map fuses: the region maps', then the detail map's (D8)."""
        return [*self.names, f"D{self.model.config.strides[0]}"] if self.detail else list(self.names)

    def fusion_maps(self, which: str) -> list[np.ndarray]:
        """The maps the anomaly map fuses, of the "val", "planted" or "test" images (``fusion_names`` order)."""
        maps = {"val": self.val, "planted": self.planted_maps, "test": self.test}[which]
        assert maps is not None, f"no {which} maps loaded"
        return [*maps, self.detail[which]] if self.detail else list(maps)

    def fusion_means(self) -> list[float]:
        """The graph's mean of each fused map on good images (``fusion_names`` order)."""
        return [float(self.model.map_means[i]) for i in self.model.fusion_indices]

    def anomaly_maps(self, which: str) -> np.ndarray:
        """The graph's anomaly map of the "val", "planted" or "test" images: its fusion of the region maps and
        the detail map, over the run's own map means and weights."""
        model = self.model
        geometric = model.config.map_fusion == "geometric"
        return fused_map(self.fusion_maps(which), self.fusion_means(), self.size, geometric, model.fusion_weights())


def load_run_maps(
    run: Path, data: str | None, batch_size: int = 16, test: bool = True, planted_seeds: Sequence[int] = (0,)
) -> RunMaps:
    """``run``'s maps on its data (``data``: default what its config.json records); ``test``: the test split too.

    ``planted_seeds``: training's planted defects are seed 0; more seeds plant more defects on the same
    validation images (a larger, less noisy label-free criterion for a study).
    """
    model, info = load_model(run)
    splits = info.splits(data)
    height, width = model.config.image_height, model.config.image_width
    val, train = load_images(splits.val, height, width), load_images(splits.train, height, width)
    good = np.concatenate([train, val])
    with torch.no_grad():
        cross = fit_heads(model.heads, backbone_features(model, good, batch_size), seed=model.config.seed)
    every = evidence_maps(model, good, batch_size, cross, np.arange(len(good)))
    val_maps = evidence_maps(model, val, batch_size, cross, len(train) + np.arange(len(val)))
    samples: list[Planted] = []
    planted: list[np.ndarray] = []
    for seed in planted_seeds:
        more, more_maps = planted_maps(model, val, batch_size, seed=seed, cross=cross, first_owner=len(train))
        samples += more
        planted = (
            more_maps if not planted else [np.concatenate([a, b]) for a, b in zip(planted, more_maps, strict=True)]
        )
    # The studies weigh the region maps; the texture head's 1 x 1 score is the image test's (bench/image_family.py),
    # the detail map the anomaly map's alone (RunMaps.detail).
    keep = model.region_indices
    detail = next((i for i in model.fusion_indices if i not in keep), None)  # the detail head's map, if any
    maps = RunMaps(
        model=model,
        splits=splits,
        size=(height, width),
        names=[f"{model.scales[i].head[0].upper()}{model.scales[i].stride}" for i in keep],
        channels=[model.scales[i].channels for i in keep],
        heads=[model.scales[i].head for i in keep],
        val=[val_maps[i] for i in keep],
        envelope=tuple(fit_nulls(model, val_maps, every[len(model.flow_scales) :])),
        head_every=[every[i] for i in keep if i >= len(model.flow_scales)],
        planted=samples,
        planted_maps=[planted[i] for i in keep] if planted else planted,
    )
    if detail is not None:
        maps.detail = {"val": val_maps[detail], "planted": planted[detail]} if planted else {"val": val_maps[detail]}
    if test:
        every_test = evidence_maps(model, load_images(splits.test, height, width), batch_size)
        maps.test = [every_test[i] for i in keep]
        if detail is not None:
            maps.detail["test"] = every_test[detail]
        maps.test_labels = np.array([r.label for r in splits.test], dtype=bool)
        maps.test_masks = np.stack([load_mask(r.mask, height, width) for r in splits.test]).astype(bool)
    return maps


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every run study takes: --run, --data, --batch-size, --threads."""
    parser.add_argument("--run", required=True, type=Path, help="a finished run directory")
    parser.add_argument("--data", help="the run's data (default: what its config.json records)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)


def run_maps_of(args: argparse.Namespace, test: bool = True) -> RunMaps:
    """:func:`load_run_maps` for the options of :func:`add_run_arguments`, on ``args.threads`` torch threads."""
    torch.set_num_threads(args.threads)
    return load_run_maps(args.run, args.data, args.batch_size, test)


def planted_hits(
    maps: list[np.ndarray], planted: list[Planted], size: tuple[int, int], nulls: Any, eps: float
) -> np.ndarray:
    """Per ``planted`` defect, whether the fitted NFA finds it (a region below ``eps`` touching the defect),
    as training's planted check counts them; ``maps``: the planted images' maps, one per null."""
    channels = [1] * len(maps)  # unused under a fitted null (dof / area replace C_s)
    return np.array(
        [
            bool(((nfa.log_nfa_map([m[i] for m in maps], channels, size, nulls) < eps) & sample.mask).any())
            for i, sample in enumerate(planted)
        ],
        dtype=bool,
    )


def planted_found(
    maps: list[np.ndarray], planted: list[Planted], size: tuple[int, int], nulls: Any, eps: float
) -> float:
    """Share of ``planted`` defects the fitted NFA finds (:func:`planted_hits`)."""
    return float(planted_hits(maps, planted, size, nulls, eps).mean())


def above_good(good: np.ndarray, defective: np.ndarray, good_share: float) -> float:
    """Share of ``defective`` scores above the ``good_share`` most suspicious ``good`` ones: the ceiling a
    threshold that reads the labels would reach at that false-alarm rate (bench/decision_limit.py's oracle)."""
    return float(np.mean(np.asarray(defective) > np.quantile(good, 1.0 - good_share)))


def decision_cells(evidence: np.ndarray, labels: np.ndarray, log10_epsilon: float) -> str:
    """The test columns the decision studies print from each image's evidence (-min log10 NFA): defective /
    good flagged at epsilon | the oracle at 1 % / 2 % good | the image AUROC of the evidence."""
    flagged, good, defective = evidence > -log10_epsilon, evidence[~labels], evidence[labels]
    return (
        f"{flagged[labels].mean():.1%} / {flagged[~labels].mean():.1%} | "
        f"{above_good(good, defective, 0.01):.1%} / {above_good(good, defective, 0.02):.1%} | "
        f"{separation(good, defective):.3f}"
    )


def separation(good: np.ndarray, defective: np.ndarray) -> float:
    """Image AUROC of ``defective`` scores against ``good`` ones."""
    return metrics.image_auroc(np.r_[good, defective], np.r_[np.zeros(len(good)), np.ones(len(defective))].astype(bool))


def fused_map(
    maps: list[np.ndarray],
    means: Sequence[float],
    size: tuple[int, int],
    geometric: bool,
    weights: torch.Tensor | None = None,
) -> np.ndarray:
    """The graph's own fusion (``training.model.fused_anomaly_map``) of N x H_k x W_k maps at ``size``."""
    with torch.no_grad():
        tensors = [torch.from_numpy(np.asarray(m, dtype=np.float32)) for m in maps]
        return fused_anomaly_map(
            tensors, torch.tensor(list(means)), *size, geometric=geometric, weights=weights
        ).numpy()
