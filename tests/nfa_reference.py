"""A deliberately plain reference for edge_agent.inspection.nfa, written from the rule in docs/nfa.md.

Nothing here is fast or clever: the tree is built by thresholding at every distinct level with
scipy.ndimage.label, parents are found by looking down the levels, and the selection mutates an
explicit tree with loops until nothing changes. It shares no code with edge_agent.inspection.nfa.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])


@dataclass
class Node:
    level: float
    pixels: frozenset[int]  # flat indices, descendants included
    parent: int | None = None
    children: set[int] = field(default_factory=set)


def build_tree(m: np.ndarray) -> tuple[list[Node], int]:
    """All nodes of the component tree of upper level sets (4-connectivity), and the root's index.

    A node is a connected component of {m >= L} holding at least one pixel equal to L.
    """
    flat = m.ravel()
    levels = np.unique(flat)  # ascending: the root's level first
    nodes: list[Node] = []
    node_at: dict[tuple[int, int], int] = {}  # (level index, label) -> node index
    label_images: list[np.ndarray] = []
    for j, level in enumerate(levels):
        labels, _ = ndimage.label(m >= level, structure=FOUR_CONNECTED)
        labels = labels.ravel()
        label_images.append(labels)
        for k in np.unique(labels[flat == level]):
            pixels = frozenset(np.flatnonzero(labels == k).tolist())
            node_at[(j, int(k))] = len(nodes)
            nodes.append(Node(level=float(level), pixels=pixels))
    for (j, _label), index in node_at.items():
        pixel = next(iter(nodes[index].pixels))
        for lower in range(j - 1, -1, -1):
            candidate = node_at.get((lower, int(label_images[lower][pixel])))
            if candidate is not None:
                nodes[index].parent = candidate
                nodes[candidate].children.add(index)
                break
    roots = [i for i, node in enumerate(nodes) if node.parent is None]
    assert len(roots) == 1, "a 4-connected grid has one root"
    return nodes, roots[0]


Observations = Callable[[int], float]


def node_log_prob(node: Node, channels: float, observations: Observations | None = None) -> float:
    """log10 P(R) = n(R) * -(C/2) * (x/C - 1 - ln(x/C)) / ln 10 with x = C * L; 0 when x <= C.

    n(R) = |R| (independent pixels), or ``observations(|R|)`` for a size-dependent correlation."""
    x = channels * node.level
    if x <= channels:
        return 0.0
    t = x / channels
    count = len(node.pixels) if observations is None else observations(len(node.pixels))
    return count * -(channels / 2) * (t - 1 - math.log(t)) / math.log(10)


def profile_observations(profile: list[float]) -> Observations:
    """n(a) = a / inflation(sqrt(a)), the inflation of a square of side s read off ``profile`` (entry k for
    side k + 1) by straight lines between sides, the last entry beyond, 1 at most below side 1."""

    def count(pixels: int) -> float:
        side = math.sqrt(max(pixels, 1))
        if side >= len(profile):
            inflation = profile[-1]
        else:
            k = math.floor(side)  # between side k (entry k - 1) and side k + 1 (entry k)
            inflation = profile[k - 1] + (side - k) * (profile[k] - profile[k - 1])
        return pixels / max(inflation, 1.0)

    return count


class _Tree:
    """A mutable tree: nodes can be removed, their children re-attached to their parent."""

    def __init__(self, nodes: list[Node], root: int) -> None:
        self.parent = {i: n.parent for i, n in enumerate(nodes)}
        self.children = {i: set(n.children) for i, n in enumerate(nodes)}
        self.alive = set(range(len(nodes)))
        self.root = root
        # Root first (ascending level) like a breadth-first visit; the fixed point does not depend on it.
        self.visit_order = sorted(range(len(nodes)), key=lambda i: nodes[i].level)

    def remove(self, v: int) -> None:
        up = self.parent[v]
        for c in self.children[v]:
            self.parent[c] = up
            if up is not None:
                self.children[up].add(c)
        if up is not None:
            self.children[up].discard(v)
        elif v == self.root:
            assert len(self.children[v]) == 1, "only a chain's root can be removed"
            self.root = next(iter(self.children[v]))
        self.alive.discard(v)
        self.children[v] = set()

    def leaves(self) -> list[int]:
        return [v for v in self.visit_order if v in self.alive and not self.children[v]]

    def branch(self, leaf: int) -> list[int]:
        """The leaf and its ancestors up while the current node is its parent's only child."""
        chain = [leaf]
        v = leaf
        while self.parent[v] is not None and len(self.children[self.parent[v]]) == 1:
            v = self.parent[v]
            chain.append(v)
        return chain


def select(nodes: list[Node], root: int, channels: float, observations: Observations | None = None) -> list[int]:
    """The kept nodes: chain reduction and merge repeated until stable; returns the final leaves."""
    log_p = [node_log_prob(n, channels, observations) for n in nodes]
    tree = _Tree(nodes, root)
    changed = True
    while changed:
        changed = False
        for leaf in tree.leaves():
            chain = tree.branch(leaf)
            best = 0
            for i in range(1, len(chain)):
                if log_p[chain[i]] < log_p[chain[best]]:  # strict: ties stay nearest the leaf
                    best = i
            for i, v in enumerate(chain):
                if i != best:
                    tree.remove(v)
                    changed = True
        for v in tree.visit_order:
            if v not in tree.alive or len(tree.children[v]) < 2:
                continue
            kids = list(tree.children[v])
            if any(tree.children[c] for c in kids):
                continue
            if log_p[v] <= min(log_p[c] for c in kids):
                for c in kids:
                    tree.remove(c)
                changed = True
    return tree.leaves()


def log_prob_map(m: np.ndarray, channels: float, observations: Observations | None = None) -> np.ndarray:
    """Per-pixel log10 P: a kept node's value on its pixels, 0 elsewhere."""
    m = np.asarray(m, dtype=np.float64)
    nodes, root = build_tree(m)
    out = np.zeros(m.size)
    painted = np.zeros(m.size, dtype=bool)
    for v in select(nodes, root, channels, observations):
        pixels = np.fromiter(nodes[v].pixels, dtype=np.int64)
        assert not painted[pixels].any(), "kept nodes must be disjoint"
        painted[pixels] = True
        out[pixels] = node_log_prob(nodes[v], channels, observations)
    return out.reshape(m.shape)


def log10_number_of_tests(shapes: list[tuple[int, int]], digits: int = 50) -> float:
    """log10 N by direct summation with mpmath at ``digits`` significant digits."""
    import mpmath

    with mpmath.workdps(digits):
        a = mpmath.mpf("0.316915")
        b = mpmath.mpf("4.062570")
        total = mpmath.mpf(0)
        for h, w in shapes:
            n_s = h * w
            total += n_s * mpmath.fsum(a * b**r / r for r in range(1, n_s + 1))
        return float(mpmath.log10(total))


def regions(mask: np.ndarray) -> list[tuple[tuple[int, int, int, int], int, frozenset[int]]]:
    """4-connected components of a boolean mask by flood fill: (bbox x, y, w, h), area, pixels."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for y0 in range(height):
        for x0 in range(width):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            stack = [(y0, x0)]
            seen[y0, x0] = True
            pixels = []
            while stack:
                y, x = stack.pop()
                pixels.append((y, x))
                for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            ys = [p[0] for p in pixels]
            xs = [p[1] for p in pixels]
            bbox = (min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1)
            found.append((bbox, len(pixels), frozenset(y * width + x for y, x in pixels)))
    return found
