"""The NFA's evidence as the pixel anomaly map, beside the graph's fused map (issue 20, reporting only).

Runs a bundle on a data set's test split through ``training.evaluate``'s own ``predict_bundle`` and
``log_nfa_maps`` (what ``uflow evaluate --bundle`` and the agent compute) and ranks pixels two ways: the
fused anomaly map, and the NFA's evidence (``-log10 NFA`` clipped at 0, to 0.01 decades) with the fused
map breaking ties. Prints pixel AUROC, AUPRO and the image AUROC of each map's maximum.

    nice .venv/bin/python bench/nfa_pixel_map.py --bundle bundles/e2e-magnetic_tile \
        --data ../shared/data/magnetic_tile/split.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.bundle import load_bundle
from edge_agent.inspection.scoring import scale_nulls
from training import metrics
from training.data import open_dataset
from training.evaluate import load_test_set, log_nfa_maps, predict_bundle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--data", required=True, help="a split.json or data folder")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    manifest = load_bundle(args.bundle).manifest
    height, width = manifest.input.height, manifest.input.width
    test = load_test_set(open_dataset(args.data), height, width)
    predictions = predict_bundle(args.bundle, test.images, args.threads)
    # The decision the bundle ships (as uflow evaluate --bundle takes it).
    predictions.nulls, predictions.log10_epsilon = scale_nulls(manifest, "bundle"), manifest.nfa.log10_epsilon
    log_nfa = log_nfa_maps(predictions, (height, width))
    fused = predictions.anomaly_maps.astype(np.float64)
    evidence = np.clip(-log_nfa.astype(np.float64), 0.0, 1e6)
    # Evidence first (to 0.01 decades); the fused map, scaled into [0, 1), only orders equal evidence.
    combined = np.floor(evidence * 100) + fused / (fused.max() + 1.0)
    print(
        f"\n{args.bundle} on {args.data}\n\n| anomaly map | pixel AUROC | AUPRO | image AUROC (its max) |\n|---|---|---|---|"
    )
    for name, amap in (("fused (the graph's)", fused), ("NFA evidence, fused for ties", combined)):
        image = metrics.image_auroc(amap.reshape(len(amap), -1).max(axis=1), test.labels)
        pixel, pro = metrics.pixel_auroc(amap, test.masks), metrics.aupro(amap, test.masks)
        print(f"| {name} | {pixel:.3f} | {pro:.3f} | {image:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
