"""The line-to-model loop as components (edge_agent/service/loop.py): each an AgentPart and a pipeline
FrameObserver, fed real inspections of a contract bundle, and the loop's merged figures and problems."""

from __future__ import annotations

import time
from pathlib import Path

from agent_harness import agent_config
from line_helpers import inspected_job

from edge_agent.config import load_settings
from edge_agent.inspection.frame_source import FrameSource
from edge_agent.inspection.loaded_model import LoadedModel
from edge_agent.inspection.pipeline import Pipeline
from edge_agent.messages import InspectionMessage, PartMessage, RecordCommand
from edge_agent.service.loop import LineLoop


class Published:
    """The pipeline's Publisher seam; these tests feed the observers directly, nothing is published."""

    def publish_inspection(self, message: InspectionMessage) -> object:
        return True

    def publish_part(self, message: PartMessage) -> object:
        return True


def _loop(tmp_path: Path, model: LoadedModel, **sections: object) -> tuple[LineLoop, Pipeline]:
    values = agent_config(tmp_path / "state", tmp_path / "bundle", str(tmp_path), 1883, **sections)
    settings = load_settings(None, **values)
    pipeline = Pipeline(FrameSource(settings.source), model, Published(), "cam1")
    return LineLoop(settings, pipeline), pipeline


def test_the_loop_hangs_only_the_configured_components_on_the_pipeline(
    tmp_path: Path, contract_model: LoadedModel
) -> None:
    loop, pipeline = _loop(tmp_path, contract_model, drift={"enabled": False})
    assert [type(c).__name__ for c in loop.components] == ["Recording"]  # keep is off by default, drift off here
    assert pipeline.observers == loop.components
    assert loop.figures() == {"kept": None, "drift": None, "shadow": None, "recording": None}
    assert loop.problems() == []
    running = loop.running()
    assert (running.keeper, running.drift, running.shadow) == (None, None, None)


def test_components_are_fed_in_order_and_their_figures_and_problems_merge(
    tmp_path: Path, contract_model: LoadedModel
) -> None:
    keep = {"flagged": True, "dir": str(tmp_path / "kept"), "min_free_mb": 0}
    loop, pipeline = _loop(tmp_path, contract_model, keep=keep, drift={"window": 10, "min_frames": 2})
    assert [type(c).__name__ for c in loop.components] == ["Keeping", "DriftCheck", "Recording"]
    loop.start()
    try:
        reply = loop.recording.record_command(RecordCommand(count=2, min_difference=0.0))
        assert "recording up to 2 images" in reply.message
        for sequence in range(6):
            job = inspected_job(contract_model, sequence, defect=sequence % 3 == 0)  # frames 0 and 3 flagged
            for observer in pipeline.observers:
                observer.on_frame(job)
        assert loop.keeping is not None and loop.keeping.keeper.drain()
        deadline = time.monotonic() + 30
        while loop.figures()["recording"]["written"] < 2:
            assert time.monotonic() < deadline, loop.figures()["recording"]
            time.sleep(0.05)
        loop.tick()
        figures = loop.figures()
        assert figures["kept"]["kept_flagged"] == 2 and figures["kept"]["problem"] == ""
        assert figures["drift"] is not None and figures["shadow"] is None
        assert figures["recording"]["written"] == 2
        assert loop.running().drift is loop.drift.monitor  # type: ignore[union-attr]
    finally:
        loop.stop()
    assert loop.figures()["recording"]["written"] == 2  # the last recording stays in the figures
    assert loop.problems() == loop.keeping.problems() + loop.drift.problems()  # type: ignore[union-attr]
