"""How close a reduced-precision model's outputs stay to the FP32 model's, measured with ONNX Runtime.

Run on held-out good images after calibration; the numbers go into the variant's ``metrics`` in
model.json so a plant engineer can see what the conversion cost before deploying it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Agreement:
    """Worst and mean differences over the images compared."""

    images: int
    anomaly_map_max_abs: float
    anomaly_map_mean_abs: float
    image_score_max_abs: float
    scale_map_max_rel: float  # max over scales of max |m - m_ref| / (mean m_ref), per image, worst image
    # max |a - a_ref| / max(1, |a_ref|): the absolute difference for a flow-only map (in [0, 1]), a relative
    # one where the fused map of the evidence heads (a mean of m / null mean, unbounded) is above 1
    anomaly_map_max_scaled: float = 0.0

    def as_metrics(self) -> dict[str, float]:
        return {
            "agreement_images": float(self.images),
            "anomaly_map_max_abs_diff": self.anomaly_map_max_abs,
            "anomaly_map_mean_abs_diff": self.anomaly_map_mean_abs,
            "image_score_max_abs_diff": self.image_score_max_abs,
            "scale_map_max_rel_diff": self.scale_map_max_rel,
            "anomaly_map_max_scaled_diff": self.anomaly_map_max_scaled,
        }


def cpu_session(path: Path | str, threads: int = 0) -> object:
    """An ONNX Runtime CPU session with full graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def compare_models(
    reference: Path, candidate: Path, batches: Iterable[np.ndarray], input_name: str = "image"
) -> Agreement:
    """Run both models on the same uint8 batches; outputs are (anomaly_map, m_0, m_1, ...)."""
    ref_session = cpu_session(reference)
    cand_session = cpu_session(candidate)
    names = [o.name for o in ref_session.get_outputs()]  # type: ignore[attr-defined]
    amap_max, amap_scaled, amap_sum, score_max, rel_max, pixels, count = 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0
    for batch in batches:
        ref = ref_session.run(names, {input_name: batch})  # type: ignore[attr-defined]
        cand = cand_session.run(names, {input_name: batch})  # type: ignore[attr-defined]
        diff = np.abs(cand[0].astype(np.float64) - ref[0])
        amap_max = max(amap_max, float(diff.max()))
        amap_scaled = max(amap_scaled, float((diff / np.maximum(1.0, np.abs(ref[0]))).max()))
        amap_sum += float(diff.sum())
        pixels += diff.size
        score_max = max(score_max, abs(float(cand[0].max()) - float(ref[0].max())))
        for r, c in zip(ref[1:], cand[1:], strict=True):
            scale = max(float(np.mean(r)), 1e-12)
            rel_max = max(rel_max, float(np.max(np.abs(c.astype(np.float64) - r))) / scale)
        count += 1
    if count == 0:
        raise ValueError("no images to compare the models on")
    return Agreement(count, amap_max, amap_sum / pixels, score_max, rel_max, amap_scaled)
