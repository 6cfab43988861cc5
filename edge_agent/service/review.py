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

``export_split`` turns the training folder into a dataset ``uflow train`` and ``uflow evaluate`` read as
is: ``split.json`` (training/data.py's ``split_json`` layout: ``train``, ``val``, ``test_good``,
``test_defect``; stems relative to the json's folder, ``STEM.jpg`` the image, ``STEM.png`` the mask) with
the images copied next to it. Good images are assigned to val / test_good / train by a hash of their name
(as training's own hold-out does), so adding images later does not reshuffle the earlier ones.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.inspection.drivers import IMAGE_SUFFIXES
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

    def __init__(self, kept_dir: Path, training_dir: Path) -> None:
        self.kept_dir = Path(kept_dir)
        self.training_dir = Path(training_dir)

    def frames(self, limit: int = 200, kind: str | None = None, offset: int = 0) -> list[KeptFrame]:
        """The kept frames, newest first (``kind``: only parts, flagged or good frames; ``offset``: paging)."""
        found = (_read_kept(folder) for folder in reversed(kept_folders(self.kept_dir)))
        frames = [frame for frame in found if frame is not None and (kind is None or frame.kind == kind)]
        return frames[offset : offset + limit]

    def folder(self, frame_id: str) -> Path:
        """The folder of one kept frame; ReviewError for a malformed or unknown id."""
        if not _ID.match(frame_id) or ".." in frame_id:
            raise ReviewError(f"not a kept frame id: {frame_id[:100]!r}")
        folder = self.kept_dir / frame_id
        if not (folder / MESSAGE_NAME).is_file():
            raise ReviewError(f"no kept frame {frame_id!r} (already reviewed, or removed by the quota)")
        return folder

    def file(self, frame_id: str, name: str) -> Path:
        """One viewable file of a kept frame (VIEWABLE only)."""
        if name not in VIEWABLE:
            raise ReviewError(f"{name[:40]!r} is not one of {', '.join(VIEWABLE)}")
        path = self.folder(frame_id) / name
        if not path.is_file():
            raise ReviewError(f"kept frame {frame_id!r} has no {name}")
        return path

    def mark_good(self, frame_id: str) -> Path:
        """The frame is good: its image joins the good training images; returns the new path."""
        folder = self.folder(frame_id)
        target = self.training_dir / GOOD_DIR / f"{frame_id}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / "frame.png", target)
        self._park(folder)
        return target

    def confirm_defect(self, frame_id: str, edit: MaskEdit | None = None) -> Path:
        """The frame shows a real defect: image, mask and message become a test example; returns the image.

        ``edit``: a person's correction of the model's mask (``mask_source: person``); without one the
        model's NFA mask is stored as is (``mask_source: model``). An empty mask is refused.
        """
        folder = self.folder(frame_id)
        model_mask = cv2.imread(str(folder / "mask.png"), cv2.IMREAD_GRAYSCALE)
        if model_mask is None:
            raise ReviewError(f"kept frame {frame_id!r} has no readable mask.png")
        drawn = edit is not None and edit.drawn
        mask = edit.apply(model_mask) if edit is not None and drawn else model_mask
        if not mask.any():
            # An empty mask says "the defect is nowhere": pixel metrics would grade the model on nothing.
            raise ReviewError(f"kept frame {frame_id!r} has an empty defect mask: draw the defect first")
        target = self.training_dir / DEFECT_DIR / f"{frame_id}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(target.with_name(f"{frame_id}_mask.png")), np.where(mask > 0, 255, 0).astype(np.uint8)):
            raise OSError(f"could not write the mask of {frame_id}")
        shutil.copyfile(folder / MESSAGE_NAME, target.with_suffix(".json"))
        if (folder / PART_MESSAGE_NAME).is_file():
            shutil.copyfile(folder / PART_MESSAGE_NAME, target.with_name(f"{frame_id}_part.json"))
        review = {"mask_source": "person" if drawn else "model", "mask_pixels": int((mask > 0).sum())}
        target.with_name(f"{frame_id}{REVIEW_SUFFIX}").write_text(json.dumps(review) + "\n", encoding="utf-8")
        shutil.copyfile(folder / "frame.png", target)
        self._park(folder)
        return target

    def undo(self, frame_id: str) -> Path:
        """Take back a decision: the training copies go, the kept folder comes back; returns it."""
        if not _ID.match(frame_id) or ".." in frame_id:
            raise ReviewError(f"not a kept frame id: {frame_id[:100]!r}")
        parked = self.kept_dir / REVIEWED_DIR / frame_id
        if not (parked / MESSAGE_NAME).is_file():
            raise ReviewError(f"no decision on {frame_id!r} to undo (only the last {REVIEWED_KEPT} can be)")
        suffixes = (".png", "_mask.png", ".json", "_part.json", REVIEW_SUFFIX)
        for path in [self.training_dir / GOOD_DIR / f"{frame_id}.png"] + [
            self.training_dir / DEFECT_DIR / f"{frame_id}{suffix}" for suffix in suffixes
        ]:
            path.unlink(missing_ok=True)
        target = self.kept_dir / frame_id
        shutil.move(parked, target)
        return target

    def _park(self, folder: Path) -> None:
        """Move a decided folder under .reviewed/ (for undo), keeping the newest REVIEWED_KEPT."""
        parked = self.kept_dir / REVIEWED_DIR
        parked.mkdir(exist_ok=True)
        shutil.rmtree(parked / folder.name, ignore_errors=True)
        shutil.move(folder, parked / folder.name)
        (parked / folder.name).touch()
        old = sorted((p for p in parked.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for stale in old[:-REVIEWED_KEPT]:
            shutil.rmtree(stale, ignore_errors=True)


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
