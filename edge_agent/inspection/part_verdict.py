"""One verdict per part from all the frames it was seen in, as an a-contrario (NFA) test.

Each frame f already has a log10 NFA map (scoring.py): the value at a pixel is log10 NFA_f of the
most significant tree region there, NFA_f = N_f * P_f(region), N_f the frame's number of tests. So
``q_f = min(1, NFA_f)`` of the best region in any chosen box is a valid p-value for "this frame shows
something there" (Bonferroni over every region of the frame: P(q_f <= a) <= a under the null).
A part seen in K frames is tested place by place (docs/parts.md has the derivation):

- a *place* is where a candidate region (log10 NFA_f below ``log10 epsilon + candidate_slack``) lies
  on the part, in part coordinates; regions of different frames that overlap there are one place;
- frame f observes ``log10 q_f`` = min(0, min of its log10 NFA map over the place's box mapped into
  frame f); only frames that show the whole box count, so K_p observations in frame order;
- the frames are independent under the null (fresh sensor noise and latents every frame), so the
  probabilities of a run of k observations multiply: t = prod q_f. The p-value of that product is
  *not* t but Fisher's tail ``P(prod of k uniforms <= t) = t * sum_{j<k} ln(1/t)^j / j!`` (the product
  of k independent p-values is smaller than each of them even under the null);
- the best of the R = K_p (K_p + 1) / 2 runs is chosen, so Bonferroni over the runs::

      log10 NFA_part(place) = log10 R + min over runs of log10 Fisher(run)

  No count for the choice of place: each place's q_f is at least the frame's global minimum, so any
  place is at most as significant as the same test on the whole part.

A region that persists at one place adds up; a one-frame flicker on a good part pays log10 R for being
picked among many runs, so it is weaker evidence than in its frame alone. The part's log10 NFA is the
minimum over its places; it is anomalous below ``log10 epsilon``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.inspection import nfa

_LN10 = math.log(10.0)
MAX_OBSERVATIONS = 120  # frames kept per part (a part crossing the view at a usual speed has 20 to 60)


@dataclass(frozen=True)
class FrameObservation:
    """One frame of a part: its log10 NFA map and where the part lay in it."""

    sequence: int
    log_nfa: np.ndarray  # float32 log10 NFA at the analysis resolution
    scale: tuple[float, float]  # frame (ROI image) pixels per map pixel, x and y
    origin_x: float  # frame x of the part's leading edge (origin of part coordinates)
    sign: int  # +1: part x = frame x - origin (belt runs right to left); -1 the other way
    view: tuple[int, int]  # frame columns [x0, x1) that show the part


@dataclass(frozen=True)
class PartRegion:
    """A place on the part with its combined evidence."""

    bbox: tuple[int, int, int, int]  # x, y, w, h in part coordinates (px from the leading edge, frame rows)
    log_nfa: float  # the place's combined log10 NFA
    frames: int  # frames whose observation entered the best run
    observed: int  # frames that showed the whole place
    best_sequence: int  # the frame where it was most significant
    best_bbox: tuple[int, int, int, int]  # that frame's region box, in ROI image pixels
    best_frame_log_nfa: float


@dataclass(frozen=True)
class PartDecision:
    """A part's verdict."""

    anomalous: bool
    log_nfa: float
    log10_epsilon: float
    frames: int
    regions: tuple[PartRegion, ...]


def log10_runs(count: int) -> float:
    """log10 of the number of runs (contiguous, non-empty) of ``count`` observations."""
    return math.log10(count * (count + 1) / 2) if count > 0 else 0.0


def log10_fisher(log10_product: np.ndarray, count: np.ndarray) -> np.ndarray:
    """log10 P(product of ``count`` independent uniform p-values <= 10**log10_product), elementwise.

    ``t * sum_{j<k} x^j / j!`` with x = ln(1/t), summed in log space (t underflows for strong evidence).
    """
    log10_product = np.minimum(np.asarray(log10_product, dtype=np.float64), 0.0)
    count = np.asarray(count, dtype=np.int64)
    x = -log10_product * _LN10
    kmax = int(count.max()) if count.size else 1
    j = np.arange(kmax, dtype=np.float64)
    log_fact = np.cumsum(np.log(np.maximum(j, 1.0)))  # ln j!
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = j * np.log(x)[..., None] - log_fact  # ln(x^j / j!), -inf for x = 0 and j > 0
    terms[..., 0] = 0.0
    terms = np.where(j < count[..., None], terms, -np.inf)
    top = terms.max(axis=-1)
    log_sum = top + np.log(np.exp(terms - top[..., None]).sum(axis=-1))
    return np.asarray(np.minimum(log10_product + log_sum / _LN10, 0.0))


def best_run(log10_q: np.ndarray) -> tuple[float, int, int]:
    """(min over runs of log10 Fisher(run), start, end exclusive) over every contiguous run; O(K^2) vectorised."""
    if log10_q.size == 0:
        raise ValueError("best_run: no observations")
    values = np.minimum(np.asarray(log10_q, dtype=np.float64), 0.0)
    sums = np.concatenate(([0.0], np.cumsum(values)))
    starts, ends = np.triu_indices(values.size + 1, k=1)
    fisher = log10_fisher(sums[ends] - sums[starts], ends - starts)
    best = int(np.argmin(fisher))
    return float(fisher[best]), int(starts[best]), int(ends[best])


@dataclass
class PartEvidence:
    """The frames of one part, kept until its decision."""

    log10_epsilon: float
    candidate_slack: float = 1.0  # candidate places: regions below log10 epsilon + this, in any frame
    margin: int = 2  # map pixels added around a place (tracking is good to a pixel or two)
    min_area: int = 0  # candidate regions smaller than this (map pixels) are ignored, as in the frame rule
    observations: list[FrameObservation] = field(default_factory=list)

    def add(self, observation: FrameObservation) -> bool:
        """One more frame of this part; False (not kept) beyond MAX_OBSERVATIONS.

        The cap bounds memory and the O(K^2) run search for a part that stays in view (a stopped belt).
        """
        if len(self.observations) >= MAX_OBSERVATIONS:
            return False
        self.observations.append(observation)
        return True

    def decide(self, length: float | None = None) -> PartDecision:
        """Combine every frame (see the module docstring).

        ``length``: the part's extent along the belt (part coordinates [0, length)); candidate regions whose
        centre lies outside it belong to a neighbouring part seen in the same frames and are not this part's.
        """
        places = self._places()
        if length is not None:
            places = [p for p in places if 0.0 <= (p[0][0] + p[0][2]) / 2.0 < length]
        regions = sorted((self._test(box, best) for box, best in places), key=lambda r: r.log_nfa)
        frames = len(self.observations)
        if regions:
            log_nfa = regions[0].log_nfa
        else:
            # No candidate anywhere: the best single frame, Bonferroni over the frames. Never below
            # epsilon: what lies below it there is evidence the decision excluded (a region under the
            # minimum area, or a neighbour's), so it is not this part's, and the message's contract is
            # "anomalous when log_nfa < log10_epsilon".
            lows = [min(0.0, _view_min(o)) for o in self.observations] or [0.0]
            log_nfa = max(min(lows) + math.log10(max(1, frames)), self.log10_epsilon)
        return PartDecision(
            anomalous=bool(regions) and log_nfa < self.log10_epsilon,
            log_nfa=float(log_nfa),
            log10_epsilon=self.log10_epsilon,
            frames=frames,
            regions=tuple(r for r in regions if r.log_nfa < self.log10_epsilon) or tuple(regions[:1]),
        )

    # -- places ------------------------------------------------------------------------------------

    def _places(self) -> list[tuple[tuple[float, float, float, float], tuple[int, nfa.NfaRegion, FrameObservation]]]:
        """Candidate regions of every frame in part coordinates, overlapping ones merged.

        Each place: its box (x0, y0, x1, y1, part coordinates, frame pixels) and its most significant
        candidate (frame index, region in map pixels, frame).
        """
        threshold = self.log10_epsilon + self.candidate_slack
        places: list[list[Any]] = []  # [box, (frame index, region, frame)], the box grows in place
        for index, obs in enumerate(self.observations):
            for raw in nfa.regions_from_log_nfa(obs.log_nfa, threshold, self.min_area):
                box = self._part_box(obs, raw.bbox)
                for place in places:
                    b = place[0]
                    if box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]:
                        place[0] = (min(b[0], box[0]), min(b[1], box[1]), max(b[2], box[2]), max(b[3], box[3]))
                        if raw.log_nfa < place[1][1].log_nfa:
                            place[1] = (index, raw, obs)
                        break
                else:
                    places.append([box, (index, raw, obs)])
        return [(p[0], p[1]) for p in places]

    def _part_box(self, obs: FrameObservation, bbox: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
        sx, sy = obs.scale
        x, y, w, h = bbox
        fx0, fx1 = x * sx, (x + w) * sx
        if obs.sign > 0:
            px0, px1 = fx0 - obs.origin_x, fx1 - obs.origin_x
        else:
            px0, px1 = obs.origin_x - fx1, obs.origin_x - fx0
        return (px0, y * sy, px1, (y + h) * sy)

    def _frame_box(
        self, obs: FrameObservation, box: tuple[float, float, float, float]
    ) -> tuple[int, int, int, int] | None:
        """The place's box in this frame's map pixels (with the margin), or None when not all in view."""
        px0, py0, px1, py1 = box
        if obs.sign > 0:
            fx0, fx1 = px0 + obs.origin_x, px1 + obs.origin_x
        else:
            fx0, fx1 = obs.origin_x - px1, obs.origin_x - px0
        if fx0 < obs.view[0] or fx1 > obs.view[1]:
            return None
        sx, sy = obs.scale
        height, width = obs.log_nfa.shape
        x0 = max(0, math.floor(fx0 / sx) - self.margin)
        x1 = min(width, math.ceil(fx1 / sx) + self.margin)
        y0 = max(0, math.floor(py0 / sy) - self.margin)
        y1 = min(height, math.ceil(py1 / sy) + self.margin)
        if x1 <= x0 or y1 <= y0:
            return None
        return x0, y0, x1, y1

    def _test(
        self, box: tuple[float, float, float, float], best: tuple[int, nfa.NfaRegion, FrameObservation]
    ) -> PartRegion:
        values = []
        for obs in self.observations:
            cut = self._frame_box(obs, box)
            if cut is not None:
                x0, y0, x1, y1 = cut
                values.append(float(obs.log_nfa[y0:y1, x0:x1].min()))
        _, raw, obs = best
        if values:
            observed = np.asarray(values, dtype=np.float64)
            total, start, end = best_run(observed)
            log_nfa = log10_runs(observed.size) + total
        else:  # never wholly in view (at a border of the part): its best frame alone, paying for every frame
            observed = np.zeros(0)
            start, end = 0, 1
            log_nfa = min(0.0, raw.log_nfa) + math.log10(max(1, len(self.observations)))
        sx, sy = obs.scale
        x, y, w, h = raw.bbox
        x0, y0 = math.floor(x * sx), math.floor(y * sy)
        best_bbox = (x0, y0, max(1, math.ceil((x + w) * sx) - x0), max(1, math.ceil((y + h) * sy) - y0))
        px0, py0, px1, py1 = box
        return PartRegion(
            bbox=(round(px0), round(py0), max(1, round(px1 - px0)), max(1, round(py1 - py0))),
            log_nfa=float(log_nfa),
            frames=end - start,
            observed=int(observed.size),
            best_sequence=obs.sequence,
            best_bbox=best_bbox,
            best_frame_log_nfa=float(raw.log_nfa),
        )


def _view_min(obs: FrameObservation) -> float:
    """The smallest log10 NFA over the columns that show the part in one frame."""
    sx = obs.scale[0]
    x0 = max(0, math.floor(obs.view[0] / sx))
    x1 = min(obs.log_nfa.shape[1], max(x0 + 1, math.ceil(obs.view[1] / sx)))
    return float(obs.log_nfa[:, x0:x1].min())
