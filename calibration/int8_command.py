"""``uflow calibrate int8``: write model.int8.onnx (symmetric INT8 Q/DQ) into a bundle."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from calibration.data import CalibrationDataError, add_data_arguments
from calibration.int8 import DEFAULT_KEEP_FP32, DEFAULT_METHOD, GROUPS, METHODS, Int8Settings, QuantizationError
from edge_agent.bundle import BundleError
from edge_agent.cli.common import EXIT_FAILURE, EXIT_OK

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory (model.onnx + model.json)")
    add_data_arguments(parser, default_images=Int8Settings().images)
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=DEFAULT_METHOD,
        help=f"activation range calibration (default {DEFAULT_METHOD})",
    )
    parser.add_argument("--percentile", type=float, default=Int8Settings().percentile, help="for --method percentile")
    parser.add_argument(
        "--keep-fp32",
        nargs="*",
        choices=GROUPS,
        default=list(DEFAULT_KEEP_FP32),
        help=f"conv groups left in FP32 (default: {' '.join(DEFAULT_KEEP_FP32) or 'none'}; see docs/precision.md)",
    )
    parser.add_argument("--exclude-node", action="append", default=[], help="also keep this node in FP32 (repeatable)")
    parser.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")


def run(args: argparse.Namespace) -> int:
    from calibration.int8 import calibrate_bundle

    try:
        settings = Int8Settings(
            method=args.method,
            percentile=args.percentile,
            per_channel=not args.per_tensor,
            keep_fp32=tuple(args.keep_fp32),
            exclude_nodes=tuple(args.exclude_node),
            images=args.images,
        )
        variant = calibrate_bundle(args.bundle, args.data, settings, split=args.split)
    except (BundleError, CalibrationDataError, QuantizationError, ValueError) as exc:
        print(f"uflow calibrate int8: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in variant.metrics.items())
    print(f"wrote {args.bundle / variant.file}; against FP32 on held-out good images: {metrics}")
    return EXIT_OK
