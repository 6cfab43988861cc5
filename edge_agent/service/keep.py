"""Keep flagged frames (and a sample of good ones) on disk for a person to review (``[keep]`` in the config).

Every kept frame is a folder under ``keep.dir`` written by ``save_snapshot``: the frame, its anomaly map,
NFA mask, overlay and the published message (``inspection.json``), named
``<YYYYmmdd-HHMMSS>-seq<sequence>-flagged`` or ``...-good``. With ``[parts]`` on, an anomalous part is
kept instead of anomalous frames (the part's verdict is the one that counts), in ``...-part-<part_id>``:
the frame that shows the part's evidence (the one its decision names, held by
edge_agent/service/part_frames.py), the part outlined, a contact sheet of its frames and the part
message (edge_agent/service/part_snapshot.py). The review page and ``edge-agent review`` read these folders.

Writing never happens on the inspection path: ``offer`` (the publish thread, once per frame) only decides
and puts the frame on a bounded queue; one writer thread (at nice 10) draws, encodes and writes. A full queue skips the frame
and counts it. After each write the oldest folders are removed until the total is within
``keep.max_total_mb``. A full or read-only disk, or less than ``keep.min_free_mb`` free, makes the writer
skip and report the problem (``problem``: the agent's /healthz says degraded); inspection goes on.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from edge_agent.config import KeepConfig
from edge_agent.inspection.pipeline import FrameJob
from edge_agent.messages import PartMessage
from edge_agent.service.part_frames import PartEvidence, PartFrameBook
from edge_agent.thread_priority import lower_thread_priority

log = logging.getLogger(__name__)

FLAGGED, GOOD, PART = "flagged", "good", "part"
PART_MESSAGE_NAME = "part.json"
WRITER_NICE = 10
MESSAGE_NAME = "inspection.json"


_Item = tuple[FrameJob, str, PartMessage | None, PartEvidence | None]  # job, kind, part, its evidence


@dataclass
class KeepCounters:
    """What the keeper did since the start (stats and /metrics)."""

    kept_flagged: int = 0
    kept_good: int = 0
    kept_parts: int = 0  # anomalous parts ([parts] mode), each with the frame that decided it
    skipped_busy: int = 0  # the writer's queue was full
    skipped_disk: int = 0  # not written: disk full, read-only, or below min_free_mb
    removed_quota: int = 0  # oldest folders removed to stay within max_total_mb
    bytes_kept: int = 0  # total size of the kept folders now


def folder_size(folder: Path) -> int:
    """Bytes of the files directly in ``folder`` (kept folders are flat)."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def kept_folders(directory: Path) -> list[Path]:
    """The kept frames' folders under ``directory``, oldest first (by modification time, then name)."""
    if not directory.is_dir():
        return []
    folders = [p for p in directory.iterdir() if p.is_dir() and (p / MESSAGE_NAME).is_file()]
    return sorted(folders, key=lambda p: (p.stat().st_mtime, p.name))


class FrameKeeper:
    """Decides which frames to keep, writes them on its own thread and holds the disk quota."""

    def __init__(self, config: KeepConfig, parts_mode: bool = False, book: PartFrameBook | None = None) -> None:
        """``parts_mode``: the agent decides per part ([parts] mode on): anomalous parts are kept, not frames.

        ``book`` (tracked mode): the parts' frames, so a kept part shows its evidence frame and contact sheet.
        """
        self.book = book
        assert config.dir is not None, "keep.dir is filled in by AgentSettings"
        self.config = config
        self.parts_mode = parts_mode
        self.directory = Path(config.dir)
        self.counters = KeepCounters()
        self.problem = ""  # the last disk problem; cleared by the next successful write
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=config.queue)
        self._good_credit = 0.0
        self._folders: deque[tuple[Path, int]] = deque()  # oldest first, with their sizes
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether any frame can be kept at all with this configuration."""
        return self.config.flagged or self.config.good_rate > 0

    def start(self) -> None:
        """Index what is already on disk and start the writer."""
        if not self.active:
            return
        try:
            self._folders = deque((p, folder_size(p)) for p in kept_folders(self.directory))
        except OSError as exc:
            self._set_problem(f"cannot read {self.directory}: {exc}")
        self.counters.bytes_kept = sum(size for _, size in self._folders)
        self._thread = threading.Thread(target=self._write_loop, name="keep-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (bounded wait), then end the writer."""
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._thread = None

    def offer(self, job: FrameJob) -> str | None:
        """Pipeline observer: queue the frame when it is to be kept; returns its kind, or None. Never blocks."""
        if not self.active or self._thread is None:
            return None
        if job.message.anomalous:
            if not self.config.flagged or self.parts_mode:  # with parts on, the part is the verdict (offer_part)
                return None
            kind = FLAGGED
        else:
            # A credit counter rather than a coin: exactly good_rate of the good frames, evenly spread.
            self._good_credit += self.config.good_rate
            if self._good_credit < 1.0 - 1e-9:  # (float sums: ten times 0.1 is 0.999...)
                return None
            self._good_credit -= 1.0
            kind = GOOD
        return kind if self._enqueue(job, kind, None) else None

    def offer_part(self, job: FrameJob, part: PartMessage) -> bool:
        """Pipeline part observer: queue an anomalous part with its evidence frame. Never blocks."""
        evidence = self.book.take(part) if self.book is not None else None  # every part: the book forgets it
        if not self.config.flagged or not part.anomalous or part.status != "inspected" or self._thread is None:
            return False
        return self._enqueue(job, PART, part, evidence)

    def _enqueue(
        self, job: FrameJob, kind: str, part: PartMessage | None, evidence: PartEvidence | None = None
    ) -> bool:
        try:
            self._queue.put_nowait((job, kind, part, evidence))
        except queue.Full:
            self.counters.skipped_busy += 1
            return False
        return True

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every queued frame is written (tests, shutdown); True when the queue emptied in time."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    # -- the writer thread ------------------------------------------------------------------------

    def _write_loop(self) -> None:
        lower_thread_priority(WRITER_NICE)  # drawing and PNG encoding wait for the live stages
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception as exc:  # the writer must survive anything one frame does
                log.exception("keeping a frame failed", extra={"event": "keep_failed", "error": str(exc)})
                self._set_problem(f"{type(exc).__name__}: {exc}")
            finally:
                self._queue.task_done()

    def _write(self, job: FrameJob, kind: str, part: PartMessage | None, evidence: PartEvidence | None) -> None:
        # The drawing code is imported only once something is kept.
        from edge_agent.service.part_snapshot import save_part
        from edge_agent.service.snapshot import save_snapshot

        free = _free_bytes(self.directory)
        if free is not None and free < self.config.min_free_mb * 1e6:
            self.counters.skipped_disk += 1
            self._set_problem(
                f"only {free / 1e6:.0f} MB free on the disk of {self.directory} (keep.min_free_mb "
                f"{self.config.min_free_mb:g}): frames are not kept"
            )
            return
        try:
            if part is None:
                paths = save_snapshot(job, self.directory, kind)
            else:
                paths = save_part(job, part, evidence, self.directory)
        except OSError as exc:
            self.counters.skipped_disk += 1
            self._set_problem(f"cannot write kept frames to {self.directory}: {exc}")
            return
        folder = Path(paths["frame"]).parent
        size = folder_size(folder)
        with self._lock:
            self._folders.append((folder, size))
            self.counters.bytes_kept += size
            if kind == FLAGGED:
                self.counters.kept_flagged += 1
            elif kind == PART:
                self.counters.kept_parts += 1
            else:
                self.counters.kept_good += 1
        if self.problem:
            log.info("kept frames are written again", extra={"event": "keep_recovered", "directory": str(folder)})
        self.problem = ""
        self._hold_quota()

    def _hold_quota(self) -> None:
        """Remove the oldest folders until the total fits max_total_mb (the newest one always stays)."""
        limit = self.config.max_total_mb * 1e6
        with self._lock:
            while self.counters.bytes_kept > limit and len(self._folders) > 1:
                folder, size = self._folders.popleft()
                shutil.rmtree(folder, ignore_errors=True)
                self.counters.bytes_kept -= size
                self.counters.removed_quota += 1

    def forget(self, folder: Path) -> None:
        """A kept folder was moved or removed by the review: it no longer counts towards the quota."""
        with self._lock:
            for entry in list(self._folders):
                if entry[0] == folder:
                    self._folders.remove(entry)
                    self.counters.bytes_kept -= entry[1]

    def _set_problem(self, problem: str) -> None:
        if problem != self.problem:
            log.warning("cannot keep frames: %s", problem, extra={"event": "keep_disk_problem", "problem": problem})
        self.problem = problem


def _free_bytes(directory: Path) -> int | None:
    existing = directory if directory.exists() else next((p for p in directory.parents if p.exists()), None)
    if existing is None:
        return None
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None
