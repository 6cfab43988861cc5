"""A kept part's folder: the frame that shows its evidence, the part outlined, a contact sheet, and part.json.

Written by the keeper's writer thread (edge_agent/service/keep.py) for an anomalous part in tracked or
triggered mode. The folder ``<YYYYmmdd-HHMMSS>-seq<sequence>-part-<part_id>`` holds:

- ``frame.png``: the evidence frame: the frame the part's decision names (its strongest region's
  ``best_sequence``) when the part frame book held it, else the part's frame with the lowest log10 NFA;
- ``overlay.png``: that frame with the heat map, the NFA outline, the part outlined and the part's regions
  boxed; its caption is the *part's* verdict (a frame's own verdict is not what was decided);
- ``mask.png``: where the defect is in ``frame.png``, never empty (``part_mask``);
- ``strip.png``: a crop of the part from each of its frames, the shown frame marked;
- ``anomaly_map.*``, ``log_nfa.npy``, ``inspection.json``: the shown frame's maps and published message;
- ``part.json``: the part message; ``evidence.json``: which frame is shown and why, the strip's frames and
  the caption, so the review page says exactly what the pictures say.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import cv2
import numpy as np

from edge_agent.inspection.overlay import detection_mask, draw_overlay, heat_map
from edge_agent.inspection.pipeline import FrameJob
from edge_agent.inspection.scoring import resize_map
from edge_agent.messages import PartMessage, Region
from edge_agent.service.part_frames import PartEvidence, best_sequence, view_log_nfa

PART_BGR = (255, 200, 0)
BEST_BGR = (0, 0, 255)
EVIDENCE_NAME = "evidence.json"
STRIP_NAME = "strip.png"
CANDIDATE_SLACK = 1.0  # as [parts] candidate_slack: a place counts from log10 NFA < epsilon + this


def part_caption(part: PartMessage, shown: int | None = None) -> str:
    """The part's verdict in words, the same on the overlay, the review page and evidence.json."""
    number = part.part_id.rsplit("-", 1)[-1]
    verdict = "REJECTED" if part.anomalous else "good"
    relation = "<" if part.log_nfa < part.log10_epsilon else ">="
    text = (
        f"part #{number} {verdict}: log10 NFA {part.log_nfa:.1f} {relation} {part.log10_epsilon:g} "
        f"over {part.frames.count} frame(s)"
    )
    return text + (f", shown: frame {shown}" if shown is not None else "")


def save_part(job: FrameJob, part: PartMessage, evidence: PartEvidence | None, directory: Path) -> dict[str, str]:
    """Write the part's folder under ``directory`` (see the module docstring); returns name -> path."""
    shot_job = evidence.shot.job if evidence is not None else job
    frame, verdict = shot_job.frame, shot_job.verdict
    height, width = frame.image.shape[:2]
    columns = (evidence.shot.x0, evidence.shot.x1) if evidence is not None else (0, width)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(frame.capture_time))
    folder = Path(directory) / f"{stamp}-seq{frame.sequence:06d}-part-{part.part_id}"
    folder.mkdir(parents=True, exist_ok=True)
    anomaly = resize_map(verdict.anomaly_map, width, height)
    log_nfa = resize_map(verdict.log_nfa, width, height)
    boxes = _part_boxes(part, frame.sequence, frame.roi_offset)
    caption = part_caption(part, frame.sequence)
    number = part.part_id.rsplit("-", 1)[-1]
    title = (  # the overlay's one line (the full caption is in evidence.json and on the review page)
        f"part #{number} {'REJECTED' if part.anomalous else 'good'}: log10 NFA {part.log_nfa:.1f}"
        f" {'<' if part.log_nfa < part.log10_epsilon else '>='} {part.log10_epsilon:g}, frame {frame.sequence}"
    )
    files = {name: folder / name for name in ("frame.png", "anomaly_map.png", "mask.png", "overlay.png", STRIP_NAME)}
    _write(files["frame.png"], frame.image)
    np.save(folder / "anomaly_map.npy", np.asarray(verdict.anomaly_map, dtype=np.float32))
    np.save(folder / "log_nfa.npy", np.asarray(verdict.log_nfa, dtype=np.float32))
    _write(files["anomaly_map.png"], heat_map(anomaly))
    _write(files["mask.png"], part_mask(log_nfa, part.log10_epsilon, columns, boxes).astype(np.uint8) * 255)
    _write(files["overlay.png"], _overlay(frame.image, anomaly, log_nfa, part, boxes, columns, title))
    thumbs = evidence.thumbs if evidence is not None else ()
    _write(files[STRIP_NAME], contact_sheet(thumbs, frame.sequence))
    (folder / "inspection.json").write_text(shot_job.message.to_json() + "\n", encoding="utf-8")
    (folder / "part.json").write_text(part.to_json() + "\n", encoding="utf-8")
    named = best_sequence(part)
    facts = {
        "part_id": part.part_id,
        "anomalous": part.anomalous,
        "log_nfa": part.log_nfa,
        "log10_epsilon": part.log10_epsilon,
        "shown_sequence": frame.sequence,
        "best_sequence": named,
        "shown_is_best": named == frame.sequence,
        "shown_view_log_nfa": round(view_log_nfa(shot_job, *columns), 4),
        "part_columns": list(columns),
        "strip_sequences": [sequence for sequence, _ in thumbs],
        "caption": caption,
    }
    (folder / EVIDENCE_NAME).write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")
    return {"frame": str(files["frame.png"]), "folder": str(folder)}


def _part_boxes(part: PartMessage, sequence: int, offset: tuple[int, int]) -> list[Region]:
    """The part's regions whose best frame is the shown one, as boxes in its image (ROI) pixels."""
    ox, oy = offset
    return [
        Region(
            bbox=(r.best_bbox[0] - ox, r.best_bbox[1] - oy, r.best_bbox[2], r.best_bbox[3]),
            area=max(1, r.best_bbox[2] * r.best_bbox[3]),
            log_nfa=r.log_nfa,
            max_score=0.0,
        )
        for r in part.regions
        if r.best_sequence == sequence and r.log_nfa < part.log10_epsilon
    ]


def part_mask(log_nfa: np.ndarray, log10_epsilon: float, columns: tuple[int, int], boxes: list[Region]) -> np.ndarray:
    """Where the part's defect is in the shown frame (boolean, image size), never empty.

    In order, the first that is not empty: the NFA detection (log10 NFA < epsilon) on the part's columns;
    the candidate level (epsilon + CANDIDATE_SLACK) inside the part's region boxes; those boxes; the
    part's most significant pixels (within 1 of its lowest log10 NFA). A confirmed defect with an empty
    mask would teach the evaluation that the defect is nowhere.
    """
    x0, x1 = columns
    on_part = np.zeros(log_nfa.shape, dtype=bool)
    on_part[:, max(0, x0) : max(x0 + 1, x1)] = True
    mask = detection_mask(log_nfa, log10_epsilon) & on_part
    if mask.any():
        return mask
    in_boxes = np.zeros_like(mask)
    for region in boxes:
        x, y, w, h = region.bbox
        in_boxes[max(0, y) : y + h, max(0, x) : x + w] = True
    for candidate in (detection_mask(log_nfa, log10_epsilon + CANDIDATE_SLACK) & in_boxes, in_boxes):
        if candidate.any():
            return candidate
    lowest = float(log_nfa[on_part].min()) if on_part.any() else float(log_nfa.min())
    return (log_nfa <= lowest + 1.0) & (on_part if on_part.any() else True)


def _overlay(
    image: np.ndarray,
    anomaly: np.ndarray,
    log_nfa: np.ndarray,
    part: PartMessage,
    boxes: list[Region],
    columns: tuple[int, int],
    caption: str,
) -> np.ndarray:
    width = image.shape[1]
    factor = max(1, -(-512 // width))
    canvas = draw_overlay(image, anomaly, log_nfa, part.log10_epsilon, boxes, caption, min_width=512)
    x0, x1 = columns
    thickness = max(2, round(factor))
    bottom = image.shape[0] * factor - 1
    cv2.rectangle(canvas, (x0 * factor, 0), (x1 * factor - 1, bottom), PART_BGR, thickness)
    label = "part #" + part.part_id.rsplit("-", 1)[-1]
    origin = (x0 * factor + 4, 18)
    cv2.putText(canvas, label, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(canvas, label, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.55, PART_BGR, 1, cv2.LINE_AA)
    return canvas


def contact_sheet(thumbs: tuple[tuple[int, np.ndarray], ...], shown: int) -> np.ndarray:
    """The part's crops side by side with their frame numbers, the shown frame framed in red."""
    label_h, gap = 18, 4
    if not thumbs:
        sheet = np.full((label_h + 32, 240, 3), 32, dtype=np.uint8)
        cv2.putText(sheet, "no frames of this part", (6, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (220, 220, 220), 1)
        return sheet
    height = max(t.shape[0] for _, t in thumbs)
    tiles = []
    for sequence, thumb in thumbs:
        tile = np.full((height + label_h + 2 * gap, max(thumb.shape[1], 40) + 2 * gap, 3), 32, dtype=np.uint8)
        tile[gap : gap + thumb.shape[0], gap : gap + thumb.shape[1]] = thumb
        best = sequence == shown
        colour = BEST_BGR if best else (200, 200, 200)
        if best:
            cv2.rectangle(tile, (0, 0), (tile.shape[1] - 1, tile.shape[0] - 1), BEST_BGR, gap - 1)
        text = f"{sequence}" + ("*" if best else "")
        cv2.putText(tile, text, (gap, height + gap + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
        tiles.append(tile)
    sheet = np.hstack(tiles)
    columns = max(1, math.ceil(sheet.shape[1] / 1600))  # wrap very long strips onto rows of at most 1600 px
    if columns > 1:
        per_row = math.ceil(len(tiles) / columns)
        rows = [np.hstack(tiles[i : i + per_row]) for i in range(0, len(tiles), per_row)]
        widest = max(r.shape[1] for r in rows)
        sheet = np.vstack([np.pad(r, ((0, 0), (0, widest - r.shape[1]), (0, 0)), constant_values=32) for r in rows])
    return sheet


def _write(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path} (disk full or not writable?)")
