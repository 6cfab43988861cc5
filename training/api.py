"""Programmatic entry points for tests and the demo (torch is imported only when called).

``train_and_export`` is the one-call path from a folder of good images (or any layout that
``training.data`` reads) to a verified model bundle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.catalog import DEFAULT_RECIPE
from training.data import DEFAULT_VAL_FRACTION, DEFAULT_VAL_MAX

# Settings for the small, fast model of the tests and the demo. Strides 8/16 keep the NFA's number
# of tests low (log10 N grows by ~0.61 per pixel of the finest map: 623 at 32x32, 156 at 16x16) and
# give the finest latent 54 channels instead of 30, so the evidence of a planted defect outweighs
# it. Measured on synthetic surfaces at 128 px with 36 training images: 40 epochs flagged 10 of 16
# defects, 80 epochs 32 of 32 (latents on defects keep growing with training), 0 good parts in both.
QUICK_STRIDES: tuple[int, ...] = (8, 16)
QUICK_EPOCHS = 80
# The tiny model keeps the objective and schedule it was measured with (the LayerNorm affine in
# log|det J|, learning rate decaying 10x); `uflow train`'s default recipe is training.catalog.DEFAULT_RECIPE.
QUICK_NORM_IN_JACOBIAN = True
QUICK_LR_FINAL_FACTOR = 0.1


def train_and_export(
    data: Path | str,
    run_dir: Path | str,
    bundle_dir: Path | str,
    *,
    image_size: int = DEFAULT_RECIPE.image_size,
    square: bool = False,
    epochs: int = DEFAULT_RECIPE.epochs,
    batch_size: int = DEFAULT_RECIPE.batch_size,
    lr: float = DEFAULT_RECIPE.lr,
    lr_final_factor: float = DEFAULT_RECIPE.lr_final_factor,
    backbone: str = DEFAULT_RECIPE.backbone,
    strides: Sequence[int] = DEFAULT_RECIPE.strides,
    hypercolumn: bool = DEFAULT_RECIPE.hypercolumn,
    norm_in_jacobian: bool = DEFAULT_RECIPE.norm_in_jacobian,
    norm_affine: bool = DEFAULT_RECIPE.norm_affine,
    norm: str = "chw",
    heads: Sequence[str] = DEFAULT_RECIPE.heads,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    val_max: int | None = DEFAULT_VAL_MAX,
    seed: int = 0,
    threads: int = 2,
    name: str | None = None,
    version: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Train U-Flow on the good images of ``data`` into ``run_dir`` and export a bundle to ``bundle_dir``.

    ``image_size`` is the input's short side and the long side follows the images' aspect ratio, as
    ``uflow train`` does (``square``: ``image_size`` x ``image_size``). Returns the bundle directory
    (already verified with the agent's loader and ONNX Runtime engine).
    """
    from training.catalog import backbone_info
    from training.data import open_dataset
    from training.export import export_bundle
    from training.geometry import resolve_geometry
    from training.model import UFlowConfig
    from training.train import TrainConfig, train

    splits = open_dataset(data, val_fraction, val_max)
    geometry = resolve_geometry(
        [r.image for r in splits.train],
        image_size,
        strides,
        square=square,
        fixed_input_size=backbone_info(backbone).fixed_input_size,
        max_pixels=DEFAULT_RECIPE.max_pixels,
    )
    model_config = UFlowConfig(
        backbone=backbone,
        image_height=geometry.height,
        image_width=geometry.width,
        strides=tuple(strides),
        hypercolumn=hypercolumn,
        norm_in_jacobian=norm_in_jacobian,
        norm_affine=norm_affine,
        norm=norm,
        seed=seed,
        heads=tuple(heads),
    )
    train_config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_final_factor=lr_final_factor,
        threads=threads,
        val_fraction=val_fraction,
        val_max=val_max,
    )
    train(splits, run_dir, model_config, train_config, progress=progress, on_epoch=on_epoch)
    return export_bundle(run_dir, bundle_dir, name=name, version=version, overwrite=overwrite)
