"""The TensorRT path end to end against fakes of the 10.3, 10.x-latest and 11.x Python bindings and of
cuda-python and pycuda (tests/fake_tensorrt): feature detection, recipe choice, the version floor, the
graph rules, the builder calls, and the engine's buffers and stream, on every test run without a GPU.

The bundles are real (ONNX models run by ONNX Runtime, FP16/INT8 variants made by the calibration
commands); the fake "plan" is the parsed ONNX and the fake engine runs it with ONNX Runtime through the
fake device memory, so the TensorRT backend's I/O binding and copies are checked against real outputs.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from fake_tensorrt import (
    PRECISION_FLAG_NAMES,
    install,
    make_cuda_python,
    make_pycuda,
    make_tensorrt,
    reset_memory,
)
from onnx import TensorProto, helper
from precision_bundle import build_precision_bundle, write_good_images

from edge_agent.bundle import MODEL_NAME, Bundle, file_hashes, load_bundle, read_manifest, write_manifest
from edge_agent.cli import build_engine
from edge_agent.config import ModelConfig
from edge_agent.engines import EngineUnavailable, GpuUnreachable, TensorRTTooOld
from edge_agent.engines.onnxruntime import OnnxRuntimeEngine
from edge_agent.engines.tensorrt.build import build_serialized, ensure_plan
from edge_agent.engines.tensorrt.cache import DeviceIdentity, EngineCache
from edge_agent.engines.tensorrt.progress import BuildProgress, Heartbeat
from edge_agent.engines.tensorrt.recipe import (
    OnnxParseError,
    RecipeError,
    TensorRTBuildError,
    choose_recipe,
    detect_features,
)

SUPPORTED = ("10.3", "10.x-latest", "11.x")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A U-Flow-shaped bundle with model.fp16.onnx and model.int8.onnx made by the calibration commands."""
    from calibration.fp16 import Fp16Settings
    from calibration.fp16 import calibrate_bundle as calibrate_fp16
    from calibration.int8 import Int8Settings
    from calibration.int8 import calibrate_bundle as calibrate_int8

    root = tmp_path_factory.mktemp("fake_trt")
    bundle = build_precision_bundle(root / "bundle")
    images = write_good_images(root / "good", 10)
    calibrate_int8(bundle, images, Int8Settings(images=6))
    calibrate_fp16(bundle, images, Fp16Settings(images=4))
    return bundle


@pytest.fixture
def bundle_copy(calibrated: Path, tmp_path: Path) -> Bundle:
    return load_bundle(shutil.copytree(calibrated, tmp_path / "bundle"))


def _old_export(root: Path) -> None:
    """Rewrite model.onnx as the exporter did before the fix: image -> Transpose -> Cast."""
    model = onnx.load(str(root / MODEL_NAME))
    nodes = list(model.graph.node)
    cast, transpose = nodes[0], nodes[1]
    assert (cast.op_type, transpose.op_type) == ("Cast", "Transpose")
    old = [
        helper.make_node("Transpose", ["image"], ["image_nchw_u8"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Cast", ["image_nchw_u8"], [transpose.output[0]], to=TensorProto.FLOAT, name="cast"),
    ]
    del model.graph.node[:]
    model.graph.node.extend(old + nodes[2:])
    onnx.save(model, str(root / MODEL_NAME))
    manifest = read_manifest(root)
    write_manifest(root, manifest.model_copy(update={"files": {**manifest.files, **file_hashes(root, [MODEL_NAME])}}))


def _device(trt: object) -> DeviceIdentity:
    return DeviceIdentity("Orin", "8.7", str(trt.__version__), 16, 61)  # type: ignore[attr-defined]


# --- feature detection and recipes on each binding ----------------------------------------------------


@pytest.mark.parametrize(
    ("version", "weak", "calibrators"),
    [("10.3", True, True), ("10.x-latest", True, True), ("11.x", False, False)],
)
def test_feature_detection(version: str, weak: bool, calibrators: bool) -> None:
    features = detect_features(make_tensorrt(version))
    assert features.weakly_typed is weak and features.calibrators is calibrators
    assert features.strongly_typed_flag and features.progress_monitor and features.strongly_typed_builds


@pytest.mark.parametrize("version", SUPPORTED)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_precision_builds_without_precision_flags_on_strongly_typed_networks(
    bundle_copy: Bundle, tmp_path: Path, version: str, precision: str
) -> None:
    trt = make_tensorrt(version)
    cache = EngineCache(tmp_path / "engines")
    result = ensure_plan(trt, bundle_copy, precision, _device(trt), cache)
    assert result.built and cache.load(result.key).plan == result.plan
    (build,) = trt.builds  # type: ignore[attr-defined]
    assert not (build["strongly_typed"] and build["flags"] & PRECISION_FLAG_NAMES)
    assert build["flags"] & PRECISION_FLAG_NAMES == set()  # no recipe sets FP16/INT8 any more
    if precision != "fp32":
        assert build["strongly_typed"]
        assert result.key.recipe == {"fp16": "fp16-typed", "int8": "int8-qdq-typed"}[precision]
    if trt.__version__.startswith("11."):  # type: ignore[attr-defined]
        assert build["flags_value"] == 0  # the creation flag is implicit (and deprecated) on 11
    # The second call finds the plan and builds nothing.
    again = ensure_plan(trt, bundle_copy, precision, _device(trt), cache)
    assert not again.built and len(trt.builds) == 1  # type: ignore[attr-defined]


def test_precision_flags_never_reach_a_strongly_typed_network(bundle_copy: Bundle, tmp_path: Path) -> None:
    """A strongly typed network with BuilderFlag.FP16 fails; the agent's guard stops it before TensorRT."""
    trt = make_tensorrt("10.3")
    recipe = choose_recipe(bundle_copy, "fp16", detect_features(trt))
    object.__setattr__(recipe, "builder_flags", ("FP16",))  # as a careless later edit of a frozen recipe might
    with pytest.raises(TensorRTBuildError, match="strongly typed"):
        build_serialized(trt, detect_features(trt), bundle_copy.root / recipe.onnx_file, recipe)
    assert trt.builds == []  # type: ignore[attr-defined]
    # And TensorRT (the fake, as the real builder) refuses the combination if it ever got there.
    logged: list[str] = []
    builder = trt.Builder(type("L", (), {"log": lambda self, severity, msg: logged.append(msg)})())  # type: ignore[attr-defined]
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))  # type: ignore[attr-defined]
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)  # type: ignore[attr-defined]
    assert builder.build_serialized_network(network, config) is None and logged


def test_version_floor_names_the_jetpack(bundle_copy: Bundle, tmp_path: Path) -> None:
    old = make_tensorrt("8.6")
    with pytest.raises(TensorRTBuildError, match=r"8\.6\.2\.3 is too old.*JetPack 6\.1"):
        ensure_plan(old, bundle_copy, "fp32", _device(old), EngineCache(tmp_path))
    early = make_tensorrt("10.1")
    assert ensure_plan(early, bundle_copy, "fp32", _device(early), EngineCache(tmp_path)).built
    with pytest.raises(RecipeError, match=r"10\.3 or newer"):
        ensure_plan(early, bundle_copy, "int8", _device(early), EngineCache(tmp_path))


# --- graph rules at build time ---------------------------------------------------------------------


def test_old_export_is_migrated_before_the_parser_sees_it(
    bundle_copy: Bundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _old_export(bundle_copy.root)
    bundle = load_bundle(bundle_copy.root)
    trt = make_tensorrt("10.3")
    # The parser itself refuses the old graph, naming the Transpose.
    with pytest.raises(OnnxParseError, match=r"Transpose 'to_nchw'"):
        build_serialized(
            trt, detect_features(trt), bundle.onnx_path, choose_recipe(bundle, "fp32", detect_features(trt))
        )
    cache = EngineCache(tmp_path / "engines")
    with caplog.at_level(logging.WARNING):
        result = ensure_plan(trt, bundle, "fp32", _device(trt), cache)
    assert result.built
    assert any(getattr(r, "event", "") == "onnx_migrated" for r in caplog.records)
    sidecar = cache.load(result.key).metadata
    assert sidecar is not None and "Transpose" in str(sidecar.builder["migrated"])
    assert result.key.onnx_sha256 == bundle.onnx_sha256  # keyed by the shipped file


def test_a_graph_that_cannot_be_migrated_is_refused_with_the_nodes(bundle_copy: Bundle, tmp_path: Path) -> None:
    """An FP16 model whose z² is FP16 (the converter's default without the head kept) is refused."""
    from calibration.fp16 import Fp16Settings, convert_fp16

    root = bundle_copy.root
    convert_fp16(root / MODEL_NAME, root / "model.fp16.onnx", bundle_copy.manifest.output_names, Fp16Settings(()))
    manifest = read_manifest(root)
    write_manifest(
        root, manifest.model_copy(update={"files": {**manifest.files, **file_hashes(root, ["model.fp16.onnx"])}})
    )
    trt = make_tensorrt("10.x-latest")
    with pytest.raises(TensorRTBuildError, match=r"head_square_0.*FP16"):
        ensure_plan(trt, load_bundle(root), "fp16", _device(trt), EngineCache(tmp_path))
    assert trt.builds == []  # type: ignore[attr-defined]


# --- the engine on cuda-python and on pycuda -----------------------------------------------------------


@pytest.mark.parametrize("binding", ["cuda-python", "pycuda"])
@pytest.mark.parametrize("version", ["10.3", "11.x"])
def test_engine_runs_through_each_cuda_binding(
    bundle_copy: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, binding: str, version: str
) -> None:
    from edge_agent.engines.tensorrt.runtime import TensorRTEngine

    memory = reset_memory()
    cuda_python = make_cuda_python() if binding == "cuda-python" else None
    install(monkeypatch, make_tensorrt(version), cuda_python=cuda_python, pycuda=make_pycuda())
    config = ModelConfig(backend="tensorrt", precision="int8", engine_cache_dir=tmp_path / "engines")
    engine = TensorRTEngine(bundle_copy, config)
    assert engine.recipe == "int8-qdq-typed"
    frames = [np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8) for seed in range(3)]
    reference = OnnxRuntimeEngine(bundle_copy, precision="int8")
    for frame in frames:
        got, want = engine.infer(frame), reference.infer(frame)
        np.testing.assert_array_equal(got.anomaly_map, want.anomaly_map)
        for g, w in zip(got.scale_maps, want.scale_maps, strict=True):
            np.testing.assert_array_equal(g, w)
    engine.close()
    assert memory.blocks == {}  # every device buffer freed
    assert memory.context_depth == 0
    if cuda_python is not None:
        assert cuda_python.host_buffers == {} and cuda_python.streams == set()
    # Nothing (stream, buffers) was created, used or freed outside the context.
    assert [e for e in memory.events if "without a current context" in e] == []


def test_without_any_cuda_binding_or_gpu(bundle_copy: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.engines.tensorrt.runtime import TensorRTEngine

    config = ModelConfig(backend="tensorrt", precision="fp32", engine_cache_dir=tmp_path)
    install(monkeypatch, make_tensorrt("10.3"))
    with pytest.raises(EngineUnavailable, match=r"cuda-python \(cuda\.bindings\) and pycuda missing"):
        TensorRTEngine(bundle_copy, config)
    install(monkeypatch, make_tensorrt("10.3"), cuda_python=make_cuda_python(gpus=0))
    with pytest.raises(GpuUnreachable, match="CUDA_ERROR_NO_DEVICE"):
        TensorRTEngine(bundle_copy, config)
    install(monkeypatch, make_tensorrt("8.6"), cuda_python=make_cuda_python())
    with pytest.raises(TensorRTTooOld, match="JetPack"):
        TensorRTEngine(bundle_copy, config)


def test_device_identity_from_each_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.engines.tensorrt.cuda_buffers import open_cuda

    install(monkeypatch, make_tensorrt("10.3"), cuda_python=make_cuda_python(sms=8), pycuda=make_pycuda())
    first = open_cuda("10.3.0.30")
    assert first.name == "cuda-python"
    assert first.identity == DeviceIdentity("Orin", "8.7", "10.3.0.30", 8, 7)
    fallback = open_cuda("10.3.0.30", prefer="pycuda")
    assert fallback.name == "pycuda"
    assert fallback.identity == DeviceIdentity("NVIDIA RTX A2000", "8.6", "10.3.0.30", 26, 12)


# --- build-engine --------------------------------------------------------------------------------------


def _args(bundle: Path, cache: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    build_engine.add_arguments(parser)
    return parser.parse_args(["--bundle", str(bundle), "--cache-dir", str(cache), *extra])


def test_build_engine_exit_statuses(bundle_copy: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = bundle_copy.root, tmp_path / "engines"
    install(monkeypatch, make_tensorrt("10.3"))
    assert build_engine.run(_args(root, cache)) == build_engine.EXIT_UNAVAILABLE  # no CUDA binding installed
    install(monkeypatch, make_tensorrt("10.3"), cuda_python=make_cuda_python(gpus=0))
    assert build_engine.run(_args(root, cache)) == build_engine.EXIT_NO_GPU  # installed, but no GPU reachable
    install(monkeypatch, make_tensorrt("8.6"), cuda_python=make_cuda_python())
    assert build_engine.run(_args(root, cache)) == build_engine.EXIT_FAILURE  # too old
    reset_memory()
    install(monkeypatch, make_tensorrt("11.x"), cuda_python=make_cuda_python())
    assert build_engine.run(_args(root, cache, "--precision", "fp16")) == build_engine.EXIT_OK  # built + verified
    assert build_engine.run(_args(root, cache, "--precision", "fp16")) == build_engine.EXIT_OK  # cached
    assert len(list(cache.glob("*.plan"))) == 1
    assert len({build_engine.EXIT_UNAVAILABLE, build_engine.EXIT_NO_GPU, build_engine.EXIT_FAILURE}) == 3


# --- systemd start timeout ---------------------------------------------------------------------------


def test_heartbeat_extends_the_start_timeout_only_while_the_build_progresses(tmp_path: Path) -> None:
    from edge_agent.systemd import SystemdNotifier

    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        progress = BuildProgress()
        notifier = SystemdNotifier(socket_path=str(path))
        with Heartbeat(progress, "m.onnx", period=0.05, notifier=notifier, stall_s=0.3):
            message = sock.recv(4096).decode()
            assert message.startswith("EXTEND_TIMEOUT_USEC=150000\n") and "building TensorRT engine" in message
            # TensorRT stops reporting: after stall_s the extensions stop, so a stuck build times out.
            time.sleep(0.5)
            sock.settimeout(0.0)
            while True:
                try:
                    sock.recv(4096)
                except BlockingIOError:
                    break
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(4096)
            progress.step("Building engine", 1)  # progress again: extensions resume
            sock.settimeout(2.0)
            assert sock.recv(4096).decode().startswith("EXTEND_TIMEOUT_USEC=")
        notifier.close()
    finally:
        sock.close()


# --- the updater builds the plan before it switches -------------------------------------------------


def test_prebuild_makes_auto_use_tensorrt_for_the_new_bundle(
    bundle_copy: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_agent.engines import create_engine
    from edge_agent.engines.tensorrt.prebuild import prebuild_plan

    config = ModelConfig(backend="auto", precision="fp16", engine_cache_dir=tmp_path / "engines")
    reset_memory()
    install(monkeypatch, make_tensorrt("10.3"), cuda_python=make_cuda_python())
    # Without the prebuild, auto finds no plan and falls back to the CPU (the defect).
    fallback = create_engine(bundle_copy, config)
    assert fallback.backend == "onnxruntime"
    fallback.close()
    ready = prebuild_plan(bundle_copy, config)
    assert ready is not None and ready.built and ready.recipe == "fp16-typed"
    engine = create_engine(bundle_copy, config)
    assert engine.backend == "tensorrt"
    engine.close()
    assert prebuild_plan(bundle_copy, config).built is False  # type: ignore[union-attr]  # found, not rebuilt


def test_prebuild_where_tensorrt_cannot_run(
    bundle_copy: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_agent.engines.tensorrt.prebuild import prebuild_plan

    auto = ModelConfig(backend="auto", precision="fp32", engine_cache_dir=tmp_path)
    forced = ModelConfig(backend="tensorrt", precision="fp32", engine_cache_dir=tmp_path)
    assert prebuild_plan(bundle_copy, ModelConfig(backend="onnxruntime")) is None
    install(monkeypatch, None)
    assert prebuild_plan(bundle_copy, auto) is None  # a CPU box: nothing to build
    with pytest.raises(EngineUnavailable, match="TensorRT not available"):
        prebuild_plan(bundle_copy, forced)
    install(monkeypatch, make_tensorrt("10.3"), cuda_python=make_cuda_python(gpus=0))
    assert prebuild_plan(bundle_copy, auto) is None
    # A bundle whose plan cannot be built fails the update's load_engine step (the old model stays).
    install(monkeypatch, make_tensorrt("10.3"), cuda_python=make_cuda_python())
    with pytest.raises(EngineUnavailable, match=r"cannot be built.*no INT8 Q/DQ model"):
        prebuild_plan(
            load_bundle(build_precision_bundle(tmp_path / "plain")), auto.model_copy(update={"precision": "int8"})
        )


def test_updater_proves_the_new_bundle_on_its_tensorrt_plan(
    bundle_copy: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The update's load_engine step builds the plan first, so the self-test runs on TensorRT, not the CPU."""
    from edge_agent.config import load_settings
    from edge_agent.fleet import update

    reset_memory()
    install(monkeypatch, make_tensorrt("11.x"), cuda_python=make_cuda_python())
    settings = load_settings(
        None,
        state_dir=str(tmp_path / "state"),
        model={"backend": "auto", "precision": "int8", "engine_cache_dir": str(tmp_path / "engines")},
        update={"require_self_test": False},
    )
    steps: list[tuple[str, bool, str]] = []
    update._prove_on_this_device(
        bundle_copy.root, settings, lambda step, ok, message="": steps.append((step, ok, message))
    )
    assert ("load_engine", True, "tensorrt int8 engine loaded") in steps
    assert len(list((tmp_path / "engines").glob("*.plan"))) == 1
