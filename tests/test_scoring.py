"""Scoring: image score, NFA decision, regions mapped to source-frame pixels, bundle/config overrides.

Runs a real ONNX Runtime session on the contract bundle (tests/contract_bundle.py), whose statistics
on "good" frames are known, so the a-contrario decision must be silent on them and fire on a defect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from contract_bundle import defect_frame, good_frame

from edge_agent.bundle import load_bundle
from edge_agent.config import ModelConfig, NfaConfig
from edge_agent.engines import create_engine
from edge_agent.engines.base import EngineOutput
from edge_agent.inspection.nfa import NfaRegion
from edge_agent.inspection.scoring import DecisionRule, FrameScorer, map_region, resize_map


@pytest.fixture(scope="module")
def engine_and_manifest(contract_bundle: Path):
    bundle = load_bundle(contract_bundle)
    engine = create_engine(bundle, ModelConfig(backend="onnxruntime", threads=1))
    yield engine, bundle.manifest
    engine.close()


def test_good_frames_are_not_anomalous(engine_and_manifest) -> None:
    engine, manifest = engine_and_manifest
    scorer = FrameScorer(manifest)
    rng = np.random.default_rng(0)
    verdicts = [scorer.score(engine.infer(good_frame(rng, 64, 64)), (64, 64)) for _ in range(30)]
    assert sum(v.anomalous for v in verdicts) <= 1  # epsilon = 1 false region per image at most, on average
    for verdict in verdicts:
        assert verdict.image_score == pytest.approx(float(verdict.anomaly_map.max()))


def test_defect_found_and_mapped_to_source_pixels_with_roi_offset(engine_and_manifest) -> None:
    engine, manifest = engine_and_manifest
    scorer = FrameScorer(manifest)
    rng = np.random.default_rng(1)
    output = engine.infer(defect_frame(rng, 64, 64, (20, 24, 12, 8)))
    # The 64x64 model input came from a 320x256 ROI at (100, 40) of a larger camera frame.
    verdict = scorer.score(output, (320, 256), roi_offset=(100, 40))
    assert verdict.anomalous
    assert len(verdict.regions) == 1
    x, y, w, h = verdict.regions[0].bbox
    # The defect is at x 100..160, y 96..128 in ROI pixels, so 200..260, 136..168 in the camera frame.
    assert x <= 200 and y <= 136 and x + w >= 260 and y + h >= 168
    assert x >= 100 and y >= 40 and x + w <= 420 and y + h <= 296  # inside the ROI
    assert verdict.regions[0].log_nfa < -10
    assert verdict.log_nfa.shape == (64, 64)  # the agent's hot path works at the model size


def test_frame_resolution_gives_maps_at_image_size_and_same_decision(engine_and_manifest) -> None:
    engine, manifest = engine_and_manifest
    scorer = FrameScorer(manifest)
    output = engine.infer(defect_frame(np.random.default_rng(2), 64, 64, (40, 8, 10, 10)))
    coarse = scorer.score(output, (128, 96))
    fine = scorer.score(output, (128, 96), resolution="frame")
    assert fine.anomaly_map.shape == (96, 128) and fine.log_nfa.shape == (96, 128)
    assert fine.anomalous == coarse.anomalous is True
    assert fine.image_score == pytest.approx(coarse.image_score, abs=1e-6)
    fx, fy, fw, fh = fine.regions[0].bbox
    cx, cy, cw, ch = coarse.regions[0].bbox
    assert abs(fx - cx) <= 2 and abs(fy - cy) <= 2 and abs(fw - cw) <= 4 and abs(fh - ch) <= 4


def test_config_epsilon_overrides_bundle_and_can_silence_detection(engine_and_manifest) -> None:
    engine, manifest = engine_and_manifest
    output = engine.infer(defect_frame(np.random.default_rng(3), 64, 64, (20, 20, 6, 6), delta=40.0))
    default = FrameScorer(manifest).score(output, (64, 64))
    assert default.anomalous and default.log10_epsilon == manifest.nfa.log10_epsilon
    strict_epsilon = default.regions[0].log_nfa - 1.0
    strict = FrameScorer(manifest, NfaConfig(log10_epsilon=strict_epsilon)).score(output, (64, 64))
    assert not strict.anomalous and strict.log10_epsilon == strict_epsilon


def test_min_region_area_from_config_in_source_pixels(engine_and_manifest) -> None:
    engine, manifest = engine_and_manifest
    output = engine.infer(defect_frame(np.random.default_rng(4), 64, 64, (20, 20, 6, 6)))
    found = FrameScorer(manifest).score(output, (640, 640))
    area = found.regions[0].area
    assert found.anomalous
    assert FrameScorer(manifest, NfaConfig(min_region_area=area)).score(output, (640, 640)).anomalous
    assert not FrameScorer(manifest, NfaConfig(min_region_area=area + 1)).score(output, (640, 640)).anomalous


def test_bundle_min_area_is_in_model_pixels_and_scales_to_the_frame() -> None:
    rule = DecisionRule(log10_epsilon=0.0, min_area_source_px=None, min_area_model_px=10)
    assert rule.min_area(2.0, 3.0) == 60.0
    assert DecisionRule(0.0, 7, 10).min_area(2.0, 3.0) == 7.0


def test_map_region_covers_the_cells_and_clips_to_the_image() -> None:
    raw = NfaRegion(bbox=(3, 2, 4, 5), area=12, log_nfa=-3.5, max_score=0.9)
    region = map_region(raw, 2.5, 2.0, (16, 12), offset=(100, 200))
    # cells x 3..7 -> pixels 7.5..17.5 -> 7..16 (clipped to 16); y 2..7 -> 4..14 -> 4..12 (clipped)
    assert region.bbox == (107, 204, 9, 8)
    assert region.area == 60
    assert region.log_nfa == -3.5 and region.max_score == pytest.approx(0.9)


def test_resize_map_is_bilinear_and_float32() -> None:
    values = np.array([[0.0, 1.0]], dtype=np.float64)
    resized = resize_map(values, 4, 1)
    assert resized.dtype == np.float32 and resized.shape == (1, 4)
    assert resized[0, 0] == 0.0 and resized[0, -1] == 1.0 and 0 < resized[0, 1] < resized[0, 2] < 1


def test_scorer_rejects_wrong_number_of_scale_maps(engine_and_manifest) -> None:
    _, manifest = engine_and_manifest
    output = EngineOutput(anomaly_map=np.zeros((64, 64), np.float32), scale_maps=(np.ones((16, 16), np.float32),))
    with pytest.raises(ValueError, match="1 scale maps but 2 channel counts"):
        FrameScorer(manifest).score(output, (64, 64))


def test_null_model_choice_from_the_config(engine_and_manifest) -> None:
    """A fitted bundle decides with its null and epsilon; 'polyomino' gives the paper's NFA at epsilon 1."""
    from edge_agent.bundle import NfaSpec, ScaleNullSpec
    from edge_agent.inspection.scoring import FrameScorer, NullModelError

    _, manifest = engine_and_manifest
    nulls = tuple(ScaleNullSpec(mean=1.0, dof=float(s.channels), area=2.0) for s in manifest.scales)
    fitted = manifest.model_copy(
        update={"nfa": NfaSpec(log10_number_of_tests=3.0, log10_epsilon=-2.0, null_model="fitted", scale_nulls=nulls)}
    )
    scorer = FrameScorer(fitted)
    assert scorer.rule.log10_epsilon == -2.0 and scorer.nulls is not None and scorer.nulls[0].area == 2.0
    paper = FrameScorer(fitted, NfaConfig(null_model="polyomino"))
    assert paper.nulls is None and paper.rule.log10_epsilon == 0.0
    assert FrameScorer(fitted, NfaConfig(null_model="polyomino", log10_epsilon=-1.0)).rule.log10_epsilon == -1.0
    with pytest.raises(NullModelError, match="ships no fitted null"):
        FrameScorer(manifest, NfaConfig(null_model="fitted"))


def test_tighten_keeps_each_regions_own_peak_and_drops_its_tails() -> None:
    from edge_agent.inspection.delineation import tighten

    detected = np.zeros((8, 12), dtype=bool)
    detected[1:7, 1:5] = True  # a strong region
    detected[2:5, 8:11] = True  # a weak one, far from the strong one's level
    score = np.ones((8, 12), dtype=np.float32)
    score[3, 2] = 10.0  # the strong peak
    score[3, 3] = 6.0
    score[3, 9] = 2.0  # the weak peak: kept, although far below the strong one
    tight = tighten(detected, score, 0.6)
    # Each region against its own peak: 10 -> 6 keeps two pixels, 2 -> 1.2 keeps the weak peak alone.
    assert {(int(r), int(c)) for r, c in zip(*np.nonzero(tight), strict=True)} == {(3, 2), (3, 3), (3, 9)}
    assert (tight <= detected).all()
    assert (tighten(detected, score, 0.0) == detected).all()
    assert not tighten(np.zeros_like(detected), score, 0.5).any()
    with pytest.raises(ValueError, match="fraction"):
        tighten(detected, score, 1.0)
    with pytest.raises(ValueError, match="differ"):
        tighten(detected, score[:4], 0.5)


def test_a_mask_fraction_tightens_the_boxes_but_not_the_decision(engine_and_manifest) -> None:
    """The regions' boxes shrink to where the anomaly map nears each region's peak; the decision, the evidence
    and the regions a minimum area drops stay the NFA's."""
    engine, manifest = engine_and_manifest
    output = engine.infer(defect_frame(np.random.default_rng(5), 64, 64, (20, 20, 10, 10), delta=40.0))
    plain = FrameScorer(manifest).score(output, (64, 64))
    tight = FrameScorer(manifest, NfaConfig(mask_fraction=0.9)).score(output, (64, 64))
    assert plain.anomalous and tight.anomalous and len(tight.regions) == len(plain.regions)
    for a, b in zip(plain.regions, tight.regions, strict=True):
        assert a.log_nfa == b.log_nfa and a.max_score == b.max_score
        ax, ay, aw, ah = a.bbox
        bx, by, bw, bh = b.bbox
        assert ax <= bx and ay <= by and bx + bw <= ax + aw and by + bh <= ay + ah  # inside the NFA's region
        assert b.area < a.area
    # The minimum area is counted on the NFA's region, so a tighter box does not drop a detection ...
    area = plain.regions[0].area
    rule = NfaConfig(mask_fraction=0.9, min_region_area=area)
    assert FrameScorer(manifest, rule).score(output, (64, 64)).anomalous
    # ... nor keep one that the area would drop.
    stricter = FrameScorer(manifest, rule.model_copy(update={"min_region_area": area + 1}))
    assert not stricter.score(output, (64, 64)).anomalous
    # The bundle's own fraction applies unless the config sets one; the paper's NFA keeps its regions.
    bundled = manifest.model_copy(update={"nfa": manifest.nfa.model_copy(update={"mask_fraction": 0.9})})
    assert FrameScorer(bundled).rule.mask_fraction == 0.9
    assert FrameScorer(bundled, NfaConfig(mask_fraction=0.0)).rule.mask_fraction == 0.0
    assert FrameScorer(bundled, NfaConfig(null_model="polyomino")).rule.mask_fraction == 0.0
    assert FrameScorer(manifest).rule.mask_fraction == 0.0  # a bundle without the field: the NFA's regions


def test_a_mask_fraction_outside_zero_to_one_is_refused_in_the_config_and_the_bundle(engine_and_manifest) -> None:
    from pydantic import ValidationError

    _, manifest = engine_and_manifest
    for bad in (1.0, -0.1):
        with pytest.raises(ValidationError) as config_error:
            NfaConfig(mask_fraction=bad)
        assert config_error.value.errors()[0]["loc"] == ("mask_fraction",)
        document = manifest.model_dump(mode="json")
        document["nfa"]["mask_fraction"] = bad
        with pytest.raises(ValidationError) as bundle_error:
            type(manifest).model_validate(document)
        assert bundle_error.value.errors()[0]["loc"] == ("nfa", "mask_fraction")
