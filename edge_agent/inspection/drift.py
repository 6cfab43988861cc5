"""Drift: are the frames still like the images the model was trained on?

The model's promise (few false alarms, defects found) holds for images like its training images. Five
statistics watch what that depends on, each compared with the same statistic of the training images,
which the bundle stores (``Manifest.drift_reference``, written by training/finish.py):

- ``brightness``: mean grey level / 255 (the light ages, a lamp fails, the exposure changes);
- ``contrast``: grey standard deviation / mean grey level, so a light that only gets brighter is a
  brightness change and not also a contrast one (a new supplier's surface, glare, a dirty lens);
- ``sharpness``: variance of the Laplacian / grey variance: also gain-free, so only focus and motion blur
  move it (reason ``blur``: the camera was bumped, the lens drifted, the belt runs faster);
- ``score``: the image score (maximum of the anomaly map) of frames the model passes;
- ``nll``: the mean of the finest scale's m_s (mean z^2 per latent, i.e. the NLL up to a constant) of
  frames the model passes.

The image statistics are computed on the model input (frame resized to the model size, RGB), exactly as
training computes them, so the resolution of the camera does not change the figures. They feed on every
frame: they describe the camera and the light, not the part, and a drift that makes every frame flagged
must still be seen. The two model statistics feed on passed frames only ("good-frame scores").

The test: on a sliding window of the last ``window`` sampled frames, the two-sample Kolmogorov-Smirnov
distance D between the window and the reference (the largest gap between their empirical CDFs, in [0, 1]).
D is used as an effect size, not through its p-value: consecutive frames of a still belt are strongly
correlated, which makes p-values meaningless, and a p-value shrinks with any tiny shift once the window is
long. D is distribution-free (sharpness and scores are skewed, far from Gaussian) and scale-free. A
statistic drifts when D >= ``max_distance`` *and* its window median moved by at least
``min_relative_shift`` of the reference median: D alone is 1 for a negligible shift when the reference has
no spread (identical training images), the median shift alone ignores the spread. After a step change, D
grows by about 1/window per frame, so a step is found after about ``max_distance * window`` sampled frames.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from edge_agent.bundle import DriftReference, DriftStat
from edge_agent.config import DriftConfig

IMAGE_STATS = ("brightness", "contrast", "sharpness")
MODEL_STATS = ("score", "nll")
STATS = IMAGE_STATS + MODEL_STATS
# What a person is told to look at (docs/agent.md "Drift"): several statistics share a reason.
REASONS: dict[str, str] = {
    "brightness": "brightness",
    "contrast": "contrast",
    "sharpness": "blur",
    "score": "score",
    "nll": "score",
}
REFERENCE_QUANTILES = 65  # stored per statistic: 0, 1/64, ..., 1 (a few hundred bytes in model.json)
_EPS = 1e-9


def image_statistics(rgb: np.ndarray) -> tuple[float, float, float]:
    """(brightness, contrast, sharpness) of one uint8 HxWx3 RGB (or HxW grey) image; see the module docstring."""
    if rgb.dtype != np.uint8:
        raise ValueError(f"drift statistics need uint8 images, got {rgb.dtype}")
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    grey = grey.astype(np.float32)
    mean, std = cv2.meanStdDev(grey)
    mean_v, var_v = float(mean[0, 0]), float(std[0, 0]) ** 2
    laplacian = cv2.Laplacian(grey, cv2.CV_32F, ksize=3)
    _, lap_std = cv2.meanStdDev(laplacian)
    return (
        mean_v / 255.0,
        math.sqrt(var_v) / max(mean_v, 1.0),
        float(lap_std[0, 0]) ** 2 / max(var_v, _EPS),
    )


def model_statistics(anomaly_map: np.ndarray, finest_scale_map: np.ndarray) -> tuple[float, float]:
    """(score, nll) of one frame: the anomaly map's maximum and the finest m_s map's mean."""
    return float(np.max(anomaly_map)), float(np.mean(finest_scale_map, dtype=np.float64))


def reference_stat(values: Sequence[float] | np.ndarray) -> DriftStat:
    """The stored form of one statistic over the training images: its quantiles and the image count."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        raise ValueError("a drift reference needs at least one finite value")
    quantiles = np.quantile(array, np.linspace(0.0, 1.0, REFERENCE_QUANTILES))
    return DriftStat(quantiles=tuple(float(q) for q in quantiles), count=int(array.size))


def build_reference(
    images_rgb: np.ndarray, scores: Sequence[float] | None = None, nll: Sequence[float] | None = None
) -> DriftReference:
    """The bundle's drift reference from training images (uint8 NxHxWx3 RGB at the model size) and the
    model's scores / mean m_0 on its good validation images (None: that statistic is not watched)."""
    if len(images_rgb) == 0:
        raise ValueError("a drift reference needs at least one training image")
    columns = np.array([image_statistics(image) for image in images_rgb], dtype=np.float64)
    return DriftReference(
        brightness=reference_stat(columns[:, 0]),
        contrast=reference_stat(columns[:, 1]),
        sharpness=reference_stat(columns[:, 2]),
        score=reference_stat(scores) if scores is not None and len(scores) else None,
        nll=reference_stat(nll) if nll is not None and len(nll) else None,
    )


def ks_distance(sample: np.ndarray, reference: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance: max |F_sample - F_reference| over every value of both (ties exact)."""
    a, b = np.sort(np.asarray(sample, dtype=np.float64)), np.sort(np.asarray(reference, dtype=np.float64))
    if a.size == 0 or b.size == 0:
        return 0.0
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / a.size
    cdf_b = np.searchsorted(b, points, side="right") / b.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


@dataclass(frozen=True)
class StatDrift:
    """One statistic's comparison over the current window."""

    name: str
    reason: str
    frames: int
    distance: float
    window_median: float
    reference_median: float
    relative_shift: float  # (window median - reference median) / |reference median|
    drifting: bool

    def sentence(self, window: int) -> str:
        """What a person reads in /healthz."""
        direction = "higher" if self.relative_shift > 0 else "lower"
        return (
            f"drift ({self.reason}): {self.name} is {abs(self.relative_shift):.0%} {direction} than in the training "
            f"images (median {self.window_median:.4g} vs {self.reference_median:.4g}; KS distance "
            f"{self.distance:.2f} over the last {self.frames} of {window} frames)"
        )


@dataclass(frozen=True)
class DriftReport:
    """Every watched statistic now; ``reasons`` lists the drifting ones' reasons, most distant first."""

    enabled: bool
    note: str
    stats: tuple[StatDrift, ...]
    window: int

    @property
    def drifting(self) -> tuple[StatDrift, ...]:
        return tuple(sorted((s for s in self.stats if s.drifting), key=lambda s: -s.distance))

    @property
    def reasons(self) -> list[str]:
        return list(dict.fromkeys(s.reason for s in self.drifting))

    @property
    def problems(self) -> list[str]:
        return [s.sentence(self.window) for s in self.drifting]


class DriftMonitor:
    """Sliding windows of the five statistics against a bundle's reference (thread-safe).

    ``observe`` is cheap when the sample interval has not passed (a clock read), so it can run for every
    frame on the publish thread; the statistics of one frame cost a grey conversion and a Laplacian at the
    model size.
    """

    def __init__(self, reference: DriftReference | None, settings: DriftConfig | None = None) -> None:
        """``settings``: the ``[drift]`` section as it is (its defaults and validators are the only ones)."""
        self.settings = settings or DriftConfig()
        self.reference = reference
        self._windows: dict[str, deque[float]] = {
            name: deque(maxlen=self.settings.window) for name in STATS if self._ref(name) is not None
        }
        self._last_sample: float | None = None
        self._lock = threading.Lock()
        self.frames_sampled = 0

    def _ref(self, name: str) -> DriftStat | None:
        return None if self.reference is None else getattr(self.reference, name)

    @property
    def enabled(self) -> bool:
        return self.reference is not None

    def due(self, now: float | None = None) -> bool:
        """Whether the next frame should be sampled (``sample_every_s`` since the last sample)."""
        if not self.enabled:
            return False
        now = time.monotonic() if now is None else now
        return self._last_sample is None or now - self._last_sample >= self.settings.sample_every_s

    def add(
        self,
        model_rgb: np.ndarray,
        passed: bool,
        model_stats: tuple[float, float] | None = None,
        now: float | None = None,
    ) -> None:
        """One sampled frame: its model input (uint8 RGB at the model size) and, when the model passed it,
        its (score, nll)."""
        if not self.enabled:
            return
        values = dict(zip(IMAGE_STATS, image_statistics(model_rgb), strict=True))
        if passed and model_stats is not None:
            values.update(zip(MODEL_STATS, model_stats, strict=True))
        with self._lock:
            self._last_sample = time.monotonic() if now is None else now
            self.frames_sampled += 1
            for name, value in values.items():
                if name in self._windows and math.isfinite(value):
                    self._windows[name].append(value)

    def report(self) -> DriftReport:
        """The comparison of every watched statistic over its current window."""
        settings = self.settings
        if self.reference is None:
            return DriftReport(False, "the bundle has no drift reference (trained before drift checks): off", (), 0)
        with self._lock:
            windows = {name: np.array(values, dtype=np.float64) for name, values in self._windows.items()}
        stats = []
        for name, window in windows.items():
            ref = self._ref(name)
            assert ref is not None
            quantiles = np.asarray(ref.quantiles, dtype=np.float64)
            ref_median = float(np.median(quantiles))
            if window.size == 0:
                stats.append(StatDrift(name, REASONS[name], 0, 0.0, math.nan, ref_median, 0.0, False))
                continue
            distance = ks_distance(window, quantiles)
            median = float(np.median(window))
            shift = (median - ref_median) / max(abs(ref_median), _EPS)
            drifting = (
                window.size >= settings.min_frames
                and distance >= settings.max_distance
                and abs(shift) >= settings.min_relative_shift
            )
            stats.append(
                StatDrift(name, REASONS[name], int(window.size), distance, median, ref_median, shift, drifting)
            )
        return DriftReport(True, "", tuple(stats), settings.window)
