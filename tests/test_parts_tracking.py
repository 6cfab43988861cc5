"""Part tracking on the synthetic conveyor: parts found against the empty belt, counted once, belt travel."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from edge_agent.config import PartsConfig
from edge_agent.demo.conveyor import Conveyor, ConveyorSpec
from edge_agent.inspection.tracking import PartTracker, TrackingSettings, profile_shift


def _run(conveyor: Conveyor, settings: TrackingSettings, fps: float = 25.0) -> tuple[PartTracker, list]:
    tracker = PartTracker(settings, conveyor.spec.width)
    decided = []
    for index in range(conveyor.frames):
        _, done = tracker.update(conveyor.frame(index), index, 1000.0 + index / fps)
        decided.extend(done)
    decided.extend(tracker.flush(conveyor.frames))
    return tracker, decided


@pytest.mark.parametrize("speed_px_s", [None, 9 * 25.0], ids=["measured", "configured"])
def test_every_part_is_decided_once_where_it_lies_on_the_belt(speed_px_s: float | None) -> None:
    spec = ConveyorSpec(width=160, height=128, parts=6, speed_px=9, defect_parts=(1, 4), seed=5)
    conveyor = Conveyor(spec)
    tracker, decided = _run(conveyor, TrackingSettings(speed_px_s=speed_px_s))
    assert [d.track.part_id for d in decided] == [str(i) for i in range(1, 7)]
    assert tracker.noise == 0
    # Belt coordinates are world columns here (the view starts at world column 0): each part's extent
    # on the belt matches where the generator placed it, to a few pixels (the part's soft shadow, up to 8 px
    # along its trailing edge, is not belt either).
    for part, done in zip(conveyor.parts, decided, strict=True):
        assert abs(done.track.u0 - part.x) <= 3
        assert -3 <= done.track.u1 - (part.x + spec.part_px) <= 9
        assert done.track.full_view
        assert done.trailing_x <= 0.0  # decided once it left (decision line at the exit edge)
    assert abs(tracker.travel - (conveyor.frames - 1) * spec.speed_px) <= 0.01 * conveyor.frames * spec.speed_px


def test_a_decision_line_decides_a_part_as_its_trailing_edge_crosses_it() -> None:
    spec = ConveyorSpec(width=160, height=128, parts=3, speed_px=8, defect_parts=(), seed=2)
    conveyor = Conveyor(spec)
    settings = TrackingSettings(speed_px_s=8 * 25.0, decision_line=0.5)
    tracker = PartTracker(settings, spec.width)
    crossings = {}
    for index in range(conveyor.frames):
        _, done = tracker.update(conveyor.frame(index), index, index / 25.0)
        for d in done:
            crossings[d.track.part_id] = (index, d.trailing_x)
    assert sorted(crossings) == ["1", "2", "3"]
    for _, trailing in crossings.values():
        assert 80 - 8 < trailing <= 80


def test_the_belt_moving_left_to_right_is_tracked_the_same() -> None:
    spec = ConveyorSpec(width=160, height=128, parts=4, speed_px=7, defect_parts=(), seed=1)
    conveyor = Conveyor(spec)
    tracker = PartTracker(TrackingSettings(direction="left_to_right"), spec.width)
    decided = []
    for index in range(conveyor.frames):
        _, done = tracker.update(conveyor.frame(index)[:, ::-1].copy(), index, index / 25.0)
        decided.extend(done)
    assert [d.track.part_id for d in decided] == ["1", "2", "3", "4"]
    assert abs(tracker.travel - (conveyor.frames - 1) * 7) < 0.02 * conveyor.frames * 7


def test_an_empty_belt_has_no_parts_and_lighting_drift_is_followed() -> None:
    spec = ConveyorSpec(width=128, height=96, parts=1, speed_px=6, defect_parts=())
    conveyor = Conveyor(spec)
    tracker = PartTracker(TrackingSettings(), spec.width)
    for index in range(120):  # the belt before the part arrives, getting 15 grey levels brighter
        frame = np.roll(conveyor.frame(0), -3 * index, axis=1).astype(np.int16) + index // 8
        in_view, done = tracker.update(np.clip(frame, 0, 255).astype(np.uint8), index, index / 25.0)
        assert in_view == [] and done == []
    assert tracker.belt.level is not None and tracker.belt.level.mean() > 46 + 8


def test_profile_shift_finds_subpixel_shifts() -> None:
    rng = np.random.default_rng(0)
    base = np.cumsum(rng.standard_normal(400)).astype(np.float32)
    window = np.hanning(256).astype(np.float32)
    for true in (0, 3, -11, 25):
        shift, peak = profile_shift(base[50:306], base[50 - true : 306 - true], window)
        assert abs(shift - true) < 0.3 and peak > 0.3


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="column_fill"):
        TrackingSettings(column_fill=1.5)
    with pytest.raises(ValueError, match="decision_line"):
        TrackingSettings(decision_line=-0.1)
    with pytest.raises(ValueError, match="speed_px_s"):
        TrackingSettings(speed_px_s=float("nan"))


def test_a_stopped_belt_adds_no_observations_and_each_part_is_still_decided_once() -> None:
    from edge_agent.config import PartsConfig
    from edge_agent.inspection.drivers import Frame
    from edge_agent.inspection.parts import TrackedParts
    from edge_agent.inspection.scoring import Verdict

    spec = ConveyorSpec(width=160, height=128, parts=3, speed_px=8, defect_parts=(), seed=6)
    conveyor = Conveyor(spec)
    order = list(range(30)) + [30] * 80 + list(range(31, conveyor.frames))  # the belt stops for 80 frames
    parts = TrackedParts(PartsConfig(mode="tracked"), "cam1", started=1000.0)
    quiet = np.zeros((32, 40), np.float32)
    verdict = Verdict(0.0, False, (), 0.0, quiet, quiet + 1.0)
    messages, most = [], 0
    for sequence, index in enumerate(order):
        frame = Frame(sequence, 1000.0 + sequence / 25.0, conveyor.frame(index), "test", (160, 128))
        messages += parts.observe(frame, verdict, None)
        most = max([most] + [len(e.observations) for e in parts._evidence.values()])
    messages += parts.finish(frame, None)
    assert [m.part_id for m in messages] == ["1000-1", "1000-2", "1000-3"]
    assert not any(m.anomalous for m in messages)
    # A part crosses the 160 px view in about (160 + 92) / 8 = 32 frames; the 80 still frames add nothing.
    assert most <= (160 + spec.part_px) / 8 + 4


def test_a_new_frame_size_decides_the_parts_in_view_and_ids_continue() -> None:
    from edge_agent.config import PartsConfig
    from edge_agent.inspection.drivers import Frame
    from edge_agent.inspection.parts import TrackedParts
    from edge_agent.inspection.scoring import Verdict

    small = Conveyor(ConveyorSpec(width=160, height=128, parts=2, speed_px=8, defect_parts=(), seed=2))
    large = Conveyor(ConveyorSpec(width=192, height=160, parts=2, speed_px=8, defect_parts=(), seed=3))
    parts = TrackedParts(PartsConfig(mode="tracked"), "cam1", started=7.0)
    quiet = np.zeros((32, 40), np.float32)
    verdict = Verdict(0.0, False, (), 0.0, quiet, quiet + 1.0)
    messages = []
    sequence = 0
    for conveyor, count in ((small, 40), (large, large.frames)):  # the camera reopens at another size mid-part
        for index in range(count):
            frame = Frame(
                sequence, sequence / 25.0, conveyor.frame(index), "test", (conveyor.spec.width, conveyor.spec.height)
            )
            messages += parts.observe(frame, verdict, None)
            sequence += 1
    messages += parts.finish(frame, None)
    ids = [m.part_id for m in messages]
    assert ids == [f"7-{n}" for n in range(1, len(ids) + 1)]  # unique, continuing
    assert len(ids) == 4  # the second part of the first view decided at the switch, then the two new ones


def test_tracking_settings_mirror_the_parts_section_by_name_with_its_defaults() -> None:
    config = PartsConfig(
        mode="tracked", direction="left_to_right", background_frames=7, threshold_sigma=3.5, min_contrast=9.0,
        column_fill=0.4, min_part_px=20, decision_line=0.3, speed_px_s=120.0, min_frames=3,
    )  # fmt: skip
    shared = {f.name for f in fields(TrackingSettings)} & set(PartsConfig.model_fields)
    assert shared == {
        "direction", "background_frames", "threshold_sigma", "min_contrast", "column_fill", "min_part_px",
        "decision_line", "speed_px_s", "min_frames",
    }  # fmt: skip
    mirrored = TrackingSettings.from_config(config)
    assert {name: getattr(mirrored, name) for name in shared} == {name: getattr(config, name) for name in shared}
    defaults, section = TrackingSettings(), PartsConfig()
    assert {name: getattr(defaults, name) for name in shared} == {name: getattr(section, name) for name in shared}
