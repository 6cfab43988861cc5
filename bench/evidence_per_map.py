"""One evidence factor for every map, or one per map: a study on a finished run (issue 20).

Training chooses ONE evidence factor by cross-fitting (training/nfa_null.py ``calibrate``): every map's
null is scaled by it, so the map whose null fits worst decides how softly all the others speak. This
compares, on a run's own maps (exactly as training/finish.py computes them: the flow's validation maps,
the heads' out-of-sample maps):

- ``one factor``: today's calibration;
- ``per map``: each map first calibrated alone by the same rule (its own factor F_k), then the joint
  factor chosen by the same rule on the nulls weighted by F_k (``calibrate(weights=...)``).

For each: the factor(s), the planted check (training's label-free criterion: defects planted on the
validation images, heads that did not see them), and on the test split (reporting only) defective and
good images flagged and the NFA evidence's image AUROC.

    nice .venv/bin/python bench/evidence_per_map.py --run runs/magnetic_tile [--data SPLIT]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_maps import add_run_arguments, planted_found, run_maps_of

from training import metrics
from training.finish import DEFAULT_LOG10_EPSILON, min_log_nfa
from training.nfa_null import calibrate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    run = run_maps_of(args)
    assert run.test is not None and run.test_labels is not None
    maps, channels, heads, size, envelope = run.val, run.channels, run.heads, run.size, run.envelope
    names = [run.model.scales[i].name for i in run.model.region_indices]  # the maps run_maps keeps (no texture)
    eps = DEFAULT_LOG10_EPSILON
    one = calibrate(maps, channels, size, eps, envelope=envelope)
    alone = [calibrate([maps[k]], [channels[k]], size, eps, envelope=(envelope[k],)).factor for k in range(len(maps))]
    joint = calibrate(maps, channels, size, eps, envelope=envelope, weights=alone)
    variants = {"one factor": one.nulls, "per map": joint.nulls}
    print(f"\n{args.run}: {len(maps[0])} calibration images, maps {' '.join(names)}")
    print(f"one factor: {one.factor:g}; alone: {dict(zip(names, alone, strict=True))}; joint factor {joint.factor:g}")
    # The very defects and maps of training's planted check (heads that did not see the source image).
    samples, planted = run.planted, run.planted_maps
    labels, test = run.test_labels, run.test  # the deployed heads (fitted on every good image)
    print(
        "\n| variant | factors (map: dof multiplier) | planted found | val good flagged | test defective flagged | "
        "test good flagged | image AUROC (NFA evidence) |\n|---|---|---|---|---|---|---|"
    )
    for label, nulls in variants.items():
        found = planted_found(planted, samples, size, nulls, eps)
        val_flag = (np.array(min_log_nfa(maps, channels, size, nulls, heads)) < eps).mean()
        scores = np.array(min_log_nfa(test, channels, size, nulls, heads))
        flagged = scores < eps
        factors = " ".join(f"{n}:{b.dof / e.dof:.2f}" for n, b, e in zip(names, nulls, envelope, strict=True))
        print(
            f"| {label} | {factors} | {found:.1%} | {val_flag:.1%} | {flagged[labels].mean():.1%} | "
            f"{flagged[~labels].mean():.1%} | {metrics.image_auroc(-scores, labels):.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
