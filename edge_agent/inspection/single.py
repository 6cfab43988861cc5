"""One frame through the model, on the caller's thread: what the pipeline's stages do, in one call.

For the tools that need a verdict outside the running pipeline: ``edge-agent record --only-good``, the
shadow model and tests. The result is a complete ``FrameJob`` (maps, verdict, message), so it can be
kept, drawn or published like a pipeline frame.
"""

from __future__ import annotations

import time

from edge_agent.inspection.drivers import Frame
from edge_agent.inspection.loaded_model import LoadedModel
from edge_agent.inspection.pipeline import FrameJob, inspection_message
from edge_agent.inspection.preprocess import model_input


def inspect_frame(model: LoadedModel, frame: Frame, device_id: str) -> FrameJob:
    """Preprocess, infer, score and build the message of one frame with ``model``."""
    job = FrameJob(frame=frame, capture_ms=0.0, model=model)
    started = time.monotonic()
    tensor = model_input(frame.image, *model.input_size)
    inferred = time.monotonic()
    job.output = model.engine.infer(tensor)
    scored = time.monotonic()
    height, width = frame.image.shape[:2]
    job.verdict = model.scorer.score(job.output, (width, height), frame.roi_offset)
    job.nfa_done = time.monotonic()
    job.preprocess_ms = (inferred - started) * 1000.0
    job.infer_ms = (scored - inferred) * 1000.0
    job.nfa_ms = (job.nfa_done - scored) * 1000.0
    job.message = inspection_message(job, device_id)
    return job
