"""Another set of evidence heads on a trained run, without training the flow again (heads studies, issue 20).

The heads (training/heads.py) are fitted, not trained: a run's flow weights stay valid whatever heads sit
beside it. This copies RUN to OUT with another head config (``--memory-scales``, ``--gaussian-scales``,
``--bank-size``, ``--fine-bank-size``, ``--map-fusion``, ``--heads``, ``--detail-share``), carries the flow's weights over and re-runs training/finish.py, so
the new run is what ``uflow train`` with those flags would have written from the same flow. Then
``uflow export``, ``uflow evaluate`` and ``uflow calibrate nfa`` as for any run.

    nice .venv/bin/python bench/refit_heads.py --run runs/mvtec_bottle --out runs/bottle_m8 --memory-scales 0
    nice .venv/bin/python bench/refit_heads.py --run runs/mvtec_bottle --out runs/bottle_d --heads flow gaussian memory texture detail
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.catalog import DETAIL_COVARIANCES, HEAD_KINDS, MAP_FUSIONS
from training.data import load_images
from training.detail_choice import parse_detail_share
from training.finish import finish_run
from training.model import UFlow
from training.rundir import CHECKPOINT_NAME, CONFIG_NAME, read_run, save_checkpoint


def refit(run: Path, out: Path, data: str | None, changes: dict[str, Any]) -> float:
    """Write OUT: RUN's flow with the heads that ``changes`` give; returns the seconds finish took."""
    info = read_run(run)
    if "detail" not in changes.get("heads", info.model_config.heads):
        changes = {"detail_share": None, **changes}  # no detail map left to weigh
    config = dataclasses.replace(info.model_config, **changes)
    if out.exists():
        raise SystemExit(f"{out} exists: choose a new --out")
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("promise_maps.npz"))
    document = json.loads((out / CONFIG_NAME).read_text())
    document["model"] = config.to_dict()
    (out / CONFIG_NAME).write_text(json.dumps(document, indent=2))
    checkpoint = torch.load(run / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    model = UFlow(config, weights=info.weights, random_weights=info.random_weights)
    # The flow and its norms carry over; the heads and the fusion's means are refitted by finish_run.
    flow_state = {k: v for k, v in checkpoint["state"].items() if not k.startswith(("heads.", "map_means"))}
    model.load_state_dict(flow_state, strict=False)
    save_checkpoint(out, model, dict(checkpoint.get("meta", {})))
    splits = info.splits(data)
    height, width = config.image_height, config.image_width
    started = time.perf_counter()
    finish_run(
        out,
        splits,
        load_images(splits.val, height, width),
        load_images(splits.train, height, width),
        int(info.train_config.get("selftest_images", 3)),
        int(info.train_config.get("extract_batch_size", 16)),
    )
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="a finished run directory")
    parser.add_argument("--out", required=True, type=Path, help="the new run directory (must not exist)")
    parser.add_argument("--data", help="the run's data (default: what its config.json records)")
    for name in ("gaussian-scales", "memory-scales", "bank-size", "fine-bank-size"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--map-fusion", choices=MAP_FUSIONS, help="how the anomaly map fuses the maps")
    parser.add_argument(
        "--gaussian-positional", action=argparse.BooleanOptionalAction, help="a Gaussian mean per position"
    )
    parser.add_argument("--heads", nargs="+", choices=HEAD_KINDS, help="the evidence kinds (flow first)")
    parser.add_argument(
        "--detail-share", type=parse_detail_share, help="the detail map's weight: auto, equal or a share in (0, 1)"
    )
    parser.add_argument("--detail-covariance", choices=DETAIL_COVARIANCES, help="the detail head's covariance")
    args = parser.parse_args(argv)
    changes: dict[str, Any] = {
        key: value
        for key, value in (
            ("gaussian_scales", args.gaussian_scales),
            ("memory_scales", args.memory_scales),
            ("bank_size", args.bank_size),
            ("fine_bank_size", args.fine_bank_size),
            ("map_fusion", args.map_fusion),
            ("gaussian_positional", args.gaussian_positional),
            ("heads", None if args.heads is None else tuple(args.heads)),
            ("detail_share", args.detail_share),
            ("detail_covariance", args.detail_covariance),
        )
        if value is not None
    }
    seconds = refit(args.run, args.out, args.data, changes)
    print(f"| run | heads changed | finish s |\n|---|---|---|\n| {args.out} | {changes} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
