"""``uflow evaluate``: metrics and an image report of a run or a bundle on a test split."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_agent.cli.common import EXIT_CONFIG, EXIT_OK


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``uflow evaluate``."""
    p.description = (
        "Evaluate a run (torch) or its bundle (ONNX Runtime, what the device runs) on a test split: "
        "pixel/image AUROC, AUPRO@0.3, mIoU of the NFA mask and the best mIoU over thresholds, overall and per type."
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
    p.add_argument(
        "--allow-model-masks",
        action="store_true",
        help="grade pixels against defect masks the agent's model drew itself (split.json mask_source: model); "
        "the numbers then measure agreement with that model, not accuracy",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``uflow evaluate``."""
    from training.data import model_made_masks
    from training.evaluate import evaluate, headline_table

    echoed = model_made_masks(args.data)
    if echoed and not args.allow_model_masks:
        print(
            f"uflow evaluate: {len(echoed)} confirmed defect(s) in {args.data} carry masks the agent's model drew "
            f"itself (mask_source: model, e.g. {echoed[0]}): pixel AUROC, AUPRO and mIoU on them would grade the "
            "model against its own output. Draw or correct the masks on the review page (Edit mask), or pass "
            "--allow-model-masks to measure agreement with that model anyway.",
            file=sys.stderr,
        )
        return EXIT_CONFIG
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
