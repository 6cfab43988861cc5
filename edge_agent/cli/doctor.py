"""``edge-agent doctor``: what this box can and cannot do, before the service is started.

A plant engineer runs it after installing, or when the agent will not come up: every check prints one
row (ok / warn / fail) with the reason and, where there is one, what to do. Exit status 1 when any
check fails, so it also works as a pre-flight step in scripts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, parse_overrides
from edge_agent.cli.doctor_recipes import active_recipe_settings, check_recipes, raw_source_settings
from edge_agent.config import AgentSettings, ConfigError, load_settings

if TYPE_CHECKING:  # the checks import what they test lazily, so one broken library fails only its row
    from edge_agent.bundle import Bundle, Manifest

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    """One row of the report."""

    name: str
    status: Status
    detail: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent doctor``."""
    parser.add_argument("--config", type=Path, default=None, help="agent TOML file to check (as `run` reads it)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting as `run --set` does, e.g. --set model.backend=onnxruntime",
    )
    parser.add_argument(
        "--open-source",
        action="store_true",
        help="also open the configured source and grab a frame (not while the agent holds the camera)",
    )
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edge-agent doctor``."""
    try:
        overrides = parse_overrides(args.overrides)
    except ConfigError as exc:
        print(f"edge-agent doctor: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    checks = run_checks(args.config, open_source=args.open_source, overrides=overrides)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print(format_table(checks))
    return EXIT_FAILURE if any(c.status == "fail" for c in checks) else EXIT_OK


def run_checks(
    config_path: Path | None, open_source: bool = False, overrides: dict[str, Any] | None = None
) -> list[Check]:
    """All checks, in the order a frame needs them; later checks are skipped when the config is unusable."""
    checks = [check_python(), check_torch_absent_is_fine(), check_opencv(), check_onnxruntime(), check_tensorrt()]
    try:
        settings = load_settings(config_path, **(overrides or {}))
    except ConfigError as exc:
        return [*checks, Check("config", "fail", str(exc))]
    where = str(config_path) if config_path else "defaults + EDGE_AGENT_* environment"
    checks.append(Check("config", "ok", f"{where}: device_id={settings.device_id}"))
    checks.append(check_writable_dir("state dir", settings.state_dir))
    checks.append(check_numba_cache())
    checks.append(check_nfa_warm_up())
    # With recipes, the engine rows run the active recipe's bundle; every recipe gets its own row below.
    checks.extend(check_bundle_and_engine(active_recipe_settings(settings) if settings.recipes else settings))
    frame_hw = None
    if open_source:  # with recipes, the camera's raw frame: each recipe turns and cuts it its own way
        source_check, frame_hw = grab_source(raw_source_settings(settings) if settings.recipes else settings)
        checks.append(source_check)
    if settings.recipes:
        checks.extend(Check(*row) for row in check_recipes(settings, frame_hw))
    elif any(c.name == "bundle" and c.status == "ok" for c in checks):
        checks.append(check_aspect(settings, frame_hw))
    checks.append(check_broker(settings))
    return checks


def format_table(checks: list[Check]) -> str:
    """Fixed-width table a person reads in a terminal."""
    width = max(len(c.name) for c in checks)
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    lines = [f"{c.name:<{width}}  {marks[c.status]}  {c.detail}" for c in checks]
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append(f"\n{len(checks)} checks: {failed} failed, {warned} warnings")
    return "\n".join(lines)


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    status: Status = "ok" if sys.version_info >= (3, 10) else "fail"
    return Check("python", status, f"{version} on {platform.machine()} ({platform.system()})")


def check_torch_absent_is_fine() -> Check:
    present = importlib.util.find_spec("torch") is not None
    detail = "installed (only training needs it)" if present else "not installed (not needed on the device)"
    return Check("torch", "ok", detail)


def check_opencv() -> Check:
    try:
        from edge_agent.inspection.drivers import describe_video_io
    except ImportError as exc:
        return Check("opencv", "fail", f"cv2 does not import: {exc} (pip install opencv-python-headless)")
    info = describe_video_io()
    detail = (
        f"{info['opencv']}; camera backends {info['camera_backends']}, stream backends {info['stream_backends']}; "
        f"GStreamer {'yes' if info['gstreamer'] else 'no (CSI cameras need the system OpenCV, see docs/deploy.md)'}"
    )
    return Check("opencv", "ok", detail)


def check_onnxruntime() -> Check:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return Check("onnxruntime", "fail", f"does not import: {exc}")
    return Check("onnxruntime", "ok", f"{ort.__version__}; providers {ort.get_available_providers()}")


def check_tensorrt() -> Check:
    from edge_agent.engines import tensorrt_missing_reason

    reason = tensorrt_missing_reason()
    if reason is not None:
        return Check("tensorrt", "warn", f"{reason}; the agent will use ONNX Runtime on the CPU")
    import tensorrt

    return Check("tensorrt", "ok", f"{tensorrt.__version__} (build plans with `edge-agent build-engine`)")


def check_writable_dir(name: str, path: Path) -> Check:
    """A directory the agent must write to: exists (or can be made) and accepts a file."""
    target = path if path.exists() else _first_existing_parent(path)
    if not target.is_dir():
        return Check(name, "fail", f"{path} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check(name, "fail", f"{path}: cannot write ({exc.strerror}); run as the service user or fix ownership")
    if path.exists():
        return Check(name, "ok", f"{path} is writable")
    return Check(name, "warn", f"{path} does not exist yet; {target} is writable, so it can be created")


def check_numba_cache() -> Check:
    """Numba's JIT cache must be writable or every start recompiles the NFA (tens of seconds)."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    if configured:
        return check_writable_dir("numba cache", Path(configured))
    import edge_agent

    package_dir = Path(edge_agent.__file__).parent
    if os.access(package_dir, os.W_OK):
        return Check("numba cache", "ok", f"next to the code in {package_dir}/__pycache__ (NUMBA_CACHE_DIR unset)")
    return Check(
        "numba cache",
        "warn",
        f"{package_dir} is read-only and NUMBA_CACHE_DIR is unset: the NFA recompiles at every start "
        "(the systemd unit sets NUMBA_CACHE_DIR)",
    )


def check_nfa_warm_up() -> Check:
    from edge_agent.inspection import nfa

    start = time.perf_counter()
    try:
        nfa.warm_up()
    except Exception as exc:  # a broken Numba/LLVM install shows up here, whatever its type
        return Check("nfa", "fail", f"warm-up failed: {exc}")
    seconds = time.perf_counter() - start
    status: Status = "ok" if seconds < 10 else "warn"
    hint = "" if status == "ok" else " (compiled now: a writable Numba cache makes the next start fast)"
    return Check("nfa", status, f"JIT ready in {seconds:.1f} s{hint}")


def check_bundle_and_engine(settings: AgentSettings) -> list[Check]:
    """The bundle verifies (hashes, schema, signature when a fleet key is set) and runs one frame."""
    from edge_agent.bundle import BundleError, load_bundle

    path = settings.model.bundle
    assert path is not None  # filled from state_dir by the settings
    try:
        bundle = load_bundle(path)
    except BundleError as exc:
        return [Check("bundle", "fail", str(exc))]
    manifest = bundle.manifest
    size = f"{manifest.input.width}x{manifest.input.height}"
    checks = [Check("bundle", "ok", f"{path}: {manifest.name} {manifest.version}, {manifest.backbone} at {size}")]
    checks.append(_check_signature(bundle.root, settings))
    checks.append(check_detection_power(manifest))
    checks.append(check_false_alarm_promise(manifest))
    if settings.model.precision != "fp32":
        checks.append(check_precision_variant(manifest, settings.model.precision))
    checks.extend(_check_engine(bundle, settings))
    return checks


def check_precision_variant(manifest: Manifest, precision: str) -> Check:
    """Whether the configured reduced-precision variant was shown to decide as FP32 on good images."""
    variant = manifest.variant(precision)
    if variant is None:
        return Check("precision", "fail", f"the bundle has no {precision} variant: run `uflow calibrate {precision}`")
    metrics = variant.metrics
    if "good_flagged" not in metrics:
        return Check(
            "precision",
            "warn",
            f"the {precision} variant was recorded before `uflow calibrate` checked its decisions on good images "
            f"(an INT8 flow flagged every good part: docs/precision.md); run `uflow calibrate {precision}` again",
        )
    images, flagged, before = (
        int(metrics.get(k, 0)) for k in ("agreement_images", "good_flagged", "good_flagged_fp32")
    )
    detail = (
        f"{precision} flags {flagged} of {images} good images (FP32 {before}); its smallest log10 NFA is at most "
        f"{metrics.get('log10_nfa_max_drop', 0.0):.2f} lower"
    )
    return Check("precision", "fail" if flagged > before else "ok", detail)


def check_detection_power(manifest: object) -> Check:
    """The label-free check recorded at training: the share of planted defects the NFA decision finds."""
    from edge_agent.bundle import MIN_PLANTED_DETECTION

    metrics = getattr(manifest, "validation_metrics", {})
    nfa_spec = getattr(manifest, "nfa", None)
    null = getattr(nfa_spec, "null_model", "polyomino")
    epsilon = getattr(nfa_spec, "log10_epsilon", 0.0)
    rate = metrics.get("planted_detection_rate")
    if rate is None:
        return Check(
            "detection power",
            "warn",
            f"the bundle records no planted-defect check (NFA {null}); re-export it with a current `uflow export`",
        )
    count = int(metrics.get("planted_count", 0))
    detail = f"the NFA ({null}, log10 epsilon {epsilon:g}) found {rate:.0%} of {count} defects planted on good images"
    fraction = float(getattr(nfa_spec, "mask_fraction", 0.0))
    if fraction > 0.0:
        detail += f"; each region is reported where the anomaly map reaches {fraction:.0%} of its peak"
    weight = metrics.get("anomaly_map_detail_weight")
    if weight is not None:
        detail += f"; the anomaly map weighs the stride-8 detail map at {weight:.0%}"
    if rate < MIN_PLANTED_DETECTION:
        return Check(
            "detection power", "warn", f"{detail}; below {MIN_PLANTED_DETECTION:.0%}: it may miss real defects"
        )
    return Check("detection power", "ok", detail)


def check_false_alarm_promise(manifest: object) -> Check:
    """Whether the good images that calibrated the NFA can vouch for its promised false-alarm rate."""
    from edge_agent.promise import describe, image_test_words, per_parts, shortfall

    nfa_spec = getattr(manifest, "nfa", None)
    null = getattr(nfa_spec, "null_model", "polyomino")
    epsilon = float(getattr(nfa_spec, "log10_epsilon", 0.0))
    if null != "fitted":
        return Check(
            "false alarms",
            "ok",
            f"the paper's polyomino NFA (log10 epsilon {epsilon:g}): its bound is conservative by construction",
        )
    calibration = getattr(nfa_spec, "calibration", None)
    if calibration is None:
        return Check(
            "false alarms",
            "warn",
            f"the bundle promises at most {per_parts(10.0**epsilon)} but records no calibration count: "
            "nothing backs the promise; retrain and re-export with a current `uflow`",
        )
    check = calibration.promise_check()
    image_test = getattr(nfa_spec, "image_test", None)
    detail = describe(check, calibration.folds, regions_only=image_test is not None)
    detail += image_test_words(image_test, epsilon)
    message = shortfall(check)
    if message:
        return Check("false alarms", "warn", f"{message}. {detail}")
    return Check("false alarms", "ok", detail)


def _check_signature(root: Path, settings: AgentSettings) -> Check:
    if settings.update.public_key is None:
        return Check("signature", "warn", "no update.public_key configured: bundle signatures are not checked")
    from edge_agent.fleet.signing import SigningError, verify_bundle_signature

    try:
        fingerprint = verify_bundle_signature(root, settings.update.public_key)
    except (SigningError, OSError) as exc:
        return Check("signature", "fail", str(exc))
    return Check("signature", "ok", f"model.json signed by fleet key {fingerprint}")


def source_is_live(settings: AgentSettings) -> bool:
    """Whether the configured source is a camera, stream or GStreamer pipeline (from its kind or URI)."""
    from edge_agent.inspection.drivers import LIVE_KINDS, detect_kind

    kind = settings.source.kind if settings.source.kind != "auto" else detect_kind(settings.source.uri)
    return kind in LIVE_KINDS


def _check_engine(bundle: Bundle, settings: AgentSettings) -> list[Check]:
    """The engine row and, for ONNX Runtime, the threads row: what was chosen for this box and source, and why."""
    import numpy as np

    from edge_agent.engines import EngineUnavailable, create_engine

    try:
        engine = create_engine(bundle, settings.model, live=source_is_live(settings))
    except (EngineUnavailable, ValueError, RuntimeError) as exc:
        return [Check("engine", "fail", str(exc))]
    plan = getattr(engine, "threads", None)  # ONNX Runtime only (TensorRT runs on the GPU)
    threads = [Check("threads", "ok", plan.describe())] if plan is not None else []
    try:
        _, height, width, _ = engine.io.input.shape
        frame = np.full((height, width, 3), 128, dtype=np.uint8)
        engine.infer(frame)  # first call pays for allocation and graph set-up
        ms = _median_ms(lambda: engine.infer(frame), repeats=5)
    except Exception as exc:  # any backend failure on a real frame is what the engineer must see
        return [Check("engine", "fail", f"{engine.backend} loaded but inference failed: {exc}"), *threads]
    finally:
        engine.close()
    ok = Check("engine", "ok", f"{engine.backend} {settings.model.precision}: {ms:.1f} ms per frame (median of 5)")
    return [ok, *threads]


def check_source(settings: AgentSettings) -> Check:
    """Open the configured source and grab one frame."""
    return grab_source(settings)[0]


def grab_source(settings: AgentSettings) -> tuple[Check, tuple[int, int] | None]:
    """The source row, and the (height, width) of the grabbed frame after source.roi (None when none came)."""
    from edge_agent.inspection.drivers import SourceError
    from edge_agent.inspection.frame_source import FrameSource
    from edge_agent.redact import redact_uri

    try:
        source = FrameSource(settings.source)
        try:
            source.open()
            frame = source.read()
        finally:
            source.close()
    except (SourceError, OSError) as exc:
        return Check("source", "fail", redact_uri(str(exc))), None
    if frame is None:
        return Check("source", "fail", f"{redact_uri(settings.source.uri)}: opened but delivered no frame"), None
    height, width = frame.image.shape[:2]
    return Check("source", "ok", f"{redact_uri(settings.source.uri)}: {width}x{height} frame grabbed"), (height, width)


def check_aspect(settings: AgentSettings, frame_hw: tuple[int, int] | None) -> Check:
    """The frames' aspect ratio (after source.roi) against the model's input: the resize must not squash parts.

    ``frame_hw`` is the grabbed frame's (height, width) (``--open-source``); without it ``source.roi``
    gives the size, and with neither the row says how to check it.
    """
    from edge_agent.bundle import BundleError, load_bundle
    from edge_agent.inspection.preprocess import aspect_advice, aspect_mismatch

    assert settings.model.bundle is not None
    try:
        spec = load_bundle(settings.model.bundle).manifest.input
    except BundleError as exc:
        return Check("aspect", "fail", str(exc))
    model_hw = (spec.height, spec.width)
    where = "the grabbed frame"
    if frame_hw is None and settings.source.roi is not None:
        frame_hw, where = (settings.source.roi[3], settings.source.roi[2]), "source.roi"
    if frame_hw is None:
        return Check(
            "aspect",
            "ok",
            f"the model takes {spec.width}x{spec.height} (aspect {spec.width / spec.height:.2f}); "
            "run with --open-source to compare the camera's frames",
        )
    ratio = aspect_mismatch(frame_hw, model_hw)
    if ratio is not None:
        return Check("aspect", "warn", f"{where}: {aspect_advice(frame_hw, model_hw, ratio)}")
    return Check(
        "aspect", "ok", f"{where} ({frame_hw[1]}x{frame_hw[0]}) has the model's aspect ({spec.width}x{spec.height})"
    )


def check_broker(settings: AgentSettings) -> Check:
    """TCP reachability only: the agent spools while the broker is away, so unreachable is a warning."""
    host, port = settings.mqtt.host, settings.mqtt.port
    try:
        with socket.create_connection((host, port), timeout=3.0):
            pass
    except OSError as exc:
        return Check(
            "mqtt broker",
            "warn",
            f"{host}:{port} not reachable ({exc}); the agent will keep retrying and spool messages",
        )
    return Check("mqtt broker", "ok", f"{host}:{port} accepts connections")


def _first_existing_parent(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]
