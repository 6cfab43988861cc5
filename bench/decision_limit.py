"""What limits a bundle's decision on a data set: the ranking of its evidence, or where its threshold sits?

For every test image the bundle's own engine and scorer (ONNX Runtime, what the agent runs) give the
image's strongest evidence, ``log10 N - min log10 NFA`` (how far below the number of tests the best
region goes). The decision flags an image when that evidence passes ``log10 N - log10 epsilon``. The table
shows, per defect type and overall:

- the deployed decision (the bundle's epsilon) and the a-contrario one (log10 epsilon = 0);
- the **test oracle**: the evidence threshold that flags exactly 1 % / 2 % of the good test images, and
  the defective share it would flag. No deployable rule can choose it (it reads the test labels): it is
  the ceiling that the ranking allows at that false-alarm rate. When the deployed row is far below the
  oracle, the threshold is the limit (calibration); when the oracle itself is low, the evidence is;
- the image AUROC of the evidence and of the anomaly map's maximum;
- by name, the good images the deployed decision flags, strongest evidence first.

Reporting only: nothing here chooses a default (defaults are chosen on training and validation images and
planted defects, docs/results.md).

    nice .venv/bin/python bench/decision_limit.py --bundle B --data ../shared/data/magnetic_tile/split.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.config import ModelConfig  # noqa: E402
from edge_agent.inspection.loaded_model import load_model  # noqa: E402
from edge_agent.inspection.preprocess import model_input  # noqa: E402
from training.data import open_dataset  # noqa: E402
from training.metrics import image_auroc  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="a data set (a split.json or a folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the per-image evidence as JSON")
    args = parser.parse_args(argv)

    model = load_model(args.bundle, ModelConfig(backend="onnxruntime", threads=args.threads))
    nfa_spec = model.bundle.manifest.nfa
    log10_n = float(nfa_spec.log10_number_of_tests)
    epsilon = float(model.scorer.rule.log10_epsilon)
    groups: dict[str, list[Path]] = {"good": []}
    for record in open_dataset(args.data).test:
        groups.setdefault("good" if record.label == 0 else record.defect_type, []).append(record.image)
    evidence: dict[str, list[float]] = {}
    peak: dict[str, list[float]] = {}
    for kind, paths in groups.items():
        for path in paths:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise SystemExit(f"cannot read {path}")
            output = model.engine.infer(model_input(bgr, *model.input_size))
            verdict = model.scorer.score(output, (bgr.shape[1], bgr.shape[0]))
            evidence.setdefault(kind, []).append(log10_n - float(np.min(verdict.log_nfa)))
            peak.setdefault(kind, []).append(float(np.max(output.anomaly_map)))
    model.close()
    good = np.array(evidence["good"])
    oracle = {rate: float(np.quantile(good, 1.0 - rate)) for rate in (0.01, 0.02)}
    deployed, contrario = log10_n - epsilon, log10_n

    def share(values: np.ndarray, threshold: float) -> str:
        return f"{np.mean(values > threshold):.1%}"

    print(f"bundle {args.bundle}: log10 N {log10_n:.2f}, deployed log10 epsilon {epsilon:g}\n")
    print(
        "| images | n | flagged, deployed | flagged, log10 eps 0 | oracle at 1 % good | oracle at 2 % good | "
        "image AUROC (evidence / map max) |"
    )
    print("|---|---|---|---|---|---|---|")
    defect_kinds = [k for k in groups if k != "good"]
    everything = np.concatenate([np.array(evidence[k]) for k in defect_kinds])
    for kind in ["good", *defect_kinds, "all defective"]:
        values = everything if kind == "all defective" else np.array(evidence[kind])
        if kind == "good":
            auroc = "-"
        else:
            maps = (
                np.concatenate([np.array(peak[k]) for k in defect_kinds])
                if kind == "all defective"
                else np.array(peak[kind])
            )
            labels = np.r_[np.zeros(len(good)), np.ones(len(values))]
            auroc = (
                f"{image_auroc(np.r_[good, values], labels.astype(bool)):.3f} / "
                f"{image_auroc(np.r_[np.array(peak['good']), maps], labels.astype(bool)):.3f}"
            )
        print(
            f"| {kind} | {len(values)} | {share(values, deployed)} | {share(values, contrario)} | "
            f"{share(values, oracle[0.01])} | {share(values, oracle[0.02])} | {auroc} |"
        )
    flagged_good = sorted(
        ((e, path.name) for e, path in zip(evidence["good"], groups["good"], strict=True) if e > deployed), reverse=True
    )
    # Which good parts the deployed decision rejects: a handful of parts imaged again and again (a wear
    # sequence) reads differently from false alarms spread over the line.
    print(f"\ngood images flagged at the deployed epsilon: {len(flagged_good)} of {len(good)}")
    for value, name in flagged_good:
        print(f"  {name}  evidence {value:.1f} (threshold {deployed:.1f})")
    if args.out:
        args.out.write_text(json.dumps({"log10_n": log10_n, "epsilon": epsilon, "evidence": evidence, "peak": peak}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
