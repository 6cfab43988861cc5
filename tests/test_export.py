"""Bundle export: ONNX parity, manifest content, refusal of corrupt/mismatched bundles, the uflow CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edge_agent.bundle import BundleError, load_bundle  # noqa: E402
from edge_agent.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from edge_agent.inspection import nfa  # noqa: E402
from training.data import load_image, open_dataset  # noqa: E402
from training.synthetic import defect_image  # noqa: E402


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def test_onnx_matches_torch_on_good_and_defect_images(
    tiny_bundle: Path, tiny_run_dir: Path, synthetic_data_dir: Path
) -> None:
    from training.model import ExportWrapper
    from training.rundir import load_model

    model, _ = load_model(tiny_run_dir)
    wrapper = ExportWrapper(model)
    session = ort.InferenceSession(str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    records = open_dataset(synthetic_data_dir).test
    images = [load_image(r.image, 128, 128) for r in (records[0], records[-1])]
    images.append(defect_image(5, 128, 128, "bright_blob").image)
    for image in images:
        got = session.run(None, {"image": image[None]})
        with torch.no_grad():
            want = [t.numpy() for t in wrapper(torch.from_numpy(image)[None])]
        assert [o.name for o in session.get_outputs()] == ["anomaly_map", "m_0", "m_1"]
        for name, g, w in zip(["anomaly_map", "m_0", "m_1"], got, want, strict=True):
            assert g.dtype == np.float32 and g.shape == w.shape
            if name == "anomaly_map":
                assert np.abs(g - w).max() < 1e-4
            else:
                # m_s is a mean of squares of order 1: ORT's kernel fusion reorders sums (the export's
                # own parity check uses the same relative tolerance).
                np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5)


def test_manifest_describes_the_model(tiny_bundle: Path, tiny_run_dir: Path) -> None:
    bundle = load_bundle(tiny_bundle)  # hashes verified
    manifest = bundle.manifest
    assert manifest.name == "tiny" and manifest.version == "1"
    assert manifest.backbone == "efficientnet_lite0"
    assert (manifest.input.height, manifest.input.width) == (128, 128)
    assert manifest.normalisation.mean == (0.5, 0.5, 0.5)

    graph = onnx.load(str(tiny_bundle / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["image"]
    # TensorRT takes the UINT8 input only straight into a Cast (the export casts first, then transposes).
    assert [n.op_type for n in graph.node if "image" in n.input] == ["Cast"]
    ops = {node.op_type for node in graph.node}
    assert not ops & {"If", "Loop", "Ceil"}, "shape-dependent control flow or padding arithmetic in the graph"
    dims = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    assert dims["anomaly_map"] == [1, 128, 128]
    for scale in manifest.scales:
        assert dims[scale.name] == [1, scale.height, scale.width]
        assert scale.height * scale.stride == 128
    assert [(s.name, s.channels, s.stride) for s in manifest.scales] == [("m_0", 54, 8), ("m_1", 56, 16)]

    shapes = [(s.height, s.width) for s in manifest.scales]
    val_scores = json.loads((tiny_run_dir / "val_scores.json").read_text())
    # Four validation images are too few to fit a null: the tiny bundle keeps the paper's NFA at epsilon 1.
    assert val_scores["nfa_null"] is None
    assert manifest.nfa.null_model == "polyomino" and manifest.nfa.log10_epsilon == 0.0
    assert manifest.nfa.log10_number_of_tests == pytest.approx(nfa.log10_number_of_tests(shapes))
    assert 0.0 <= manifest.validation_metrics["planted_detection_rate"] <= 1.0
    assert manifest.validation_metrics["planted_count"] >= 24
    assert manifest.image_score_threshold == pytest.approx(max(val_scores["scores"]))
    assert manifest.validation_metrics["onnx_parity_anomaly_map_max_abs"] < 1e-4
    assert manifest.validation_metrics["val_nfa_false_alarm_rate"] == 0.0
    # 40 good images, 30 % held out to calibrate (training.data.DEFAULT_VAL_FRACTION)
    assert manifest.training_data["layout"] == "mvtec" and manifest.training_data["train"] == 28

    assert len(manifest.self_test) == 3
    engine = OnnxRuntimeEngine(bundle)
    for rel in manifest.self_test:
        assert rel in manifest.files
        image = load_image(tiny_bundle / rel, 128, 128)
        output = engine.infer(image)
        assert output.anomaly_map.max() <= manifest.validation_metrics["selftest_max_score"] + 1e-5
        assert [m.shape for m in output.scale_maps] == shapes


def test_exported_bundle_passes_the_tensorrt_graph_check(tiny_bundle: Path) -> None:
    """The same check build-engine runs before every build (types included), on the exported model."""
    from edge_agent.engines.tensorrt.graph_check import check_graph, describe

    problems = check_graph(tiny_bundle / "model.onnx", "fp32")
    assert problems == [], describe(problems, tiny_bundle / "model.onnx")


def test_flipped_byte_in_model_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx is corrupt or was modified"):
        load_bundle(bundle)


def test_missing_selftest_image_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    rel = json.loads((bundle / "model.json").read_text())["self_test"][0]
    (bundle / rel).unlink()
    with pytest.raises(BundleError, match=f"{rel} is listed in model.json but missing"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m["scales"][0].update(height=32),
            r"output 'm_0' has shape \[1, 16, 16\], the manifest says \[1, 32, 16\]",
        ),
        (lambda m: m["scales"][1].update(name="m_9"), r"no output 'm_9'"),
        (lambda m: m["input"].update(width=256), r"input 'image' has shape \[1, 128, 128, 3\]"),
    ],
)
def test_manifest_that_does_not_match_the_onnx_is_refused(tiny_bundle: Path, tmp_path: Path, edit, message) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    manifest = json.loads((bundle / "model.json").read_text())
    edit(manifest)
    (bundle / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        OnnxRuntimeEngine(load_bundle(bundle))


def test_export_refuses_to_overwrite_and_leaves_nothing_on_failure(
    tiny_run_dir: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    from training.export import ExportError, export_bundle
    from training.rundir import RunDirError

    with pytest.raises(ExportError, match="already exists"):
        export_bundle(tiny_run_dir, tiny_bundle)
    not_a_bundle = tmp_path / "photos"
    not_a_bundle.mkdir()
    (not_a_bundle / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ExportError, match="not a model bundle"):
        export_bundle(tiny_run_dir, not_a_bundle, overwrite=True)
    assert (not_a_bundle / "holiday.jpg").exists()

    broken_run = Path(shutil.copytree(tiny_run_dir, tmp_path / "run"))
    (broken_run / "checkpoint.pt").unlink()
    with pytest.raises(RunDirError, match=r"no checkpoint\.pt"):
        export_bundle(broken_run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_export_with_overwrite_replaces_a_bundle(tiny_run_dir: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    from training.export import export_bundle

    target = _copy(tiny_bundle, tmp_path)
    export_bundle(tiny_run_dir, target, version="2", overwrite=True)
    assert load_bundle(target).manifest.version == "2"


def test_uflow_cli_train_and_export(synthetic_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from training.cli import main

    run, out = tmp_path / "run", tmp_path / "bundle"
    code = main(
        [
            "train",
            "--data",
            str(synthetic_data_dir),
            "--out",
            str(run),
            "--image-size",
            "64",
            "--strides",
            "8",
            "16",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--quiet",
        ]
    )
    assert code == 0
    model_config = json.loads((run / "config.json").read_text())["model"]
    assert model_config["strides"] == [8, 16] and model_config["heads"][:4] == ["flow", "gaussian", "memory", "texture"]
    # The detail head's weight was chosen at the end of training (or the head dropped): never left "auto".
    assert model_config["heads"][4:] in ([], ["detail"]) and model_config["detail_share"] != "auto"
    assert main(["export", "--run", str(run), "--out", str(out), "--name", "cli", "--version", "0.1"]) == 0
    manifest = load_bundle(out).manifest
    assert manifest.input.height == 64
    # Four validation images are too few for the fitted null: the paper's NFA, and so the flow alone.
    assert manifest.nfa.null_model == "polyomino" and {s.head for s in manifest.scales} == {"flow"}
    assert "bundle written to" in capsys.readouterr().out

    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r2"), "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--data", str(synthetic_data_dir), "--out", str(tmp_path / "r3"), "--image-size", "100"]) == 1
    assert "divisible by the largest stride" in capsys.readouterr().err


def test_a_run_with_a_fitted_null_exports_it_with_the_tree_test_count(tiny_run_dir: Path) -> None:
    from dataclasses import replace

    from edge_agent.inspection import nfa
    from training.export import nfa_spec
    from training.rundir import read_run

    info = read_run(tiny_run_dir)
    fitted = [{"mean": 0.9, "dof": 12.0, "area": 3.0}, {"mean": 1.1, "dof": 20.0, "area": 2.5}]
    with_null = replace(info, val_scores={**info.val_scores, "nfa_null": fitted, "log10_epsilon": -2.0})
    spec = nfa_spec(with_null, [(16, 16), (8, 8)])
    assert spec.null_model == "fitted" and spec.log10_epsilon == -2.0
    assert spec.log10_number_of_tests == pytest.approx(nfa.log10_tree_tests([(16, 16), (8, 8)]))
    assert [n.model_dump() for n in spec.scale_nulls] == fitted
    paper = nfa_spec(with_null, [(16, 16), (8, 8)], null_model="polyomino")
    assert paper.null_model == "polyomino" and not paper.scale_nulls


def test_export_warns_loudly_on_a_model_that_misses_the_planted_defects(tiny_bundle: Path) -> None:
    from edge_agent.bundle import load_bundle
    from training.export import warn_if_blind

    manifest = load_bundle(tiny_bundle).manifest
    blind = manifest.model_copy(update={"validation_metrics": {"planted_detection_rate": 0.25}})
    message = warn_if_blind(blind)
    assert message is not None and "25%" in message and "WARNING" in message
    seeing = manifest.model_copy(update={"validation_metrics": {"planted_detection_rate": 0.75}})
    assert warn_if_blind(seeing) is None
    assert warn_if_blind(manifest.model_copy(update={"validation_metrics": {}})) is None


def _calibration_record(images: int, false_regions: int, flagged: int) -> dict[str, object]:
    """What training writes to val_scores.json (training/nfa_null.py Calibration.to_dict), counts given."""
    from edge_agent.promise import check_promise

    check = check_promise(0.01, images, false_regions, flagged)
    return {
        "method": "cross-fit",
        "images": images,
        "folds": 10,
        "evidence_scale": 1.5,
        "log10_epsilon": -2.0,
        "false_regions": false_regions,
        "images_flagged": flagged,
        "false_regions_per_image_upper95": check.regions_upper,
        "flagged_share_upper95": check.flagged_upper,
        "images_needed": check.needed,
        "supported": check.supported,
        "counts": [{"factor": 1.5, "false_regions": false_regions, "images_flagged": flagged, "regions_at_0": 0}],
    }


def test_the_manifest_records_the_calibration_count_and_export_warns_what_is_missing(
    tiny_run_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from training.export import export_bundle, warn_if_unsupported

    run = Path(shutil.copytree(tiny_run_dir, tmp_path / "run"))
    scores = json.loads((run / "val_scores.json").read_text())
    scores |= {
        "nfa_null": [{"mean": 0.9, "dof": 12.0, "area": 3.0}, {"mean": 1.1, "dof": 20.0, "area": 2.5}],
        "log10_epsilon": -2.0,
        "nfa_calibration": _calibration_record(21, 0, 0),
    }
    (run / "val_scores.json").write_text(json.dumps(scores))
    with caplog.at_level("WARNING"):
        bundle = export_bundle(run, tmp_path / "bundle", name="tiny", version="1")
    calibration = load_bundle(bundle).manifest.nfa.calibration
    assert calibration is not None
    assert (calibration.images, calibration.folds, calibration.false_regions, calibration.images_needed) == (
        21,
        10,
        0,
        300,
    )
    assert calibration.false_regions_per_image_upper95 == pytest.approx(0.1427, abs=1e-4)
    assert calibration.flagged_share_upper95 == pytest.approx(0.1329, abs=1e-4)
    warned = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "export_promise_unsupported"]
    assert len(warned) == 1
    for fact in ("1 per 100 parts", "300", "had 21", "279 more good images"):
        assert fact in warned[0]
    # 320 clean calibration images back the promise: no warning.
    manifest = load_bundle(bundle).manifest
    enough = manifest.nfa.calibration.model_copy(  # type: ignore[union-attr]
        update={"images": 320, "false_regions_per_image_upper95": 0.00936, "images_needed": 300}
    )
    assert (
        warn_if_unsupported(
            manifest.model_copy(update={"nfa": manifest.nfa.model_copy(update={"calibration": enough})})
        )
        is None
    )


def test_a_bundle_without_the_calibration_field_loads_and_decides_as_before(tiny_bundle: Path, tmp_path: Path) -> None:
    from edge_agent.bundle import NfaCalibration
    from edge_agent.config import NfaConfig
    from edge_agent.inspection.scoring import FrameScorer

    old = _copy(tiny_bundle, tmp_path)
    raw = json.loads((old / "model.json").read_text())
    shapes = [(s["height"], s["width"]) for s in raw["scales"]]
    # An nfa section as exporters wrote it before the calibration record existed (no "calibration" key).
    raw["nfa"] = {
        "log10_number_of_tests": nfa.log10_tree_tests(shapes),
        "log10_epsilon": -2.0,
        "min_region_area": 0,
        "null_model": "fitted",
        "scale_nulls": [{"mean": 0.9, "dof": 12.0, "area": 3.0} for _ in shapes],
    }
    (old / "model.json").write_text(json.dumps(raw, indent=2))
    manifest = load_bundle(old).manifest
    assert manifest.nfa.null_model == "fitted" and manifest.nfa.calibration is None
    recorded = manifest.model_copy(
        update={
            "nfa": manifest.nfa.model_copy(
                update={
                    "calibration": NfaCalibration.model_validate(
                        {k: v for k, v in _calibration_record(100, 0, 0).items() if k in NfaCalibration.model_fields}
                    )
                }
            )
        }
    )
    engine = OnnxRuntimeEngine(load_bundle(old))
    try:
        size = manifest.input.height
        output = engine.infer(load_image(sorted((old / "selftest").iterdir())[0], size, size))
    finally:
        engine.close()
    verdicts = [FrameScorer(m, NfaConfig()).score(output, (size, size)) for m in (manifest, recorded)]
    np.testing.assert_array_equal(verdicts[0].log_nfa, verdicts[1].log_nfa)
    assert verdicts[0].regions == verdicts[1].regions


def test_training_counts_its_calibration_images_and_the_bundle_carries_the_bound(
    tiny_run_dir: Path, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    from edge_agent.promise import binomial_upper, poisson_upper
    from training.data import load_images
    from training.export import export_bundle
    from training.finish import finish_run
    from training.rundir import read_run

    run = Path(shutil.copytree(tiny_run_dir, tmp_path / "run"))
    config = read_run(run).model_config
    height, width = config.image_height, config.image_width
    splits = open_dataset(synthetic_data_dir)
    # 24 good images as the calibration (validation) set: enough for the fitted null (>= 20).
    calibration_set = replace(splits, val=splits.train[:24], train=splits.train[24:])
    result = finish_run(
        run,
        calibration_set,
        load_images(calibration_set.val, height, width),
        load_images(calibration_set.train, height, width),
        2,
        8,
    )
    record = result["nfa_calibration"]
    assert record["images"] == 24 and record["folds"] == 10 and record["log10_epsilon"] == -2.0
    chosen = next(c for c in record["counts"] if c["factor"] == record["evidence_scale"])
    assert record["false_regions"] == chosen["false_regions"]
    bundle = export_bundle(run, tmp_path / "bundle", name="tiny", version="1")
    manifest = load_bundle(bundle).manifest
    calibration = manifest.nfa.calibration
    assert manifest.nfa.null_model == "fitted" and calibration is not None
    assert calibration.images == 24 and calibration.false_regions == record["false_regions"]
    assert calibration.false_regions_per_image_upper95 == pytest.approx(poisson_upper(record["false_regions"], 24))
    assert calibration.flagged_share_upper95 == pytest.approx(binomial_upper(record["images_flagged"], 24))
    # 24 images cannot back 1 in 100 whatever they show: the record says so.
    assert calibration.false_regions_per_image_upper95 > 0.1 and not calibration.promise_check().supported
