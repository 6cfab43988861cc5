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
3. **Selection**, the rule of docs/design.md section 5 with the details it leaves open resolved as the
   public reference implementation (mtailanian/uflow, ``src/nfa_tree.py``) resolves them; where
   the two differ (step 2: the reference has no ``log10 P = 0`` below the mean) docs/design.md is followed:

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
   ``_select``); ``tests/nfa_reference.py`` runs the literal iterative procedure instead.
4. **NFA.** ``log10 NFA = log10 N + min over scales of the bilinearly upsampled log10 P maps``
   (half-pixel centres, as torch ``interpolate(mode="bilinear", align_corners=False)``) with
   ``N = sum_s N_s * sum_{r=1..N_s} a b^r / r``, ``N_s = H_s W_s``, ``a = 0.316915``, ``b = 4.062570``.
   Regions are the 4-connected components (the tree's connectivity) of ``log10 NFA < log10 epsilon``.

All jitted functions use ``cache=True``: ``NUMBA_CACHE_DIR`` must be a writable directory (the
systemd unit sets one, see docs/nfa.md); call ``warm_up()`` once at start-up. Single-threaded and
``nogil``: scales can run in threads and overlap with inference.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

POLYOMINO_A = 0.316915
POLYOMINO_B = 4.062570
_LN10 = math.log(10.0)
_NO_UNITS = np.zeros(0, dtype=np.float64)  # a constant correlation area: no per-size table
_NO_UNITS.flags.writeable = False
MAX_PROFILE = 64  # sides of the size-dependent correlation profile a null may carry


# --------------------------------------------------------------------------------------------
# Number of tests
# --------------------------------------------------------------------------------------------


def _logsumexp(values: np.ndarray) -> float:
    top = float(np.max(values))
    return top + math.log(float(np.sum(np.exp(values - top))))


def log10_number_of_tests(shapes: Sequence[tuple[int, int]]) -> float:
    """log10 of N = sum_s N_s * sum_{r=1..N_s} a * b^r / r with N_s = H_s * W_s, computed in log space."""
    as_tuples: list[tuple[int, ...]] = [tuple(shape) for shape in shapes]
    if all(len(shape) == 2 and all(_is_positive_int(d) for d in shape) for shape in as_tuples):
        return _cached_log10_number_of_tests(tuple((int(h), int(w)) for h, w in as_tuples))
    return _log10_number_of_tests(as_tuples)


@functools.lru_cache(maxsize=64)
def _cached_log10_number_of_tests(shapes: tuple[tuple[int, int], ...]) -> float:
    # The agent asks for the same few shapes on every frame; the sum over 65536 terms costs ~0.1 ms.
    return _log10_number_of_tests(list(shapes))


def _log10_number_of_tests(shapes: Sequence[tuple[int, ...]]) -> float:
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


def _checked_channels(channels: Any, what: str) -> int:
    if not _is_positive_int(channels):
        raise ValueError(f"{what}: channels must be a positive integer, got {channels!r}")
    return int(channels)


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
    # Path halving: every visited entry skips to its grandparent.
    while zpar[p] != p:
        zpar[p] = zpar[zpar[p]]
        p = zpar[p]
    return p


@njit(nogil=True, cache=True)
def _sorted_decreasing(keys: np.ndarray, items: np.ndarray) -> np.ndarray:
    """``items`` sorted by decreasing ``keys[item]``: an LSD radix sort on unsigned keys.

    The keys are the bit patterns of non-negative floats, which order like the floats. Only the
    span of bits that differ between items is sorted on (after subtracting the smallest key), so
    maps that came from float32 or span a narrow range take two or three passes.
    """
    n = items.size
    k_min = keys[items[0]]
    k_max = k_min
    k_or = k_min
    k_and = k_min
    for i in range(n):
        k = keys[items[i]]
        k_min = min(k_min, k)
        k_max = max(k_max, k)
        k_or |= k
        k_and &= k
    order = items.copy()
    varying = k_or ^ k_and
    if varying == 0:
        return order
    low = 0  # bits below ``low`` are equal in every key
    while ((varying >> np.uint64(low)) & np.uint64(1)) == 0:
        low += 1
    span = (k_max - k_min) >> np.uint64(low)
    n_bits = 0
    while span > 0:
        span >>= np.uint64(1)
        n_bits += 1
    max_digit_bits = 8 if n < 1024 else 11  # keep the histogram small next to n
    n_pass = (n_bits + max_digit_bits - 1) // max_digit_bits
    digit_bits = (n_bits + n_pass - 1) // n_pass
    n_buckets = 1 << digit_bits
    mask = np.uint64(n_buckets - 1)
    scratch = np.empty(n, dtype=np.int32)
    start = np.empty(n_buckets, dtype=np.int32)
    for k in range(n_pass):
        shift = np.uint64(low + k * digit_bits)
        start[:] = 0
        for i in range(n):
            start[((keys[order[i]] - k_min) >> shift) & mask] += 1
        total = 0
        for d in range(n_buckets - 1, -1, -1):  # largest digit first: decreasing order
            c = start[d]
            start[d] = total
            total += c
        for i in range(n):
            p = order[i]
            d = ((keys[p] - k_min) >> shift) & mask
            scratch[start[d]] = p
            start[d] += 1
        order, scratch = scratch, order
    return order


@njit(nogil=True, cache=True)
def _ranked_pixels(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, rank, level) of the pixels of a flat H x W map, on a grid padded by one pixel.

    ``order[i]`` is the padded index of the pixel of rank i (rank 0 = largest value), ``rank`` maps
    a padded index to its rank (n on the border, so the border is never "already seen") and
    ``level[i]`` is the value at rank i. The padding removes every bounds check from the
    neighbour loop.
    """
    n = values.size
    height = n // width
    padded_width = width + 2
    padded = np.zeros((height + 2) * padded_width, dtype=np.float64)
    items = np.empty(n, dtype=np.int32)
    for y in range(height):
        for x in range(width):
            pp = (y + 1) * padded_width + x + 1
            padded[pp] = values[y * width + x]
            items[y * width + x] = pp
    order = _sorted_decreasing(padded.view(np.uint64), items)
    rank = np.full(padded.size, n, dtype=np.int32)
    level = np.empty(n, dtype=np.float64)
    for i in range(n):
        rank[order[i]] = i
        level[i] = padded[order[i]]
    return order, rank, level


@njit(nogil=True, cache=True)
def _attach(links: np.ndarray, i: int, j: int) -> None:
    """Pixel i (rank) meets the already seen pixel j: j's component becomes a child of i.

    ``links[k, 0]`` is k's union-find link, ``links[k, 1]`` its parent in the tree: side by side,
    so the root found and the two writes to it touch one cache line.
    """
    r = j
    while links[r, 0] != r:  # path halving
        links[r, 0] = links[links[r, 0], 0]
        r = links[r, 0]
    if r != i:
        links[r, 1] = i
        links[r, 0] = i


@njit(nogil=True, cache=True)
def _max_tree(order: np.ndarray, rank: np.ndarray, level: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(parent, is_node) of the canonical max-tree (4-connectivity), everything indexed by rank.

    Union-find over the pixels by decreasing value (Berger et al. 2007). After canonicalisation a
    pixel either is a node (it represents its level component; ``parent`` is the parent node) or
    belongs to the node ``parent`` points to (same level). The root has rank n - 1 and is its own
    parent. Every parent has a higher rank than its children.
    """
    n = order.size
    padded_width = width + 2
    links = np.empty((n, 2), dtype=np.int32)
    for i in range(n):
        pp = order[i]
        links[i, 0] = i
        links[i, 1] = i
        j = rank[pp - 1]
        if j < i:
            _attach(links, i, j)
        j = rank[pp + 1]
        if j < i:
            _attach(links, i, j)
        j = rank[pp - padded_width]
        if j < i:
            _attach(links, i, j)
        j = rank[pp + padded_width]
        if j < i:
            _attach(links, i, j)
    parent = links[:, 1].copy()
    # Root first: a pixel whose parent is not a node (same level as the parent's parent) points
    # past it, so each level component ends up represented by one pixel, its last one.
    root = n - 1
    is_node = np.empty(n, dtype=np.bool_)
    is_node[root] = True
    for i in range(n - 2, -1, -1):
        q = parent[i]
        if level[parent[q]] == level[q]:
            q = parent[q]
            parent[i] = q
        is_node[i] = level[q] != level[i]
    return parent, is_node


@njit(nogil=True, cache=True)
def _select(
    parent: np.ndarray, is_node: np.ndarray, level: np.ndarray, channels: float, units: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log_prob, rep, collapses) per node (by rank), bottom-up in one pass.

    The fixed point of the selection in closed form: a node v *collapses* when its whole subtree
    ends as one leaf of the final tree, and ``rep[v]`` is that leaf. A leaf collapses to itself. A
    node with one child collapses when the child does, to whichever of itself and the child's leaf
    has the smaller log P, ties to the child's leaf (chain reduction). A node with several
    children collapses to itself when all of them collapse and its log P is <= the smallest of
    their leaves' (the merge); otherwise it never does. Areas are accumulated on the way up.

    ``units`` empty: a node of ``area`` pixels counts ``area`` observations of ``channels`` degrees of
    freedom. Otherwise ``units[area]`` is the number of independent observations a region of that many
    pixels carries (the size-dependent correlation of :class:`ScaleNull`).
    """
    n = level.size
    root = n - 1
    per_unit = -0.5 * channels / _LN10  # log10 P per pixel = per_unit * (L - 1 - ln L) when L > 1
    # Per node, what its children pushed up, in one cache line: area, number of children, the
    # smallest log P of their leaves (-inf once one child does not collapse), the only child's leaf.
    pushed = np.empty((n, 4), dtype=np.float64)
    for i in range(n):
        pushed[i, 0] = 1.0
        pushed[i, 1] = 0.0
        pushed[i, 2] = np.inf
        pushed[i, 3] = 0.0
    log_prob = np.zeros(n, dtype=np.float64)
    rep = np.empty(n, dtype=np.int32)
    collapses = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        up = parent[i]
        if not is_node[i]:
            pushed[up, 0] += 1.0  # a pixel of node ``up``
            continue
        area = pushed[i, 0]
        n_children = pushed[i, 1]
        children_best = pushed[i, 2]
        lv = level[i]
        observations = area if units.size == 0 else units[int(area)]
        lp = observations * per_unit * (lv - 1.0 - math.log(lv)) if lv > 1.0 else 0.0
        if n_children == 0.0:
            c = True
            r = i
            r_lp = lp
        elif n_children == 1.0:
            c = children_best != -np.inf
            r = int(pushed[i, 3])
            r_lp = children_best
            if c and lp < children_best:
                r = i
                r_lp = lp
        else:
            c = lp <= children_best
            r = i
            r_lp = lp
        log_prob[i] = lp
        rep[i] = r
        collapses[i] = c
        if i != root:
            pushed[up, 0] += area
            pushed[up, 1] += 1.0
            if c:
                pushed[up, 3] = r
                if r_lp < pushed[up, 2]:
                    pushed[up, 2] = r_lp
            else:
                pushed[up, 2] = -np.inf
    return log_prob, rep, collapses


@njit(nogil=True, cache=True)
def _paint(
    parent: np.ndarray,
    is_node: np.ndarray,
    log_prob: np.ndarray,
    rep: np.ndarray,
    collapses: np.ndarray,
    order: np.ndarray,
    width: int,
) -> np.ndarray:
    """Flat per-pixel log10 P: the kept leaves' values on their pixels, 0 elsewhere.

    The kept leaves are rep[c] for every collapsing node c whose parent does not collapse (or that
    is the root). Root first, so a leaf is marked before it is reached and every pixel inherits
    the value of its node, which inherits its parent's unless it is kept.
    """
    n = order.size
    root = n - 1
    padded_width = width + 2
    kept = np.zeros(n, dtype=np.bool_)
    value = np.empty(n, dtype=np.float64)
    padded = np.empty(order.size + 2 * (n // width) + 2 * padded_width, dtype=np.float64)
    for i in range(n - 1, -1, -1):
        up = parent[i]
        if is_node[i]:
            if collapses[i] and (i == root or not collapses[up]):
                kept[rep[i]] = True
            if kept[i]:
                v = log_prob[i]
            elif i != root:
                v = value[up]
            else:
                v = 0.0
        else:
            v = value[up]
        value[i] = v
        padded[order[i]] = v
    out = np.empty(n, dtype=np.float64)
    height = n // width
    for y in range(height):
        for x in range(width):
            out[y * width + x] = padded[(y + 1) * padded_width + x + 1]
    return out


@njit(nogil=True, cache=True)
def _log_prob_flat(values: np.ndarray, width: int, channels: float, units: np.ndarray = _NO_UNITS) -> np.ndarray:
    order, rank, level = _ranked_pixels(values, width)
    parent, is_node = _max_tree(order, rank, level, width)
    log_prob, rep, collapses = _select(parent, is_node, level, channels, units)
    return _paint(parent, is_node, log_prob, rep, collapses, order, width)


def _null_log_prob(values: np.ndarray, width: int, null: ScaleNull) -> np.ndarray:
    """Flat log10 P of one map under a fitted null (a constant area, or the size-dependent profile)."""
    if not null.profile:
        # Dividing by the mean is monotone, so the tree is the same; dof/area as a float
        # "channel count" scales every node's evidence by 1/area.
        return _log_prob_flat(values / null.mean, width, float(null.dof / null.area))
    return _log_prob_flat(values / null.mean, width, float(null.dof), null.observations(values.size))


@njit(nogil=True, cache=True)
def _tree_nodes(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(flat pixel, parent rank, is_node, area) per rank, for ``component_tree``."""
    order, rank, level = _ranked_pixels(values, width)
    parent, is_node = _max_tree(order, rank, level, width)
    n = order.size
    area = np.ones(n, dtype=np.int64)
    for i in range(n - 1):
        area[parent[i]] += area[i]
    padded_width = width + 2
    pixel = np.empty(n, dtype=np.int64)
    for i in range(n):
        pixel[i] = (order[i] // padded_width - 1) * width + order[i] % padded_width - 1
    return pixel, parent.astype(np.int64), is_node, area


def log_prob_map(m: np.ndarray, channels: int, null: ScaleNull | None = None) -> np.ndarray:
    """Per-pixel log10 P (float64, H x W) of the selected tree nodes of one scale's map m_s.

    ``channels`` is C_s, the number of latent channels m_s averages over; ``null`` a fitted null
    model (see :func:`log_nfa_map`). Releases the GIL, so scales can run in parallel threads or
    overlap with inference.
    """
    values = _checked_scale_map(m, "log_prob_map: m")
    c = _checked_channels(channels, "log_prob_map")
    height, width = values.shape
    if null is None:
        return _log_prob_flat(values.ravel(), width, c).reshape(height, width)
    return _null_log_prob(values.ravel(), width, null).reshape(height, width)


@dataclass(frozen=True)
class ComponentTree:
    """The canonical max-tree of a map, one entry per node, root first (for inspection and tests)."""

    node_pixel: np.ndarray  # flat index of the pixel that represents the node
    parent_node: np.ndarray  # index into these arrays; the root is its own parent
    level: np.ndarray  # float64: the node's level, the minimum of the map over its region
    area: np.ndarray  # int64: pixels in the region, descendants included


def component_tree(m: np.ndarray) -> ComponentTree:
    """The canonical max-tree (4-connectivity, equal levels merged) of a non-negative map."""
    values = _checked_scale_map(m, "component_tree: m")
    flat = values.ravel()
    pixel, parent, is_node, area = _tree_nodes(flat, values.shape[1])
    ranks = np.flatnonzero(is_node)[::-1]  # root (highest rank) first
    index_of = np.full(flat.size, -1, dtype=np.int64)
    index_of[ranks] = np.arange(ranks.size)
    return ComponentTree(
        node_pixel=pixel[ranks],
        parent_node=index_of[parent[ranks]],
        level=flat[pixel[ranks]],
        area=area[ranks],
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
def _min_of_upsampled(
    flat_maps: np.ndarray, heights: np.ndarray, widths: np.ndarray, offset: float, out: np.ndarray
) -> None:
    """out = offset + min over maps of bilinear(map), built one output row at a time.

    ``flat_maps`` holds the maps one after the other (C order). Each output row is the minimum over
    maps of their interpolated rows, kept in a small float64 buffer (branch-free ``min``), and is
    written to ``out`` once; with a float32 ``out`` each value is rounded once.
    """
    n_maps = heights.size
    out_h, out_w = out.shape
    starts = np.zeros(n_maps + 1, dtype=np.int64)
    for s in range(n_maps):
        starts[s + 1] = starts[s] + heights[s] * widths[s]
    x0 = np.empty((n_maps, out_w), dtype=np.int64)
    x1 = np.empty((n_maps, out_w), dtype=np.int64)
    wx = np.empty((n_maps, out_w), dtype=np.float64)
    y0 = np.empty((n_maps, out_h), dtype=np.int64)
    y1 = np.empty((n_maps, out_h), dtype=np.int64)
    wy = np.empty((n_maps, out_h), dtype=np.float64)
    max_width = 1
    for s in range(n_maps):
        x0[s], x1[s], wx[s] = _source_taps(widths[s], out_w)
        y0[s], y1[s], wy[s] = _source_taps(heights[s], out_h)
        max_width = max(max_width, widths[s])
    row = np.empty(max_width, dtype=np.float64)
    best = np.empty(out_w, dtype=np.float64)
    for i in range(out_h):
        for s in range(n_maps):
            width = widths[s]
            top = starts[s] + y0[s, i] * width
            bottom = starts[s] + y1[s, i] * width
            b = wy[s, i]
            a = 1.0 - b
            for j in range(width):
                row[j] = a * flat_maps[top + j] + b * flat_maps[bottom + j]
            xa = x0[s]
            xb = x1[s]
            w = wx[s]
            if s == 0:
                for j in range(out_w):
                    best[j] = (1.0 - w[j]) * row[xa[j]] + w[j] * row[xb[j]]
            else:
                for j in range(out_w):
                    best[j] = min(best[j], (1.0 - w[j]) * row[xa[j]] + w[j] * row[xb[j]])
        for j in range(out_w):
            out[i, j] = offset + best[j]


def resize_bilinear(image: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map to ``out_shape`` (float64), half-pixel centres, edges clamped.

    Same sampling as torch ``interpolate(mode="bilinear", align_corners=False)`` without antialias.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 2 or image.size == 0:
        raise ValueError(f"resize_bilinear: expected a non-empty 2-D array, got {getattr(image, 'shape', image)!r}")
    out_h, out_w = _checked_out_shape(out_shape)
    out = np.empty((out_h, out_w), dtype=np.float64)
    flat = np.ascontiguousarray(image, dtype=np.float64).ravel()
    _min_of_upsampled(flat, np.array([image.shape[0]]), np.array([image.shape[1]]), 0.0, out)
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
    for index, lp in enumerate(log_prob_maps):
        if not isinstance(lp, np.ndarray) or lp.ndim != 2 or lp.size == 0:
            raise ValueError(f"combine_log_probs: log P map {index} is not a non-empty 2-D array")
    flat = np.concatenate([np.ascontiguousarray(lp, dtype=np.float64).ravel() for lp in log_prob_maps])
    heights = np.array([lp.shape[0] for lp in log_prob_maps], dtype=np.int64)
    widths = np.array([lp.shape[1] for lp in log_prob_maps], dtype=np.int64)
    out = np.empty((out_h, out_w), dtype=np.float32)
    _min_of_upsampled(flat, heights, widths, float(log10_n_tests), out)
    return out


@dataclass(frozen=True)
class ScaleNull:
    """The null model of one scale fitted on good validation latents (the ``fitted`` NFA).

    Under it, ``m_s / mean`` has a Chernoff tail bound of a Gamma law with ``dof`` degrees of
    freedom (``dof`` = C_s and ``mean`` = 1 is the paper's chi^2(C_s)/C_s), and neighbouring pixels
    are dependent: ``area`` pixels carry the evidence of one independent pixel, so a region of
    |R| pixels counts as |R| / ``area`` independent observations. See docs/nfa.md.
    """

    mean: float
    dof: float
    area: float = 1.0
    # Size-dependent correlation (empty: the constant ``area``): profile[k] is the variance inflation of
    # the mean over a square of side k + 1 (1 for one pixel), so a region of a pixels counts
    # a / profile(sqrt(a)) observations, the correlation reaching as far as the region does.
    profile: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("mean", "dof", "area"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"ScaleNull.{name} must be a finite positive number, got {value!r}")
        if self.area < 1.0:
            raise ValueError(f"ScaleNull.area must be >= 1 (pixels per independent observation), got {self.area!r}")
        if isinstance(self.profile, list):  # from JSON
            object.__setattr__(self, "profile", tuple(self.profile))
        if not isinstance(self.profile, tuple) or len(self.profile) > MAX_PROFILE:
            raise ValueError(f"ScaleNull.profile must be a tuple of at most {MAX_PROFILE} numbers")
        for value in self.profile:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 1.0):
                raise ValueError(f"ScaleNull.profile values must be finite and >= 1, got {value!r}")

    def observations(self, pixels: int) -> np.ndarray:
        """Independent observations of a region of a pixels, for a = 0 .. ``pixels`` (read-only)."""
        return _observation_table(self.profile, int(pixels)) if self.profile else _NO_UNITS


@functools.lru_cache(maxsize=64)
def _observation_table(profile: tuple[float, ...], pixels: int) -> np.ndarray:
    """a / inflation(sqrt(a)) for a = 0 .. pixels, the inflation read off ``profile`` by side length
    (linear between sides, the last side's beyond; at most one observation per pixel)."""
    area = np.arange(pixels + 1, dtype=np.float64)
    sides = np.arange(1, len(profile) + 1, dtype=np.float64)
    inflation = np.maximum(np.interp(np.sqrt(np.maximum(area, 1.0)), sides, np.asarray(profile)), 1.0)
    table: np.ndarray = area / inflation
    table.flags.writeable = False
    return table


def log10_tree_tests(shapes: Sequence[tuple[int, int]]) -> float:
    """log10 of the number of tests of the ``fitted`` NFA: at most one max-tree node per pixel, all scales.

    A canonical max-tree has at most H x W nodes (every node owns at least one pixel at its level), and
    the tree nodes are the only regions the selection ever tests, as the level lines are the only
    curves that meaningful-boundary detection tests.
    """
    total = 0
    for index, shape in enumerate(shapes):
        if len(shape) != 2 or not all(_is_positive_int(d) for d in shape):
            raise ValueError(f"log10_tree_tests: scale {index} shape {shape!r} is not two positive integers")
        total += int(shape[0]) * int(shape[1])
    if total == 0:
        raise ValueError("log10_tree_tests: no scale shapes given")
    return math.log10(total)


def log_nfa_map(
    scale_maps: Sequence[np.ndarray],
    channels: Sequence[int],
    out_shape: tuple[int, int],
    nulls: Sequence[ScaleNull] | None = None,
) -> np.ndarray:
    """float32 log10 NFA per pixel at ``out_shape`` (height, width) from the per-scale maps m_s.

    ``channels[s]`` is C_s. log10 NFA = log10 N + min over scales of the bilinearly upsampled
    per-scale log10 P maps (see the module docstring).

    ``nulls=None`` is the paper's exact NFA: chi^2(C_s) pixels, independent, N = the polyomino
    count. With one :class:`ScaleNull` per scale it is the ``fitted`` NFA: the same tree and
    selection on ``m_s / mean`` with ``dof / area`` in place of C_s, and N = the tree-node bound
    (:func:`log10_tree_tests`).
    """
    maps = list(scale_maps)
    chans = list(channels)
    if not maps:
        raise ValueError("log_nfa_map: no scale maps given")
    if len(chans) != len(maps):
        raise ValueError(f"log_nfa_map: {len(maps)} scale maps but {len(chans)} channel counts")
    if nulls is not None and len(nulls) != len(maps):
        raise ValueError(f"log_nfa_map: {len(maps)} scale maps but {len(nulls)} null models")
    out_shape = _checked_out_shape(out_shape)
    log_probs = []
    for s, (m, c) in enumerate(zip(maps, chans, strict=True)):
        values = _checked_scale_map(m, f"log_nfa_map: scale {s}")
        cs = _checked_channels(c, f"log_nfa_map: scale {s}")
        height, width = values.shape
        if nulls is None:
            log_prob = _log_prob_flat(values.ravel(), width, cs)
        else:
            log_prob = _null_log_prob(values.ravel(), width, nulls[s])
        log_probs.append(log_prob.reshape(height, width))
    shapes = [lp.shape for lp in log_probs]
    log10_n = log10_number_of_tests(shapes) if nulls is None else log10_tree_tests(shapes)
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
    flat = log_nfa.ravel()
    score_flat = score.ravel()
    first = 0
    while first < n and not flat[first] < threshold:
        first += 1
    if first == n:  # the usual case on good parts: nothing to label, nothing to allocate
        return (
            np.empty((0, 4), dtype=np.int64),
            np.empty(0, dtype=np.int64),
            np.empty(0, dtype=np.float64),
            np.empty(0, dtype=np.float64),
        )
    zpar = np.full(n, -1, dtype=np.int32)
    for p in range(first, n):
        if not flat[p] < threshold:
            continue
        zpar[p] = p
        x = p % width
        if x > 0 and zpar[p - 1] >= 0:
            zpar[p] = _find_root(zpar, p - 1)
        if p >= width and zpar[p - width] >= 0:
            a = _find_root(zpar, p - width)
            b = _find_root(zpar, p)
            # Keep the smaller index as root: a region's root is its first pixel in raster order.
            if a < b:
                zpar[b] = a
            elif b < a:
                zpar[a] = b
    count = 0
    for p in range(first, n):
        if zpar[p] == p:
            count += 1
    boxes = np.empty((count, 4), dtype=np.int64)
    areas = np.zeros(count, dtype=np.int64)
    mins = np.full(count, np.inf, dtype=np.float64)
    maxs = np.full(count, -np.inf, dtype=np.float64)
    label = np.empty(count, dtype=np.int32)  # label of the k-th root, reused via the root's zpar slot
    k = 0
    for p in range(first, n):
        if zpar[p] < 0:
            continue
        r = _find_root(zpar, p)
        y = p // width
        x = p - y * width
        if r == p:
            label[k] = p
            boxes[k, 0] = x
            boxes[k, 1] = y
            boxes[k, 2] = x
            boxes[k, 3] = y
            k += 1
        j = np.searchsorted(label[:k], r)
        boxes[j, 0] = min(boxes[j, 0], x)
        boxes[j, 2] = max(boxes[j, 2], x)
        boxes[j, 3] = y  # rows are visited in order
        areas[j] += 1
        mins[j] = min(mins[j], flat[p])
        if has_score:
            maxs[j] = max(maxs[j], score_flat[p])
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
    # float32 (what log_nfa_map returns) is used as is; anything else as float64. The score map
    # follows the log NFA map's dtype, so only two specialisations are ever compiled.
    dtype = np.float32 if log_nfa.dtype == np.float32 else np.float64
    values = np.ascontiguousarray(log_nfa, dtype=dtype)
    if score_map is None:
        score = np.zeros((1, 1), dtype=dtype)
    else:
        if not isinstance(score_map, np.ndarray) or score_map.shape != log_nfa.shape:
            raise ValueError(
                f"regions_from_log_nfa: score_map shape {getattr(score_map, 'shape', None)} "
                f"differs from the log NFA map's {log_nfa.shape}"
            )
        score = np.ascontiguousarray(score_map, dtype=dtype)
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
    log_nfa_map(maps, [4, 8], (7, 9), [ScaleNull(1.0, 4.0, 1.5), ScaleNull(1.0, 8.0, 2.0, (1.0, 2.0))])
    for dtype in (np.float32, np.float64):
        regions_from_log_nfa(log_nfa.astype(dtype), 1e9, 0, np.zeros((7, 9), dtype=dtype))
    component_tree(maps[0])
    resize_bilinear(maps[1], (4, 4))
