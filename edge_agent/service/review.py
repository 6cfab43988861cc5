"""Review kept frames and feed them back to training: the logic under the review page and ``edge-agent review``.

Kept frames (edge_agent/service/keep.py) wait under ``keep.dir``. A person decides, per frame:

- **good** (a false alarm, or a sampled good frame worth training on): ``frame.png`` moves to
  ``<keep.training_dir>/good/<id>.png``; the folder goes away. ``edge-agent record --out
  <keep.training_dir>/good`` adds recorded images to the same folder.
- **defect** (a confirmed defect): ``frame.png`` and the NFA ``mask.png`` move to
  ``<keep.training_dir>/defect/<id>.png`` and ``<id>_mask.png`` (and the message to ``<id>.json``): a test
  example for ``uflow evaluate``, never a training image.

The moves are done through directory file descriptors opened with ``O_NOFOLLOW``: the training folder,
its ``good``/``defect`` folders, the kept folder and the files moved must all be real folders and regular
files, never symlinks, so whoever owns the state directory (the service user) cannot make ``sudo
edge-agent review`` move a file outside ``training_dir`` or pull a root-only file into it. Every move is
also checked against the training folder's free-space floor and quota (disk_budget.py).

``export_split`` turns the training folder into a dataset ``uflow train`` and ``uflow evaluate`` read as
is: ``split.json`` (training/data.py's ``split_json`` layout: ``train``, ``val``, ``test_good``,
``test_defect``; stems relative to the json's folder, ``STEM.jpg`` the image, ``STEM.png`` the mask) with
the images copied next to it. Good images are assigned to val / test_good / train by a hash of their name
(as training's own hold-out does), so adding images later does not reshuffle the earlier ones.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

from edge_agent.inspection.drivers import IMAGE_SUFFIXES
from edge_agent.service.disk_budget import BudgetExceeded, DiskBudget
from edge_agent.service.keep import FLAGGED, MESSAGE_NAME, PART, PART_MESSAGE_NAME, kept_folders

GOOD_DIR, DEFECT_DIR = "good", "defect"
DEFECT_TYPE = "confirmed"
# Files of a kept folder the page may show; nothing else is served from disk.
VIEWABLE = ("frame.png", "overlay.png", "mask.png", "anomaly_map.png")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
JPEG_QUALITY = 95
_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ReviewError(ValueError):
    """A review action that cannot be done; the message says why (unknown frame, bad id, ...)."""


@dataclass(frozen=True)
class KeptFrame:
    """One kept frame waiting for review."""

    id: str
    kind: str  # flagged | good | part
    sequence: int
    capture_time: float
    image_score: float
    anomalous: bool
    regions: int
    model: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "sequence": self.sequence,
            "capture_time": self.capture_time,
            "image_score": self.image_score,
            "anomalous": self.anomalous,
            "regions": self.regions,
            "model": self.model,
        }


def _read_kept(folder: Path) -> KeptFrame | None:
    try:
        message = json.loads((folder / MESSAGE_NAME).read_text(encoding="utf-8"))
        model = message.get("model") or {}
        part_path = folder / PART_MESSAGE_NAME
        # A kept part: the part's verdict (over all its frames) counts, not its deciding frame's alone.
        part = json.loads(part_path.read_text(encoding="utf-8")) if part_path.is_file() else None
        kind = PART if part is not None else FLAGGED if folder.name.endswith(f"-{FLAGGED}") else "good"
        return KeptFrame(
            id=folder.name,
            kind=kind,
            sequence=int(message.get("sequence", 0)),
            capture_time=float(message.get("capture_time", 0.0)),
            image_score=float(message.get("image_score", 0.0)),
            anomalous=bool((part or message).get("anomalous", False)),
            regions=len(message.get("regions") or []),
            model=f"{model.get('name', '?')} {model.get('version', '?')}",
        )
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # half-written or foreign folder: not listed


class ReviewStore:
    """Kept frames under ``kept_dir``; decisions move them into ``training_dir`` (thread-safe enough:
    one move per request, and a frame that is already gone is a clear error)."""

    def __init__(self, kept_dir: Path, training_dir: Path, budget: DiskBudget | None = None) -> None:
        """``budget``: the training folder's free-space floor and quota, checked before every move."""
        self.kept_dir = Path(kept_dir)
        self.training_dir = Path(training_dir)
        self.budget = budget

    def frames(self, limit: int = 200) -> list[KeptFrame]:
        """The kept frames, newest first."""
        found = (_read_kept(folder) for folder in reversed(kept_folders(self.kept_dir)))
        return [frame for frame in found if frame is not None][:limit]

    def folder(self, frame_id: str) -> Path:
        """The folder of one kept frame; ReviewError for a malformed or unknown id, or a symlink."""
        if not _ID.fullmatch(frame_id) or ".." in frame_id:
            raise ReviewError(f"not a kept frame id: {frame_id[:100]!r}")
        folder = self.kept_dir / frame_id
        if folder.is_symlink() or (folder / MESSAGE_NAME).is_symlink():
            raise ReviewError(f"kept frame {frame_id!r} is a symlink: refused")
        if not (folder / MESSAGE_NAME).is_file():
            raise ReviewError(f"no kept frame {frame_id!r} (already reviewed, or removed by the quota)")
        return folder

    def file(self, frame_id: str, name: str) -> Path:
        """One viewable file of a kept frame (VIEWABLE only, never a symlink)."""
        if name not in VIEWABLE:
            raise ReviewError(f"{name[:40]!r} is not one of {', '.join(VIEWABLE)}")
        path = self.folder(frame_id) / name
        if path.is_symlink() or not path.is_file():
            raise ReviewError(f"kept frame {frame_id!r} has no {name}")
        return path

    def mark_good(self, frame_id: str) -> Path:
        """The frame is good: its image joins the good training images; returns the new path."""
        self.folder(frame_id)
        self._move(frame_id, GOOD_DIR, [("frame.png", f"{frame_id}.png")])
        return self.training_dir / GOOD_DIR / f"{frame_id}.png"

    def confirm_defect(self, frame_id: str) -> Path:
        """The frame shows a real defect: image, NFA mask and message become a test example; returns the image."""
        folder = self.folder(frame_id)
        moves = [("mask.png", f"{frame_id}_mask.png"), (MESSAGE_NAME, f"{frame_id}.json")]
        if (folder / PART_MESSAGE_NAME).is_file():
            moves.append((PART_MESSAGE_NAME, f"{frame_id}_part.json"))
        moves.append(("frame.png", f"{frame_id}.png"))  # last: the image is what makes the example
        self._move(frame_id, DEFECT_DIR, moves)
        return self.training_dir / DEFECT_DIR / f"{frame_id}.png"

    def _move(self, frame_id: str, kind: str, moves: list[tuple[str, str]]) -> None:
        """Move ``moves`` (name in the kept folder, name in training_dir/kind) without following any symlink,
        then remove the kept folder."""
        with contextlib.ExitStack() as fds:
            kept = fds.enter_context(_dir_fd(self.kept_dir))
            source = fds.enter_context(_dir_fd(Path(frame_id), parent_fd=kept))
            training = fds.enter_context(_dir_fd(self.training_dir, create=True))
            target = fds.enter_context(_dir_fd(Path(kind), parent_fd=training, create=True))
            sizes = [_regular_size(name, source, frame_id) for name, _ in moves]
            if self.budget is not None:
                try:
                    self.budget.claim(sum(sizes))
                except BudgetExceeded as exc:
                    raise ReviewError(f"not moved into the training folder: {exc}") from exc
            for name, new_name in moves:
                _move_file(name, source, new_name, target)
            shutil.rmtree(frame_id, ignore_errors=True, dir_fd=kept)


@contextlib.contextmanager
def _dir_fd(path: Path, parent_fd: int | None = None, create: bool = False) -> Iterator[int]:
    """An fd of folder ``path`` whose last component is not a symlink (relative to ``parent_fd`` if given)."""
    if parent_fd is None:
        parent = path.parent
        if create:
            parent.mkdir(parents=True, exist_ok=True)
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        owned_parent = True
    else:
        owned_parent = False
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path.name, 0o755, dir_fd=parent_fd)
        try:
            fd = os.open(path.name, _DIR_NOFOLLOW, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ReviewError(f"{path} is a symlink or not a folder: refused") from exc
            if exc.errno == errno.ENOENT:
                raise ReviewError(f"{path} does not exist") from exc
            raise
    finally:
        if owned_parent:
            os.close(parent_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _regular_size(name: str, folder_fd: int, frame_id: str) -> int:
    """The size of regular file ``name`` in ``folder_fd``; ReviewError for a symlink or anything else."""
    try:
        info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError as exc:
        raise ReviewError(f"kept frame {frame_id!r} has no {name}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ReviewError(f"{name} of kept frame {frame_id!r} is not a regular file (a symlink?): refused")
    return info.st_size


def _move_file(name: str, source_fd: int, new_name: str, target_fd: int) -> None:
    """Rename across two folder fds; across file systems, copy without following links, then unlink."""
    try:
        os.rename(name, new_name, src_dir_fd=source_fd, dst_dir_fd=target_fd)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    reader = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=source_fd)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        writer = os.open(new_name, flags, 0o644, dir_fd=target_fd)
        try:
            while chunk := os.read(reader, 1 << 20):
                os.write(writer, chunk)
            os.fsync(writer)
        finally:
            os.close(writer)
    finally:
        os.close(reader)
    os.unlink(name, dir_fd=source_fd)


def _share(name: str) -> float:
    """A stable number in [0, 1) from a file name (the hold-out rule)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 2**32


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in p.stem
    )


def _stem(root: Path, path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.relative_to(root).with_suffix("").as_posix().replace("/", "__"))


def _write_jpeg(source: Path, target: Path) -> None:
    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    if image is None:
        raise ReviewError(f"cannot read image {source}")
    if not cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"could not write {target}")


def export_split(
    training_dir: Path, out: Path, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> dict[str, Any]:
    """Write ``out/split.json`` with the images of ``training_dir`` copied beside it; returns the split.

    Good images: a hashed ``val_fraction`` to val, a hashed ``test_fraction`` to test_good when there are
    confirmed defects to evaluate against (else none), the rest to train. Defects: test only, with masks.
    """
    training_dir, out = Path(training_dir), Path(out)
    goods = _images(training_dir / GOOD_DIR)
    defects = _images(training_dir / DEFECT_DIR)
    if not goods:
        raise ReviewError(f"no good images under {training_dir / GOOD_DIR}: record some or mark kept frames good")
    split: dict[str, Any] = {"train": [], "val": [], "test_good": [], "test_defect": {DEFECT_TYPE: []}}
    (out / GOOD_DIR).mkdir(parents=True, exist_ok=True)
    test_share = test_fraction if defects else 0.0
    for path in goods:
        stem = f"{GOOD_DIR}/{_stem(training_dir / GOOD_DIR, path)}"
        _write_jpeg(path, out / f"{stem}.jpg")
        share = _share(stem)
        key = "val" if share < val_fraction else "test_good" if share < val_fraction + test_share else "train"
        split[key].append(stem)
    if not split["train"]:  # a handful of images: training needs at least one
        split["train"].append(split["val"].pop() if split["val"] else split["test_good"].pop())
    if defects:
        (out / DEFECT_DIR).mkdir(parents=True, exist_ok=True)
    for path in defects:
        mask = path.with_name(f"{path.stem}_mask.png")
        if not mask.is_file():
            raise ReviewError(f"confirmed defect {path} has no mask {mask.name}")
        stem = f"{DEFECT_DIR}/{_stem(training_dir / DEFECT_DIR, path)}"
        _write_jpeg(path, out / f"{stem}.jpg")
        shutil.copyfile(mask, out / f"{stem}.png")
        split["test_defect"][DEFECT_TYPE].append(stem)
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")
    return split
