"""``uflow calibrate nfa``: the NFA false-alarm check of a bundle on good images (table + JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from calibration.data import CalibrationDataError, pick_evenly, select_images
from edge_agent.bundle import BundleError
from edge_agent.cli.common import EXIT_FAILURE, EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory (model.onnx + model.json)")
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="good images: a folder, a .txt list of paths, or a dataset split.json (its --split list)",
    )
    parser.add_argument("--split", default="val", help="list to read from a split.json (default val)")
    parser.add_argument("--images", type=int, help="use this many images, picked evenly (default: all)")
    parser.add_argument("--log10-epsilon", type=float, help="decision threshold (default: the bundle's)")
    parser.add_argument("--min-area", type=int, help="ignore smaller regions, model pixels (default: the bundle's)")
    parser.add_argument(
        "--null-model",
        default="bundle",
        choices=["bundle", "fitted", "polyomino"],
        help="NFA null model: the bundle's (default), the fitted one, or the paper's exact polyomino NFA",
    )
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"], help="model variant to run")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--json", type=Path, help="also write the full report (every image) as JSON here")
    parser.add_argument(
        "--run",
        type=Path,
        help="training run of the bundle: also measure the latents z themselves (needs torch; up to 50 images)",
    )


def run(args: argparse.Namespace) -> int:
    from calibration.nfa_check import check_bundle, format_latent_statistics, format_report, latent_statistics

    try:
        images = select_images(args.data, args.images, split=args.split)
        report = check_bundle(
            args.bundle,
            images,
            log10_epsilon=args.log10_epsilon,
            min_region_area=args.min_area,
            precision=args.precision,
            threads=args.threads,
            null_model=args.null_model,
        )
        print(format_report(report))
        if args.run is not None:
            report = report.with_latents(latent_statistics(args.run, pick_evenly(images.paths, 50)))
            print(f"\nlatents z from the training run {args.run}:\n{format_latent_statistics(report.latents or [])}")
    except (BundleError, CalibrationDataError, ValueError) as exc:
        # RunDirError and the dataset errors are ValueErrors too: one line naming the problem.
        print(f"uflow calibrate nfa: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return EXIT_OK
