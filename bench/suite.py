"""The suite: ours and the peers on every data set, one table per data set in docs/results.md.

    nice -n 10 .venv-peers/bin/python bench/suite.py                 # everything, every data set
    nice -n 10 .venv/bin/python bench/suite.py --methods ours        # ours only (no anomalib needed)
    nice -n 10 .venv/bin/python bench/suite.py --only ours           # ours again, the peers' rows from the cache
    nice -n 10 .venv/bin/python bench/suite.py --max-train 60 --max-test 40 --ours-epochs 10   # capped

For every folder of ``--data-root`` (default ../shared/data) that holds a ``split.json``:

1. the input geometry that ``uflow train`` chooses for it (training/geometry.py: the training images'
   aspect ratio, 256 px on the short side, the pixel budget);
2. bench/peers.py's ``run_bench`` at that geometry: ours is ``uflow train --data SPLIT --out RUN`` with
   no other flag (``--ours-epochs`` caps it and the table says so) then ``training.evaluate``; the
   peers are anomalib's PatchCore, PaDiM and U-Flow on the same images, resized to the same HxW
   (they need anomalib: run the suite from ``.venv-peers``, docs/peers.md). Results are cached per
   method as in bench/peers.py, under ``--results/<data set>``;
3. ours' engine frame rate: the run exported as a bundle (``uflow export``'s code) and run by the
   agent's ONNX Runtime engine (FP32, ``--engine-threads`` threads), engine only, one frame at a time.
   The peers have no exported engine: their column is 1000 / their torch ms per image (batch 1);
4. one Markdown table per data set, printed and written into ``--docs`` (docs/results.md) between
   ``<!-- suite:NAME -->`` and ``<!-- /suite:NAME -->`` (replaced on every run, added at the end of
   the file the first time).

Times are wall clock on whatever else the machine runs; the table header names the load average.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

log = logging.getLogger("bench.suite")

DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
DEFAULT_RESULTS = REPO / "reports" / "suite"
DEFAULT_DOCS = REPO / "docs" / "results.md"
ENGINE_FRAMES = 30
METHODS: tuple[str, ...] = ("ours", "patchcore", "padim", "uflow")  # bench/peers.py's, in its order
# bench/peers.py's defaults for the peers (docs/peers.md "Deviations"): a run that lowers them says so.
CORESET_RATIO = 0.004
UFLOW_EPOCHS = 100
UFLOW_BUDGET_MIN = 110.0


def load_peers() -> Any:
    """bench/peers.py as a module (bench/ is not a package)."""
    name = "bench_peers_for_suite"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def find_datasets(root: Path, names: Sequence[str] | None = None) -> list[Path]:
    """The split.json of every sub-folder of ``root`` (sorted), or of the ``names`` given."""
    if names:
        paths = [root / name / "split.json" for name in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise SystemExit(f"no split.json at {', '.join(missing)}")
        return paths
    found = sorted(root.glob("*/split.json"))
    if not found:
        raise SystemExit(f"no data sets (folders with a split.json) under {root}")
    return found


def suite_geometry(split: Path, max_train: int | None, image_size: int | None) -> tuple[int, int, float]:
    """(height, width, data aspect) that ``uflow train`` picks for the (capped) training images of ``split``."""
    from training.catalog import DEFAULT_RECIPE
    from training.data import open_dataset
    from training.geometry import resolve_geometry

    train = open_dataset(split).train[:max_train] if max_train else open_dataset(split).train
    geometry = resolve_geometry(
        [r.image for r in train],
        image_size or DEFAULT_RECIPE.image_size,
        DEFAULT_RECIPE.strides,
        max_pixels=DEFAULT_RECIPE.max_pixels,
    )
    return geometry.height, geometry.width, geometry.data_aspect


def engine_fps(run_dir: Path, bundle_dir: Path, threads: int, frames: int = ENGINE_FRAMES) -> float:
    """Frames per second of the agent's ONNX Runtime engine (FP32) on ``run_dir`` exported to ``bundle_dir``."""
    from edge_agent.bundle import load_bundle
    from edge_agent.config import ModelConfig
    from edge_agent.engines import create_engine
    from training.export import export_bundle

    if not (bundle_dir / "model.json").is_file():
        export_bundle(run_dir, bundle_dir, name="suite", version="0.0.0", overwrite=True)
    bundle = load_bundle(bundle_dir)
    engine = create_engine(bundle, ModelConfig(backend="onnxruntime", threads=threads))
    spec = bundle.manifest.input
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (spec.height, spec.width, 3), dtype=np.uint8) for _ in range(4)]
    try:
        for image in images[:3]:  # warm-up: allocations are not inference time
            engine.infer(image)
        started = time.perf_counter()
        for index in range(frames):
            engine.infer(images[index % len(images)])
        return frames / (time.perf_counter() - started)
    finally:
        engine.close()


@dataclass
class DatasetRun:
    """One data set's results: the geometry, every method's result (or why it is missing), ours' fps."""

    name: str
    split: Path
    height: int
    width: int
    aspect: float
    results: list[dict[str, Any]]
    missing: dict[str, str]
    counts: dict[str, int]
    ours_engine_fps: float | None
    caps: list[str]
    load: float


def peers_args(peers: Any, args: argparse.Namespace, split: Path, height: int, width: int) -> argparse.Namespace:
    """bench/peers.py's arguments for one data set at ours' geometry."""
    argv = ["--data", str(split), "--results", str(args.results / split.parent.name)]
    argv += ["--methods", *suite_methods(args), "--image-size", str(height), "--image-width", str(width)]
    argv += ["--threads", str(args.threads), "--epochs", str(args.epochs)]
    argv += ["--coreset-ratio", str(args.coreset_ratio), "--uflow-budget-min", str(args.uflow_budget_min)]
    for flag, value in (
        ("--max-train", args.max_train),
        ("--max-test", args.max_test),
        ("--ours-epochs", args.ours_epochs),
        ("--ours-image-size", args.image_size),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if args.force:
        argv.append("--force")
    if args.only:
        argv += ["--only", *args.only]
    return peers.build_parser().parse_args(argv)


def suite_methods(args: argparse.Namespace) -> list[str]:
    """The table's methods: ``--methods`` plus ``--only``, in bench/peers.py's order.

    With ``--only M`` the suite recomputes M and shows every other method from the cache, so that ours
    can be rerun with new defaults in the main venv while the peers' rows (anomalib, .venv-peers) stay.
    """
    chosen = set(args.methods) | set(args.only or ())
    return [m for m in METHODS if m in chosen]


def caps_of(args: argparse.Namespace) -> list[str]:
    """What makes this run smaller than the full, default one (said under every table)."""
    caps = []
    if args.max_train is not None:
        caps.append(f"first {args.max_train} training images")
    if args.max_test is not None:
        caps.append(f"{args.max_test} test images")
    if args.ours_epochs is not None:
        caps.append(f"ours {args.ours_epochs} epochs (the default recipe's 40 capped)")
    if args.image_size is not None:
        caps.append(f"short side {args.image_size} px (not the recipe's 256)")
    methods = suite_methods(args)
    if "patchcore" in methods and args.coreset_ratio != CORESET_RATIO:
        caps.append(f"PatchCore coreset {args.coreset_ratio:.2%} of the patches (the bench's {CORESET_RATIO:.1%})")
    if "uflow" in methods and (args.epochs != UFLOW_EPOCHS or args.uflow_budget_min != UFLOW_BUDGET_MIN):
        caps.append(
            f"anomalib U-Flow at most {args.epochs} epochs and {args.uflow_budget_min:g} minutes "
            f"(the bench's {UFLOW_EPOCHS} and {UFLOW_BUDGET_MIN:g}; its epochs column says how many ran)"
        )
    return caps


def run_dataset(args: argparse.Namespace, split: Path) -> DatasetRun:
    """Geometry, peers.run_bench at that geometry, ours' engine fps."""
    peers = load_peers()
    height, width, aspect = suite_geometry(split, args.max_train, args.image_size)
    log.info(
        "data set",
        extra={"event": "suite_dataset", "dataset": split.parent.name, "height": height, "width": width},
    )
    bench_args = peers_args(peers, args, split, height, width)
    results = peers.run_bench(bench_args)
    data = peers.prepare_data(
        split, Path(bench_args.results), height, args.max_train, args.max_test, width if width != height else None
    )
    got = {r["method"] for r in results}
    missing = {m: _why_missing(peers, m, args.only) for m in suite_methods(args) if m not in got}
    fps = None
    ours = next((r for r in results if r["method"] == "ours"), None)
    if ours is not None and ours.get("details", {}).get("run"):
        run_dir = Path(ours["details"]["run"])
        fps = ours.get("engine_fps")
        if fps is None:
            fps = engine_fps(run_dir, Path(bench_args.results) / f"bundle-{ours['key']}", args.engine_threads)
            ours["engine_fps"] = fps
            peers.save_result(Path(bench_args.results), ours)  # cached with ours' result
    return DatasetRun(
        name=split.parent.name,
        split=split,
        height=height,
        width=width,
        aspect=aspect,
        results=results,
        missing=missing,
        counts=peers._counts(data.splits),
        ours_engine_fps=fps,
        caps=caps_of(args),
        load=os.getloadavg()[0],
    )


def _why_missing(peers: Any, method: str, only: Sequence[str] | None = None) -> str:
    if only and method not in only:  # --only computes nothing else
        return "no cached result for this data and config"
    if method != "ours" and not peers.anomalib_available():
        return "anomalib is not installed here (run the suite from .venv-peers, docs/peers.md)"
    return "no result"


COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("pixel AUROC", "pixel_auroc", "{:.3f}"),
    ("AUPRO", "aupro", "{:.3f}"),
    ("image AUROC", "image_auroc", "{:.3f}"),
    ("mIoU deploy", "miou_deploy", "{:.3f}"),
    ("defect flagged", "flagged_defect_share", "{:.1%}"),
    ("good flagged", "flagged_good_share", "{:.1%}"),
    ("train s", "train_seconds", "{:.0f}"),
)


def format_dataset(run: DatasetRun) -> str:
    """The Markdown block of one data set (heading, data line, table, notes)."""
    counts = run.counts
    lines = [
        f"### {run.name}",
        "",
        f"`{run.split.parent.name}/split.json`: {counts['train']} train, {counts['val']} val, "
        f"{counts['test_good']} good + {counts['test_defect']} defective test images; median aspect "
        f"{run.aspect:.2f} -> every method at **{run.width}x{run.height}** (w x h), as `uflow train` chooses.",
        "",
        "| method | deployable threshold | epochs | " + " | ".join(c[0] for c in COLUMNS) + " | fps |",
        "|" + "---|" * (4 + len(COLUMNS)),
    ]
    for result in run.results:
        values = result.get("metrics", {})
        cells = [result["method"], str(result.get("threshold", "-")), str(result.get("epochs") or "-")]
        cells += ["-" if values.get(k) is None else f.format(values[k]) for _, k, f in COLUMNS]
        if result["method"] == "ours" and run.ours_engine_fps is not None:
            cells.append(f"{run.ours_engine_fps:.1f} (engine)")
        elif values.get("ms_per_image"):
            cells.append(f"{1000 / values['ms_per_image']:.1f} (torch)")
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    for method, why in run.missing.items():
        lines.append("| " + " | ".join([method, f"not run: {why}"] + [""] * (2 + len(COLUMNS))) + " |")
    lines += [
        "",
        "fps: ours = the exported bundle in the agent's ONNX Runtime engine (FP32, engine only); peers = "
        "1000 / their torch forward ms (batch 1). Train s and fps are wall clock on a shared machine "
        f"(load average {run.load:.1f} at the end).",
    ]
    if run.caps:
        lines.append("")
        lines.append(
            f"**Capped run**: {'; '.join(run.caps)}. Not the full bench: compare it with runs under the same caps."
        )
    return "\n".join(lines)


def write_docs(docs: Path, runs: Sequence[DatasetRun]) -> None:
    """Replace (or append) each data set's block between its markers in ``docs``."""
    text = docs.read_text(encoding="utf-8") if docs.is_file() else ""
    for run in runs:
        start, end = f"<!-- suite:{run.name} -->", f"<!-- /suite:{run.name} -->"
        block = f"{start}\n{format_dataset(run)}\n{end}"
        found = re.search(re.escape(start) + r".*?" + re.escape(end), text, re.DOTALL)
        before, after = (text[: found.start()], text[found.end() :]) if found else (text.rstrip("\n") + "\n\n", "\n")
        text = before + block + after
    docs.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    """The suite's command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folders with a split.json each")
    p.add_argument("--datasets", nargs="+", help="folder names under --data-root (default: every one)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument(
        "--only",
        nargs="+",
        choices=METHODS,
        help="recompute these even when cached; show the other --methods from the cache (or as not run)",
    )
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="per data set: bench/peers.py's cache")
    p.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="the Markdown file the tables go into")
    p.add_argument("--no-docs", action="store_true", help="print the tables only")
    p.add_argument("--max-train", type=int, help="cap: the first N training images (N/4 val)")
    p.add_argument("--max-test", type=int, help="cap: N test images, taken by type in turn")
    p.add_argument("--ours-epochs", type=int, help="cap ours' epochs (default: the recipe's)")
    p.add_argument("--image-size", type=int, help="TESTS: a smaller short side than the recipe's 256")
    p.add_argument("--epochs", type=int, default=UFLOW_EPOCHS, help="anomalib U-Flow's maximum epochs")
    p.add_argument("--uflow-budget-min", type=float, default=UFLOW_BUDGET_MIN, help="anomalib U-Flow's minutes")
    p.add_argument("--coreset-ratio", type=float, default=CORESET_RATIO, help="PatchCore's coreset share")
    p.add_argument("--threads", type=int, default=1, help="torch threads (peers, ours' evaluation)")
    p.add_argument("--engine-threads", type=int, default=2, help="ONNX Runtime threads for ours' engine fps")
    p.add_argument("--force", action="store_true", help="recompute every method even when cached")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python bench/suite.py [options]``."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from edge_agent.logs import setup_logging

    setup_logging("INFO", fmt="text", stream=sys.stdout)
    args = build_parser().parse_args(argv)
    runs = [run_dataset(args, split) for split in find_datasets(args.data_root, args.datasets)]
    for run in runs:
        print("\n" + format_dataset(run))
    if not args.no_docs:
        write_docs(args.docs, runs)
        print(f"\ntables written into {args.docs}")
    summary = {r.name: {"shape": [r.height, r.width], "methods": [x["method"] for x in r.results]} for r in runs}
    (args.results / "suite.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
