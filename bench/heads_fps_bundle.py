"""Two 256 px bundles of one run, with and without the heads, for engine-cost benches (weights do not matter).

Trains U-Flow for one epoch on synthetic good images (half of them held out, so the fitted null and the
heads are exported), then exports ``<out>/hybrid`` (the run's heads) and ``<out>/flow`` (the same flow
alone, ``--null-model polyomino``). Measure them with bench/pipeline.py --engine-only and
bench/heads_cost.py.

    nice .venv/bin/python bench/heads_fps_bundle.py --out /tmp/heads20/fps
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.export import export_bundle
from training.model import UFlowConfig
from training.synthetic import write_synthetic_dataset
from training.train import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    root = args.out
    if not (root / "data").exists():
        write_synthetic_dataset(root / "data", train_good=60, test_good=0, defects_per_kind=0, height=256, width=256)
    if not (root / "run" / "val_scores.json").exists():
        config = TrainConfig(epochs=1, val_fraction=0.5, threads=1)
        train(root / "data", root / "run", UFlowConfig(), config, progress=False)
    export_bundle(root / "run", root / "hybrid", name="hybrid", version="1", overwrite=True)
    export_bundle(root / "run", root / "flow", name="flow", version="1", overwrite=True, null_model="polyomino")
    print(f"bundles in {root / 'hybrid'} and {root / 'flow'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
