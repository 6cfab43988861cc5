"""uflow calibrate int8/fp16 on real ONNX files and real ONNX Runtime sessions; the TensorRT calibrator feed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
from precision_bundle import NODE_NAMES, SIZE, build_precision_bundle, write_good_images

from calibration.agreement import compare_models
from calibration.bundle_variants import record_variant
from calibration.data import CalibrationDataError, find_images, model_batches, pick_evenly, select_images
from calibration.fp16 import Fp16Error, Fp16Settings, convert_fp16, head_nodes
from calibration.fp16 import calibrate_bundle as calibrate_fp16
from calibration.int8 import Int8Settings, QuantizationError, conv_groups, quantize_int8
from calibration.int8 import calibrate_bundle as calibrate_int8
from calibration.trt_calibrator import CalibrationFeed, calibration_cache_path
from edge_agent.bundle import SIGNATURE_NAME, BundleError, QuantizedModel, load_bundle, sha256_of
from edge_agent.engines.onnxruntime import OnnxRuntimeEngine
from edge_agent.engines.tensorrt.ops import unsupported_ops
from edge_agent.inspection.preprocess import model_input
from training import cli as uflow_cli


@pytest.fixture(scope="module")
def good_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_good_images(tmp_path_factory.mktemp("good") / "images", 24)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, good_images: Path) -> Path:
    """A bundle with both variants made once (the slow part), shared by the read-only tests."""
    root = build_precision_bundle(tmp_path_factory.mktemp("calibrated") / "bundle")
    calibrate_int8(root, good_images, Int8Settings(images=12, method="minmax"))
    calibrate_fp16(root, good_images, Fp16Settings(images=4))
    return root


def _copy_bundle(src: Path, dst: Path) -> Path:
    assert (src / "model.json").is_file(), f"{src} is not a bundle"  # never copy a wrong tree
    shutil.copytree(src, dst)
    return dst


def _weight_is_quantized(model: onnx.ModelProto, conv_name: str) -> bool:
    """True when the conv's weight input comes from a DequantizeLinear (Q/DQ)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    conv = next(node for node in model.graph.node if node.name == conv_name)
    source = producer.get(conv.input[1])
    return source is not None and source.op_type == "DequantizeLinear"


def test_conv_groups_find_the_flow_structure(tmp_path: Path) -> None:
    root = build_precision_bundle(tmp_path / "b")
    groups = conv_groups(onnx.load(str(root / "model.onnx"))).groups
    assert groups["coupling"] == (NODE_NAMES["out"],)
    assert groups["subnet"] == (NODE_NAMES["hidden"],)
    assert groups["permutation"] == (NODE_NAMES["perm"],)
    assert groups["backbone"] == (NODE_NAMES["stem"], NODE_NAMES["down"])
    assert groups["stem"] == (NODE_NAMES["stem"],)


def test_int8_variant_is_recorded_verified_and_runs(calibrated: Path, good_images: Path) -> None:
    bundle = load_bundle(calibrated)  # every hash, including the new file, checks out
    variant = bundle.manifest.variant("int8")
    assert variant is not None and variant.file == "model.int8.onnx"
    assert bundle.manifest.files["model.int8.onnx"] == sha256_of(calibrated / "model.int8.onnx")
    assert variant.settings["method"] == "minmax" and variant.settings["per_channel"] is True
    assert variant.settings["calibration_images"]["images"] == 12
    # The default keeps the backbone FP32 (docs/precision.md: it is where INT8 costs accuracy).
    assert variant.settings["excluded_nodes"] == sorted([NODE_NAMES["stem"], NODE_NAMES["down"]])
    assert 0.0 < variant.metrics["anomaly_map_mean_abs_diff"] < 0.01

    model = onnx.load(str(calibrated / "model.int8.onnx"))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert _weight_is_quantized(model, NODE_NAMES["hidden"])
    assert _weight_is_quantized(model, NODE_NAMES["out"])
    assert not _weight_is_quantized(model, NODE_NAMES["stem"])
    assert unsupported_ops(calibrated / "model.int8.onnx") == []  # symmetric INT8, FP32 biases: TensorRT parses it

    image = model_input(cv2.imread(str(sorted(good_images.iterdir())[-1])), 32, 32)
    fp32 = OnnxRuntimeEngine(bundle, precision="fp32").infer(image)
    int8 = OnnxRuntimeEngine(bundle, precision="int8").infer(image)
    assert int8.anomaly_map.shape == fp32.anomaly_map.shape
    assert 0.0 < np.abs(int8.anomaly_map - fp32.anomaly_map).mean() < 0.01
    for a, b in zip(int8.scale_maps, fp32.scale_maps, strict=True):
        assert np.abs(a - b).mean() < 0.05 * b.mean()


def test_fp16_variant_keeps_io_types_and_the_head_in_fp32(calibrated: Path) -> None:
    bundle = load_bundle(calibrated)
    variant = bundle.manifest.variant("fp16")
    assert variant is not None and variant.file == "model.fp16.onnx"
    model = onnx.load(str(calibrated / "model.fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}
    fp16_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_weights, "the convolution weights should be FP16"
    assert set(variant.settings["fp32_nodes"]) >= {"head_square_0", "head_mean_1", "head_exp_0", "head_squeeze"}
    assert variant.metrics["anomaly_map_max_abs_diff"] < 0.02
    assert unsupported_ops(calibrated / "model.fp16.onnx") == []
    out = OnnxRuntimeEngine(bundle, precision="fp16").infer(np.full((32, 32, 3), 128, np.uint8))
    assert out.anomaly_map.dtype == np.float32


def test_fp16_keeps_the_fewest_first_backbone_convs_in_fp32_that_meet_the_limit(
    tmp_path: Path, good_images: Path
) -> None:
    """FP16 rounding in the backbone's first layers is carried forward: when the anomaly map moves past the
    limit, the conversion keeps the backbone's first convs (and the layers before them) in FP32, as few as
    pass, and records how many; a limit no count meets is refused."""
    root = build_precision_bundle(tmp_path / "b")
    bundle = load_bundle(root)
    spec = bundle.manifest.input
    settings = Fp16Settings(images=4)
    batches = list(model_batches(select_images(good_images, 4, "train"), spec.height, spec.width))
    moved = []
    for count in (0, 1, 2):
        kept = convert_fp16(
            root / "model.onnx", tmp_path / f"{count}.onnx", bundle.manifest.output_names, settings, count
        )
        assert (NODE_NAMES["stem"] in kept) == (count >= 1) and (NODE_NAMES["down"] in kept) == (count >= 2)
        moved.append(compare_models(root / "model.onnx", tmp_path / f"{count}.onnx", batches).anomaly_map_max_scaled)
    assert moved[2] < moved[0], moved  # the tiny model's backbone is what FP16 moves most

    limit = (moved[0] + min(moved[1:])) / 2
    variant = calibrate_fp16(root, good_images, Fp16Settings(images=4, max_anomaly_map_diff=limit))
    count = variant.settings["backbone_fp32_convs"]
    assert variant.settings["backbone_convs"] == 2 and count in (1, 2)
    assert variant.metrics["anomaly_map_max_scaled_diff"] <= limit < moved[count - 1]
    assert NODE_NAMES["stem"] in variant.settings["fp32_nodes"]
    fp16 = onnx.load(str(root / "model.fp16.onnx"))
    stem = next(node for node in fp16.graph.node if node.name == NODE_NAMES["stem"])
    weights = {init.name: init.data_type for init in fp16.graph.initializer}
    assert weights[stem.input[1]] == onnx.TensorProto.FLOAT  # kept: its weights are still FP32
    recorded = load_bundle(root).manifest.variant("fp16")
    assert recorded is not None and recorded.metrics == variant.metrics
    assert recorded.settings["backbone_fp32_convs"] == count

    with pytest.raises(Fp16Error, match="whole backbone in FP32"):
        calibrate_fp16(root, good_images, Fp16Settings(images=4, max_anomaly_map_diff=min(moved) / 1000))
    with pytest.raises(Fp16Error, match="0 of the backbone's 2 convolutions"):
        calibrate_fp16(root, good_images, Fp16Settings(images=4, backbone_fp32_convs=0, max_anomaly_map_diff=limit))
    assert load_bundle(root).manifest.variant("fp16") == recorded  # a refusal leaves the recorded variant
    whole = calibrate_fp16(root, good_images, Fp16Settings(images=4, keep_fp32=("head", "backbone")))
    assert whole.settings["backbone_fp32_convs"] == 2 and NODE_NAMES["down"] in whole.settings["fp32_nodes"]


def test_head_nodes_are_everything_after_the_squares(tmp_path: Path) -> None:
    root = build_precision_bundle(tmp_path / "b")
    head = head_nodes(onnx.load(str(root / "model.onnx")), ["m_0", "m_1"])
    assert "head_square_0" in head and "head_complement" in head
    assert not any(name.startswith(("coupling", "backbone", "flow")) for name in head)


def test_keep_fp32_groups_choose_the_float_convs(tmp_path: Path, good_images: Path) -> None:
    root = build_precision_bundle(tmp_path / "b")
    variant = calibrate_int8(root, good_images, Int8Settings(images=4, method="minmax", keep_fp32=()))
    assert variant.settings["excluded_nodes"] == []
    assert _weight_is_quantized(onnx.load(str(root / "model.int8.onnx")), NODE_NAMES["stem"])
    variant = calibrate_int8(root, good_images, Int8Settings(images=4, keep_fp32=("coupling", "stem")))
    assert variant.settings["excluded_nodes"] == sorted([NODE_NAMES["out"], NODE_NAMES["stem"]])
    model = onnx.load(str(root / "model.int8.onnx"))
    assert not _weight_is_quantized(model, NODE_NAMES["out"]) and _weight_is_quantized(model, NODE_NAMES["down"])


def test_recalibration_replaces_the_variant_and_warns_about_a_signature(
    calibrated: Path, tmp_path: Path, good_images: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy_bundle(calibrated, tmp_path / "b")
    (root / SIGNATURE_NAME).write_text("c2lnbmF0dXJl\n")
    before = load_bundle(root).manifest.files["model.int8.onnx"]
    with caplog.at_level(logging.WARNING):
        calibrate_int8(root, good_images, Int8Settings(images=6, method="entropy"))
    manifest = load_bundle(root).manifest
    assert [v.precision for v in manifest.variants].count("int8") == 1
    assert manifest.variant("int8").settings["method"] == "entropy"  # type: ignore[union-attr]
    assert manifest.files["model.int8.onnx"] != before
    assert any("sign the bundle again" in r.getMessage() for r in caplog.records)


def test_interrupted_calibration_can_be_redone(calibrated: Path, tmp_path: Path, good_images: Path) -> None:
    """A new model.int8.onnx written but not recorded leaves a stale hash; calibrating again fixes it."""
    root = _copy_bundle(calibrated, tmp_path / "b")
    (root / "model.int8.onnx").write_bytes(b"half-written")
    with pytest.raises(BundleError, match=r"model\.int8\.onnx"):
        load_bundle(root)
    calibrate_int8(root, good_images, Int8Settings(images=4, method="minmax"))
    load_bundle(root)


def test_a_corrupt_model_is_refused_before_calibrating(calibrated: Path, tmp_path: Path, good_images: Path) -> None:
    root = _copy_bundle(calibrated, tmp_path / "b")
    (root / "model.onnx").write_bytes(b"not the model")
    with pytest.raises(BundleError, match=r"model\.onnx is corrupt"):
        calibrate_int8(root, good_images, Int8Settings(images=4))


def test_record_variant_refuses_a_missing_file(calibrated: Path, tmp_path: Path) -> None:
    root = _copy_bundle(calibrated, tmp_path / "b")
    with pytest.raises(FileNotFoundError, match=r"model\.int4\.onnx"):
        record_variant(root, QuantizedModel(file="model.int4.onnx", precision="int8"))


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="calibration method"):
        Int8Settings(method="kl")
    with pytest.raises(ValueError, match="layer group"):
        Int8Settings(keep_fp32=("decoder",))
    with pytest.raises(ValueError, match="at least 1"):
        Int8Settings(images=0)
    with pytest.raises(ValueError, match="INT8 format must be one of s8s8-qdq"):
        Int8Settings(format="s8s8-qoperator")
    with pytest.raises(ValueError, match="0 or more"):
        Fp16Settings(backbone_fp32_convs=-1)
    with pytest.raises(ValueError, match="not both"):
        Fp16Settings(keep_fp32=("head", "backbone"), backbone_fp32_convs=3)
    with pytest.raises(ValueError, match="above 0"):
        Fp16Settings(max_anomaly_map_diff=0.0)


def test_cpu_formats_are_quantized_and_run_but_never_go_into_a_bundle(tmp_path: Path, good_images: Path) -> None:
    """u8s8-qoperator: QLinearConv with uint8 activations; ORT runs it close to FP32; TensorRT refuses it."""
    root = build_precision_bundle(tmp_path / "b")
    images = select_images(good_images, 6)
    target = tmp_path / "cpu.onnx"
    quantize_int8(root / "model.onnx", target, images, SIZE, SIZE, Int8Settings(images=6, format="u8s8-qoperator"))
    model = onnx.load(str(target))
    qconvs = [node for node in model.graph.node if node.op_type == "QLinearConv"]
    assert qconvs, "QOperator format has no QLinearConv"
    zero_points = {init.name: init for init in model.graph.initializer}
    x_zero_point = zero_points[qconvs[0].input[2]]
    assert x_zero_point.data_type == onnx.TensorProto.UINT8
    assert "QLinearConv" in {p.op_type for p in unsupported_ops(target)}
    frame = model_input(cv2.imread(str(images.paths[0])), SIZE, SIZE)[None]
    reference = OnnxRuntimeEngine(load_bundle(root)).infer(frame[0])
    quantized = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(
        None, {"image": frame}
    )
    assert np.abs(quantized[0] - reference.anomaly_map).max() < 0.2
    with pytest.raises(QuantizationError, match="CPU-only benchmark format"):
        calibrate_int8(root, good_images, Int8Settings(images=4, format="u8s8-qdq"))
    assert not (root / "model.int8.onnx").exists()


def test_image_selection_from_folder_list_and_split(tmp_path: Path, good_images: Path) -> None:
    assert len(find_images(good_images)) == 24
    listing = tmp_path / "list.txt"
    listing.write_text("# good parts\n" + "\n".join(str(p) for p in sorted(good_images.iterdir())[:5]) + "\n")
    assert len(find_images(listing)) == 5
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [f"images/good_{i:03d}" for i in range(3)], "val": []}))
    shutil.copytree(good_images, tmp_path / "images")
    assert [p.name for p in find_images(split)] == ["good_000.png", "good_001.png", "good_002.png"]
    chosen = select_images(good_images, 4)
    assert [p.name for p in chosen.paths] == ["good_000.png", "good_008.png", "good_015.png", "good_023.png"]
    assert chosen.describe() == {"source": str(good_images), "images": 4, "available": 24}


def test_pick_evenly_keeps_order_and_ends() -> None:
    items = [Path(str(i)) for i in range(10)]
    assert pick_evenly(items, 3) == [Path("0"), Path("4"), Path("9")]
    assert pick_evenly(items, None) == items
    assert pick_evenly(items, 50) == items


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "holds no images"),
        (lambda d: (d / "s.json").write_text('{"val": []}') and d / "s.json", "no list of image stems under 'train'"),
        (lambda d: (d / "bad.json").write_text("{") and d / "bad.json", "not valid JSON"),
        (lambda d: (d / "l.txt").write_text("nope.png\n") and d / "l.txt", "missing"),
    ],
)
def test_bad_calibration_data_is_named(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CalibrationDataError, match=message):
        find_images(make(tmp_path))


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    feed = CalibrationFeed(select_images(folder, None), 32, 32, tmp_path / "c.cache")
    with pytest.raises(CalibrationDataError, match=r"broken\.png"):
        feed.next_batch()


def test_uflow_calibrate_cli(
    calibrated: Path, tmp_path: Path, good_images: Path, capsys: pytest.CaptureFixture
) -> None:
    root = _copy_bundle(calibrated, tmp_path / "b")
    argv = ["calibrate", "int8", "--bundle", str(root), "--data", str(good_images), "--images", "4"]
    assert uflow_cli.main([*argv, "--method", "percentile", "--keep-fp32", "coupling", "permutation"]) == 0
    assert "model.int8.onnx" in capsys.readouterr().out
    settings = load_bundle(root).manifest.variant("int8").settings  # type: ignore[union-attr]
    assert settings["keep_fp32"] == ["coupling", "permutation"] and settings["method"] == "percentile"
    fp16 = ["calibrate", "fp16", "--bundle", str(root), "--data", str(good_images), "--images", "4"]
    assert uflow_cli.main([*fp16, "--backbone-fp32-convs", "1"]) == 0
    assert "(1 of the backbone's 2 convolutions in FP32)" in capsys.readouterr().out
    assert uflow_cli.main([*fp16, "--backbone-fp32-convs", "1", "--keep-fp32", "head", "backbone"]) == 1
    assert "not both" in capsys.readouterr().err
    assert uflow_cli.main(["calibrate", "int8", "--bundle", str(tmp_path / "nope"), "--data", str(good_images)]) == 1
    assert "nope does not exist or is not a directory" in capsys.readouterr().err


def test_trt_calibration_feed_serves_engine_input_batches_and_caches(tmp_path: Path, good_images: Path) -> None:
    cache = calibration_cache_path(tmp_path, "ab" * 32, "10.3.0")
    feed = CalibrationFeed(select_images(good_images, 3), 32, 32, cache)
    batches = [feed.next_batch() for _ in range(4)]
    assert batches[3] is None and feed.served == 3
    for batch in batches[:3]:
        assert batch is not None and batch.shape == (1, 32, 32, 3) and batch.dtype == np.uint8
        assert batch.flags["C_CONTIGUOUS"] and batch.nbytes == feed.nbytes
    assert feed.read_cache() is None
    feed.write_cache(memoryview(b"TRT-1003-EntropyCalibration2\nimage: 3c010a14\n"))
    assert feed.read_cache() == b"TRT-1003-EntropyCalibration2\nimage: 3c010a14\n"
    assert cache.name == "abababababab-int8-calibration-trt10.3.0.cache"


def test_real_exported_bundle_calibrates(request: pytest.FixtureRequest, tmp_path: Path, good_images: Path) -> None:
    """The training export's graph: groups found, INT8 model TensorRT-parseable and close to FP32."""
    try:
        bundle_dir = request.getfixturevalue("tiny_bundle")
    except pytest.FixtureLookupError:
        pytest.skip("no tiny_bundle fixture (training export not available)")
    root = _copy_bundle(Path(bundle_dir), tmp_path / "real")
    groups = conv_groups(onnx.load(str(root / "model.onnx"))).counts()
    assert groups["coupling"] > 0 and groups["coupling"] == groups["permutation"] == groups["subnet"]
    variant = calibrate_int8(root, good_images, Int8Settings(images=4, method="minmax"))
    assert unsupported_ops(root / "model.int8.onnx") == []
    assert np.isfinite(variant.metrics["anomaly_map_max_abs_diff"])


def test_agreement_of_an_unbounded_fused_map_is_relative(tmp_path: Path) -> None:
    # The heads' fused anomaly map is mean(m / null mean), about 1 on good parts and unbounded above: an
    # FP16 model 1 % off everywhere must not read as a 0.02 absolute change where the map is 5.
    import onnx
    from onnx import TensorProto, helper

    from calibration.agreement import compare_models

    def model(path: Path, factor: float) -> Path:
        image = helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 2, 2, 3])
        outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 2, 3]) for n in ("anomaly_map", "m_0")]
        nodes = [
            helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "f"], ["anomaly_map"]),
            helper.make_node("Identity", ["x"], ["m_0"]),
        ]
        factor_init = helper.make_tensor("f", TensorProto.FLOAT, [], [factor])
        graph = helper.make_graph(nodes, "g", [image], outputs, initializer=[factor_init])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return path

    reference = model(tmp_path / "ref.onnx", 1.0)
    candidate = model(tmp_path / "cand.onnx", 1.01)
    batch = np.full((1, 2, 2, 3), 5, np.uint8)
    agreement = compare_models(reference, candidate, [batch])
    assert agreement.anomaly_map_max_abs == pytest.approx(0.05, rel=1e-3)
    assert agreement.anomaly_map_max_scaled == pytest.approx(0.01, rel=1e-3)
    small = compare_models(reference, candidate, [np.full((1, 2, 2, 3), 0, np.uint8)])
    assert small.anomaly_map_max_scaled == small.anomaly_map_max_abs == 0.0


def test_doctor_tells_whether_the_configured_variant_decides_as_fp32(calibrated: Path) -> None:
    """`edge-agent doctor` reads the variant's recorded decision check: ok when it flags no more good images than
    FP32, warn for a variant recorded before the check existed, fail for one that flags more or is missing."""
    from edge_agent.cli.doctor import check_precision_variant

    manifest = load_bundle(calibrated).manifest
    for precision in ("fp16", "int8"):
        variant = manifest.variant(precision)
        assert variant is not None and {"good_flagged", "good_flagged_fp32"} <= set(variant.metrics)
        check = check_precision_variant(manifest, precision)
        assert check.status == "ok" and f"{precision} flags" in check.detail

    def with_metrics(metrics: dict[str, float]):  # type: ignore[no-untyped-def]
        variants = [
            v.model_copy(update={"metrics": metrics}) if v.precision == "int8" else v for v in manifest.variants
        ]
        return manifest.model_copy(update={"variants": variants})

    old = {k: v for k, v in manifest.variant("int8").metrics.items() if not k.startswith(("good_", "log10_"))}  # type: ignore[union-attr]
    assert check_precision_variant(with_metrics(old), "int8").status == "warn"
    worse = {**manifest.variant("int8").metrics, "good_flagged": 3.0, "good_flagged_fp32": 0.0}  # type: ignore[union-attr]
    failed = check_precision_variant(with_metrics(worse), "int8")
    assert failed.status == "fail" and "flags 3 of" in failed.detail
    bare = manifest.model_copy(update={"variants": []})
    assert check_precision_variant(bare, "fp16").status == "fail"
