"""Record good images for training: the frame-collecting logic of ``edge-agent record`` and ``cmd/record``.

Frames arrive as the agent sees them (rotated, ROI applied); the recorder writes the ones worth keeping
as lossless PNG files into one folder, which ``uflow train DIR`` takes as is (the ``folder`` layout of
training/data.py: every image under it is a good part). A frame is written when

- at least ``every_s`` seconds passed since the last written one, by the frames' own clock (capture time,
  or the time in a video file: a file read faster than real time is spaced as it was filmed);
- with ``only_good``, the current model passed it, and in tracked mode every part in it was decided good
  (edge_agent/service/record_gate.py holds the frames until then);
- it is not a near-duplicate of the last written frame: a still belt delivers the same picture a
  thousand times, and a thousand copies would teach the model nothing but cost disk and training time.

Near-duplicates are judged on a small grey thumbnail (``THUMB_SIDE`` pixels on the long side, area
averaged, so sensor noise averages out): the mean absolute difference to the last written frame's
thumbnail, in grey levels, must reach ``min_difference``. Comparing with the last *written* frame, not the
previous one, makes a slowly moving belt accumulate its change until a frame counts as new. (An indexed
conveyor that stops identical-looking parts at the same place needs a smaller ``min_difference``.)
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.service.disk_budget import BudgetExceeded, DiskBudget

THUMB_SIDE = 64
SUMMARY_NAME = "record.json"  # not an image: training ignores it


class RecordError(RuntimeError):
    """The recording cannot go on (output folder not writable); the message says why."""


@dataclass(frozen=True)
class RecordSettings:
    """What to record (the options of ``edge-agent record`` and the fields of ``cmd/record``)."""

    count: int | None = None  # stop after this many written frames (None: until stopped)
    every_s: float = 0.0  # at least this many seconds between written frames
    only_good: bool = False  # only frames the current model passes
    min_difference: float = 2.0  # mean absolute grey difference to the last written frame (0..255)

    def __post_init__(self) -> None:
        if self.count is not None and self.count < 1:
            raise ValueError("count must be at least 1")
        if self.every_s < 0 or self.min_difference < 0:
            raise ValueError("every_s and min_difference must not be negative")


@dataclass
class RecordCounts:
    """What happened to the frames offered so far."""

    seen: int = 0
    written: int = 0
    duplicates: int = 0
    flagged: int = 0  # skipped with only_good because the model flagged them
    too_soon: int = 0  # within every_s of the last written frame
    undecided: int = 0  # skipped with only_good: a part in the frame was never decided (record_gate.py)
    files: list[str] = field(default_factory=list)


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A float32 grey thumbnail, ``THUMB_SIDE`` on the long side, for the near-duplicate test."""
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    height, width = grey.shape[:2]
    scale = THUMB_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA).astype(np.float32)


def difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two thumbnails in grey levels (inf when their shapes differ)."""
    if a.shape != b.shape:
        return float("inf")
    return float(cv2.norm(a, b, cv2.NORM_L1)) / a.size


class FrameRecorder:
    """Writes the frames worth keeping into ``out`` (thread-safe; ``offer`` may run on the publish thread)."""

    def __init__(
        self, out: Path, settings: RecordSettings, prefix: str = "frame", budget: DiskBudget | None = None
    ) -> None:
        """``budget``: the free-space floor and quota every written image is checked against (RecordError
        when the folder is already past them, and when a write would take it past)."""
        self.out = Path(out)
        self.settings = settings
        self.prefix = prefix
        self.budget = budget
        self.counts = RecordCounts()
        self.started = time.time()
        self._last_thumb: np.ndarray | None = None
        self._last_written: float | None = None
        self._lock = threading.Lock()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RecordError(f"cannot create the output folder {self.out}: {exc}") from exc
        why = budget.problem() if budget is not None else None
        if why is not None:
            raise RecordError(f"not recording: {why}")

    @property
    def done(self) -> bool:
        """True once ``count`` frames are written."""
        return self.settings.count is not None and self.counts.written >= self.settings.count

    def offer(self, image_bgr: np.ndarray, sequence: int, passed: bool | None = None, now: float | None = None) -> str:
        """Consider one frame; returns what happened: written, duplicate, flagged, too_soon or done."""
        now = time.monotonic() if now is None else now
        with self._lock:
            counts = self.counts
            if self.done:
                return "done"
            counts.seen += 1
            if self.settings.only_good and passed is False:
                counts.flagged += 1
                return "flagged"
            if self._last_written is not None and now - self._last_written < self.settings.every_s:
                counts.too_soon += 1
                return "too_soon"
            thumb = thumbnail(image_bgr)
            if self._last_thumb is not None and difference(thumb, self._last_thumb) < self.settings.min_difference:
                counts.duplicates += 1
                return "duplicate"
            path = self.out / f"{self.prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{sequence:06d}-{counts.written:05d}.png"
            self._write(path, image_bgr)
            self._last_thumb, self._last_written = thumb, now
            counts.written += 1
            counts.files.append(path.name)
            return "written"

    def note(self, outcome: str) -> None:
        """Count a frame the caller skipped itself (record_gate.py): ``flagged``, ``undecided`` or ``too_soon``."""
        with self._lock:
            if self.done:
                return
            self.counts.seen += 1
            setattr(self.counts, outcome, getattr(self.counts, outcome) + 1)

    def _write(self, path: Path, image_bgr: np.ndarray) -> None:
        ok, encoded = cv2.imencode(".png", image_bgr)
        if not ok:
            raise RecordError(f"could not encode frame for {path}")
        data = encoded.tobytes()
        if self.budget is not None:
            try:
                self.budget.claim(len(data))
            except BudgetExceeded as exc:
                raise RecordError(f"recording stopped: {exc}") from exc
        try:
            path.write_bytes(data)
        except OSError as exc:
            if self.budget is not None:
                self.budget.release(len(data))
            raise RecordError(f"could not write {path} (disk full or not writable?): {exc}") from exc

    def summary(self) -> dict[str, Any]:
        """The counts and settings, as written to ``record.json`` and sent in the cmd/record reply."""
        counts = {k: v for k, v in asdict(self.counts).items() if k != "files"}
        return {"out": str(self.out), "settings": asdict(self.settings), **counts}

    def write_summary(self) -> Path:
        """``record.json`` next to the images (what was recorded, how many were skipped and why)."""
        path = self.out / SUMMARY_NAME
        path.write_text(json.dumps(self.summary(), indent=1) + "\n", encoding="utf-8")
        return path
