"""Review kept frames and feed them back to training: the logic under the review page and ``edge-agent review``.

Kept frames (edge_agent/service/keep.py) wait under ``keep.dir``. A person decides, per frame:

- **good** (a false alarm, or a sampled good frame worth training on): ``frame.png`` moves to
  ``<keep.training_dir>/good/<id>.png``; the folder goes away. ``edge-agent record --out
  <keep.training_dir>/good`` adds recorded images to the same folder.
- **defect** (a confirmed defect): ``frame.png`` and the NFA ``mask.png`` move to
  ``<keep.training_dir>/defect/<id>.png`` and ``<id>_mask.png`` (and the message to ``<id>.json``): a test
  example for ``uflow evaluate``, never a training image.

A decision copies the files into the training folder and parks the kept folder under
``<keep.dir>/.reviewed/`` (the last ``REVIEWED_KEPT``), so ``undo`` can put it back and remove the copies.
A defect's mask is the model's NFA mask unless a person corrected it (``MaskEdit``: polygons added to or
erased from the model's mask, or drawn on an empty one); ``<id>_review.json`` says which
(``mask_source``: ``model`` or ``person``), and split.json repeats it, so ``uflow evaluate`` can refuse to
grade the model's pixels against masks it drew itself. An empty mask is never stored.

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
import numpy as np

from edge_agent.inspection.drivers import IMAGE_SUFFIXES
from edge_agent.promise import FOLDER_CALIBRATION_SHARE
from edge_agent.service.disk_budget import BudgetExceeded, DiskBudget
from edge_agent.service.keep import FLAGGED, MESSAGE_NAME, PART, PART_MESSAGE_NAME, kept_folders

GOOD_DIR, DEFECT_DIR = "good", "defect"
DEFECT_TYPE = "confirmed"
# Files of a kept folder the page may show; nothing else is served from disk.
VIEWABLE = ("frame.png", "overlay.png", "mask.png", "anomaly_map.png", "strip.png")
REVIEWED_DIR = ".reviewed"  # decided folders, kept for undo (not listed: no inspection.json at the top level)
REVIEWED_KEPT = 50
REVIEW_SUFFIX = "_review.json"
MAX_POLYGONS, MAX_POINTS = 50, 500
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
JPEG_QUALITY = 95
# The good images the exported split.json holds out as val calibrate the NFA's false-alarm promise: the same
# share as ``uflow train`` holds out of a folder (training.data.DEFAULT_VAL_FRACTION says why).
EXPORT_VAL_FRACTION = FOLDER_CALIBRATION_SHARE
_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ReviewError(ValueError):
    """A review action that cannot be done; the message says why (unknown frame, bad id, ...)."""


@dataclass(frozen=True)
class MaskEdit:
    """A person's correction of the model's mask: polygons (frame pixels) added, then erased.

    ``base`` is ``model`` (start from the kept NFA mask) or ``empty`` (draw the defect from scratch).
    """

    base: str = "model"
    add: tuple[tuple[tuple[float, float], ...], ...] = ()
    erase: tuple[tuple[tuple[float, float], ...], ...] = ()

    @property
    def drawn(self) -> bool:
        """Whether a person changed anything (else the mask is still the model's)."""
        return self.base == "empty" or bool(self.add or self.erase)

    @classmethod
    def parse(cls, document: Any) -> MaskEdit:
        """From the page's JSON (``{"base": ..., "add": [[[x, y], ...], ...], "erase": [...]}``); ReviewError if bad."""
        if not isinstance(document, dict) or document.get("base", "model") not in ("model", "empty"):
            raise ReviewError("mask_edit must be {'base': 'model' | 'empty', 'add': [polygon, ...], 'erase': [...]}")
        polygons: dict[str, tuple[tuple[tuple[float, float], ...], ...]] = {}
        for key in ("add", "erase"):
            raw = document.get(key) or []
            if not isinstance(raw, list) or len(raw) > MAX_POLYGONS:
                raise ReviewError(f"mask_edit.{key}: a list of at most {MAX_POLYGONS} polygons")
            shapes = []
            for polygon in raw:
                if not isinstance(polygon, list) or not 3 <= len(polygon) <= MAX_POINTS:
                    raise ReviewError(f"mask_edit.{key}: a polygon has 3 to {MAX_POINTS} [x, y] points")
                try:
                    shapes.append(tuple((float(x), float(y)) for x, y in polygon))
                except (TypeError, ValueError) as exc:
                    raise ReviewError(f"mask_edit.{key}: points are [x, y] numbers") from exc
            polygons[key] = tuple(shapes)
        return cls(str(document.get("base", "model")), polygons["add"], polygons["erase"])

    def apply(self, model_mask: np.ndarray) -> np.ndarray:
        """The corrected uint8 mask (0 / 255) at the model mask's size."""
        mask = model_mask.copy() if self.base == "model" else np.zeros_like(model_mask)
        for polygons, value in ((self.add, 255), (self.erase, 0)):
            for polygon in polygons:
                points = np.rint(np.asarray(polygon, dtype=np.float64)).astype(np.int32)
                cv2.fillPoly(mask, [points], value)
        return mask


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
    caption: str = ""  # what the pictures say (a part's verdict for a kept part)
    part_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "caption": self.caption,
            "part_id": self.part_id,
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
        evidence_path = folder / "evidence.json"
        evidence = json.loads(evidence_path.read_text(encoding="utf-8")) if evidence_path.is_file() else {}
        verdict = "ANOMALOUS" if message.get("anomalous") else "good"
        caption = evidence.get("caption") or f"frame {message.get('sequence', 0)} {verdict}"
        return KeptFrame(
            caption=str(caption),
            part_id=part.get("part_id") if part else None,
            id=folder.name,
            kind=kind,
            sequence=int(message.get("sequence", 0)),
            capture_time=float(message.get("capture_time", 0.0)),
            image_score=float(message.get("image_score", 0.0)),
            anomalous=bool((part or message).get("anomalous", False)),
            regions=len((part or message).get("regions") or []),
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

    def frames(self, limit: int = 200, kind: str | None = None, offset: int = 0) -> list[KeptFrame]:
        """The kept frames, newest first (``kind``: only parts, flagged or good frames; ``offset``: paging)."""
        found = (_read_kept(folder) for folder in reversed(kept_folders(self.kept_dir)))
        frames = [frame for frame in found if frame is not None and (kind is None or frame.kind == kind)]
        return frames[offset : offset + limit]

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

    def confirm_defect(self, frame_id: str, edit: MaskEdit | None = None) -> Path:
        """The frame shows a real defect: image, mask and message become a test example; returns the image.

        ``edit``: a person's correction of the model's mask (``mask_source: person``); without one the
        model's NFA mask is stored as is (``mask_source: model``). An empty mask is refused.
        """
        folder = self.folder(frame_id)
        model_mask = _read_mask(folder, frame_id)
        drawn = edit is not None and edit.drawn
        mask = edit.apply(model_mask) if edit is not None and drawn else model_mask
        if not mask.any():
            # An empty mask says "the defect is nowhere": pixel metrics would grade the model on nothing.
            raise ReviewError(f"kept frame {frame_id!r} has an empty defect mask: draw the defect first")
        review = {"mask_source": "person" if drawn else "model", "mask_pixels": int((mask > 0).sum())}
        written = {f"{frame_id}{REVIEW_SUFFIX}": json.dumps(review).encode() + b"\n"}
        moves = [(MESSAGE_NAME, f"{frame_id}.json")]
        if drawn:  # the person's mask is written; the model's stays in the parked folder (undo)
            ok, encoded = cv2.imencode(".png", np.where(mask > 0, 255, 0).astype(np.uint8))
            if not ok:
                raise ReviewError(f"cannot encode the mask of {frame_id!r}")
            written[f"{frame_id}_mask.png"] = encoded.tobytes()
        else:
            moves.insert(0, ("mask.png", f"{frame_id}_mask.png"))
        if (folder / PART_MESSAGE_NAME).is_file():
            moves.append((PART_MESSAGE_NAME, f"{frame_id}_part.json"))
        moves.append(("frame.png", f"{frame_id}.png"))  # last: the image is what makes the example
        self._move(frame_id, DEFECT_DIR, moves, written)
        return self.training_dir / DEFECT_DIR / f"{frame_id}.png"

    def undo(self, frame_id: str) -> Path:
        """Take back a decision: the files go back into the parked kept folder, which returns; returns it."""
        if not _ID.fullmatch(frame_id) or ".." in frame_id:
            raise ReviewError(f"not a kept frame id: {frame_id[:100]!r}")
        with contextlib.ExitStack() as fds:
            kept = fds.enter_context(_dir_fd(self.kept_dir))
            try:
                parked_root = fds.enter_context(_dir_fd(Path(REVIEWED_DIR), parent_fd=kept))
                parked = fds.enter_context(_dir_fd(Path(frame_id), parent_fd=parked_root))
            except ReviewError as exc:
                message = f"no decision on {frame_id!r} to undo (only the last {REVIEWED_KEPT} can be)"
                raise ReviewError(message) from exc
            training = fds.enter_context(_dir_fd(self.training_dir, create=True))
            good = self.training_dir / GOOD_DIR / f"{frame_id}.png"
            kind = GOOD_DIR if good.is_file() and not good.is_symlink() else DEFECT_DIR
            target = fds.enter_context(_dir_fd(Path(kind), parent_fd=training, create=True))
            back = [(f"{frame_id}.png", "frame.png")]
            if kind == DEFECT_DIR:
                back += [(f"{frame_id}.json", MESSAGE_NAME), (f"{frame_id}_part.json", PART_MESSAGE_NAME)]
                back.append((f"{frame_id}_mask.png", "mask.png"))
            for name, old_name in back:
                if name.endswith("_mask.png") and _exists(old_name, parked):
                    os.unlink(name, dir_fd=target)  # a person's mask: the model's is still in the folder
                elif _exists(name, target):
                    _regular_size(name, target, frame_id)
                    _move_file(name, target, old_name, parked)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{frame_id}{REVIEW_SUFFIX}", dir_fd=target)
            os.rename(frame_id, frame_id, src_dir_fd=parked_root, dst_dir_fd=kept)
        return self.kept_dir / frame_id

    def _move(
        self, frame_id: str, kind: str, moves: list[tuple[str, str]], written: dict[str, bytes] | None = None
    ) -> None:
        """Move ``moves`` (name in the kept folder, name in training_dir/kind) and write ``written`` there without
        following any symlink, then park the kept folder under .reviewed/ (for undo)."""
        with contextlib.ExitStack() as fds:
            kept = fds.enter_context(_dir_fd(self.kept_dir))
            source = fds.enter_context(_dir_fd(Path(frame_id), parent_fd=kept))
            training = fds.enter_context(_dir_fd(self.training_dir, create=True))
            target = fds.enter_context(_dir_fd(Path(kind), parent_fd=training, create=True))
            sizes = [_regular_size(name, source, frame_id) for name, _ in moves]
            sizes += [len(data) for data in (written or {}).values()]
            if self.budget is not None:
                try:
                    self.budget.claim(sum(sizes))
                except BudgetExceeded as exc:
                    raise ReviewError(f"not moved into the training folder: {exc}") from exc
            for name, data in (written or {}).items():
                _write_file(name, data, target)
            for name, new_name in moves:
                _move_file(name, source, new_name, target)
            parked = fds.enter_context(_dir_fd(Path(REVIEWED_DIR), parent_fd=kept, create=True))
            shutil.rmtree(frame_id, ignore_errors=True, dir_fd=parked)  # an older decision on the same id
            os.rename(frame_id, frame_id, src_dir_fd=kept, dst_dir_fd=parked)
            os.utime(frame_id, dir_fd=parked, follow_symlinks=False)
            _prune_parked(parked)


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


def _exists(name: str, folder_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _write_file(name: str, data: bytes, folder_fd: int) -> None:
    """A new regular file in ``folder_fd`` (never through a symlink)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o644, dir_fd=folder_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read_mask(folder: Path, frame_id: str) -> np.ndarray:
    """The kept mask.png (a regular file, never through a symlink) as a uint8 array."""
    try:
        fd = os.open(folder / "mask.png", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ReviewError(f"kept frame {frame_id!r} has no mask.png (or it is a symlink): {exc.strerror}") from exc
    try:
        data = b""
        while chunk := os.read(fd, 1 << 20):
            data += chunk
    finally:
        os.close(fd)
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ReviewError(f"kept frame {frame_id!r}: mask.png is not a readable image")
    return mask


def _prune_parked(parked_fd: int) -> None:
    """Keep the newest REVIEWED_KEPT parked folders."""
    entries = []
    for name in os.listdir(parked_fd):
        info = os.stat(name, dir_fd=parked_fd, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            entries.append((info.st_mtime, name))
    for _, name in sorted(entries)[:-REVIEWED_KEPT]:
        shutil.rmtree(name, ignore_errors=True, dir_fd=parked_fd)


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


def _mask_source(image: Path) -> str:
    """``person`` when the review recorded a drawn mask, else ``model`` (no record: nobody drew it)."""
    try:
        review = json.loads(image.with_name(f"{image.stem}{REVIEW_SUFFIX}").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "model"
    return "person" if isinstance(review, dict) and review.get("mask_source") == "person" else "model"


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
    training_dir: Path, out: Path, val_fraction: float = EXPORT_VAL_FRACTION, test_fraction: float = 0.1
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
    split: dict[str, Any] = {
        "train": [],
        "val": [],
        "test_good": [],
        "test_defect": {DEFECT_TYPE: []},
        "mask_source": {},  # defect stem -> "person" (drawn or corrected) or "model" (the agent's own NFA mask)
    }
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
    if test_share and not split["test_good"] and len(split["train"]) > 1:
        split["test_good"].append(split["train"].pop())  # evaluation needs a good image beside the defects
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
        split["mask_source"][stem] = _mask_source(path)
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")
    return split
