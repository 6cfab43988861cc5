"""The fused map as one more map of the NFA: does agreement between the maps rank images better? (issue 20)

The NFA takes, per pixel, the strongest of its maps (min over maps of log10 P): a defect that raises every
map a little can lose against a good part on which one map spikes. The geometric mean of the maps over
their null means (the anomaly map's fusion, bench/fusion.py) is high only where the maps agree. This bench
puts that fusion, at the finest map's grid, into the one NFA as a map of its own, with its own fitted null
(the same ``fit_scale_null`` as every map), and re-runs training's calibration (the cross-fitted evidence
factor, ``calibrate``) on the run's own calibration maps. Variants:

- ``today``: the run's maps;
- ``today + fused``: the run's maps and the fused map;
- ``fused alone``: the fused map only.

Columns: the factor, the planted check (training's label-free criterion), and on the test split (reporting
only) the defective and good images flagged at the deployed epsilon, and the ranking of the NFA's evidence:
image AUROC and the defective share at the evidence that flags 1 % / 2 % of the good test images (the
"oracle" of bench/decision_limit.py, a ceiling no deployable rule can choose).

    nice .venv/bin/python bench/fused_nfa.py --run runs/magnetic_tile [--data SPLIT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_maps import above_good, add_run_arguments, fused_map, planted_found, run_maps_of

from training import metrics
from training.finish import DEFAULT_LOG10_EPSILON, min_log_nfa
from training.nfa_null import calibrate, fit_scale_null

FUSED_CHANNELS = 1  # unused under a fitted null (dof / area replace C_s); log_nfa_map wants a count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--grid", type=int, default=0, help="the fused map's grid: that of map N (0: the finest)")
    args = parser.parse_args(argv)
    run = run_maps_of(args)
    assert run.test is not None and run.test_labels is not None
    means = [n.mean for n in run.envelope]
    grid = run.val[args.grid].shape[1:]
    eps = DEFAULT_LOG10_EPSILON

    def with_fused(maps: list[np.ndarray]) -> list[np.ndarray]:
        return [*maps, fused_map(maps, means, grid, geometric=True)]

    sets = {"val": with_fused(run.val), "planted": with_fused(run.planted_maps), "test": with_fused(run.test)}
    fused_envelope = fit_scale_null(sets["val"][-1])
    everything = (*run.envelope, fused_envelope)
    variants = {
        "today": list(range(len(run.val))),
        "today + fused": list(range(len(run.val) + 1)),
        "fused alone": [len(run.val)],
    }
    labels = run.test_labels
    print(f"\n{args.run}: maps {' '.join(run.names)} + fused ({fused_envelope}); {len(run.val[0])} calibration images")
    print(
        "\n| maps in the NFA | factor | planted found | test defective flagged | test good flagged | "
        "image AUROC (NFA evidence) | defective at 1 % / 2 % good (oracle) |\n|---|---|---|---|---|---|---|"
    )
    for label, pick in variants.items():
        chosen = calibrate(
            [sets["val"][k] for k in pick],
            [FUSED_CHANNELS] * len(pick),
            run.size,
            eps,
            envelope=tuple(everything[k] for k in pick),
        )
        found = planted_found([sets["planted"][k] for k in pick], run.planted, run.size, chosen.nulls, eps)
        tested = [sets["test"][k] for k in pick]
        evidence = -np.array(min_log_nfa(tested, [FUSED_CHANNELS] * len(pick), run.size, chosen.nulls))
        flagged = evidence > -eps
        oracle = " / ".join(f"{above_good(evidence[~labels], evidence[labels], rate):.1%}" for rate in (0.01, 0.02))
        print(
            f"| {label} | {chosen.factor:g} | {found:.1%} | {flagged[labels].mean():.1%} | {flagged[~labels].mean():.1%} | "
            f"{metrics.image_auroc(evidence, labels):.3f} | {oracle} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
