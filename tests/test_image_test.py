"""The image test (edge_agent/inspection/image_test.py): its null from good scores, its share of epsilon,
and how scoring joins it to the region tests; the texture head's graph (training/heads.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_agent.bundle import MIN_GOOD_SCORES
from edge_agent.inspection import nfa
from edge_agent.inspection.image_test import ImageTest
from edge_agent.inspection.scoring import log_nfa_map_of, nfa_inputs


def test_below_the_tail_the_probability_is_the_rank_among_good_scores() -> None:
    test = ImageTest(tuple(float(v) for v in range(1, 101)), share=0.1)
    # 50 of the 100 good scores are >= 50.5: p = (1 + 50) / 101
    assert test.log10_p(50.5) == pytest.approx(math.log10(51 / 101))
    assert test.log10_p(0.5) == pytest.approx(0.0)  # below every good score: p = 1
    assert test.log10_nfa(50.5) == pytest.approx(math.log10(51 / 101) + 1.0)  # over a share of 0.1
    assert test.region_shift == pytest.approx(-math.log10(0.9))


def test_past_the_largest_good_score_the_tail_keeps_ranking() -> None:
    scores = np.exp(np.random.default_rng(0).normal(size=300))
    test = ImageTest(tuple(scores), share=0.1)
    top = float(scores.max())
    grid = np.linspace(0.1, 5 * top, 400)
    values = [test.log10_p(v) for v in grid]
    assert (np.diff(values) <= 1e-12).all()  # never rises with the score
    assert test.log10_p(top * 1.01) <= math.log10(1 / 301)  # at most the conformal floor just past the max
    assert test.log10_p(3 * top) < test.log10_p(2 * top) < test.log10_p(top * 1.01)  # and goes on falling
    assert test.log10_p(math.inf) == -math.inf and test.log10_p(math.nan) == 0.0


def test_new_good_scores_are_flagged_at_about_the_promised_rate() -> None:
    """Exchangeable good scores: the share flagged at each level is about that level (a heavy tail here)."""
    rng = np.random.default_rng(3)
    good = np.exp(rng.standard_t(5, size=600))
    test = ImageTest(tuple(good), share=0.5)
    fresh = np.exp(rng.standard_t(5, size=40000))
    log_p = np.array([test.log10_p(v) for v in fresh])
    for level, low, high in ((0.1, 0.08, 0.12), (0.01, 0.005, 0.02), (0.001, 0.0002, 0.004)):
        assert low <= float(np.mean(log_p < math.log10(level))) <= high


@pytest.mark.parametrize(
    ("scores", "share", "tail"),
    [
        ((1.0,) * (MIN_GOOD_SCORES - 1), 0.1, 0.1),
        ((1.0,) * (MIN_GOOD_SCORES - 1) + (0.0,), 0.1, 0.1),
        ((1.0,) * (MIN_GOOD_SCORES - 1) + (math.nan,), 0.1, 0.1),
        ((1.0,) * MIN_GOOD_SCORES, 1.0, 0.1),
        ((1.0,) * MIN_GOOD_SCORES, 0.1, 0.9),
    ],
)
def test_a_null_that_cannot_hold_a_promise_is_refused(scores: tuple[float, ...], share: float, tail: float) -> None:
    with pytest.raises(ValueError, match="ImageTest"):
        ImageTest(scores, share, tail)


def _maps(texture: float) -> tuple[list[np.ndarray], list[int], list[str], tuple[nfa.ScaleNull, ...]]:
    rng = np.random.default_rng(1)
    flow = (rng.chisquare(16, size=(12, 12)) / 16).astype(np.float32)
    return [flow, np.array([[texture]], np.float32)], [16, 100], ["flow", "texture"], (nfa.ScaleNull(1.0, 16.0, 1.0),)


def test_scoring_joins_the_image_test_to_the_regions_as_one_nfa() -> None:
    good = tuple(float(v) for v in np.exp(np.random.default_rng(2).normal(size=200)))
    test = ImageTest(good, share=0.1)
    maps, channels, heads, nulls = _maps(texture=1.0)
    regions = nfa.log_nfa_map([maps[0]], [16], (24, 24), nulls)
    # The texture map is not a region map: the regions read the flow map alone.
    assert [m.shape for m in nfa_inputs(maps, channels, heads, nulls)[0]] == [(12, 12)]
    typical = log_nfa_map_of(maps, channels, heads, (24, 24), nulls, test)
    np.testing.assert_allclose(typical, np.minimum(regions + test.region_shift, test.log10_nfa(1.0)), rtol=1e-6)
    assert typical.min() > -2.0  # a typical good frame: nothing below epsilon
    extreme = log_nfa_map_of(_maps(texture=1e4)[0], channels, heads, (24, 24), nulls, test)
    assert (extreme < -2.0).all()  # the whole frame is the detection
    # Without an image test (an old bundle, or the paper's NFA) the texture score changes nothing.
    np.testing.assert_allclose(log_nfa_map_of(_maps(1e4)[0], channels, heads, (24, 24), nulls), regions)
    paper = log_nfa_map_of(_maps(1e4)[0], channels, heads, (24, 24), None, test)
    np.testing.assert_allclose(paper, nfa.log_nfa_map([maps[0]], [16], (24, 24)))


def test_the_texture_head_exports_to_a_graph_tensorrt_takes_with_its_statistics_kept_fp32(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    from edge_agent.engines.tensorrt.graph_check import check_graph, head_nodes
    from training.finish import backbone_features
    from training.heads import TEXTURE_KEY, fit_heads, out_of_sample_maps
    from training.model import ExportWrapper, UFlow, UFlowConfig

    config = UFlowConfig(image_height=64, image_width=96, heads=("flow", "texture"))
    model = UFlow(config, random_weights=True).eval()
    assert [(s.name, s.height, s.width, s.head) for s in model.scales][-1] == ("t_0", 1, 1, "texture")
    images = (np.random.default_rng(0).random((24, 64, 96, 3)) * 255).astype(np.uint8)
    with torch.no_grad():
        features = backbone_features(model, images, 8)
        cross = fit_heads(model.heads, features)
        inside = model.maps(features)[-1].numpy()[:, 0, 0]
        outside = out_of_sample_maps(model.heads, cross, features, np.arange(24))[TEXTURE_KEY][:, 0, 0]
    # Out of sample the good frames look less typical than to a fit that saw them: that is what the null needs.
    assert outside.mean() > inside.mean()
    path = tmp_path / "model.onnx"
    from training.export import export_onnx

    export_onnx(model, path)
    assert check_graph(path, "fp32") == []
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["t_0"], {session.get_inputs()[0].name: images[:1]})[0]
    with torch.no_grad():
        want = ExportWrapper(model)(torch.from_numpy(images[:1]))[-1].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    graph = onnx.load(str(path)).graph
    kept = head_nodes(graph, ["t_0"])
    assert {n.op_type for n in kept} >= {"ReduceMean", "Sub", "Sqrt", "Concat", "Gemm", "Pow"}
    assert all(n.name.startswith("/texture_0/") for n in kept)  # the statistics, and no backbone node


def test_in_a_decision_the_regions_say_where_and_the_whole_frame_only_when_the_image_test_alone_fires() -> None:
    good = tuple(float(v) for v in np.exp(np.random.default_rng(2).normal(size=200)))
    test = ImageTest(good, share=0.1)
    maps, channels, heads, nulls = _maps(texture=1e4)
    maps[0][3:7, 3:7] = 12.0  # a defect the region tests see
    regions = nfa.log_nfa_map([maps[0]], [16], (24, 24), nulls) + test.region_shift
    assert regions.min() < -2.0 and (regions >= -2.0).any()
    decided = log_nfa_map_of(maps, channels, heads, (24, 24), nulls, test, log10_epsilon=-2.0)
    np.testing.assert_allclose(decided, regions, rtol=1e-6)  # the defect's region, not the whole frame
    ranked = log_nfa_map_of(maps, channels, heads, (24, 24), nulls, test)
    assert float(ranked.min()) == pytest.approx(min(float(regions.min()), test.log10_nfa(1e4)), rel=1e-6)
    quiet, *_ = _maps(texture=1e4)
    alone = log_nfa_map_of([quiet[0], quiet[1]], channels, heads, (24, 24), nulls, test, log10_epsilon=-2.0)
    assert (alone < -2.0).all()  # the image test alone: the whole frame
