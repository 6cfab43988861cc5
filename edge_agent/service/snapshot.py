"""Save what the agent saw and decided for one frame, for a person to look at (the ``snapshot`` command).

A folder ``<snapshot_dir>/<YYYYmmdd-HHMMSS>-seq<sequence>[-<label>]`` with:
``frame.png`` (the inspected image: rotated, ROI applied), ``anomaly_map.npy`` / ``log_nfa.npy`` (float32
at the model's resolution, as computed), ``anomaly_map.png`` (heat map at the image's size), ``mask.png``
(white where log10 NFA is below the decision threshold), ``overlay.png`` (image, heat map, NFA outline,
region boxes) and ``inspection.json`` (the message that was published).

Any broker client can send ``cmd/snapshot``, and the folder shares a file system with the spool, so
``SnapshotBudget`` limits the rate, the number of folders, their total size and the free space left
(``[snapshot]`` in the config); a refused snapshot says which limit and writes nothing.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from edge_agent.config import SnapshotConfig
from edge_agent.inspection.overlay import detection_mask, draw_overlay, heat_map
from edge_agent.inspection.pipeline import FrameJob
from edge_agent.inspection.scoring import resize_map


class SnapshotRefused(RuntimeError):
    """A snapshot would break one of the limits; the message names it."""


class SnapshotBudget:
    """Rate, count, size and free-space limits for snapshots (thread-safe)."""

    def __init__(self, config: SnapshotConfig) -> None:
        self.config = config
        self._last: float | None = None
        self._lock = threading.Lock()

    def claim(self, directory: Path) -> None:
        """Take one snapshot's place, or raise SnapshotRefused naming the limit."""
        config = self.config
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last < config.min_interval_s:
                wait = config.min_interval_s - (now - self._last)
                raise SnapshotRefused(
                    f"at most one snapshot every {config.min_interval_s:g} s (snapshot.min_interval_s); "
                    f"try again in {wait:.0f} s"
                )
            directory = Path(directory)
            folders = [p for p in directory.iterdir() if p.is_dir()] if directory.is_dir() else []
            if len(folders) >= config.max_count:
                raise SnapshotRefused(
                    f"{directory} holds {len(folders)} snapshots (snapshot.max_count {config.max_count}); "
                    "remove old ones first"
                )
            total = sum(f.stat().st_size for folder in folders for f in folder.iterdir() if f.is_file())
            if total >= config.max_total_mb * 1e6:
                raise SnapshotRefused(
                    f"{directory} holds {total / 1e6:.0f} MB of snapshots (snapshot.max_total_mb "
                    f"{config.max_total_mb:g}); remove old ones first"
                )
            existing = directory if directory.exists() else next((p for p in directory.parents if p.exists()), None)
            if existing is not None:
                free = shutil.disk_usage(existing).free
                if free < config.min_free_mb * 1e6:
                    raise SnapshotRefused(
                        f"only {free / 1e6:.0f} MB free on the file system of {directory} (snapshot.min_free_mb "
                        f"{config.min_free_mb:g}): the spool needs it more"
                    )
            self._last = now


def save_snapshot(job: FrameJob, directory: Path, label: str | None = None) -> dict[str, str]:
    """Write one frame's files into a new folder under ``directory``; returns name -> path."""
    frame, verdict = job.frame, job.verdict
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(frame.capture_time))
    folder = Path(directory) / f"{stamp}-seq{frame.sequence:06d}{'-' + label if label else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    anomaly, log_nfa, overlay = overlay_for_job(job)
    files = {
        "frame": folder / "frame.png",
        "anomaly_map": folder / "anomaly_map.npy",
        "log_nfa": folder / "log_nfa.npy",
        "heat_map": folder / "anomaly_map.png",
        "mask": folder / "mask.png",
        "overlay": folder / "overlay.png",
        "message": folder / "inspection.json",
    }
    _write_image(files["frame"], frame.image)
    np.save(files["anomaly_map"], np.asarray(verdict.anomaly_map, dtype=np.float32))
    np.save(files["log_nfa"], np.asarray(verdict.log_nfa, dtype=np.float32))
    _write_image(files["heat_map"], heat_map(anomaly))
    _write_image(files["mask"], detection_mask(log_nfa, verdict.log10_epsilon).astype(np.uint8) * 255)
    _write_image(files["overlay"], overlay)
    files["message"].write_text(job.message.to_json() + "\n", encoding="utf-8")
    return {name: str(path) for name, path in files.items()}


def overlay_for_job(job: FrameJob, min_width: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The anomaly map and log10 NFA at the frame's size, and the overlay drawn from them (BGR uint8).

    Frames narrower than ``min_width`` are drawn enlarged (whole factor) so the labels stay legible.
    """
    frame, verdict = job.frame, job.verdict
    height, width = frame.image.shape[:2]
    anomaly = resize_map(verdict.anomaly_map, width, height)
    log_nfa = resize_map(verdict.log_nfa, width, height)
    # Regions are in source-frame pixels; the overlay is drawn on the ROI image.
    ox, oy = frame.roi_offset
    regions = [
        r.model_copy(update={"bbox": (r.bbox[0] - ox, r.bbox[1] - oy, r.bbox[2], r.bbox[3])}) for r in verdict.regions
    ]
    title = f"{frame_caption(job)}  model {job.message.model.name} {job.message.model.version}"
    overlay = draw_overlay(frame.image, anomaly, log_nfa, verdict.log10_epsilon, regions, title, min_width=min_width)
    return anomaly, log_nfa, overlay


def frame_caption(job: FrameJob) -> str:
    """What a frame's picture says it shows: the frame's verdict, or in tracked mode its parts' verdicts.

    In tracked mode a frame is evidence, not a verdict: a part is decided over all its frames, so a frame
    caption saying "good" next to a rejected part would contradict the part message. It names the parts.
    """
    message, view = job.message, job.parts_view
    if view is not None:
        return f"frame {message.sequence}  parts: {view.caption()}"
    return f"frame {message.sequence}  score {message.image_score:.3f}  {'ANOMALOUS' if message.anomalous else 'good'}"


def _write_image(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path} (disk full or not writable?)")
