"""How close a reduced-precision model's outputs stay to the FP32 model's, measured with ONNX Runtime.

Run on held-out good images after calibration; the numbers go into the variant's ``metrics`` in
model.json so a plant engineer can see what the conversion cost before deploying it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.bundle import Bundle
from edge_agent.config import NfaConfig
from edge_agent.engines.base import EngineOutput
from edge_agent.inspection.scoring import FrameScorer

# A reduced-precision model must decide as FP32 does on good images: flag none that FP32 does not, and lower
# no image's smallest log10 NFA by more than this (one decade of evidence; FP16 moves it by 0.04 on the
# bottle, INT8 of the flow by 30: docs/precision.md).
MAX_LOG10_NFA_DROP = 1.0
EVIDENCE_WINDOW = 3.0  # decades above log10 epsilon within which a drop of evidence is counted


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
    # The bundle's own decision (its NFA null, epsilon and image test) on the same good images, when compared:
    # how many each model flags, and by how much the candidate lowers an image's smallest log10 NFA (counted
    # below log10 epsilon + EVIDENCE_WINDOW only).
    good_flagged_reference: int | None = None
    good_flagged_candidate: int | None = None
    evidence_shift_max: float | None = None

    def as_metrics(self) -> dict[str, float]:
        metrics = {
            "agreement_images": float(self.images),
            "anomaly_map_max_abs_diff": self.anomaly_map_max_abs,
            "anomaly_map_mean_abs_diff": self.anomaly_map_mean_abs,
            "image_score_max_abs_diff": self.image_score_max_abs,
            "scale_map_max_rel_diff": self.scale_map_max_rel,
            "anomaly_map_max_scaled_diff": self.anomaly_map_max_scaled,
        }
        if self.evidence_shift_max is not None:
            metrics |= {
                "good_flagged_fp32": float(self.good_flagged_reference or 0),
                "good_flagged": float(self.good_flagged_candidate or 0),
                "log10_nfa_max_drop": self.evidence_shift_max,
            }
        return metrics

    def decision_problem(self, max_drop: float = MAX_LOG10_NFA_DROP) -> str | None:
        """Why the candidate does not decide as the reference does on these good images (None: it does)."""
        if self.evidence_shift_max is None:
            return None
        flagged, before = self.good_flagged_candidate or 0, self.good_flagged_reference or 0
        if flagged > before:
            return f"it flags {flagged} of {self.images} good images where FP32 flags {before}"
        if self.evidence_shift_max > max_drop:
            return (
                f"it lowers a good image's smallest log10 NFA by {self.evidence_shift_max:.2f} "
                f"(limit {max_drop:g}): its maps are no longer the ones the bundle's NFA null was fitted on"
            )
        return None


def cpu_session(path: Path | str, threads: int = 0) -> object:
    """An ONNX Runtime CPU session with full graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def bundle_scorer(bundle: Bundle) -> FrameScorer:
    """The bundle's own decision (its null, epsilon, image test and mask fraction), as the agent loads it."""
    return FrameScorer(bundle.manifest, NfaConfig())


def _engine_output(outputs: list[np.ndarray]) -> EngineOutput:
    """One image's raw session outputs (batch axis first) as the agent's engines return them."""
    maps = [np.asarray(a, dtype=np.float32)[0] for a in outputs]
    return EngineOutput(anomaly_map=maps[0], scale_maps=tuple(maps[1:]))


def compare_models(
    reference: Path,
    candidate: Path,
    batches: Iterable[np.ndarray],
    input_name: str = "image",
    scorer: FrameScorer | None = None,
) -> Agreement:
    """Run both models on the same uint8 batches; outputs are (anomaly_map, m_0, m_1, ...).

    With ``scorer`` (the bundle's own: ``FrameScorer(manifest, NfaConfig())``), each image is also decided
    by both models' outputs, as the agent decides a frame at the model size.
    """
    ref_session = cpu_session(reference)
    cand_session = cpu_session(candidate)
    names = [o.name for o in ref_session.get_outputs()]  # type: ignore[attr-defined]
    amap_max, amap_scaled, amap_sum, score_max, rel_max, pixels, count = 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0
    flagged_ref, flagged_cand, drop = 0, 0, 0.0
    for batch in batches:
        ref = ref_session.run(names, {input_name: batch})  # type: ignore[attr-defined]
        cand = cand_session.run(names, {input_name: batch})  # type: ignore[attr-defined]
        if scorer is not None:
            size = (int(ref[0].shape[-1]), int(ref[0].shape[-2]))
            before, after = scorer.score(_engine_output(ref), size), scorer.score(_engine_output(cand), size)
            flagged_ref, flagged_cand = flagged_ref + before.anomalous, flagged_cand + after.anomalous
            # Evidence far from the threshold decides nothing: only drops below epsilon x 1000 count.
            ceiling = scorer.rule.log10_epsilon + EVIDENCE_WINDOW
            drop = max(drop, min(float(before.log_nfa.min()), ceiling) - min(float(after.log_nfa.min()), ceiling))
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
    if scorer is None:
        return Agreement(count, amap_max, amap_sum / pixels, score_max, rel_max, amap_scaled)
    return Agreement(
        count, amap_max, amap_sum / pixels, score_max, rel_max, amap_scaled, flagged_ref, flagged_cand, drop
    )
