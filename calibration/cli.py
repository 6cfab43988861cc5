"""``uflow calibrate ...``: precision calibration commands (placeholder until the calibration work lands).

``training.cli`` calls :func:`register` with its subparsers; replace the body with the real
``calibrate`` group (INT8 Q/DQ, FP16, NFA false-alarm check).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``calibrate`` command group to the ``uflow`` parser (nothing yet)."""
