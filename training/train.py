"""Training loop: good images only, cached backbone features, best checkpoint by validation NLL.

The backbone is frozen and there is no augmentation, so its features are extracted once and the
norms + flow train on the cached tensors (``cache_features=False`` runs the backbone every step;
kept for measuring the difference, see bench/train_epoch.py). Model selection uses the validation
good images only (never the test split); without a validation split it falls back to the training
loss and says so in the history.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from training.catalog import DEFAULT_RECIPE
from training.data import DEFAULT_VAL_FRACTION, DEFAULT_VAL_MAX, DatasetSplits, load_images, open_dataset
from training.finish import finish_run
from training.model import FlowOutput, UFlow, UFlowConfig, nll_loss, predict, to_float_nchw

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "predict", "train"]
from training.rundir import (
    CONFIG_NAME,
    HISTORY_NAME,
    save_checkpoint,
    write_json,
)

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (diverged loss, empty data); the message says what to change."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train (stored in config.json next to the model config)."""

    epochs: int = DEFAULT_RECIPE.epochs
    batch_size: int = DEFAULT_RECIPE.batch_size
    lr: float = DEFAULT_RECIPE.lr
    lr_final_factor: float = DEFAULT_RECIPE.lr_final_factor  # exponential decay from lr to lr * this
    weight_decay: float = 1e-5
    # folder / MVTec layouts only (split.json defines its own val): the share held out, at most val_max images
    # (None: no limit); they calibrate the NFA (training.data.DEFAULT_VAL_FRACTION says why these defaults)
    val_fraction: float = DEFAULT_VAL_FRACTION
    val_max: int | None = DEFAULT_VAL_MAX
    threads: int = 2
    cache_features: bool = True
    selftest_images: int = 3
    extract_batch_size: int = 16
    patience: int = DEFAULT_RECIPE.patience  # stop after this many epochs without a better val NLL (0: off)
    device: str = "auto"  # "auto": CUDA when present, else CPU
    amp: bool | None = None  # bfloat16 autocast of the flow; None: on for CUDA, off for CPU
    channels_last: bool = False  # NHWC memory format for the cached features and the flow's convs

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0 epochs, got {self.patience}")
        if not 0.0 <= self.val_fraction < 1.0 or (self.val_max is not None and self.val_max < 1):
            raise ValueError(
                f"need 0 <= val_fraction < 1 and val_max >= 1 or None, got {self.val_fraction}, {self.val_max}"
            )
        if not (self.lr > 0 and 0 < self.lr_final_factor <= 1):
            raise ValueError(f"need lr > 0 and 0 < lr_final_factor <= 1, got {self.lr} and {self.lr_final_factor}")


@dataclass(frozen=True)
class TrainResult:
    """Where the run went and how it ended."""

    run_dir: Path
    best_epoch: int
    best_val_nll: float | None
    seconds: float
    seconds_per_epoch: float
    epochs_run: int = 0
    stopped_early: bool = False


@dataclass(frozen=True)
class Placement:
    """Where and how the flow trains: device, autocast dtype (None: float32), memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    def features(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device, non_blocking=True)
        return tensor.contiguous(memory_format=torch.channels_last) if self.channels_last else tensor


def placement(config: TrainConfig) -> Placement:
    """The device (CUDA when present unless told otherwise) and precision of a training run.

    AMP is bfloat16 autocast: no loss scaling needed, and the loss and log-determinant are summed in
    float32. GPUs without bfloat16 train in float32.
    """
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError(f"--device {config.device} asked for, but torch sees no CUDA GPU")
    amp = config.amp if config.amp is not None else device.type == "cuda"
    if amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("no bfloat16 on this GPU: training in float32", extra={"event": "train_no_bf16"})
        amp = False
    return Placement(device, torch.bfloat16 if amp else None, config.channels_last)


def extract_features(
    model: UFlow,
    images: np.ndarray,
    batch_size: int,
    progress: bool,
    label: str,
    where: Placement | None = None,
) -> list[torch.Tensor]:
    """Backbone features of uint8 NxHxWx3 images, one tensor N x C_s x H_s x W_s per scale."""
    device = where.device if where is not None else torch.device("cpu")
    chunks: list[list[torch.Tensor]] = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=f"features {label}", unit="batch", disable=not progress, leave=False):
        chunks.append(model.extract(to_float_nchw(images[start : start + batch_size]).to(device)))
    features = [torch.cat([chunk[s] for chunk in chunks]) for s in range(len(chunks[0]))]
    return [where.features(f) for f in features] if where is not None else features


class FeatureBatches:
    """Feeds the flow either cached features or fresh backbone features of stored images."""

    def __init__(
        self,
        model: UFlow,
        images: np.ndarray,
        cache: bool,
        batch_size: int,
        progress: bool,
        label: str,
        where: Placement | None = None,
    ):
        self.model = model
        self.images = images
        self.count = len(images)
        self.where = where or Placement(torch.device("cpu"), None, False)
        self.features = extract_features(model, images, batch_size, progress, label, self.where) if cache else None

    def get(self, index: torch.Tensor) -> list[torch.Tensor]:
        if self.features is not None:
            index = index.to(self.where.device)
            return [f[index] for f in self.features]
        batch = to_float_nchw(self.images[index.numpy()]).to(self.where.device)
        return [self.where.features(f) for f in self.model.extract(batch)]


def objective_terms(model: UFlow, batches: FeatureBatches, batch_size: int) -> dict[str, Any]:
    """The NLL on ``batches`` and its parts, per latent dimension (docs/results.md "The objective").

    ``half_sq``: 0.5 * mean z^2; ``flow_log_det``: the flow's log|det J|; ``norm_log_det``: the norms'
    affine log|det|, counted in ``nll`` only when ``norm_in_jacobian``; ``latent_rms``: sqrt(mean z^2);
    ``norm_weight_abs``: mean |weight| of each scale norm's affine (None without one). A loss that
    falls while ``norm_log_det`` falls and the latents stay unit-sized is the flow modelling shrunk
    inputs, not a better density.
    """
    dims = sum(s.channels * s.height * s.width for s in model.flow_scales)  # the latents only, not the heads' maps
    nll = half_sq = flow_ld = 0.0
    norm_ld = float(model.norms_log_jac_det().detach())
    with torch.no_grad():
        for start in range(0, batches.count, batch_size):
            index = torch.arange(start, min(start + batch_size, batches.count))
            output = model.encode(batches.get(index))
            sq = torch.stack([0.5 * z.float().pow(2).flatten(1).sum(1) for z in output.latents]).sum(0)
            ld = output.log_jac_det.float()
            nll += float((sq - ld).sum())
            half_sq += float(sq.sum())
            flow_ld += float((ld - norm_ld if model.config.norm_in_jacobian else ld).sum())
    count = max(batches.count, 1)
    weights = [getattr(getattr(n, "norm", n), "weight", None) for n in model.norms]
    return {
        "nll": nll / count,
        "half_sq_per_dim": half_sq / count / dims,
        "flow_log_det_per_dim": flow_ld / count / dims,
        "norm_log_det_per_dim": norm_ld / dims,
        "latent_rms": math.sqrt(2 * half_sq / count / dims),
        "norm_weight_abs": [None if w is None else float(w.detach().abs().mean()) for w in weights],
    }


def train_epoch(
    model: UFlow,
    batches: FeatureBatches,
    optimiser: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
    epoch: int,
) -> float:
    model.train()
    order = torch.randperm(batches.count, generator=generator)
    total = 0.0
    where = batches.where
    for step, start in enumerate(range(0, batches.count, batch_size)):
        index = order[start : start + batch_size]
        with torch.autocast(
            where.device.type, dtype=where.amp_dtype or torch.float32, enabled=where.amp_dtype is not None
        ):
            output = model.encode(batches.get(index))
        # z^2 sums and log|det J| in float32 whatever the autocast dtype
        loss = nll_loss(FlowOutput(tuple(z.float() for z in output.latents), output.log_jac_det.float()))
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the loss became {float(loss)} at epoch {epoch} step {step}; lower the learning rate (--lr)"
            )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total += loss.detach().item() * len(index)
    model.eval()
    return total / batches.count


def _lr_gamma(config: TrainConfig) -> float:
    return math.exp(math.log(config.lr_final_factor) / max(config.epochs - 1, 1))


def train(
    data: Path | str | DatasetSplits,
    run_dir: Path | str,
    model_config: UFlowConfig,
    train_config: TrainConfig,
    *,
    weights: Path | str | None = None,
    random_weights: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train U-Flow on the good images of ``data`` and write a run directory (see training.rundir).

    Keeps the checkpoint with the lowest validation NLL (good images only) and stops early after
    ``train_config.patience`` epochs without improvement. ``random_weights`` (tests only) trains on a
    seeded random backbone and records it in config.json.
    """
    started = time.perf_counter()
    torch.set_num_threads(train_config.threads)
    torch.manual_seed(model_config.seed)
    splits = (
        data if isinstance(data, DatasetSplits) else open_dataset(data, train_config.val_fraction, train_config.val_max)
    )
    if not splits.train:
        raise TrainingError(f"dataset {splits.root} has no training images")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    height, width = model_config.image_height, model_config.image_width

    where = placement(train_config)
    model = UFlow(model_config, weights=weights, random_weights=random_weights).eval().to(where.device)
    if where.channels_last:
        model = model.to(memory_format=torch.channels_last)
    write_json(
        run_dir / CONFIG_NAME,
        {
            "model": model_config.to_dict(),
            "train": asdict(train_config),
            "data": {**splits.summary(), "image_height": height, "image_width": width},
            "weights": None if weights is None else str(weights),
            "random_weights": random_weights,
            "versions": _versions(),
        },
    )
    log.info("loading images", extra={"event": "train_load", "train": len(splits.train), "val": len(splits.val)})
    train_images = load_images(splits.train, height, width)
    val_images = load_images(splits.val, height, width)
    cache, ebs = train_config.cache_features, train_config.extract_batch_size
    train_batches = FeatureBatches(model, train_images, cache, ebs, progress, "train", where)
    val_batches = FeatureBatches(model, val_images, cache, ebs, progress, "val", where) if len(val_images) else None
    log.info(
        "training on",
        extra={
            "event": "train_placement",
            "device": str(where.device),
            "amp": str(where.amp_dtype),
            "channels_last": where.channels_last,
        },
    )

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(trainable, lr=train_config.lr, weight_decay=train_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=_lr_gamma(train_config))
    generator = torch.Generator().manual_seed(model_config.seed)
    dims = sum(s.channels * s.height * s.width for s in model.flow_scales)

    history: list[dict[str, Any]] = []
    best: tuple[float, int] = (math.inf, -1)
    epoch_seconds = []
    bar = tqdm(range(1, train_config.epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        tick = time.perf_counter()
        lr = optimiser.param_groups[0]["lr"]
        train_loss = train_epoch(model, train_batches, optimiser, train_config.batch_size, generator, epoch)
        scheduler.step()
        terms = objective_terms(model, val_batches, ebs) if val_batches else None
        val_nll = terms["nll"] if terms else None
        epoch_seconds.append(time.perf_counter() - tick)
        selection = val_nll if val_nll is not None else train_loss
        improved = selection < best[0]
        if improved:
            best = (selection, epoch)
            save_checkpoint(run_dir, model, {"epoch": epoch, "val_nll": val_nll, "train_loss": train_loss})
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": train_loss,
            "train_nll_per_dim": train_loss / dims,
            "val_nll": val_nll,
            "val_nll_per_dim": None if val_nll is None else val_nll / dims,
            "selected_by": "val_nll" if val_nll is not None else "train_loss",
            "best": improved,
            "seconds": epoch_seconds[-1],
            "val_terms": terms,
        }
        history.append(row)
        write_json(run_dir / HISTORY_NAME, history)
        bar.set_postfix(loss=f"{train_loss / dims:.4f}", val=f"{(val_nll or math.nan) / dims:.4f}", best=best[1])
        log.info("epoch done", extra={"event": "train_epoch", **row})
        if on_epoch is not None:
            on_epoch(row)
        if train_config.patience and epoch - best[1] >= train_config.patience:
            log.info(
                "early stop",
                extra={
                    "event": "train_early_stop",
                    "epoch": epoch,
                    "best_epoch": best[1],
                    "patience": train_config.patience,
                },
            )
            break

    finish_run(run_dir, splits, val_images, train_images, train_config.selftest_images, train_config.extract_batch_size)
    seconds = time.perf_counter() - started
    return TrainResult(
        run_dir=run_dir,
        best_epoch=best[1],
        best_val_nll=best[0] if val_batches else None,
        seconds=seconds,
        seconds_per_epoch=float(np.mean(epoch_seconds)),
        epochs_run=len(history),
        stopped_early=len(history) < train_config.epochs,
    )


def _versions() -> dict[str, str]:
    import FrEIA
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__, "FrEIA": getattr(FrEIA, "__version__", "?")}
