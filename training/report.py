"""The evaluation report people look at: ``report.html`` with metric tables and one PNG grid per type.

Each grid row is one test image: image | ground truth (red outline) | anomaly map (colour, one
scale for the whole test set) | NFA mask (in green over the image, ground truth
outline in red; the mask is log10 NFA below the decision's epsilon, the bundle's or the run's). The sample is deterministic: evenly spaced images of each type.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from training.data import Record

REPORT_NAME = "report.html"
IMAGES_DIR = "images"
_RED = (0, 0, 255)  # BGR
_GREEN = (0, 200, 0)
_LABEL_HEIGHT = 22


class TestSet(Protocol):
    """What the report reads of the test set (training.evaluate.TestSet; the report does not import it)."""

    # Read-only properties, so that the dataclass's tuple of records matches the Sequence here.
    @property
    def records(self) -> Sequence[Record]: ...
    @property
    def images(self) -> np.ndarray: ...  # uint8 (N, H, W, 3)
    @property
    def masks(self) -> np.ndarray: ...  # bool (N, H, W)
    @property
    def labels(self) -> np.ndarray: ...  # bool (N,)

    @property
    def types(self) -> list[str]: ...


class Predictions(Protocol):
    """What the report reads of the predictions (training.evaluate.Predictions)."""

    anomaly_maps: np.ndarray  # float32 (N, H, W)
    log10_epsilon: float  # the threshold the grid's detection outlines are drawn at


def sample_indices(indices: np.ndarray, count: int) -> list[int]:
    """``count`` evenly spaced entries of ``indices`` (all of them when there are fewer)."""
    if len(indices) <= count:
        return [int(i) for i in indices]
    picks = np.linspace(0, len(indices) - 1, count).round().astype(int)
    return [int(indices[p]) for p in picks]


def _outline(canvas: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(canvas, contours, -1, colour, 1)


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((_LABEL_HEIGHT, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, tile])


def grid_row(
    image_rgb: np.ndarray,
    mask: np.ndarray,
    amap: np.ndarray,
    log_nfa: np.ndarray,
    span: tuple[float, float],
    name: str,
    log10_epsilon: float = 0.0,
    detected: np.ndarray | None = None,
) -> np.ndarray:
    """One BGR row: image | ground truth | anomaly map | NFA mask, each tile captioned.

    ``detected``: the decision's mask (the NFA's regions tightened to their peaks); default the NFA's own.
    """
    image = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    truth = _outline(image.copy(), mask, _RED)
    low, high = span
    if low > 0.0 and high > 1.0:
        # The heads' fused map (a mean of m / null mean: about 1 on good parts, up to hundreds on defects) is
        # shown on a log scale, or a single large defect would leave every other map one colour.
        scaled = np.clip(np.log(np.maximum(amap, low) / low) / max(math.log(high / low), 1e-12), 0.0, 1.0)
    else:
        scaled = np.clip((amap - low) / max(high - low, 1e-12), 0.0, 1.0)
    heat = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    caption = "NFA mask" if detected is None else "decision mask"  # the NFA's regions, or tightened to their peaks
    if detected is None:
        detected = log_nfa < log10_epsilon
    overlay = image.copy()
    overlay[detected] = (0.45 * overlay[detected] + 0.55 * np.array(_GREEN)).astype(np.uint8)
    overlay = _outline(overlay, mask, _RED)
    tiles = [
        _label(image, name[:40]),
        _label(truth, "ground truth"),
        _label(heat, f"anomaly map, max {amap.max():.3f}"),
        _label(overlay, f"{caption}, min log10 NFA {log_nfa.min():.0f}"),
    ]
    spacer = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    parts = []
    for tile in tiles:
        parts += [tile, spacer]
    return np.hstack(parts[:-1])


def decision_errors(test: TestSet, log_nfa: np.ndarray, log10_epsilon: float) -> dict[str, list[int]]:
    """The decision's two kinds of error, worst first, as test indices.

    ``false rejects``: good images with a region below ``log10_epsilon``, strongest evidence (lowest
    log10 NFA) first. ``escapes``: defective images without one, largest defect first (a large defect
    that passes is the worst escape a line can have).
    """
    lowest = np.asarray(log_nfa).reshape(len(log_nfa), -1).min(axis=1)
    flagged = lowest < log10_epsilon
    labels = np.asarray(test.labels, dtype=bool)
    false_rejects = np.flatnonzero(~labels & flagged)
    escapes = np.flatnonzero(labels & ~flagged)
    defect_area = np.asarray(test.masks).reshape(len(labels), -1).sum(axis=1)
    return {
        "false rejects": [int(i) for i in false_rejects[np.argsort(lowest[false_rejects], kind="stable")]],
        "escapes": [int(i) for i in escapes[np.argsort(-defect_area[escapes], kind="stable")]],
    }


def _write_grid(out_dir: Path, rel: str, rows: list[np.ndarray]) -> None:
    gap = np.full((6, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.vstack([part for row in rows for part in (row, gap)][:-1])
    if not cv2.imwrite(str(out_dir / rel), grid):
        raise OSError(f"could not write {out_dir / rel}")


def write_grids(
    out_dir: Path,
    test: TestSet,
    predictions: Predictions,
    log_nfa: np.ndarray,
    samples_per_type: int,
    errors: dict[str, list[int]] | None = None,
    detected: np.ndarray | None = None,
) -> dict[str, str]:
    """One PNG per type under ``out_dir/images``, and one per kind of decision error (its worst
    ``samples_per_type``) when ``errors`` has any; returns name -> relative path."""
    folder = out_dir / IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    amaps = predictions.anomaly_maps
    # One colour scale for the whole test set, robust to a few extreme pixels: the fused map of a bundle
    # with heads is unbounded (one image at 1000 would paint every other map blue).
    span = (float(np.quantile(amaps[~test.labels], 0.01)), float(np.quantile(amaps, 0.999)))  # log scale above 1

    def row(i: int) -> np.ndarray:
        record = test.records[i]
        return grid_row(
            test.images[i],
            test.masks[i],
            amaps[i],
            log_nfa[i],
            span,
            record.image.name,
            predictions.log10_epsilon,
            None if detected is None else detected[i],
        )

    types = np.array([r.defect_type for r in test.records])
    written = {}
    for kind in test.types:
        rel = f"{IMAGES_DIR}/{kind}.png"
        _write_grid(out_dir, rel, [row(i) for i in sample_indices(np.flatnonzero(types == kind), samples_per_type)])
        written[kind] = rel
    for kind, indices in (errors or {}).items():
        if indices:
            rel = f"{IMAGES_DIR}/{kind.replace(' ', '_')}.png"
            _write_grid(out_dir, rel, [row(i) for i in indices[:samples_per_type]])
            written[kind] = rel
    return written


def _errors_html(test: TestSet, errors: dict[str, list[int]], log_nfa: np.ndarray, grids: dict[str, str]) -> str:
    """The decision's errors by name (all of them, up to 100 each), with their grids."""
    labels = np.asarray(test.labels, dtype=bool)
    totals = {"false rejects": int((~labels).sum()), "escapes": int(labels.sum())}
    what = {"false rejects": "good images the decision flags", "escapes": "defective images it lets pass"}
    parts = []
    for kind, indices in errors.items():
        parts.append(f"<h3>{html.escape(kind)}: {len(indices)} of {totals[kind]} {what[kind]}</h3>")
        if not indices:
            continue
        items = "".join(
            f"<li>{html.escape(test.records[i].image.name)} ({html.escape(test.records[i].defect_type)}, "
            + (f"defect {int(np.asarray(test.masks[i]).sum())} px, " if labels[i] else "")
            + f"min log10 NFA {float(np.min(log_nfa[i])):.1f})</li>"
            for i in indices[:100]
        )
        parts.append(f"<ol>{items}</ol>")
        if kind in grids:
            parts.append(f"<img src='{html.escape(grids[kind])}' alt='{html.escape(kind)}'>")
    return "".join(parts)


def _table(result: dict[str, Any]) -> str:
    keys = [
        ("pixel_auroc", "pixel AUROC"),
        ("aupro", "AUPRO@0.3"),
        ("image_auroc", "image AUROC"),
        ("image_auroc_nfa", "image AUROC (NFA evidence)"),
        ("miou_nfa", "mIoU (NFA)"),
        ("miou_oracle", "mIoU (oracle)"),
        ("nfa_flagged_defect", "NFA flagged defect"),
        ("nfa_flagged_good", "NFA flagged good"),
        ("images", "images"),
    ]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in keys)
    rows = []
    for name, values in [("overall", result["overall"]), *result["per_type"].items()]:
        cells = []
        for key, _ in keys:
            value = values.get(key, "")
            cells.append(f"<td>{value:.3f}</td>" if isinstance(value, float) else f"<td>{value}</td>")
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>subset</th>{head}</tr>{''.join(rows)}</table>"


def _latent_table(result: dict[str, Any]) -> str:
    rows = []
    for scale in result["latents"]:
        cells = [f"{scale['scale']}", f"{scale['channels']}", f"{scale['height']}x{scale['width']}"]
        for part in ("good_images", "defect_cells", "defect_cells_max_per_image"):
            stats = scale[part]
            cells.append(", ".join(f"{k} {stats[k]:.2f}" for k in ("mean", "p90", "p99") if k in stats))
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = "<tr><th>scale</th><th>C</th><th>map</th><th>m on good images</th><th>m on defect cells</th><th>max m per defect image</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def write_report(
    out_dir: Path,
    result: dict[str, Any],
    test: TestSet,
    predictions: Predictions,
    log_nfa: np.ndarray,
    samples_per_type: int,
    detected: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write report.html and the grids; returns what was written (for metrics.json). ``detected``: the
    decision's masks (training.evaluate.decision_masks), default the NFA's regions."""
    nfa_stats = result["nfa"]
    epsilon = float(nfa_stats["log10_epsilon"])
    errors = decision_errors(test, log_nfa, epsilon)
    grids = write_grids(out_dir, test, predictions, log_nfa, samples_per_type, errors, detected)
    null_model = str(nfa_stats["null_model"])
    what = result["bundle"] or result["run"]
    images = "".join(
        f"<h3>{html.escape(kind)}</h3><img src='{html.escape(rel)}' alt='{html.escape(kind)} samples'>"
        for kind, rel in grids.items()
        if kind not in errors
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>U-Flow evaluation: {html.escape(str(what))}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}} img{{max-width:100%}}</style></head><body>
<h1>U-Flow evaluation</h1>
<p>Model: {html.escape(str(what))} ({html.escape(result["source"])}), input {result["image_size"][0]}x{result["image_size"][1]}.
Data: {html.escape(str(result["data"]["root"]))} ({html.escape(result["data"]["layout"])}), {result["overall"]["images"]} test images,
{result["overall"]["defect_images"]} with defects.</p>
<p>mIoU (NFA): mask log10 NFA &lt; {epsilon:g} (the decision's log10 epsilon, {html.escape(null_model)} null), averaged over all test images (an empty mask on a good image scores 1;
all-empty masks score {result["overall"]["miou_all_empty"]:.3f}). mIoU (oracle): best threshold of the anomaly map
({result["overall"]["oracle_threshold"]:.4f}), chosen on the test set itself. Per type: AUROCs and AUPRO over that
type and the good images; mIoUs over that type's images.</p>
{_table(result)}
<h2>NFA</h2>
<p>log10 number of tests {nfa_stats["log10_number_of_tests"]:.1f}. Minimum log10 NFA per image: good median
{nfa_stats["min_log_nfa_good"].get("p50", float("nan")):.1f}, defect median {nfa_stats["min_log_nfa_defect"].get("p50", float("nan")):.1f}
(a region is detected below {epsilon:g}).</p>
{_latent_table(result)}
<h2>The decision's errors</h2>
<p>Worst first: false rejects by their strongest evidence, escapes by the size of their defect. The grids show
the first {samples_per_type} of each (image | ground truth | anomaly map | NFA mask).</p>
{_errors_html(test, errors, log_nfa, grids)}
<h2>Samples</h2>
<p>image | ground truth (red) | anomaly map (one colour scale for the whole test set) | NFA mask (green), ground truth (red)</p>
{images}
</body></html>
"""
    (out_dir / REPORT_NAME).write_text(page, encoding="utf-8")
    names = {kind: [test.records[i].image.name for i in indices] for kind, indices in errors.items()}
    return {"html": REPORT_NAME, "grids": grids, "errors": names}
