"""edge_agent.inspection.nfa against the plain reference in tests/nfa_reference.py, plus edge cases and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nfa_reference as ref
import numpy as np
import pytest

from edge_agent.inspection import nfa

RTOL = 1e-9


def assert_same_log_prob(m: np.ndarray, channels: int) -> np.ndarray:
    fast = nfa.log_prob_map(m, channels)
    slow = ref.log_prob_map(m, channels)
    assert fast.shape == m.shape
    # Zeros must be exact zeros in both (same mask), the rest equal to a relative 1e-9.
    np.testing.assert_array_equal(fast == 0, slow == 0)
    np.testing.assert_allclose(fast, slow, rtol=RTOL, atol=0)
    # The same detection mask (log10 NFA < 0) at the map's own size.
    log10_n = ref.log10_number_of_tests([m.shape]) if m.size <= 1024 else nfa.log10_number_of_tests([m.shape])
    np.testing.assert_array_equal(log10_n + fast < 0, log10_n + slow < 0)
    return fast


def chi2_map(rng: np.random.Generator, shape: tuple[int, int], channels: int) -> np.ndarray:
    return rng.chisquare(channels, size=shape) / channels


def with_blob(m: np.ndarray, rng: np.random.Generator, channels: int, centre, radius: float, variance: float):
    """m with a disc where the latents have ``variance`` instead of 1 (m scaled chi^2 there)."""
    yy, xx = np.mgrid[: m.shape[0], : m.shape[1]]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    out = m.copy()
    out[disc] = variance * rng.chisquare(channels, size=int(disc.sum())) / channels
    return out, disc


# ------------------------------------------------------------------ tree


def test_component_tree_matches_reference_nodes() -> None:
    rng = np.random.default_rng(3)
    m = rng.integers(0, 5, size=(9, 11)).astype(np.float64)  # many plateaus and ties
    tree = nfa.component_tree(m)
    nodes, root = ref.build_tree(m)
    assert len(tree.node_pixel) == len(nodes)
    fast = sorted((float(lv), int(a)) for lv, a in zip(tree.level, tree.area, strict=True))
    slow = sorted((n.level, len(n.pixels)) for n in nodes)
    assert fast == slow
    assert tree.area[tree.parent_node == np.arange(len(tree.parent_node))].tolist() == [m.size]
    # A child is strictly higher and strictly smaller than its parent.
    child = tree.parent_node != np.arange(len(tree.parent_node))
    assert (tree.level[child] > tree.level[tree.parent_node[child]]).all()
    assert (tree.area[child] < tree.area[tree.parent_node[child]]).all()
    assert len(nodes[root].pixels) == m.size


# ------------------------------------------------------------------ per-scale log P vs the reference


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("channels", [1, 4, 32])
def test_chi2_maps_match_reference(seed: int, channels: int) -> None:
    rng = np.random.default_rng(seed)
    shape = [(14, 14), (12, 17), (23, 9), (28, 28), (5, 31), (16, 16)][seed]
    assert_same_log_prob(chi2_map(rng, shape, channels), channels)


@pytest.mark.parametrize(
    "make",
    [
        lambda r: r.uniform(0.0, 3.0, (17, 13)),
        lambda r: r.exponential(1.5, (20, 20)),
        lambda r: r.lognormal(0.3, 0.8, (11, 24)),
        lambda r: np.round(r.uniform(0.0, 4.0, (18, 18)), 1),  # many ties
        lambda r: r.choice([0.5, 1.0, 2.0, 5.0], size=(15, 15)),  # plateaus, levels 1 and below
        lambda r: r.uniform(0.0, 3.0, (32, 32)).astype(np.float32),
    ],
    ids=["uniform", "exponential", "lognormal", "rounded", "four-levels", "float32"],
)
@pytest.mark.parametrize("seed", range(3))
def test_other_distributions_match_reference(make, seed: int) -> None:
    m = make(np.random.default_rng(100 + seed))
    assert_same_log_prob(m, 8)


@pytest.mark.parametrize("seed", range(4))
def test_planted_blobs_match_reference_and_are_detected(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    channels = 64
    m = chi2_map(rng, (28, 28), channels)
    # log10 N is about 0.61 per pixel of the map (477 at 28x28): a region must beat that in total.
    m, disc = with_blob(m, rng, channels, centre=(8 + seed, 15), radius=3.5, variance=6.0)
    m, disc2 = with_blob(m, rng, channels, centre=(21, 6 + seed), radius=2.5, variance=8.0)
    lp = assert_same_log_prob(m, channels)
    log_nfa = nfa.log10_number_of_tests([m.shape]) + lp
    detected = log_nfa < 0
    for blob in (disc, disc2):
        # The selection keeps the most significant node inside the blob, not necessarily all of it.
        assert detected[blob].sum() >= 0.25 * blob.sum(), "a planted blob must be detected"
    assert (detected & ~(disc | disc2)).sum() <= 0.25 * (disc | disc2).sum()


def test_pure_noise_is_mostly_not_detected() -> None:
    rng = np.random.default_rng(7)
    channels = 16
    n_regions = []
    for _ in range(30):
        m = chi2_map(rng, (28, 28), channels)
        log_nfa = nfa.log_nfa_map([m], [channels], m.shape)
        n_regions.append(len(nfa.regions_from_log_nfa(log_nfa)))
    assert np.mean(n_regions) < 1.0


@pytest.mark.parametrize("seed", range(2))
def test_two_scale_noise_with_blob(seed: int) -> None:
    rng = np.random.default_rng(300 + seed)
    coarse = chi2_map(rng, (14, 14), 64)
    fine, _ = with_blob(chi2_map(rng, (28, 28), 64), rng, 64, (14, 14), 4.0, 6.0)
    assert_same_log_prob(coarse, 64)
    assert_same_log_prob(fine, 64)
    log_nfa = nfa.log_nfa_map([fine, coarse], [64, 64], (56, 56))
    regions = nfa.regions_from_log_nfa(log_nfa)
    assert regions, "the blob must give a region"
    x, y, w, h = regions[0].bbox
    assert x <= 28 <= x + w and y <= 28 <= y + h


# ------------------------------------------------------------------ real m_s maps (magnetic tile)

REAL = Path(__file__).parent / "data" / "nfa_real_ms"


def real_maps() -> tuple[dict, dict[str, np.ndarray]]:
    """The saved m_s maps of a U-Flow model trained on magnetic tile (tests/data/make_nfa_real_ms.py)."""
    meta = json.loads(REAL.with_suffix(".json").read_text())
    with np.load(REAL.with_suffix(".npz")) as arrays:
        return meta, {k: arrays[k] for k in arrays.files}


def test_real_maps_match_reference() -> None:
    meta, maps = real_maps()
    channels = [s["channels"] for s in meta["scales"]]
    assert len(maps) == len(meta["images"]) * len(channels)
    for image in meta["images"]:
        for s, c in enumerate(channels):
            m = maps[f"image{image['index']}_scale{s}"]
            assert m.dtype == np.float32 and m.shape == (meta["scales"][s]["height"], meta["scales"][s]["width"])
            # The plain reference takes seconds at 64x64: compare the finest scale on one image only.
            if m.size <= 1024 or image["index"] == len(meta["images"]) - 1:
                lp = assert_same_log_prob(m, c)
                assert (lp < 0).any()  # real maps have nodes above the mean


def test_real_maps_full_pipeline() -> None:
    meta, maps = real_maps()
    channels = [s["channels"] for s in meta["scales"]]
    size = (meta["scales"][0]["height"] * meta["scales"][0]["stride"],) * 2
    for image in meta["images"]:
        scale_maps = [maps[f"image{image['index']}_scale{s}"] for s in range(len(channels))]
        log_nfa = nfa.log_nfa_map(scale_maps, channels, size)
        assert log_nfa.shape == size and np.isfinite(log_nfa).all()
        per_scale = [nfa.log_prob_map(m, c).min() for m, c in zip(scale_maps, channels, strict=True)]
        # Bilinear upsampling never goes below a map's minimum.
        assert log_nfa.min() >= nfa.log10_number_of_tests([m.shape for m in scale_maps]) + min(per_scale) - 1e-3
        regions = nfa.regions_from_log_nfa(log_nfa)
        assert sum(r.area for r in regions) == int((log_nfa < 0).sum())


# ------------------------------------------------------------------ edge cases


def test_one_pixel() -> None:
    assert nfa.log_prob_map(np.array([[4.0]]), 3)[0, 0] == pytest.approx(ref.log_prob_map(np.array([[4.0]]), 3)[0, 0])
    assert nfa.log_prob_map(np.array([[4.0]]), 3)[0, 0] < 0
    assert nfa.log_prob_map(np.array([[0.5]]), 3)[0, 0] == 0.0
    assert nfa.log_prob_map(np.array([[0.0]]), 3)[0, 0] == 0.0


@pytest.mark.parametrize("value", [0.0, 0.7, 1.0, 1.5, 3.0])
def test_constant_map_is_one_node(value: float) -> None:
    m = np.full((6, 9), value)
    lp = assert_same_log_prob(m, 5)
    tree = nfa.component_tree(m)
    assert tree.area.tolist() == [54]
    expected = 0.0 if value <= 1 else 54 * -(5 / 2) * (value - 1 - math.log(value)) / math.log(10)
    np.testing.assert_allclose(lp, expected, rtol=RTOL)


def test_all_levels_at_most_one_give_zero() -> None:
    rng = np.random.default_rng(11)
    m = rng.uniform(0, 1, size=(20, 20))
    m[3, 3] = 1.0
    assert (assert_same_log_prob(m, 12) == 0).all()


def test_the_bound_is_zero_not_negative_below_the_mean() -> None:
    # Pure noise at level < 1 everywhere except one high pixel: the uncorrected bound would make the
    # whole image very improbable; with log P = 0 below the mean only the high pixel counts.
    m = np.full((10, 10), 0.9)
    m[5, 5] = 6.0
    lp = assert_same_log_prob(m, 10)
    assert lp[5, 5] < 0
    assert np.count_nonzero(lp) == 1


def test_plateau_and_tie_structure() -> None:
    # Two equal-level plateaus joined at a lower level, a single-child chain above one of them.
    m = np.ones((7, 12))
    m[1:6, 1:5] = 3.0
    m[1:6, 7:11] = 3.0
    m[2:5, 2:4] = 4.0
    m[3, 3] = 9.0
    assert_same_log_prob(m, 6)
    tree = nfa.component_tree(m)
    assert sorted(tree.area.tolist()) == [1, 6, 20, 20, 84]


def test_merge_replaces_leaf_children() -> None:
    # A wide bump of level 2.5 with two single-pixel peaks: the bump's log P is below both peaks',
    # so the bump replaces them and all its pixels share its value.
    m = np.ones((9, 9))
    m[2:7, 2:7] = 2.5
    m[3, 3] = 3.0
    m[5, 5] = 3.0
    lp = assert_same_log_prob(m, 4)
    assert np.unique(lp[2:7, 2:7]).size == 1
    assert lp[0, 0] == 0


def test_merge_refused_keeps_children() -> None:
    # Two tall peaks on a barely raised base: the peaks are more significant than the base.
    m = np.ones((9, 9))
    m[1:8, 1:8] = 1.05
    m[2, 2] = 40.0
    m[6, 6] = 40.0
    lp = assert_same_log_prob(m, 4)
    assert lp[2, 2] < 0 and lp[6, 6] < 0
    assert lp[4, 4] == 0


def test_extreme_values_sort_and_match_reference() -> None:
    # Zeros, subnormals, values straddling powers of two and huge values exercise the radix sort.
    rng = np.random.default_rng(8)
    pool = np.array(
        [0.0, 5e-324, 1e-300, 0.25, 0.5, 0.9999999, 1.0, 1.0000001, 2.0, 2.0000000000000004, 7.5, 1e6, 1e300]
    )
    m = rng.choice(pool, size=(13, 14))
    assert_same_log_prob(m, 3)
    tree = nfa.component_tree(m)
    assert sorted(np.unique(tree.level).tolist()) == sorted(np.unique(m).tolist())


@pytest.mark.parametrize("shape", [(1, 50), (50, 1), (2, 2), (1, 2)])
def test_single_row_and_column_maps(shape) -> None:
    rng = np.random.default_rng(sum(shape))
    assert_same_log_prob(rng.exponential(2.0, size=shape), 6)


def test_strided_and_fortran_order_inputs() -> None:
    rng = np.random.default_rng(12)
    base = rng.exponential(2.0, size=(40, 45))
    for m in (base[::2, ::3], np.asfortranarray(base), base.T):
        np.testing.assert_array_equal(nfa.log_prob_map(m, 6), nfa.log_prob_map(np.ascontiguousarray(m), 6))
    assert_same_log_prob(base[::2, ::3], 6)


def test_non_square_and_large_quantised_map() -> None:
    rng = np.random.default_rng(5)
    # 256x256 with few distinct levels keeps the plain reference fast enough.
    m = np.round(rng.chisquare(4, size=(256, 256)) / 4, 0) * 0.75
    assert_same_log_prob(m, 4)
    m = np.round(rng.chisquare(4, size=(3, 200)) / 4, 1)
    assert_same_log_prob(m, 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_size_dependent_correlation_matches_reference(seed: int) -> None:
    """A null with a profile counts a region of a pixels as a / inflation(sqrt(a)) observations."""
    rng = np.random.default_rng(40 + seed)
    m, _ = with_blob(chi2_map(rng, (18, 23), 4), rng, 4, (9, 11), 3.5, 2.5)
    profile = (1.0, 2.2, 4.1, 6.5, 8.0)
    null = nfa.ScaleNull(mean=1.1, dof=3.0, area=2.0, profile=profile)
    fast = nfa.log_prob_map(m, 4, null)
    slow = ref.log_prob_map(m / 1.1, 3.0, ref.profile_observations(list(profile)))
    np.testing.assert_array_equal(fast == 0, slow == 0)
    np.testing.assert_allclose(fast, slow, rtol=RTOL, atol=0)
    assert fast.min() < 0


def test_size_dependent_correlation_weighs_small_regions_up_and_large_ones_down() -> None:
    """Against a constant area equal to the profile's value at side 3: one pixel counts as one observation
    (more evidence), a region larger than the profile as a / profile[-1] (less)."""
    profile = (1.0, 2.0, 4.0, 6.0, 9.0)
    constant, by_size = nfa.ScaleNull(1.0, 4.0, 4.0), nfa.ScaleNull(1.0, 4.0, 4.0, profile)
    spike = np.ones((9, 9))
    spike[4, 4] = 6.0
    assert nfa.log_prob_map(spike, 4, by_size).min() == pytest.approx(4.0 * nfa.log_prob_map(spike, 4, constant).min())
    plateau = np.ones((20, 20))
    plateau[2:18, 2:18] = 3.0  # 256 pixels: side 16, past the profile
    assert nfa.log_prob_map(plateau, 4, by_size).min() == pytest.approx(
        4.0 / 9.0 * nfa.log_prob_map(plateau, 4, constant).min()
    )
    # A flat profile is the constant area, to the last bit.
    flat = nfa.ScaleNull(1.0, 4.0, 4.0, (4.0,))
    np.testing.assert_array_equal(nfa.log_prob_map(plateau, 4, flat), nfa.log_prob_map(plateau, 4, constant))


@pytest.mark.parametrize("profile", [(0.5,), (1.0, float("nan")), tuple([1.0] * 65)])
def test_bad_profiles_are_refused(profile) -> None:
    with pytest.raises(ValueError, match="profile"):
        nfa.ScaleNull(1.0, 4.0, 1.0, profile)


def test_large_continuous_map_properties() -> None:
    rng = np.random.default_rng(6)
    m = chi2_map(rng, (256, 256), 8)
    lp = nfa.log_prob_map(m, 8)
    assert lp.dtype == np.float64 and lp.shape == (256, 256)
    assert (lp <= 0).all()
    # Every kept value comes from a node of the tree: |R| * per-pixel bound at the node's level.
    tree = nfa.component_tree(m)
    per_pixel = np.where(tree.level > 1, -4 * (tree.level - 1 - np.log(tree.level)) / math.log(10), 0.0)
    node_values = tree.area * per_pixel
    kept = np.unique(lp[lp < 0])
    candidates = np.sort(node_values)
    at = np.clip(np.searchsorted(candidates, kept), 1, candidates.size - 1)
    nearest = np.minimum(np.abs(candidates[at] - kept), np.abs(candidates[at - 1] - kept))
    assert kept.size > 0
    assert (nearest <= 1e-12 * np.abs(kept)).all()


# ------------------------------------------------------------------ number of tests


@pytest.mark.parametrize("shapes", [[(1, 1)], [(2, 3)], [(7, 7)], [(14, 14), (7, 7)], [(28, 28), (14, 14), (7, 7)]])
def test_number_of_tests_matches_high_precision(shapes) -> None:
    assert nfa.log10_number_of_tests(shapes) == pytest.approx(ref.log10_number_of_tests(shapes), rel=1e-12)


def test_number_of_tests_is_finite_for_large_scales() -> None:
    value = nfa.log10_number_of_tests([(256, 256), (128, 128), (64, 64)])
    # The largest term dominates: log10(N_s a b^N_s / N_s * b/(b-1)) for N_s = 65536.
    approx = math.log10(0.316915) + 65536 * math.log10(4.062570) + math.log10(4.062570 / 3.062570)
    assert math.isfinite(value)
    assert value == pytest.approx(approx, abs=1e-4)


# ------------------------------------------------------------------ upsampling and the NFA map


@pytest.mark.parametrize(
    "src_shape,out_shape",
    [((7, 7), (32, 32)), ((14, 10), (56, 33)), ((5, 9), (5, 9)), ((9, 12), (4, 5)), ((1, 1), (3, 2))],
)
def test_resize_matches_torch(src_shape, out_shape) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    src = rng.normal(size=src_shape)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(src)[None, None], size=out_shape, mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(nfa.resize_bilinear(src, out_shape), expected, rtol=0, atol=1e-12)


def test_log_nfa_map_is_number_of_tests_plus_min_of_upsampled() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    maps = [chi2_map(rng, (16, 16), 64), chi2_map(rng, (8, 8), 32)]
    maps[0][4:8, 4:8] *= 6
    out = nfa.log_nfa_map(maps, [64, 32], (64, 64))
    assert out.dtype == np.float32 and out.shape == (64, 64)
    ups = [
        torch.nn.functional.interpolate(
            torch.from_numpy(ref.log_prob_map(m, c))[None, None], size=(64, 64), mode="bilinear", align_corners=False
        )[0, 0].numpy()
        for m, c in zip(maps, [64, 32], strict=True)
    ]
    expected = ref.log10_number_of_tests([(16, 16), (8, 8)]) + np.minimum(*ups)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-4)
    assert (out < 0).any()


# ------------------------------------------------------------------ regions


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(4))
def test_regions_match_flood_fill(seed: int, dtype) -> None:
    rng = np.random.default_rng(seed)
    log_nfa = rng.normal(size=(40, 37)).astype(dtype)
    score = rng.uniform(size=log_nfa.shape).astype(dtype)
    threshold = [-0.5, 0.0, 0.8, -1.5][seed]  # from a few large tangled regions to small specks
    got = nfa.regions_from_log_nfa(log_nfa, threshold, score_map=score)
    expected = ref.regions(log_nfa < threshold)
    assert len(got) == len(expected)
    by_bbox = {}
    for bbox, area, pixels in expected:
        idx = np.array(sorted(pixels))
        by_bbox.setdefault(bbox, []).append((area, float(log_nfa.ravel()[idx].min()), float(score.ravel()[idx].max())))
    for r in got:
        assert (r.area, r.log_nfa, r.max_score) in [
            (a, pytest.approx(lo), pytest.approx(hi)) for a, lo, hi in by_bbox[r.bbox]
        ]
    assert [r.log_nfa for r in got] == sorted(r.log_nfa for r in got)


def test_regions_are_four_connected_and_filtered_by_area() -> None:
    log_nfa = np.zeros((6, 6), dtype=np.float32)
    log_nfa[1, 1] = log_nfa[2, 2] = -3.0  # diagonal neighbours: two regions with 4-connectivity
    log_nfa[4, 1:5] = -1.0
    regions = nfa.regions_from_log_nfa(log_nfa, 0.0)
    assert sorted(r.area for r in regions) == [1, 1, 4]
    assert all(r.max_score is None for r in regions)
    big = nfa.regions_from_log_nfa(log_nfa, 0.0, min_area=2)
    assert [(r.bbox, r.area, r.log_nfa) for r in big] == [((1, 4, 4, 1), 4, -1.0)]
    assert nfa.regions_from_log_nfa(log_nfa, -5.0) == []
    # The threshold is strict: log NFA equal to log10 epsilon is not detected.
    assert len(nfa.regions_from_log_nfa(log_nfa, -1.0)) == 2


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.array([[1.0, np.nan]]), "non-finite"),
        (np.array([[1.0, np.inf]]), "non-finite"),
        (np.array([[1.0, -0.5]]), "negative"),
        (np.ones(5), "2-D"),
        (np.ones((2, 2, 2)), "2-D"),
        (np.ones((0, 4)), "empty"),
        (np.array([["a"]]), "dtype"),
        ([[1.0, 2.0]], "numpy array"),
    ],
)
def test_bad_maps_are_refused(bad, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nfa.log_prob_map(bad, 4)
    with pytest.raises(ValueError, match=match):
        nfa.log_nfa_map([np.ones((3, 3)), bad], [4, 4], (8, 8))


def test_bad_arguments_are_refused() -> None:
    m = np.ones((4, 4))
    with pytest.raises(ValueError, match="2 scale maps but 1 channel"):
        nfa.log_nfa_map([m, m], [4], (8, 8))
    with pytest.raises(ValueError, match="no scale maps"):
        nfa.log_nfa_map([], [], (8, 8))
    for channels in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="channels"):
            nfa.log_prob_map(m, channels)
    for shape in ((8,), (0, 8), (8, -1), (8.0, 8)):
        with pytest.raises(ValueError, match="out_shape"):
            nfa.log_nfa_map([m], [4], shape)
    with pytest.raises(ValueError, match="shape"):
        nfa.log10_number_of_tests([(0, 3)])
    with pytest.raises(ValueError, match="NaN"):
        nfa.regions_from_log_nfa(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="score_map shape"):
        nfa.regions_from_log_nfa(np.zeros((2, 2)), score_map=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="min_area"):
        nfa.regions_from_log_nfa(np.zeros((2, 2)), min_area=-1)


def test_warm_up_compiles_every_runtime_specialisation() -> None:
    """After warm_up() the agent's calls (float32 engine maps, any sizes) compile nothing new."""
    from numba.core.registry import CPUDispatcher

    nfa.warm_up()
    jitted = {name: f for name, f in vars(nfa).items() if isinstance(f, CPUDispatcher)}
    before = {name: len(f.signatures) for name, f in jitted.items()}
    rng = np.random.default_rng(0)
    maps = [(rng.chisquare(c, shape) / c).astype(np.float32) for c, shape in ((30, (40, 48)), (56, (20, 24)))]
    log_nfa = nfa.log_nfa_map(maps, [30, 56], (160, 192))
    score = rng.uniform(size=log_nfa.shape).astype(np.float32)
    nfa.regions_from_log_nfa(log_nfa, 0.0, 4, score)
    nfa.regions_from_log_nfa(log_nfa - 1e4, 0.0, 4, score)
    nfa.regions_from_log_nfa(log_nfa.astype(np.float64) - 1e4)
    nfa.log_prob_map(maps[0].astype(np.float64), 30)
    nfa.log_prob_map((maps[0] * 100).astype(np.uint16), 30)
    for nulls in ([nfa.ScaleNull(1.1, 20.0, 3.0)] * 2, [nfa.ScaleNull(1.1, 20.0, 3.0, (1.0, 2.5, 3.0))] * 2):
        nfa.log_nfa_map(maps, [30, 56], (160, 192), nulls)
    nfa.resize_bilinear(maps[0], (7, 300))
    nfa.component_tree(maps[1])
    assert {name: len(f.signatures) for name, f in jitted.items()} == before
    assert sum(before.values()) >= 5
