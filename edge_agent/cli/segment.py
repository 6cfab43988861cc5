"""``edge-agent segment``: score and segment image files offline with a bundle.

For each image ``<stem>.json`` (score, decision, regions in the image's own pixels), ``<stem>_map.npy``
(float32 anomaly map at the image's size), ``<stem>_lognfa.npy`` (float32 log10 NFA at the image's
size) and ``<stem>_overlay.png``. Unreadable images are reported by name and skipped; the others are
still written, and the exit status is 1 when any image failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.bundle import Bundle, BundleError, load_bundle
from edge_agent.cli.common import EXIT_FAILURE, EXIT_OK
from edge_agent.config import ModelConfig, NfaConfig
from edge_agent.engines import Engine, EngineUnavailable, create_engine
from edge_agent.inspection import nfa
from edge_agent.inspection.drivers import IMAGE_SUFFIXES, list_images
from edge_agent.inspection.overlay import draw_overlay
from edge_agent.inspection.preprocess import AspectCheck, model_input
from edge_agent.inspection.scoring import FrameScorer, Verdict
from edge_agent.logs import setup_logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent segment``."""
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], default="onnxruntime")
    parser.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    parser.add_argument("--log10-epsilon", type=float, default=None, help="override the bundle's decision threshold")
    parser.add_argument("--min-region-area", type=int, default=None, help="ignore smaller regions (image pixels)")
    parser.add_argument("--no-overlay", action="store_true", help="skip the overlay PNGs")


@dataclass(frozen=True)
class SegmentResult:
    """What segment wrote for one image."""

    image: Path
    verdict: Verdict
    json_path: Path


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edge-agent segment``."""
    setup_logging("INFO", "text")
    try:
        images = expand_images(args.images)
        bundle = load_bundle(args.bundle)
        engine = create_engine(bundle, ModelConfig(backend=args.backend, precision=args.precision, threads=0))
    except (BundleError, EngineUnavailable, ValueError) as exc:
        log.error("%s", exc, extra={"event": "segment_failed"})
        return EXIT_FAILURE
    nfa.warm_up()
    nfa_config = NfaConfig(log10_epsilon=args.log10_epsilon, min_region_area=args.min_region_area)
    segmenter = Segmenter(bundle, engine, nfa_config, precision=args.precision)
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in images:
        try:
            result = segmenter.segment_file(path, args.out, overlay=not args.no_overlay)
        except (OSError, ValueError) as exc:
            failures += 1
            log.error("%s: %s", path, exc, extra={"event": "image_failed", "path": str(path)})
            continue
        verdict = result.verdict
        log.info(
            "%s: score %.4f, %s, %d region(s)",
            path.name,
            verdict.image_score,
            "ANOMALOUS" if verdict.anomalous else "good",
            len(verdict.regions),
            extra={"event": "image_segmented", "json": str(result.json_path)},
        )
    engine.close()
    log.info(
        "segmented %d of %d image(s) into %s",
        len(images) - failures,
        len(images),
        args.out,
        extra={"event": "segment_done", "images": len(images), "failed": failures, "out": str(args.out)},
    )
    return EXIT_FAILURE if failures else EXIT_OK


def expand_images(paths: list[Path]) -> list[Path]:
    """Image paths with folders expanded (sorted); duplicate output stems are an error naming both files."""
    images: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise ValueError(f"folder {path} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
            images += found
        else:
            images.append(path)
    seen: dict[str, Path] = {}
    for path in images:
        if path.stem in seen and seen[path.stem] != path:
            raise ValueError(
                f"{seen[path.stem]} and {path} would write the same outputs ({path.stem}.json); rename one"
            )
        seen[path.stem] = path
    return images


class Segmenter:
    """Runs one bundle's engine and the NFA on image files at their own resolution."""

    def __init__(self, bundle: Bundle, engine: Engine, nfa_config: NfaConfig | None = None, precision: str = "fp32"):
        self.bundle = bundle
        self.engine = engine
        self.scorer = FrameScorer(bundle.manifest, nfa_config)
        self.precision = precision
        self.aspect = AspectCheck("segment")  # one warning per image size whose aspect is not the model's

    def segment_image(self, image_bgr: np.ndarray) -> Verdict:
        """The verdict for one BGR image with maps and boxes at the image's own size."""
        spec = self.bundle.manifest.input
        height, width = image_bgr.shape[:2]
        self.aspect.check((height, width), (spec.height, spec.width))
        output = self.engine.infer(model_input(image_bgr, spec.height, spec.width))
        return self.scorer.score(output, (width, height), resolution="frame")

    def segment_file(self, path: Path, out_dir: Path, overlay: bool = True) -> SegmentResult:
        """Segment one image file and write its outputs into ``out_dir``."""
        if not path.is_file():
            raise OSError("no such image file")
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError("not an image OpenCV can read (corrupt or unsupported format)")
        started = time.perf_counter()
        verdict = self.segment_image(image)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        stem = path.stem
        np.save(out_dir / f"{stem}_map.npy", verdict.anomaly_map.astype(np.float32))
        np.save(out_dir / f"{stem}_lognfa.npy", verdict.log_nfa.astype(np.float32))
        if overlay:
            title = f"{path.name}  score {verdict.image_score:.3f}  " + (
                f"ANOMALOUS ({len(verdict.regions)} region(s))" if verdict.anomalous else "good"
            )
            picture = draw_overlay(
                image, verdict.anomaly_map, verdict.log_nfa, verdict.log10_epsilon, verdict.regions, title
            )
            if not cv2.imwrite(str(out_dir / f"{stem}_overlay.png"), picture):
                raise OSError(f"could not write {out_dir / f'{stem}_overlay.png'}")
        json_path = out_dir / f"{stem}.json"
        json_path.write_text(json.dumps(self.report(path, image, verdict, elapsed_ms), indent=2) + "\n")
        return SegmentResult(image=path, verdict=verdict, json_path=json_path)

    def report(self, path: Path, image: np.ndarray, verdict: Verdict, elapsed_ms: float) -> dict[str, Any]:
        """The ``<stem>.json`` content."""
        manifest = self.bundle.manifest
        return {
            "image": str(path),
            "image_size": [int(image.shape[1]), int(image.shape[0])],
            "image_score": verdict.image_score,
            "anomalous": verdict.anomalous,
            "log10_epsilon": verdict.log10_epsilon,
            "min_log_nfa": float(verdict.log_nfa.min()),
            "regions": [r.model_dump(mode="json") for r in verdict.regions],
            "model": {
                "name": manifest.name,
                "version": manifest.version,
                "sha256": self.bundle.model_sha256(self.precision),
                "backend": self.engine.backend,
                "precision": self.precision,
            },
            "elapsed_ms": round(elapsed_ms, 2),
        }
