"""``uflow``: the offline command line (train, evaluate, export; calibrate when calibration/ provides it).

The same pattern as ``edge-agent`` (edge_agent/cli/common.py): a table of commands, one module each, and
only the chosen one is imported, so torch loads only for the command that runs and ``uflow --help`` is
instant.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAILURE, CommandTable, parse_command, run_quietly_on_broken_pipe

log = logging.getLogger(__name__)

DESCRIPTION = "Train, export and calibrate U-Flow models"

# name -> (module, one-line help). Add a command by adding a line.
COMMANDS: CommandTable = {
    "train": ("training.commands.train", "train U-Flow on good images"),
    "evaluate": ("training.commands.evaluate", "metrics and an image report on a test split"),
    "export": ("training.commands.export", "export a run as a model bundle"),
}
if importlib.util.find_spec("calibration") is not None:
    COMMANDS["calibrate"] = ("calibration.cli", "make reduced-precision models of a bundle, or check the NFA")


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``uflow`` console script."""
    # OpenMP threads that spin while waiting make torch ~10x slower on a CPU shared with other jobs
    # (measured here: 20 s vs 1.8 s per flow step). Must be set before torch loads; users can override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parsed = parse_command("uflow", DESCRIPTION, COMMANDS, sys.argv[1:] if argv is None else argv)
    if parsed is None:
        return EXIT_CONFIG
    args, module = parsed
    try:
        return run_quietly_on_broken_pipe(lambda: int(module.run(args) or 0))
    except _user_errors() as exc:
        # Bad data, options, weights or run dirs: one line that names the file or option, not a traceback.
        print(f"uflow {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
