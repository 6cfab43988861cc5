"""``uflow export``: a run as a model bundle (ONNX + manifest), optionally signed."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_agent.cli.common import EXIT_OK


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``uflow export``."""
    p.description = "Export a run as a model bundle."
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


def run(args: argparse.Namespace) -> int:
    """Run ``uflow export``."""
    from edge_agent.bundle import load_bundle
    from edge_agent.fleet.signing import load_private_key, sign_bundle
    from edge_agent.promise import describe, image_test_words
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
    calibration = manifest.nfa.calibration
    if calibration is not None:
        image_test = manifest.nfa.image_test
        regions = describe(calibration.promise_check(), calibration.folds, regions_only=image_test is not None)
        print(f"false alarms: {regions}{image_test_words(image_test, manifest.nfa.log10_epsilon)}")
    # A blind model's and an unsupported promise's warnings were already logged (stderr) by export_bundle.
    if key is not None:
        sign_bundle(out, key)
        print(f"signed with {args.sign} (signature over model.json)")
    return EXIT_OK
