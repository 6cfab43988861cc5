"""TensorRT: everything that is not a TensorRT call is tested here; the GPU tests skip without one.

The recipes are checked against the API surface of each TensorRT version, as the fake bindings in
tests/fake_tensorrt write it down (10.x has ``BuilderFlag.FP16/INT8``, ``IInt8EntropyCalibrator2`` and
the STRONGLY_TYPED creation flag; 11.x has none of the precision flags or calibrators). Builds through
the fakes are in tests/test_trt_fake.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fake_tensorrt import make_tensorrt
from precision_bundle import build_precision_bundle, write_good_images

from edge_agent.bundle import Bundle, QuantizedModel, load_bundle
from edge_agent.cli import build_engine
from edge_agent.config import ModelConfig
from edge_agent.engines import EngineUnavailable, create_engine
from edge_agent.engines.tensorrt.build import ensure_plan, fixed_input_shape, numpy_dtype_name
from edge_agent.engines.tensorrt.cache import DeviceIdentity, EngineCache, EngineKey, new_metadata
from edge_agent.engines.tensorrt.progress import BuildProgress, Heartbeat
from edge_agent.engines.tensorrt.recipe import (
    BuildRecipe,
    ParserIssue,
    RecipeError,
    TensorRTBuildError,
    TensorRTVersionError,
    TrtFeatures,
    choose_recipe,
    describe_parser_errors,
    detect_features,
)

TRT10 = TrtFeatures(
    "10.3.0.30", fp16_flag=True, int8_flag=True, strongly_typed_flag=True, calibrators=True, progress_monitor=True
)
TRT11 = TrtFeatures(
    "11.1.0.2", fp16_flag=False, int8_flag=False, strongly_typed_flag=True, calibrators=False, progress_monitor=True
)
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def _api_surface(version: str, weak: bool) -> Any:
    """The fake binding of that TensorRT version (tests/fake_tensorrt)."""
    return make_tensorrt("10.3" if weak else "11.x") if version.startswith(("10.3", "11.1")) else make_tensorrt(version)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(build_precision_bundle(tmp_path_factory.mktemp("trt") / "bundle"))


def _with_variants(bundle: Bundle, *precisions: str) -> Bundle:
    """The same bundle with variants recorded (hashes are not re-verified by the recipes)."""
    files = dict(bundle.manifest.files)
    variants = []
    for precision in precisions:
        files[f"model.{precision}.onnx"] = precision[0] * 64
        variants.append(QuantizedModel(file=f"model.{precision}.onnx", precision=precision))  # type: ignore[arg-type]
    manifest = bundle.manifest.model_copy(update={"files": files, "variants": tuple(variants)})
    return Bundle(root=bundle.root, manifest=manifest)


def test_detect_features_tells_10_from_11() -> None:
    ten = detect_features(_api_surface("10.3.0", weak=True))
    eleven = detect_features(_api_surface("11.1.0", weak=False))
    assert ten == TRT10
    assert eleven == TRT11
    assert ten.weakly_typed and not eleven.weakly_typed and eleven.major == 11


def test_recipes_are_strongly_typed_for_fp16_and_int8(bundle: Bundle) -> None:
    both = _with_variants(bundle, "fp16", "int8")
    for features in (TRT10, TRT11):
        fp32 = choose_recipe(both, "fp32", features)
        assert (fp32.onnx_file, fp32.builder_flags, fp32.strongly_typed) == ("model.onnx", (), features.major >= 11)
        fp16 = choose_recipe(both, "fp16", features)
        assert (fp16.name, fp16.onnx_file, fp16.strongly_typed, fp16.builder_flags) == (
            "fp16-typed",
            "model.fp16.onnx",
            True,
            (),
        )
        int8 = choose_recipe(both, "int8", features)
        assert (int8.name, int8.onnx_file, int8.strongly_typed, int8.builder_flags) == (
            "int8-qdq-typed",
            "model.int8.onnx",
            True,
            (),
        )
        assert int8.onnx_sha256 == "i" * 64


def test_no_precision_flag_on_a_strongly_typed_recipe() -> None:
    with pytest.raises(ValueError, match="strongly typed"):
        BuildRecipe("fp16", "fp16-flag", "model.onnx", "a" * 64, strongly_typed=True, builder_flags=("FP16",))
    with pytest.raises(ValueError, match="strongly typed"):
        BuildRecipe("int8", "x", "model.int8.onnx", "a" * 64, strongly_typed=True, builder_flags=("TF32", "INT8"))
    BuildRecipe("fp32", "fp32", "model.onnx", "a" * 64, strongly_typed=False, builder_flags=("TF32",))


def test_missing_variants_say_what_to_make(bundle: Bundle) -> None:
    for features in (TRT10, TRT11):
        with pytest.raises(RecipeError, match=r"uflow calibrate fp16 --bundle"):
            choose_recipe(bundle, "fp16", features)
        with pytest.raises(RecipeError, match=r"uflow calibrate int8 --bundle"):
            choose_recipe(bundle, "int8", features)
    with pytest.raises(RecipeError, match="precision must be one of"):
        choose_recipe(bundle, "int4", TRT10)


def test_version_floor(bundle: Bundle) -> None:
    both = _with_variants(bundle, "fp16", "int8")
    old = TrtFeatures("8.6.2", True, True, True, True, False)
    with pytest.raises(TensorRTVersionError, match=r"TensorRT 8\.6\.2 is too old.*JetPack 6\.1"):
        choose_recipe(both, "fp32", old)
    early_10 = TrtFeatures("10.1.0", True, True, True, True, True)
    assert choose_recipe(both, "fp32", early_10).name == "fp32"
    with pytest.raises(RecipeError, match=r"TensorRT 10\.3 or newer"):
        choose_recipe(both, "fp16", early_10)


def test_dynamic_inputs_are_pinned_to_the_manifest_shape() -> None:
    """An exporter's dynamic batch (-1) takes the manifest's 1; a fixed axis must already agree."""
    assert fixed_input_shape((1, 64, 64, 3), (1, 64, 64, 3), "image") is None
    assert fixed_input_shape((-1, 64, 64, 3), (1, 64, 64, 3), "image") == (1, 64, 64, 3)
    assert fixed_input_shape((-1, -1, -1, 3), (1, 32, 48, 3), "image") == (1, 32, 48, 3)
    with pytest.raises(TensorRTBuildError, match=r"input 'image' has shape \[-1, 128, 128, 3\].*\[1, 64, 64, 3\]"):
        fixed_input_shape((-1, 128, 128, 3), (1, 64, 64, 3), "image")
    with pytest.raises(TensorRTBuildError, match="cannot run the manifest's shape"):
        fixed_input_shape((-1, 3, 64, 64, 1), (1, 64, 64, 3), "image")


def test_types_without_numpy_equivalent_are_named() -> None:
    """trt.nptype raises TypeError for BF16/FP8/INT4; the error names the tensor and the type."""

    def nptype(dtype: str) -> type:
        known = {"UINT8": np.uint8, "FLOAT": np.float32, "HALF": np.float16}
        if dtype not in known:
            raise TypeError(f"Could not resolve TensorRT datatype to an equivalent numpy datatype. {dtype}")
        return known[dtype]

    trt_types = SimpleNamespace(nptype=nptype)
    assert numpy_dtype_name(trt_types, "UINT8", "image") == "uint8"
    assert numpy_dtype_name(trt_types, "HALF", "m_0") == "float16"
    with pytest.raises(TensorRTBuildError, match=r"tensor 'anomaly_map' is BF16, which has no numpy type"):
        numpy_dtype_name(trt_types, "BF16", "anomaly_map")


def test_parser_errors_name_the_nodes() -> None:
    issues = [
        ParserIssue("No importer registered for op: Unique", "UNSUPPORTED_NODE", 42, "dedupe_values", "Unique"),
        ParserIssue("Assertion failed: zero point must be 0", "INVALID_NODE", 7, "q_x", "QuantizeLinear"),
        ParserIssue("ModelImporter.cpp: failed to parse the model"),
    ]
    text = describe_parser_errors(Path("/b/model.int8.onnx"), issues, "10.3.0")
    assert text.startswith("TensorRT 10.3.0 cannot parse model.int8.onnx (3 error(s))")
    assert "Unique 'dedupe_values' (node #42): No importer registered for op: Unique [UNSUPPORTED_NODE]" in text
    assert "QuantizeLinear 'q_x' (node #7)" in text
    assert "  - ModelImporter.cpp: failed to parse the model" in text


def test_progress_logs_top_level_phases_and_cancels(caplog: pytest.LogCaptureFixture) -> None:
    progress = BuildProgress(log_every_s=0.0)
    with caplog.at_level(logging.INFO, logger="edge_agent.engines.tensorrt.progress"):
        progress.phase_start("Building engine", None, 3)
        progress.phase_start("Tactic search", "Building engine", 100)
        assert progress.step("Tactic search", 10) is True
        assert progress.active_phases() == ["Building engine", "Tactic search"]
        progress.cancel.set()
        assert progress.step("Tactic search", 11) is False  # TensorRT stops the build when this is False
        progress.phase_finish("Tactic search")
        progress.phase_finish("Building engine")
    events = [(r.event, getattr(r, "phase", None)) for r in caplog.records]  # type: ignore[attr-defined]
    assert ("trt_phase_start", "Building engine") in events
    assert ("trt_phase_start", "Tactic search") not in events  # nested phases are too chatty
    assert ("trt_progress", "Tactic search") in events
    assert ("trt_phase_finish", "Building engine") in events
    assert progress.active_phases() == []


def test_heartbeat_reports_elapsed_time(caplog: pytest.LogCaptureFixture) -> None:
    progress = BuildProgress()
    with (
        caplog.at_level(logging.INFO, logger="edge_agent.engines.tensorrt.progress"),
        Heartbeat(progress, "m.onnx", 0.05),
    ):
        time.sleep(0.3)
    beats = [r for r in caplog.records if getattr(r, "event", "") == "trt_build_heartbeat"]
    assert len(beats) >= 2
    assert "still building the TensorRT engine for m.onnx" in beats[0].getMessage()


def test_ensure_plan_uses_a_matching_cached_plan_without_building(bundle: Bundle, tmp_path: Path) -> None:
    trt = _api_surface("10.3.0", weak=True)
    device = DeviceIdentity("Orin", "8.7", trt.__version__, 16, 64)
    cache = EngineCache(tmp_path)
    key = EngineKey.for_device(device, bundle.onnx_sha256, "fp32", "fp32")
    cache.store(key, b"plan", new_metadata(key, b"plan", 1.0, "model.onnx"))
    result = ensure_plan(trt, bundle, "fp32", device, cache)
    assert (result.plan, result.built, result.path) == (b"plan", False, cache.plan_path(key))
    # The same plan is not used for another GPU; without building allowed the reason is given.
    with pytest.raises(TensorRTBuildError, match=r"no plan built for fp32 on Orin Nano.*Orin"):
        ensure_plan(
            trt, bundle, "fp32", DeviceIdentity("Orin Nano", "8.7", trt.__version__), cache, build_if_missing=False
        )
    # Nor for an Orin module with fewer SMs or less memory (same name, same compute capability).
    smaller = DeviceIdentity("Orin", "8.7", trt.__version__, 8, 16)
    with pytest.raises(TensorRTBuildError, match=r"fp32 on Orin \(8 SMs, 16 GiB\).*exist for other.*16 SMs, 64 GiB"):
        ensure_plan(trt, bundle, "fp32", smaller, cache, build_if_missing=False)


@pytest.mark.skipif(HAVE_TRT, reason="checks the behaviour where TensorRT is not installed")
def test_without_tensorrt_auto_falls_back_to_onnxruntime(bundle: Bundle, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        engine = create_engine(bundle, ModelConfig(backend="auto"))
    assert engine.backend == "onnxruntime"
    fallback = [r for r in caplog.records if getattr(r, "event", "") == "backend_fallback"]
    assert fallback and "tensorrt" in fallback[0].reason  # type: ignore[attr-defined]
    with pytest.raises(EngineUnavailable, match="TensorRT not available on this device"):
        create_engine(bundle, ModelConfig(backend="tensorrt"))


@pytest.mark.skipif(HAVE_TRT, reason="checks the behaviour where TensorRT is not installed")
def test_tensorrt_engine_without_tensorrt_says_so(bundle: Bundle) -> None:
    from edge_agent.engines.tensorrt.runtime import TensorRTEngine

    with pytest.raises(EngineUnavailable, match="TensorRT is not installed"):
        TensorRTEngine(bundle, ModelConfig(backend="tensorrt"))


def _build_args(bundle_dir: Path, cache: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    build_engine.add_arguments(parser)
    return parser.parse_args(["--bundle", str(bundle_dir), "--cache-dir", str(cache), *extra])


@pytest.mark.skipif(HAVE_TRT, reason="checks the behaviour where TensorRT is not installed")
def test_build_engine_exit_codes_without_tensorrt(bundle: Bundle, tmp_path: Path) -> None:
    assert build_engine.run(_build_args(bundle.root, tmp_path)) == build_engine.EXIT_UNAVAILABLE
    assert build_engine.run(_build_args(tmp_path / "nope", tmp_path)) == build_engine.EXIT_FAILURE
    assert build_engine.run(_build_args(bundle.root, tmp_path, "--workspace-mb", "8")) == build_engine.EXIT_CONFIG


# --- on a GPU with TensorRT -------------------------------------------------------------------------


def _gpu_or_skip() -> None:
    if not HAVE_TRT:
        pytest.skip(
            "needs TensorRT and cuda-python or pycuda (pip install '.[tensorrt-cu12]' on a machine with an NVIDIA GPU)"
        )
    from edge_agent.engines.tensorrt.cuda_buffers import open_cuda

    try:
        open_cuda("probe").release()
    except EngineUnavailable as exc:
        pytest.skip(f"no usable NVIDIA GPU: {exc}")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_matches_onnxruntime_and_caches(tmp_path: Path, precision: str) -> None:
    _gpu_or_skip()
    from calibration.fp16 import Fp16Settings
    from calibration.fp16 import calibrate_bundle as calibrate_fp16
    from calibration.int8 import Int8Settings
    from calibration.int8 import calibrate_bundle as calibrate_int8
    from edge_agent.engines.onnxruntime import OnnxRuntimeEngine
    from edge_agent.engines.tensorrt.runtime import TensorRTEngine

    root = build_precision_bundle(tmp_path / "bundle")
    images = write_good_images(tmp_path / "good", 12)
    calibrate_int8(root, images, Int8Settings(images=8))
    calibrate_fp16(root, images, Fp16Settings(images=4))
    bundle = load_bundle(root)
    config = ModelConfig(backend="tensorrt", precision=precision, engine_cache_dir=tmp_path / "engines")
    assert build_engine.run(_build_args(root, tmp_path / "engines", "--precision", precision)) == 0
    engine = TensorRTEngine(bundle, config)
    frame = np.random.default_rng(0).integers(60, 200, (32, 32, 3), dtype=np.uint8)
    out = engine.infer(frame)
    again = engine.infer(frame)
    engine.close()
    reference = OnnxRuntimeEngine(bundle, precision="int8" if precision == "int8" else "fp32").infer(frame)
    tolerance = {"fp32": 1e-3, "fp16": 2e-2, "int8": 5e-2}[precision]
    assert np.abs(out.anomaly_map - reference.anomaly_map).max() < tolerance
    np.testing.assert_array_equal(out.anomaly_map, again.anomaly_map)  # buffers reused, results copied out
    # Second run finds the plan; a different GPU name in the key would not.
    assert build_engine.run(_build_args(root, tmp_path / "engines", "--precision", precision)) == 0
    assert len(list((tmp_path / "engines").glob("*.plan"))) == 1
