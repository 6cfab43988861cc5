"""The ``models/`` directory under the state dir: installed bundles, the ``current`` symlink, the update lock.

Layout::

    models/
      1.2.0/            a complete bundle that passed verification and its self-test
      1.3.0/
      current -> 1.3.0  relative symlink; the agent loads models/current
      .pending.json     an update switched ``current`` but the agent has not yet confirmed it
      .failed.json      versions that failed to install, with the reason (not retried without --force)
      .update.lock      flock()ed by the one updater allowed to run
      .staging-*        downloads and unpacking in progress (removed at the next update's start)
      .trash-*          versions being deleted (removed at the next update's start)

Every change a reader can observe is a single rename: a bundle appears under its version name only once
it is complete, ``current`` is replaced with ``os.replace`` of a fresh symlink, and a pruned version is
first renamed to ``.trash-*``. So an updater killed at any instant leaves ``current`` pointing at a
complete bundle, old or new, never half of one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.fileio import atomic_write, fsync_dir

log = logging.getLogger(__name__)

CURRENT = "current"
PENDING = ".pending.json"
FAILED = ".failed.json"
INDEX_STATE = ".fleet-index.json"  # the highest latest.json serial accepted (refuse older ones: replay/rollback)
LOCK = ".update.lock"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
_TMP_LINK_PREFIX = ".current-"
# A version names a directory: no path separators, no leading dot (hidden/staging names), no "..".
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class ModelsDirError(RuntimeError):
    """The models directory cannot be used as asked; the message says why."""


class UpdateLocked(ModelsDirError):
    """Another updater holds the lock."""


@dataclass(frozen=True)
class PendingSwitch:
    """An update that switched ``current`` and waits for the agent's confirmation."""

    version: str
    previous: str | None
    started: float


def check_version_name(version: str) -> str:
    """The version if it is safe as a directory name; raise ModelsDirError otherwise."""
    if not _VERSION_RE.match(version) or ".." in version:
        raise ModelsDirError(
            f"model version {version!r} cannot name a directory (letters, digits and . _ + - only, "
            "not starting with a dot, at most 128 characters)"
        )
    return version


class ModelsDir:
    """Operations on ``<state_dir>/models``; mutating ones must run under ``lock()``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # -- reading ------------------------------------------------------------------------------------

    @property
    def current_link(self) -> Path:
        return self.root / CURRENT

    def current_version(self) -> str | None:
        """The version ``current`` points at, or None when there is no current model."""
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # a real directory named current (installed by hand)
                return None
            raise
        return Path(target).name

    def version_dir(self, version: str) -> Path:
        return self.root / check_version_name(version)

    def installed_versions(self) -> list[str]:
        """Installed version directories, oldest install first."""
        if not self.root.is_dir():
            return []
        entries = [
            p
            for p in self.root.iterdir()
            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and _VERSION_RE.match(p.name)
        ]
        entries.sort(key=lambda p: (p.stat().st_mtime, p.name))
        return [p.name for p in entries]

    # -- locking ------------------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the update lock (released by the kernel if the process dies); raise UpdateLocked if taken."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                raise UpdateLocked(f"another update is running (pid {holder}, lock {path})") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            yield
        finally:
            os.close(fd)

    # -- staging ------------------------------------------------------------------------------------

    def new_staging_dir(self, version: str) -> Path:
        """A fresh empty directory for downloading and unpacking ``version``."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{check_version_name(version)}-", dir=self.root))

    def clean_leftovers(self) -> list[str]:
        """Remove staging/trash directories and temporary links of earlier, interrupted runs."""
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        for path in self.root.iterdir():
            if path.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
            elif path.name.startswith(_TMP_LINK_PREFIX) and path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path.name)
        if removed:
            log.info(
                "removed leftovers of an interrupted update", extra={"event": "update_leftovers", "removed": removed}
            )
        return removed

    def install(self, staging: Path, version: str) -> Path:
        """Rename a complete staging directory to ``models/<version>`` (one atomic step)."""
        final = self.version_dir(version)
        if final.exists():
            raise ModelsDirError(f"{final} already exists")
        _fsync_tree(staging)
        os.utime(staging)  # the install time orders versions for pruning
        os.rename(staging, final)
        fsync_dir(self.root)
        return final

    def discard(self, version: str) -> None:
        """Delete an installed, non-current version (renamed to .trash-* first, so never half visible)."""
        if version == self.current_version():
            raise ModelsDirError(f"refusing to delete {version}: it is the current model")
        path = self.version_dir(version)
        if not path.exists():
            return
        trash = self.root / f"{TRASH_PREFIX}{version}-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(path, trash)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    # -- switching ----------------------------------------------------------------------------------

    def switch_current(self, version: str) -> str | None:
        """Point ``current`` at an installed version atomically; return the version it pointed at before."""
        target = self.version_dir(version)
        if not target.is_dir():
            raise ModelsDirError(f"cannot switch to {version}: {target} is not installed")
        previous = self.current_version()
        if self.current_link.exists() and not self.current_link.is_symlink():
            raise ModelsDirError(
                f"{self.current_link} is a real directory, not a symlink; move it to {self.root}/<version> first"
            )
        tmp = self.root / f"{_TMP_LINK_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
        os.symlink(version, tmp)
        try:
            os.replace(tmp, self.current_link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.root)
        log.info(
            "current model switched",
            extra={"event": "current_switched", "version": version, "previous": previous},
        )
        return previous

    # -- pending confirmation -----------------------------------------------------------------------

    def read_pending(self) -> PendingSwitch | None:
        """The unconfirmed switch of an earlier run, if any."""
        data = _read_json(self.root / PENDING)
        if not isinstance(data, dict) or "version" not in data:
            return None
        return PendingSwitch(
            version=str(data["version"]), previous=data.get("previous"), started=float(data.get("started", 0))
        )

    def write_pending(self, pending: PendingSwitch) -> None:
        _write_json(
            self.root / PENDING, {"version": pending.version, "previous": pending.previous, "started": pending.started}
        )

    def clear_pending(self) -> None:
        (self.root / PENDING).unlink(missing_ok=True)
        fsync_dir(self.root)

    # -- failure memory -----------------------------------------------------------------------------

    def failed_versions(self) -> dict[str, dict[str, Any]]:
        """version -> {"reason", "step", "time"} for versions that failed here before."""
        data = _read_json(self.root / FAILED)
        return data if isinstance(data, dict) else {}

    def record_failure(self, version: str, step: str, reason: str) -> None:
        failed = self.failed_versions()
        failed[version] = {"step": step, "reason": reason, "time": time.time()}
        _write_json(self.root / FAILED, failed)

    def forget_failure(self, version: str) -> None:
        failed = self.failed_versions()
        if failed.pop(version, None) is not None:
            _write_json(self.root / FAILED, failed)

    # -- pruning ------------------------------------------------------------------------------------

    def index_serial(self) -> int:
        """The serial of the newest signed latest.json this box has accepted (0 before the first)."""
        data = _read_json(self.root / INDEX_STATE)
        serial = data.get("serial") if isinstance(data, dict) else None
        return serial if isinstance(serial, int) and serial >= 0 else 0

    def record_index_serial(self, serial: int) -> None:
        """Remember an accepted latest.json serial (only ever raised; under lock())."""
        if serial > self.index_serial():
            _write_json(self.root / INDEX_STATE, {"serial": serial})

    def prune(self, keep: int, protect: tuple[str | None, ...] = ()) -> list[str]:
        """Delete the oldest installed versions beyond ``keep`` (current and ``protect`` always stay)."""
        keep = max(1, keep)
        protected = {v for v in (self.current_version(), *protect) if v}
        versions = self.installed_versions()
        newest_first = list(reversed(versions))
        kept = [v for v in newest_first if v in protected]
        for version in newest_first:
            if len(kept) < keep and version not in kept:
                kept.append(version)
        removed = [v for v in versions if v not in kept]
        for version in removed:
            self.discard(version)
        if removed:
            log.info("old models removed", extra={"event": "models_pruned", "removed": removed, "kept": kept})
        return removed


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning(
            "ignoring unreadable %s: %s", path.name, exc, extra={"event": "models_state_unreadable", "path": str(path)}
        )
        return None


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True))


def _fsync_tree(root: Path) -> None:
    # A power cut after the rename must not leave a "complete" version with empty files.
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))
