"""A free-space floor and a size quota for a folder the agent writes on request: training_dir.

Kept frames (keep.py) and snapshots (snapshot.py) have their own limits; the training folder receives
``cmd/record`` recordings (up to 100,000 images per command) and the review's decisions, and shares the
disk with the spool. ``DiskBudget.claim(n)`` is asked before every write of about ``n`` bytes and refuses
when the file system would be left with less than ``min_free_mb`` free or the folder would grow past
``max_total_mb``. The folder's size is measured once (a walk) and then kept up to date from the claims,
so a recording does not walk 100,000 files per frame; a long-lived budget (the review page's) measures
again after ``remeasure_s``, as recordings add files it does not see.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

from edge_agent.config import KeepConfig


class BudgetExceeded(OSError):
    """A write refused by the budget; the message names the limit and its config key."""


def tree_size(root: Path) -> int:
    """Bytes in the regular files under ``root`` (symlinks not followed, unreadable entries skipped)."""
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            try:
                stat = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            total += stat.st_size
    return total


def free_bytes(directory: Path) -> int | None:
    """Free bytes on the file system of ``directory`` (its nearest existing parent); None when unknown."""
    existing = Path(directory)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None


class DiskBudget:
    """The floor and quota of one folder (thread-safe)."""

    def __init__(
        self, root: Path, max_total_mb: float, min_free_mb: float, name: str, remeasure_s: float | None = None
    ) -> None:
        """``name`` is the config section whose keys the refusals cite (e.g. ``keep``); ``remeasure_s``: walk
        the folder again when the last walk is older (None: once, then only this budget's own claims)."""
        self.root = Path(root)
        self.max_total_bytes = max_total_mb * 1e6
        self.min_free_bytes = min_free_mb * 1e6
        self.name = name
        self.remeasure_s = remeasure_s
        self._lock = threading.Lock()
        self._used: int | None = None
        self._measured = 0.0

    @property
    def used(self) -> int:
        """Bytes under the root (measured, then counted from the claims)."""
        with self._lock:
            stale = self.remeasure_s is not None and time.monotonic() - self._measured > self.remeasure_s
            if self._used is None or stale:
                self._used = tree_size(self.root) if self.root.exists() else 0
                self._measured = time.monotonic()
            return self._used

    def problem(self, size: int = 0) -> str | None:
        """Why a write of ``size`` bytes must not happen now, or None."""
        free = free_bytes(self.root)
        if free is not None and free - size < self.min_free_bytes:
            return (
                f"only {free / 1e6:.0f} MB free on the file system of {self.root} "
                f"({self.name}.min_free_mb {self.min_free_bytes / 1e6:g}): the spool needs it more"
            )
        if self.used + size > self.max_total_bytes:
            return (
                f"{self.root} holds {self.used / 1e6:.0f} MB ({self.name}.training_max_total_mb "
                f"{self.max_total_bytes / 1e6:g}); move or remove old images first"
            )
        return None

    def claim(self, size: int) -> None:
        """Reserve ``size`` bytes for a write; BudgetExceeded (with the reason) when the budget forbids it."""
        why = self.problem(size)
        if why is not None:
            raise BudgetExceeded(why)
        with self._lock:
            self._used = (self._used or 0) + size

    def release(self, size: int) -> None:
        """``size`` bytes left the folder again (a write that failed, a file removed)."""
        with self._lock:
            if self._used is not None:
                self._used = max(0, self._used - size)


def training_budget(keep: KeepConfig, root: Path | None = None, remeasure_s: float | None = None) -> DiskBudget:
    """The budget of ``keep.training_dir`` (or ``root``, a recording's own folder): the keep's free-space floor
    (``keep.min_free_mb``) and ``keep.training_max_total_mb``."""
    folder = root if root is not None else keep.training_dir
    if folder is None:
        raise ValueError("keep.training_dir is not set")
    return DiskBudget(folder, keep.training_max_total_mb, keep.min_free_mb, "keep", remeasure_s)
