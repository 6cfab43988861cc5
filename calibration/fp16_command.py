"""``uflow calibrate fp16``: write model.fp16.onnx (uint8 in, float32 out) into a bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from calibration.data import CalibrationDataError, add_data_arguments
from calibration.fp16 import DEFAULT_KEEP_FP32, FP16_GROUPS, Fp16Error, Fp16Settings
from edge_agent.bundle import BundleError
from edge_agent.cli.common import EXIT_FAILURE, EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory (model.onnx + model.json)")
    add_data_arguments(parser, default_images=Fp16Settings().images)
    parser.add_argument(
        "--keep-fp32",
        nargs="*",
        choices=FP16_GROUPS,
        default=list(DEFAULT_KEEP_FP32),
        help="parts kept in FP32 (default: head, the m_s and anomaly-map arithmetic; backbone: all of it)",
    )
    parser.add_argument(
        "--backbone-fp32-convs",
        type=int,
        default=None,
        metavar="N",
        help="keep the backbone's first N convolutions (and the layers before them) in FP32 "
        "(default: the fewest that keep the anomaly map within the agreement limit, 0 when FP16 passes as it is)",
    )
    parser.add_argument("--block-op", action="append", default=[], help="also keep every node of this op type in FP32")


def run(args: argparse.Namespace) -> int:
    from calibration.fp16 import calibrate_bundle

    try:
        settings = Fp16Settings(
            keep_fp32=tuple(args.keep_fp32),
            block_ops=tuple(args.block_op),
            images=args.images,
            backbone_fp32_convs=args.backbone_fp32_convs,
        )
        variant = calibrate_bundle(args.bundle, args.data, settings, split=args.split)
    except (BundleError, CalibrationDataError, Fp16Error, ValueError) as exc:
        print(f"uflow calibrate fp16: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in variant.metrics.items())
    kept = (
        f"{variant.settings['backbone_fp32_convs']} of the backbone's {variant.settings['backbone_convs']} convolutions"
    )
    print(f"wrote {args.bundle / variant.file} ({kept} in FP32); against FP32 on good images: {metrics}")
    return EXIT_OK
