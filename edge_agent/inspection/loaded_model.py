"""A model ready to serve: verified bundle, engine, scorer and the reference every message carries.

``load_model`` does all the slow and fallible work (hash check, engine load or TensorRT plan, one warm-up
inference and NFA on a grey frame, output sanity) before anything is swapped in, so a bad bundle fails
here with a message and never reaches the pipeline. Used at start-up and by the ``reload`` command.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.bundle import Bundle, BundleError, load_bundle
from edge_agent.config import ModelConfig, NfaConfig
from edge_agent.engines import Engine, EngineUnavailable, create_engine
from edge_agent.inspection.scoring import FrameScorer
from edge_agent.messages import ModelRef

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The bundle cannot be served; the message says which step failed and why."""


@dataclass
class LoadedModel:
    """Everything the pipeline needs from one bundle."""

    bundle: Bundle
    engine: Engine
    scorer: FrameScorer
    ref: ModelRef
    load_s: float

    @property
    def input_size(self) -> tuple[int, int]:
        """Model input (height, width)."""
        _, height, width, _ = self.engine.io.input.shape
        return height, width

    def close(self) -> None:
        self.engine.close()


def load_model(
    bundle_path: Path | str, model_config: ModelConfig, nfa_config: NfaConfig | None = None, live: bool = False
) -> LoadedModel:
    """Load and warm up the bundle at ``bundle_path`` (a symlink such as models/current is resolved now).

    ``live``: frames come from a camera or stream (the engine's thread plan, edge_agent/engines/threads.py).
    """
    started = time.monotonic()
    root = Path(bundle_path).resolve()
    try:
        bundle = load_bundle(root)
        engine = create_engine(bundle, model_config, live=live)
    except (BundleError, EngineUnavailable) as exc:
        raise ModelLoadError(f"cannot load the model at {bundle_path}: {exc}") from exc
    try:
        scorer = FrameScorer(bundle.manifest, nfa_config)
        warm_started = time.monotonic()
        warm_up(engine, scorer)
        log.info(
            "inference path warmed up",
            extra={
                "event": "warmed_up",
                "seconds": round(time.monotonic() - warm_started, 2),
                "log10_epsilon": scorer.rule.log10_epsilon,
            },
        )
    except Exception as exc:  # an engine that loads but cannot run is a model problem, not a crash
        engine.close()
        raise ModelLoadError(f"the model at {root} failed its warm-up inference: {exc}") from exc
    ref = ModelRef(
        name=bundle.manifest.name,
        version=bundle.manifest.version,
        sha256=bundle.model_sha256(model_config.precision),
        backend=engine.backend,
        precision=model_config.precision,
    )
    loaded = LoadedModel(bundle, engine, scorer, ref, round(time.monotonic() - started, 3))
    log.info(
        "model ready",
        extra={
            "event": "model_ready",
            "model": ref.name,
            "version": ref.version,
            "backend": ref.backend,
            "bundle": str(root),
            "seconds": loaded.load_s,
            "log10_epsilon": scorer.rule.log10_epsilon,
        },
    )
    return loaded


def warm_up(engine: Engine, scorer: FrameScorer) -> None:
    """One grey frame through engine and NFA (allocations, JIT at these shapes); raise on non-finite outputs."""
    _, height, width, _ = engine.io.input.shape
    output = engine.infer(np.full((height, width, 3), 128, dtype=np.uint8))
    for name, values in zip(engine.io.output_names, (output.anomaly_map, *output.scale_maps), strict=True):
        if not np.all(np.isfinite(values)):
            raise ValueError(f"output {name!r} holds NaN or infinity on a plain grey frame")
    scorer.score(output, (width, height))
