"""One frame through the model, on the caller's thread: what the pipeline's stages do, in one call.

For the tools that need a verdict outside the running pipeline: ``edge-agent record --only-good``, the
shadow model and tests. The result is a complete ``FrameJob`` (maps, verdict, message), so it can be
kept, drawn or published like a pipeline frame.
"""

from __future__ import annotations

import time

from edge_agent.inspection.drivers import Frame
from edge_agent.inspection.loaded_model import LoadedModel
from edge_agent.inspection.preprocess import model_input
from edge_agent.inspection.stage_records import Captured, FrameJob, Inferred, Scored, inspection_message


def inspect_frame(model: LoadedModel, frame: Frame, device_id: str) -> FrameJob:
    """Preprocess, infer, score and build the message of one frame with ``model``."""
    started = time.monotonic()
    tensor = model_input(frame.image, *model.input_size)
    inferred = time.monotonic()
    output = model.engine.infer(tensor)
    scored = time.monotonic()
    height, width = frame.image.shape[:2]
    verdict = model.scorer.score(output, (width, height), frame.roi_offset)
    done = time.monotonic()
    record = Inferred(Captured(frame, 0.0), model, output, (inferred - started) * 1000.0, (scored - inferred) * 1000.0)
    message = inspection_message(Scored(record, verdict, (done - scored) * 1000.0, done), device_id)
    return FrameJob(frame, model, output, verdict, message)
