"""``uflow calibrate KIND``: precision calibration and the NFA check, as one ``uflow`` command module.

Each calibration is a module exposing ``add_arguments(parser)`` and ``run(args) -> int`` (the pattern of
edge_agent/cli/common.py, one level down); add one by adding a line to ``CALIBRATIONS``.
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``KIND`` subcommands and their arguments."""
    parser.description = "Precision calibration of a bundle, and the check of the NFA's false-alarm promise."
    kinds = parser.add_subparsers(dest="calibration", metavar="KIND", required=True)
    for name, (module_name, help_text) in CALIBRATIONS.items():
        child = kinds.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(child)


def run(args: argparse.Namespace) -> int:
    """Run the chosen calibration."""
    return int(importlib.import_module(CALIBRATIONS[args.calibration][0]).run(args) or 0)
