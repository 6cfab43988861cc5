"""The false-alarm check of the a-contrario promise: run a bundle on good images and count NFA regions.

On good parts the NFA decision should raise on average at most about epsilon false regions per image
(epsilon = 1 by default: log10 epsilon = 0). This runs the bundle with ONNX Runtime on a set of good
images, makes the agent's own decision (``edge_agent.inspection.scoring.FrameScorer`` at the model size) and
reports the mean number of regions per image, the fraction of images with any region and the
distribution of the per-image minimum log10 NFA.

It also measures why the promise may fail. The bound behind the NFA assumes that on good parts
``C_s * m_s`` is chi^2(C_s) and that pixels are independent. Per scale it reports the mean and
variance of m_s (chi^2(C)/C has mean 1 and variance 2/C), the empirical tail P(m_s >= t) next to
the Chernoff bound exp(-(C/2)(t - 1 - ln t)) that the NFA uses (a tail above the bound means the
latents are not standard normal on these images), and the lag-1 spatial autocorrelation of m_s
(0 for independent pixels; for Gaussian latents with neighbour correlation rho it is about rho^2).
It compares each scale's most significant node per image (its log10 P) with the same on maps drawn
from the NFA's own null (i.i.d. chi^2(C)/C of the same shape), and says which scale's log P gives
each image's minimum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from calibration.data import ImageSet, read_model_input
from calibration.nfa_promise import format_promise, promise_row, recorded_calibration
from edge_agent.bundle import REGION_HEADS, Bundle, Manifest, load_bundle, region_scales
from edge_agent.config import NfaConfig
from edge_agent.inspection import nfa
from edge_agent.inspection.image_test import ImageTest
from edge_agent.inspection.scoring import FrameScorer

log = logging.getLogger(__name__)

TAIL_LEVELS: tuple[float, ...] = (1.25, 1.5, 2.0, 3.0, 5.0)
QUANTILES: tuple[float, ...] = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
NULL_MAPS = 50


@dataclass(frozen=True)
class ImageResult:
    """One good image: its regions and its smallest log10 NFA (overall and per scale)."""

    path: str
    regions: int
    region_areas: tuple[int, ...]
    min_log_nfa: float
    regions_at_epsilon_1: int  # regions with log10 NFA < 0: the a-contrario promise is about these
    scale_min_log_nfa: tuple[float, ...]  # log10 N + min log10 P of each scale alone


@dataclass
class ScaleStats:
    """Running statistics of one scale's m_s over all pixels of all images."""

    name: str
    channels: int
    height: int
    width: int
    pixels: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    tail_counts: list[int] = field(default_factory=lambda: [0] * len(TAIL_LEVELS))
    autocorr_sum: float = 0.0
    autocorr_images: int = 0

    def add(self, m: np.ndarray) -> None:
        values = np.asarray(m, dtype=np.float64)
        self.pixels += values.size
        self.total += float(values.sum())
        self.total_sq += float(np.square(values).sum())
        for k, level in enumerate(TAIL_LEVELS):
            self.tail_counts[k] += int(np.count_nonzero(values >= level))
        rho = lag1_autocorrelation(values)
        if math.isfinite(rho):
            self.autocorr_sum += rho
            self.autocorr_images += 1

    def summary(self) -> dict[str, object]:
        mean = self.total / self.pixels
        variance = self.total_sq / self.pixels - mean * mean
        c = self.channels
        return {
            "name": self.name,
            "channels": c,
            "shape": [self.height, self.width],
            "mean_m": mean,
            "variance_m": variance,
            "variance_chi2": 2.0 / c,
            "tail": [
                {
                    "level": level,
                    "empirical": count / self.pixels,
                    "chernoff_bound": math.exp(-(c / 2) * (level - 1 - math.log(level))),
                }
                for level, count in zip(TAIL_LEVELS, self.tail_counts, strict=True)
            ],
            "lag1_autocorrelation": self.autocorr_sum / self.autocorr_images if self.autocorr_images else None,
        }


def lag1_autocorrelation(m: np.ndarray) -> float:
    """Mean of the horizontal and vertical lag-1 Pearson correlations of a map (NaN if undefined)."""
    pairs = []
    if m.shape[1] > 1:
        pairs.append((m[:, :-1].ravel(), m[:, 1:].ravel()))
    if m.shape[0] > 1:
        pairs.append((m[:-1, :].ravel(), m[1:, :].ravel()))
    values = []
    for a, b in pairs:
        if a.std() > 0 and b.std() > 0:
            values.append(float(np.corrcoef(a, b)[0, 1]))
    return float(np.mean(values)) if values else float("nan")


@dataclass(frozen=True)
class NfaCheckReport:
    """The outcome of one check: the headline numbers, the diagnostics and every image."""

    bundle: str
    model: str
    data: str
    calibration: dict[str, object] | None  # what the bundle recorded at training (manifest nfa.calibration)
    precision: str
    log10_epsilon: float
    min_region_area: int
    log10_number_of_tests: float
    images: int
    mean_regions_per_image: float
    fraction_with_detection: float
    null_model: str
    mean_regions_at_epsilon_1: float  # the promise: <= 1 false region per good image at log10 epsilon = 0
    fraction_with_detection_at_epsilon_1: float
    min_log_nfa_quantiles: dict[str, float]
    images_triggered_by_scale: dict[str, int]
    promise: list[dict[str, object]]  # per epsilon (the bundle's, then 0): counts, 95 % intervals, verdict
    scales: list[dict[str, Any]]  # JSON rows, one per scale
    per_image: list[ImageResult]
    latents: list[dict[str, object]] | None = None  # from the training run, when given

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def with_latents(self, latents: list[dict[str, object]]) -> NfaCheckReport:
        return replace(self, latents=latents)


def check_images(
    bundle: Bundle,
    images: ImageSet,
    log10_epsilon: float | None = None,
    min_region_area: int | None = None,
    precision: str = "fp32",
    threads: int = 0,
    null_model: str = "bundle",
) -> NfaCheckReport:
    """Run ``bundle`` on ``images`` (good parts) and measure the NFA decision's false alarms.

    ``null_model`` as ``[nfa] null_model`` in the agent's config: the bundle's, ``polyomino`` or ``fitted``.
    """
    from edge_agent.engines.onnxruntime import OnnxRuntimeEngine

    manifest = bundle.manifest
    height, width = manifest.input.height, manifest.input.width
    # The check works at the model size, where source pixels are model pixels.
    scorer = FrameScorer(
        manifest,
        NfaConfig(log10_epsilon=log10_epsilon, min_region_area=min_region_area, null_model=null_model),  # type: ignore[arg-type]
    )
    min_area = manifest.nfa.min_region_area if min_region_area is None else min_region_area
    shapes = [(s.height, s.width) for s in region_scales(manifest.scales)]
    nulls = scorer.nulls
    log10_n = nfa.log10_number_of_tests(shapes) if nulls is None else nfa.log10_tree_tests(shapes)
    stats = [ScaleStats(s.name, s.channels, s.height, s.width) for s in manifest.scales]
    engine = OnnxRuntimeEngine(bundle, precision=precision, threads=threads)
    results: list[ImageResult] = []
    try:
        for index, path in enumerate(images.paths, start=1):
            output = engine.infer(read_model_input(path, height, width))
            verdict = scorer.score(output, (width, height))
            per_scale = _per_scale_log_nfa(output.scale_maps, manifest, nulls, scorer.image_test, log10_n)
            at_1 = nfa.regions_from_log_nfa(verdict.log_nfa, 0.0, min_area)
            for stat, m in zip(stats, output.scale_maps, strict=True):
                stat.add(m)
            results.append(
                ImageResult(
                    path=str(path),
                    regions=len(verdict.regions),
                    region_areas=tuple(r.area for r in verdict.regions),
                    min_log_nfa=float(verdict.log_nfa.min()),
                    scale_min_log_nfa=per_scale,
                    regions_at_epsilon_1=len(at_1),
                )
            )
            _log_progress(index, len(images.paths), results)
    finally:
        engine.close()
    report = _report(bundle, images, scorer.rule.log10_epsilon, min_area, precision, log10_n, stats, results)
    return replace(report, null_model="polyomino" if nulls is None else "fitted")


def _per_scale_log_nfa(
    maps: Sequence[np.ndarray],
    manifest: Manifest,
    nulls: Sequence[nfa.ScaleNull] | None,
    image_test: ImageTest | None,
    log10_n: float,
) -> tuple[float, ...]:
    """Each map's test alone: log10 N + its smallest log10 P for a region map; for the texture map the image
    test's log10 NFA (+inf when no image test reads it); +inf for the detail map (no test reads it)."""
    out, region = [], 0
    for m, s in zip(maps, manifest.scales, strict=True):
        if s.head == "texture":
            out.append(math.inf if image_test is None else image_test.log10_nfa(float(np.max(m))))
            continue
        if s.head not in REGION_HEADS:
            out.append(math.inf)
            continue
        out.append(log10_n + float(nfa.log_prob_map(m, s.channels, None if nulls is None else nulls[region]).min()))
        region += 1
    return tuple(out)


def _map_test_summary(stat: ScaleStats, head: str, log_nfa: list[float], log10_n: float) -> dict[str, object]:
    """What each map's test gave: a region map's best node against the i.i.d. null, the texture map's image
    test quantiles, nothing for the detail map (no test reads it)."""
    if head == "texture":
        return _image_test_quantiles(log_nfa)
    if head not in REGION_HEADS:
        return {}
    return best_node_comparison(stat, [v - log10_n for v in log_nfa])


def _image_test_quantiles(values: list[float]) -> dict[str, object]:
    """The image test's log10 NFA over the images (nothing when no image test read the texture map)."""
    finite = [v for v in values if math.isfinite(v)]
    return {"image_test_log_nfa": quantiles(finite)} if finite else {}


def _log_progress(done: int, total: int, results: list[ImageResult]) -> None:
    step = max(1, total // 10)
    if done % step == 0 or done == total:
        log.info(
            "nfa check progress",
            extra={
                "event": "nfa_check_progress",
                "done": done,
                "total": total,
                "regions_so_far": sum(r.regions for r in results),
            },
        )


def quantiles(values: Iterable[float]) -> dict[str, float]:
    """min, p5, p25, median, p75, p95, max of the values."""
    array = np.asarray(list(values), dtype=np.float64)
    names = ("min", "p5", "p25", "median", "p75", "p95", "max")
    return {name: float(np.quantile(array, q)) for name, q in zip(names, QUANTILES, strict=True)}


def _report(
    bundle: Bundle,
    images: ImageSet,
    log10_epsilon: float,
    min_area: int,
    precision: str,
    log10_n: float,
    stats: list[ScaleStats],
    results: list[ImageResult],
) -> NfaCheckReport:
    triggered = {s.name: 0 for s in stats}
    for r in results:
        if r.regions:
            triggered[stats[int(np.argmin(r.scale_min_log_nfa))].name] += 1
    manifest = bundle.manifest
    return NfaCheckReport(
        bundle=str(bundle.root),
        model=f"{manifest.name} {manifest.version}",
        data=images.source,
        calibration=None if manifest.nfa.calibration is None else manifest.nfa.calibration.model_dump(),
        precision=precision,
        log10_epsilon=log10_epsilon,
        min_region_area=min_area,
        log10_number_of_tests=log10_n,
        images=len(results),
        mean_regions_per_image=float(np.mean([r.regions for r in results])),
        fraction_with_detection=float(np.mean([r.regions > 0 for r in results])),
        null_model="polyomino",
        mean_regions_at_epsilon_1=float(np.mean([r.regions_at_epsilon_1 for r in results])),
        fraction_with_detection_at_epsilon_1=float(np.mean([r.regions_at_epsilon_1 > 0 for r in results])),
        min_log_nfa_quantiles=quantiles(r.min_log_nfa for r in results),
        images_triggered_by_scale=triggered,
        promise=[
            promise_row(log10_epsilon, [r.regions for r in results]),
            promise_row(0.0, [r.regions_at_epsilon_1 for r in results]),
        ],
        scales=[
            stat.summary() | _map_test_summary(stat, head, [r.scale_min_log_nfa[k] for r in results], log10_n)
            for k, (stat, head) in enumerate(zip(stats, (s.head for s in manifest.scales), strict=True))
        ],
        per_image=results,
    )


def null_min_log_p(channels: int, shape: tuple[int, int], maps: int = NULL_MAPS, seed: int = 0) -> np.ndarray:
    """The smallest per-pixel log10 P of ``maps`` maps drawn from the NFA's null: i.i.d. chi^2(C)/C."""
    rng = np.random.default_rng(seed)
    return np.array(
        [nfa.log_prob_map(rng.chisquare(channels, size=shape) / channels, channels).min() for _ in range(maps)]
    )


def best_node_comparison(stat: ScaleStats, real_min_log_p: list[float]) -> dict[str, object]:
    """The best (smallest) log10 P per image on the real maps next to the same on null maps.

    On the null the a-contrario bound holds by construction; real good images whose best node is far
    more significant than the null's are where false alarms come from, long before they cross log10 N.
    """
    null = null_min_log_p(stat.channels, (stat.height, stat.width))
    return {
        "best_log_p_real": quantiles(real_min_log_p),
        "best_log_p_null": quantiles(null.tolist()),
    }


def check_bundle(
    bundle_dir: Path | str,
    images: ImageSet,
    log10_epsilon: float | None = None,
    min_region_area: int | None = None,
    precision: str = "fp32",
    threads: int = 0,
    null_model: str = "bundle",
) -> NfaCheckReport:
    """Load and verify a bundle directory, then :func:`check_images`."""
    bundle = load_bundle(bundle_dir)
    return check_images(bundle, images, log10_epsilon, min_region_area, precision, threads, null_model)


def latent_statistics(run_dir: Path | str, paths: Iterable[Path]) -> list[dict[str, object]]:
    """Per scale, statistics of the latents z themselves, from a training run (torch, offline).

    The engine only returns m_s; the run's checkpoint gives z. Reported per scale: the mean and
    variance of z (0 and 1 under the model), the lag-1 spatial autocorrelation of each channel
    averaged over channels and images (0 for the independent pixels the NFA assumes), and the mean
    absolute correlation between channels at one pixel (0 under the model).
    """
    import torch

    from training.rundir import load_model

    model, _ = load_model(run_dir)
    height, width = model.config.image_height, model.config.image_width
    sums: list[dict[str, float]] = []
    for path in paths:
        image = read_model_input(path, height, width)
        batch = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            latents = model(batch).latents
        for k, z in enumerate(latents):
            z = z[0].double().numpy()
            if len(sums) <= k:
                sums.append({"images": 0, "mean": 0.0, "var": 0.0, "autocorr": 0.0, "cross": 0.0})
            acc = sums[k]
            acc["images"] += 1
            acc["mean"] += float(z.mean())
            acc["var"] += float(z.var())
            acc["autocorr"] += float(np.mean([lag1_autocorrelation(channel) for channel in z]))
            flat = z.reshape(z.shape[0], -1)
            corr = np.corrcoef(flat) if z.shape[0] > 1 else np.ones((1, 1))
            off_diagonal = corr[~np.eye(corr.shape[0], dtype=bool)]
            acc["cross"] += float(np.abs(off_diagonal).mean()) if off_diagonal.size else 0.0
    return [
        {
            "scale": k,
            "channels": int(latents[k].shape[1]),
            "images": int(acc["images"]),
            "mean_z": acc["mean"] / acc["images"],
            "variance_z": acc["var"] / acc["images"],
            "lag1_autocorrelation_z": acc["autocorr"] / acc["images"],
            "mean_abs_channel_correlation": acc["cross"] / acc["images"],
        }
        for k, acc in enumerate(sums)
    ]


def format_latent_statistics(rows: list[dict[str, object]]) -> str:
    """The latent statistics as a markdown table."""
    lines = [
        "| scale | C | images | mean z (0) | var z (1) | lag-1 autocorr of z (0) | mean abs channel corr (0) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scale']} | {r['channels']} | {r['images']} | {r['mean_z']:.3f} | {r['variance_z']:.3f} | "
            f"{r['lag1_autocorrelation_z']:.3f} | {r['mean_abs_channel_correlation']:.3f} |"
        )
    return "\n".join(lines)


def format_report(report: NfaCheckReport) -> str:
    """The report as markdown tables."""
    q = report.min_log_nfa_quantiles
    lines = [
        f"NFA false-alarm check: {report.model} ({report.precision}) on {report.images} images from {report.data}",
        f"null model {report.null_model}, log10 N = {report.log10_number_of_tests:.1f}, "
        f"log10 epsilon = {report.log10_epsilon:g}, min region area = {report.min_region_area} model px",
        "",
        "| images | mean regions / image | images with a detection | at log10 eps = 0: regions / image "
        "(promise <= 1) | images with one | min log10 NFA: min | p5 | median | p95 | max |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {report.images} | {report.mean_regions_per_image:.3f} | {report.fraction_with_detection:.1%} | "
        f"{report.mean_regions_at_epsilon_1:.3f} | {report.fraction_with_detection_at_epsilon_1:.1%} | "
        f"{q['min']:.1f} | {q['p5']:.1f} | {q['median']:.1f} | {q['p95']:.1f} | {q['max']:.1f} |",
        "",
        format_promise(report.promise),
        *recorded_calibration(report.calibration),
        "",
        "| scale | C | shape | mean m (chi2: 1) | var m (chi2: 2/C) | lag-1 autocorr of m | images it triggers |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report.scales:
        rho = s["lag1_autocorrelation"]
        lines.append(
            f"| {s['name']} | {s['channels']} | {s['shape'][0]}x{s['shape'][1]} | {s['mean_m']:.3f} | "
            f"{s['variance_m']:.4f} ({s['variance_chi2']:.4f}) | {'n/a' if rho is None else f'{rho:.3f}'} | "
            f"{report.images_triggered_by_scale[s['name']]} |"
        )
    lines += [
        "",
        "| scale | best log10 P per image, real: min / median / max | i.i.d. chi2(C)/C null: min / median / max |",
        "|---|---|---|",
    ]
    for s in report.scales:
        if "best_log_p_real" not in s:  # the texture map: no region null; its image test's log10 NFA instead
            image = s.get("image_test_log_nfa")
            if image:
                lines.append(
                    f"| {s['name']} (image test, log10 NFA) | {image['min']:.1f} / {image['median']:.1f} / "
                    f"{image['max']:.1f} | - |"
                )
            continue
        real, null = s["best_log_p_real"], s["best_log_p_null"]
        lines.append(
            f"| {s['name']} | {real['min']:.1f} / {real['median']:.1f} / {real['max']:.1f} | "
            f"{null['min']:.1f} / {null['median']:.1f} / {null['max']:.1f} |"
        )
    lines += ["", "| scale | " + " | ".join(f"P(m >= {t:g}) / bound" for t in TAIL_LEVELS) + " |"]
    lines.append("|---|" + "---|" * len(TAIL_LEVELS))
    for s in report.scales:
        cells = [f"{t['empirical']:.2e} / {t['chernoff_bound']:.2e}" for t in s["tail"]]
        lines.append(f"| {s['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
