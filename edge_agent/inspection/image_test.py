"""The image test: a second family of tests in the fitted NFA, on the frame as a whole (issue 20).

The maps test regions. Some defects are not regions a local test can see: a tile whose upper half is a
slightly different texture, a part that is wrong everywhere a little. The ``texture`` head sees such a
change as a whole: the graph gives one number per frame, the Mahalanobis distance of the frame's texture
statistics (every backbone scale's channel means and standard deviations) to those of the good images
(training/heads.py ``TextureHead``), as a 1 x 1 map.

The a-contrario way to join two families of tests is to split the false-alarm budget between them: the
regions' NFA is counted over the maps' tests divided by ``1 - share``, the image test's over its one test
divided by ``share``, so the expected number of false detections of both together stays below epsilon
(docs/nfa.md, "The image test"). A detection by the image test is the whole frame: its log10 NFA is the
same at every pixel.

Its null is the good images themselves: every good image's distance computed by a fit that left it out
(k folds), so a new good frame is one more draw of the same law. Up to the top ``tail`` share of those
scores the probability of a score is its rank among them (the conformal p-value, exact under
exchangeability); beyond it an exponential law on the log scores of that top share (peaks over a
threshold: a Pareto tail) carries the ranking past the largest good score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edge_agent.bundle import MIN_GOOD_SCORES


@dataclass(frozen=True)
class ImageTest:
    """The image test's null and its share of epsilon; ``scores``: the good images' out-of-sample scores."""

    scores: tuple[float, ...]
    share: float
    tail: float = 0.1
    _sorted: np.ndarray = field(init=False, repr=False, compare=False)
    _threshold: float = field(init=False, repr=False, compare=False)
    _scale: float = field(init=False, repr=False, compare=False)
    _tail_log10_p: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = np.asarray(self.scores, dtype=np.float64)
        if values.ndim != 1 or len(values) < MIN_GOOD_SCORES:
            raise ValueError(f"ImageTest needs at least {MIN_GOOD_SCORES} good scores, got {values.size}")
        if not (np.isfinite(values).all() and (values > 0).all()):
            raise ValueError("ImageTest scores must be finite and positive")
        if not 0.0 < self.share < 1.0:
            raise ValueError(f"ImageTest.share must be in (0, 1), got {self.share!r}")
        if not 0.0 < self.tail <= 0.5:
            raise ValueError(f"ImageTest.tail must be in (0, 0.5], got {self.tail!r}")
        ordered = np.sort(values)
        count = max(5, math.ceil(self.tail * len(ordered)))
        top = np.log(ordered[-count:])
        object.__setattr__(self, "_sorted", ordered)
        object.__setattr__(self, "_threshold", float(top[0]))
        # The exponential law's scale: the mean excess of the top share's log scores (its maximum likelihood);
        # a floor keeps identical scores from making an infinitely steep tail.
        object.__setattr__(self, "_scale", max(float(np.mean(top - top[0])), 1e-6))
        object.__setattr__(self, "_tail_log10_p", math.log10(count / (len(ordered) + 1.0)))

    @property
    def images(self) -> int:
        """How many good images make the null."""
        return len(self.scores)

    @property
    def region_shift(self) -> float:
        """What the regions' log10 NFA gains for the budget the image test takes (log10 of 1 / (1 - share))."""
        return -math.log10(1.0 - self.share)

    def log10_p(self, score: float) -> float:
        """log10 of the probability that a good frame scores at least ``score``."""
        value = float(score)
        if not math.isfinite(value):
            return -math.inf if value > 0 else 0.0
        above = len(self._sorted) - int(np.searchsorted(self._sorted, value, side="left"))
        rank = math.log10((1.0 + above) / (len(self._sorted) + 1.0))
        log_score = math.log(value) if value > 0 else -math.inf
        if log_score <= self._threshold:
            return rank
        tail = self._tail_log10_p - (log_score - self._threshold) / self._scale / math.log(10.0)
        return min(rank, tail)

    def log10_nfa(self, score: float) -> float:
        """The image test's log10 NFA: its probability over its share of the budget."""
        return self.log10_p(score) - math.log10(self.share)
