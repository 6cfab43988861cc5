"""A bundle's self-test: its good images, run on this device's engine and the NFA decision, must be judged good.

Run by the fleet updater before a new model may become current. It uses the same preprocessing, engine
and decision as the agent's frame loop (``preprocess.model_input``, ``scoring.FrameScorer``), so a model
that would flag good parts on this device, or produce NaNs on this GPU's precision, never goes live.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from edge_agent.bundle import Bundle
from edge_agent.config import NfaConfig
from edge_agent.engines.base import Engine

log = logging.getLogger(__name__)


class SelfTestError(RuntimeError):
    """The bundle failed its self-test on this device; the message names the image and the verdict."""


@dataclass(frozen=True)
class ImageResult:
    """The verdict on one self-test image."""

    path: str
    image_score: float
    anomalous: bool
    regions: int
    min_log_nfa: float
    milliseconds: float


def run_self_test(
    bundle: Bundle, engine: Engine, nfa_config: NfaConfig | None = None, require_images: bool = True
) -> list[ImageResult]:
    """Judge every ``self_test`` image of the bundle; raise SelfTestError on the first one that is not good.

    With no self-test images, ``require_images`` makes that an error (nothing would show the model works
    here); otherwise one mid-grey frame is run only to check that the outputs are finite.
    """
    import cv2

    from edge_agent.inspection.preprocess import model_input
    from edge_agent.inspection.scoring import FrameScorer

    manifest = bundle.manifest
    scorer = FrameScorer(manifest, nfa_config)
    height, width = manifest.input.height, manifest.input.width
    if not manifest.self_test:
        if require_images:
            raise SelfTestError(
                f"bundle {manifest.name} {manifest.version} lists no self_test images; export it with good "
                "images (uflow export) or set update.require_self_test = false"
            )
        output = engine.infer(np.full((height, width, 3), 128, np.uint8))
        _check_finite(output.anomaly_map, "a mid-grey frame")
        log.warning(
            "bundle has no self-test images; only checked that outputs are finite", extra={"event": "self_test_empty"}
        )
        return []
    results = []
    for rel in manifest.self_test:
        path = bundle.root / rel
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SelfTestError(f"self-test image {rel} cannot be read as an image")
        started = time.perf_counter()
        output = engine.infer(model_input(image, height, width))
        _check_finite(output.anomaly_map, rel)
        for scale_map in output.scale_maps:
            _check_finite(scale_map, rel)
        verdict = scorer.score(output, (image.shape[1], image.shape[0]))
        elapsed = (time.perf_counter() - started) * 1000
        result = ImageResult(
            path=rel,
            image_score=round(verdict.image_score, 6),
            anomalous=verdict.anomalous,
            regions=len(verdict.regions),
            min_log_nfa=round(float(np.min(verdict.log_nfa)), 3),
            milliseconds=round(elapsed, 1),
        )
        results.append(result)
        log.info(
            "self-test image judged %s",
            "ANOMALOUS" if result.anomalous else "good",
            extra={"event": "self_test_image", **result.__dict__},
        )
        if result.anomalous:
            worst = min(r.log_nfa for r in verdict.regions)
            raise SelfTestError(
                f"self-test image {rel} is a good part but was judged anomalous on this device "
                f"({result.regions} region(s), lowest log10 NFA {worst:.2f} < {verdict.log10_epsilon:g}, "
                f"image score {result.image_score:.3f}, backend {engine.backend})"
            )
    return results


def _check_finite(values: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(values)):
        raise SelfTestError(
            f"the engine returned NaN or infinite values for {what}; the model is broken on this device"
        )
