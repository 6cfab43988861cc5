"""Tree-based a-contrario segmentation (NFA) of the per-scale maps m_s, in Numba.

For one scale with map ``m`` (H x W, m = mean over the C channels of z^2) the steps are:

1. **Component tree.** The max-tree of ``m`` with 4-connectivity: one node per connected component
   of an upper level set ``{m >= L}`` that contains at least one pixel of value exactly ``L``
   (equal levels merged, i.e. the canonical max-tree). A node's level is the minimum of ``m`` over
   its region, its area the number of pixels in the region (descendants included). Built in one
   pass: union-find over the pixels sorted by decreasing value (Berger et al. 2007), then areas
   accumulated from the leaves.
2. **Node probability.** With ``x = C * L`` every pixel of the region has ``sum_c z^2 >= x``; the
   Chernoff bound of the chi^2(C) tail for independent pixels gives
   ``log10 P(R) = |R| * -(C/2) * (t - 1 - ln t) / ln 10`` with ``t = x / C = L``, and
   ``log10 P(R) = 0`` when ``t <= 1`` (the bound only holds above the mean).
3. **Selection**, the rule of DESIGN.md section 5 with the details it leaves open resolved as the
   public reference implementation (mtailanian/uflow, ``src/nfa_tree.py``) resolves them:

   - A *branch* is the chain that starts at a leaf and climbs to the parent while the current node
     is its parent's only child. It never contains a node with two or more children; it contains
     the root only when the whole remaining tree is one chain.
   - *Chain reduction*: in every branch only the node with the smallest log10 P is kept (ties go to
     the node nearest the leaf, i.e. the smaller region); the others are removed and their children
     re-attached to their parent.
   - *Merge*: a node with two or more children that are all leaves, whose own log10 P is less than
     or equal to the smallest of its children's, replaces them (they are removed; it becomes a
     leaf). A node with several children that fails this test keeps them for good.
   - Chain reduction and merge are repeated until nothing changes (a node that became a leaf by a
     merge starts a new branch with the single-child nodes above it). The root is an ordinary node.
   - The kept nodes are the leaves of the final tree; they are disjoint. Each pixel of a kept node
     gets that node's log10 P, every other pixel gets 0.

   The Numba code computes exactly this fixed point in one bottom-up pass: for each node it decides
   whether its subtree collapses into a single leaf and which node that leaf is (see
   ``_select_and_paint``); ``tests/nfa_reference.py`` runs the literal iterative procedure instead.
4. **NFA.** ``log10 NFA = log10 N + min over scales of the bilinearly upsampled log10 P maps``
   (half-pixel centres, as torch ``interpolate(mode="bilinear", align_corners=False)``) with
   ``N = sum_s N_s * sum_{r=1..N_s} a b^r / r``, ``N_s = H_s W_s``, ``a = 0.316915``, ``b = 4.062570``.
   Regions are the 4-connected components (the tree's connectivity) of ``log10 NFA < log10 epsilon``.

All jitted functions use ``cache=True``: point ``NUMBA_CACHE_DIR`` at a writable directory (on the
device, inside the agent's state directory) and call ``warm_up()`` once at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit

POLYOMINO_A = 0.316915
POLYOMINO_B = 4.062570
_LN10 = math.log(10.0)


# --------------------------------------------------------------------------------------------
# Number of tests
# --------------------------------------------------------------------------------------------


def _logsumexp(values: np.ndarray) -> float:
    top = float(np.max(values))
    return top + math.log(float(np.sum(np.exp(values - top))))


def log10_number_of_tests(shapes: Sequence[tuple[int, int]]) -> float:
    """log10 of N = sum_s N_s * sum_{r=1..N_s} a * b^r / r with N_s = H_s * W_s, computed in log space."""
    shapes = list(shapes)
    if not shapes:
        raise ValueError("log10_number_of_tests: no scale shapes given")
    log_terms = []
    for index, shape in enumerate(shapes):
        if len(shape) != 2 or not all(_is_positive_int(d) for d in shape):
            raise ValueError(f"log10_number_of_tests: scale {index} shape {shape!r} is not two positive integers")
        n_s = int(shape[0]) * int(shape[1])
        r = np.arange(1, n_s + 1, dtype=np.float64)
        # ln(a b^r / r) for r = 1..N_s; the largest terms are the last ones (b > 1).
        log_polyominoes = math.log(POLYOMINO_A) + r * math.log(POLYOMINO_B) - np.log(r)
        log_terms.append(math.log(n_s) + _logsumexp(log_polyominoes))
    return _logsumexp(np.asarray(log_terms)) / _LN10


def _is_positive_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and int(value) > 0


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _checked_scale_map(m: np.ndarray, what: str) -> np.ndarray:
    """``m`` as a C-contiguous float64 H x W array, or a ValueError naming what is wrong."""
    if not isinstance(m, np.ndarray):
        raise ValueError(f"{what}: expected a numpy array, got {type(m).__name__}")
    if m.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D map (H x W), got shape {m.shape}")
    if m.size == 0:
        raise ValueError(f"{what}: empty map of shape {m.shape}")
    if m.dtype.kind not in "fiu":
        raise ValueError(f"{what}: expected a real numeric map, got dtype {m.dtype}")
    values = np.ascontiguousarray(m, dtype=np.float64)
    if not np.isfinite(values).all():
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise ValueError(f"{what}: {bad} non-finite value(s) (NaN or inf)")
    low = float(values.min())
    if low < 0.0:
        raise ValueError(f"{what}: negative value {low:g}; m_s is a mean of squares and cannot be negative")
    return values


def _checked_channels(channels: object, what: str) -> int:
    if not _is_positive_int(channels):
        raise ValueError(f"{what}: channels must be a positive integer, got {channels!r}")
    return int(channels)  # type: ignore[call-overload]


def _checked_out_shape(out_shape: object) -> tuple[int, int]:
    if (
        not isinstance(out_shape, (tuple, list))
        or len(out_shape) != 2
        or not all(_is_positive_int(d) for d in out_shape)
    ):
        raise ValueError(f"out_shape must be two positive integers (height, width), got {out_shape!r}")
    return int(out_shape[0]), int(out_shape[1])


# --------------------------------------------------------------------------------------------
# Component tree and selection (Numba)
# --------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _find_root(zpar: np.ndarray, p: int) -> int:
    # Path halving: every visited node skips to its grandparent.
    while zpar[p] != p:
        zpar[p] = zpar[zpar[p]]
        p = zpar[p]
    return p


@njit(nogil=True, cache=True)
def _max_tree(values: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, parent) of the canonical max-tree of the flat ``values`` (4-connectivity).

    ``order`` lists the pixels by decreasing value, so every pixel comes before its parent;
    ``parent[p]`` is the canonical pixel of p's node when p is not canonical, else of the parent
    node (the root, ``order[-1]``, is its own parent).
    """
    n = values.size
    order = np.argsort(-values, kind="mergesort").astype(np.int32)
    parent = np.empty(n, dtype=np.int32)
    zpar = np.full(n, -1, dtype=np.int32)
    for i in range(n):
        p = order[i]
        parent[p] = p
        zpar[p] = p
        y = p // width
        x = p - y * width
        for k in range(4):
            if k == 0:
                if x == 0:
                    continue
                q = p - 1
            elif k == 1:
                if x == width - 1:
                    continue
                q = p + 1
            elif k == 2:
                if y == 0:
                    continue
                q = p - width
            else:
                if y == height - 1:
                    continue
                q = p + width
            if zpar[q] < 0:
                continue
            r = _find_root(zpar, q)
            if r != p:
                parent[r] = p
                zpar[r] = p
    # Canonicalise, root first: a pixel whose parent has the same value as the parent's parent
    # points to the latter, so each level component is represented by one pixel.
    for i in range(n - 1, -1, -1):
        p = order[i]
        q = parent[p]
        if values[parent[q]] == values[q]:
            parent[p] = parent[q]
    return order, parent


@njit(nogil=True, cache=True)
def _node_areas(order: np.ndarray, parent: np.ndarray) -> np.ndarray:
    n = order.size
    area = np.ones(n, dtype=np.int64)
    for i in range(n - 1):  # the root (last) has no parent to add to
        p = order[i]
        area[parent[p]] += area[p]
    return area


@njit(nogil=True, cache=True)
def _pixel_log_prob(level: float, channels: int) -> float:
    """log10 of the Chernoff bound of P(chi^2(C) >= C * level) for one pixel; 0 where level <= 1."""
    if level <= 1.0:
        return 0.0
    return -0.5 * channels * (level - 1.0 - math.log(level)) / _LN10


@njit(nogil=True, cache=True)
def _select_and_paint(values: np.ndarray, order: np.ndarray, parent: np.ndarray, channels: int) -> np.ndarray:
    """Per-pixel log10 P of the kept nodes (0 elsewhere), for a canonical max-tree.

    Bottom-up, each node v gets ``collapses[v]`` (its subtree ends as one leaf of the final tree)
    and ``rep[v]`` (that leaf): a leaf collapses to itself; a node with one child collapses when the
    child does, to whichever of itself and the child's leaf has the smaller log P (ties to the
    child's, the node nearer the leaf): this is chain reduction; a node with several children
    collapses to itself when all children collapse and its log P is <= the smallest of their leaves'
    (the merge), and otherwise never. The kept nodes are rep[c] for every collapsing c whose parent
    does not collapse (or that is the root).
    """
    n = order.size
    root = order[n - 1]
    area = _node_areas(order, parent)
    log_prob = np.zeros(n, dtype=np.float64)
    n_children = np.zeros(n, dtype=np.int32)
    children_collapse = np.ones(n, dtype=np.bool_)
    children_min = np.full(n, np.inf, dtype=np.float64)
    only_child_rep = np.zeros(n, dtype=np.int32)
    collapses = np.zeros(n, dtype=np.bool_)
    rep = np.zeros(n, dtype=np.int32)
    for i in range(n):
        v = order[i]
        if v != root and values[parent[v]] == values[v]:
            continue  # not canonical: a pixel of its node, not a node
        lp = area[v] * _pixel_log_prob(values[v], channels)
        log_prob[v] = lp
        k = n_children[v]
        if k == 0:
            c = True
            r = v
        elif k == 1:
            c = children_collapse[v]
            r = only_child_rep[v]
            if c and lp < log_prob[r]:
                r = v
        else:
            c = children_collapse[v] and lp <= children_min[v]
            r = v
        collapses[v] = c
        rep[v] = r
        if v != root:
            up = parent[v]
            n_children[up] += 1
            if c:
                only_child_rep[up] = r
                if log_prob[r] < children_min[up]:
                    children_min[up] = log_prob[r]
            else:
                children_collapse[up] = False

    kept = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        v = order[i]
        if v != root and values[parent[v]] == values[v]:
            continue
        if collapses[v] and (v == root or not collapses[parent[v]]):
            kept[rep[v]] = True

    # Root first, so a node's value is known before its descendants inherit it.
    node_value = np.zeros(n, dtype=np.float64)
    out = np.zeros(n, dtype=np.float64)
    for i in range(n - 1, -1, -1):
        p = order[i]
        if p == root or values[parent[p]] != values[p]:
            if kept[p]:
                node_value[p] = log_prob[p]
            elif p != root:
                node_value[p] = node_value[parent[p]]
            out[p] = node_value[p]
        else:
            out[p] = node_value[parent[p]]
    return out


@njit(nogil=True, cache=True)
def _log_prob_flat(values: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    order, parent = _max_tree(values, height, width)
    return _select_and_paint(values, order, parent, channels)


@njit(nogil=True, cache=True)
def _tree_nodes(values: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order, parent = _max_tree(values, height, width)
    area = _node_areas(order, parent)
    return order, parent, area


def log_prob_map(m: np.ndarray, channels: int) -> np.ndarray:
    """Per-pixel log10 P (float64, H x W) of the selected tree nodes of one scale's map m_s.

    ``channels`` is C_s, the number of latent channels m_s averages over. Releases the GIL, so
    scales can run in parallel threads or overlap with inference.
    """
    values = _checked_scale_map(m, "log_prob_map: m")
    c = _checked_channels(channels, "log_prob_map")
    height, width = values.shape
    return _log_prob_flat(values.ravel(), height, width, c).reshape(height, width)


@dataclass(frozen=True)
class ComponentTree:
    """The canonical max-tree of a map, one entry per node (for inspection and tests)."""

    node_pixel: np.ndarray  # flat index of each node's canonical pixel
    parent_node: np.ndarray  # index into the node arrays; the root is its own parent
    level: np.ndarray  # float64
    area: np.ndarray  # int64, descendants included


def component_tree(m: np.ndarray) -> ComponentTree:
    """The canonical max-tree (4-connectivity, equal levels merged) of a non-negative map."""
    values = _checked_scale_map(m, "component_tree: m")
    flat = values.ravel()
    order, parent, area = _tree_nodes(flat, values.shape[0], values.shape[1])
    root = order[-1]
    canonical = (flat[parent] != flat) | (np.arange(flat.size) == root)
    node_pixel = order[canonical[order]][::-1].copy()  # root first
    index_of = np.full(flat.size, -1, dtype=np.int64)
    index_of[node_pixel] = np.arange(node_pixel.size)
    return ComponentTree(
        node_pixel=node_pixel.astype(np.int64),
        parent_node=index_of[parent[node_pixel]],
        level=flat[node_pixel],
        area=area[node_pixel],
    )


# --------------------------------------------------------------------------------------------
# Upsampling and the NFA map
# --------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _source_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: the two source indices and the weight of the second (half-pixel centres)."""
    scale = in_size / out_size
    i0 = np.empty(out_size, dtype=np.int64)
    i1 = np.empty(out_size, dtype=np.int64)
    w1 = np.empty(out_size, dtype=np.float64)
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        if src < 0.0:
            src = 0.0
        lo = int(src)
        i0[i] = lo
        i1[i] = lo + 1 if lo < in_size - 1 else lo
        w1[i] = src - lo
    return i0, i1, w1


@njit(nogil=True, cache=True)
def _resize_bilinear_into(src: np.ndarray, out: np.ndarray, take_min: bool) -> None:
    """out = bilinear(src), or out = min(out, bilinear(src)) when ``take_min``."""
    in_h, in_w = src.shape
    out_h, out_w = out.shape
    y0, y1, wy = _source_taps(in_h, out_h)
    x0, x1, wx = _source_taps(in_w, out_w)
    row = np.empty(in_w, dtype=np.float64)
    for i in range(out_h):
        a = 1.0 - wy[i]
        b = wy[i]
        for j in range(in_w):
            row[j] = a * src[y0[i], j] + b * src[y1[i], j]
        for j in range(out_w):
            v = (1.0 - wx[j]) * row[x0[j]] + wx[j] * row[x1[j]]
            if not take_min or v < out[i, j]:
                out[i, j] = v


def resize_bilinear(image: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map to ``out_shape`` (float64), half-pixel centres, edges clamped.

    Same sampling as torch ``interpolate(mode="bilinear", align_corners=False)`` without antialias.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 2 or image.size == 0:
        raise ValueError(f"resize_bilinear: expected a non-empty 2-D array, got {getattr(image, 'shape', image)!r}")
    out_h, out_w = _checked_out_shape(out_shape)
    out = np.empty((out_h, out_w), dtype=np.float64)
    _resize_bilinear_into(np.ascontiguousarray(image, dtype=np.float64), out, False)
    return out


def combine_log_probs(
    log_prob_maps: Sequence[np.ndarray], out_shape: tuple[int, int], log10_n_tests: float
) -> np.ndarray:
    """float32 log10 NFA at ``out_shape``: log10 N + min over scales of the upsampled log10 P maps."""
    out_h, out_w = _checked_out_shape(out_shape)
    if len(log_prob_maps) == 0:
        raise ValueError("combine_log_probs: no log P maps given")
    if not math.isfinite(log10_n_tests):
        raise ValueError(f"combine_log_probs: log10_n_tests must be finite, got {log10_n_tests!r}")
    out = np.empty((out_h, out_w), dtype=np.float64)
    for index, lp in enumerate(log_prob_maps):
        if not isinstance(lp, np.ndarray) or lp.ndim != 2 or lp.size == 0:
            raise ValueError(f"combine_log_probs: log P map {index} is not a non-empty 2-D array")
        _resize_bilinear_into(np.ascontiguousarray(lp, dtype=np.float64), out, index > 0)
    out += log10_n_tests
    return out.astype(np.float32)


def log_nfa_map(scale_maps: Sequence[np.ndarray], channels: Sequence[int], out_shape: tuple[int, int]) -> np.ndarray:
    """float32 log10 NFA per pixel at ``out_shape`` (height, width) from the per-scale maps m_s.

    ``channels[s]`` is C_s. log10 NFA = log10 N + min over scales of the bilinearly upsampled
    per-scale log10 P maps (see the module docstring).
    """
    maps = list(scale_maps)
    chans = list(channels)
    if not maps:
        raise ValueError("log_nfa_map: no scale maps given")
    if len(chans) != len(maps):
        raise ValueError(f"log_nfa_map: {len(maps)} scale maps but {len(chans)} channel counts")
    out_shape = _checked_out_shape(out_shape)
    log_probs = []
    for s, (m, c) in enumerate(zip(maps, chans, strict=True)):
        values = _checked_scale_map(m, f"log_nfa_map: scale {s}")
        cs = _checked_channels(c, f"log_nfa_map: scale {s}")
        height, width = values.shape
        log_probs.append(_log_prob_flat(values.ravel(), height, width, cs).reshape(height, width))
    log10_n = log10_number_of_tests([lp.shape for lp in log_probs])
    return combine_log_probs(log_probs, out_shape, log10_n)


# --------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NfaRegion:
    """One 4-connected region of log10 NFA below the threshold, in the log NFA map's pixels."""

    bbox: tuple[int, int, int, int]  # x, y, w, h
    area: int
    log_nfa: float  # min log10 NFA inside the region
    max_score: float | None  # max of the score map inside the region, when one was given


@njit(nogil=True, cache=True)
def _label_regions(
    log_nfa: np.ndarray, threshold: float, score: np.ndarray, has_score: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per region (raster order of first pixel): bbox (x0, y0, x1, y1), area, min log NFA, max score."""
    height, width = log_nfa.shape
    n = height * width
    zpar = np.full(n, -1, dtype=np.int32)
    for y in range(height):
        for x in range(width):
            if not log_nfa[y, x] < threshold:
                continue
            p = y * width + x
            zpar[p] = p
            if x > 0 and zpar[p - 1] >= 0:
                zpar[p] = _find_root(zpar, p - 1)
            if y > 0 and zpar[p - width] >= 0:
                a = _find_root(zpar, p - width)
                b = _find_root(zpar, p)
                if a != b:
                    # Keep the smaller index as root so labels follow raster order.
                    if a < b:
                        zpar[b] = a
                    else:
                        zpar[a] = b
    label = np.full(n, -1, dtype=np.int32)
    count = 0
    for p in range(n):
        if zpar[p] >= 0:
            r = _find_root(zpar, p)
            if r == p:
                label[p] = count
                count += 1
    boxes = np.empty((count, 4), dtype=np.int64)
    boxes[:, 0] = width
    boxes[:, 1] = height
    boxes[:, 2] = -1
    boxes[:, 3] = -1
    areas = np.zeros(count, dtype=np.int64)
    mins = np.full(count, np.inf, dtype=np.float64)
    maxs = np.full(count, -np.inf, dtype=np.float64)
    for y in range(height):
        for x in range(width):
            p = y * width + x
            if zpar[p] < 0:
                continue
            k = label[_find_root(zpar, p)]
            boxes[k, 0] = min(boxes[k, 0], x)
            boxes[k, 1] = min(boxes[k, 1], y)
            boxes[k, 2] = max(boxes[k, 2], x)
            boxes[k, 3] = max(boxes[k, 3], y)
            areas[k] += 1
            mins[k] = min(mins[k], log_nfa[y, x])
            if has_score:
                maxs[k] = max(maxs[k], score[y, x])
    return boxes, areas, mins, maxs


def regions_from_log_nfa(
    log_nfa: np.ndarray,
    log10_epsilon: float = 0.0,
    min_area: int = 0,
    score_map: np.ndarray | None = None,
) -> list[NfaRegion]:
    """The 4-connected regions where log10 NFA < ``log10_epsilon``, most significant first.

    Regions smaller than ``min_area`` pixels are dropped. With ``score_map`` (same shape), each
    region also carries the max score inside it. Sorted by min log10 NFA, then raster order.
    """
    if not isinstance(log_nfa, np.ndarray) or log_nfa.ndim != 2 or log_nfa.size == 0:
        raise ValueError(
            f"regions_from_log_nfa: expected a non-empty 2-D log NFA map, got {getattr(log_nfa, 'shape', log_nfa)!r}"
        )
    if np.isnan(log_nfa).any():
        raise ValueError("regions_from_log_nfa: the log NFA map contains NaN")
    if not isinstance(log10_epsilon, (int, float, np.floating, np.integer)) or not math.isfinite(log10_epsilon):
        raise ValueError(f"regions_from_log_nfa: log10_epsilon must be a finite number, got {log10_epsilon!r}")
    if not isinstance(min_area, (int, np.integer)) or min_area < 0:
        raise ValueError(f"regions_from_log_nfa: min_area must be a non-negative integer, got {min_area!r}")
    values = np.ascontiguousarray(log_nfa, dtype=np.float64)
    if score_map is None:
        score = np.zeros((1, 1), dtype=np.float64)
    else:
        if not isinstance(score_map, np.ndarray) or score_map.shape != log_nfa.shape:
            raise ValueError(
                f"regions_from_log_nfa: score_map shape {getattr(score_map, 'shape', None)} "
                f"differs from the log NFA map's {log_nfa.shape}"
            )
        score = np.ascontiguousarray(score_map, dtype=np.float64)
    boxes, areas, mins, maxs = _label_regions(values, float(log10_epsilon), score, score_map is not None)
    regions = [
        NfaRegion(
            bbox=(int(b[0]), int(b[1]), int(b[2] - b[0] + 1), int(b[3] - b[1] + 1)),
            area=int(a),
            log_nfa=float(lo),
            max_score=float(hi) if score_map is not None else None,
        )
        for b, a, lo, hi in zip(boxes, areas, mins, maxs, strict=True)
        if a >= min_area
    ]
    regions.sort(key=lambda r: r.log_nfa)  # stable: ties stay in raster order
    return regions


# --------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------


def warm_up() -> None:
    """Compile (or load from Numba's cache) every jitted function, with the dtypes used at run time."""
    rng = np.random.default_rng(0)
    maps = [rng.chisquare(4, size=(6, 5)) / 4.0, rng.chisquare(8, size=(3, 3)) / 8.0]
    log_nfa = log_nfa_map(maps, [4, 8], (7, 9))
    regions_from_log_nfa(log_nfa, 1.0, 0, np.zeros((7, 9), dtype=np.float32))
    regions_from_log_nfa(log_nfa, 1.0)
    component_tree(maps[0])
    resize_bilinear(maps[1], (4, 4))
