"""``uflow calibrate ...``: precision calibration commands.

``training.cli`` calls :func:`register` with its subparsers. Each calibration is a module exposing
``add_arguments(parser)`` and ``run(args) -> int``; add one by adding a line to ``CALIBRATIONS``.
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help).
CALIBRATIONS: dict[str, tuple[str, str]] = {
    "int8": (
        "calibration.int8_command",
        "INT8 Q/DQ model (model.int8.onnx) from good images, for TensorRT and ONNX Runtime",
    ),
    "fp16": ("calibration.fp16_command", "FP16 model (model.fp16.onnx) for strongly typed TensorRT builds"),
    "nfa": ("calibration.nfa_command", "NFA false-alarm check: regions per good image (should be <= about epsilon)"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``calibrate`` command group to the ``uflow`` parser."""
    group = subparsers.add_parser(
        "calibrate", help="make reduced-precision models of a bundle", description="Precision calibration of a bundle."
    )
    kinds = group.add_subparsers(dest="calibration", metavar="KIND", required=True)
    for name, (module_name, help_text) in CALIBRATIONS.items():
        module = importlib.import_module(module_name)
        parser = kinds.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)
