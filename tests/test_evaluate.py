"""``uflow evaluate`` on the tiny synthetic run: metrics.json, the report and its images, torch vs ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("FrEIA")

from training.cli import main

TYPES = {"good", "bright_blob", "crack", "dark_blob", "scratch"}
OVERALL_KEYS = {
    "pixel_auroc",
    "aupro",
    "image_auroc",
    "miou_nfa",
    "miou_oracle",
    "oracle_threshold",
    "miou_all_empty",
    "nfa_flagged_defect",
    "nfa_flagged_good",
    "nfa_detection_rate",
    "nfa_false_alarm_rate",
    "images",
    "defect_images",
}


@pytest.fixture(scope="module")
def torch_report(tiny_run_dir: Path, synthetic_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval_torch")
    code = main(
        ["evaluate", "--run", str(tiny_run_dir), "--data", str(synthetic_data_dir), "--out", str(out), "--samples", "2"]
    )
    assert code == 0
    return out


def _metrics(report_dir: Path) -> dict[str, Any]:
    return json.loads((report_dir / "metrics.json").read_text())


def test_metrics_json_has_every_metric_overall_and_per_type(torch_report: Path) -> None:
    result = _metrics(torch_report)
    assert result["source"] == "torch" and result["image_size"] == [128, 128]
    overall = result["overall"]
    assert set(overall) >= OVERALL_KEYS
    assert overall["images"] == 24 and overall["defect_images"] == 16
    assert set(result["per_type"]) == TYPES
    for kind in TYPES - {"good"}:
        assert {"pixel_auroc", "aupro", "image_auroc", "miou_nfa", "miou_oracle"} <= set(result["per_type"][kind])
    # the tiny model separates its planted defects and its NFA flags them, not the good parts
    assert overall["pixel_auroc"] > 0.95 and overall["image_auroc"] == 1.0
    assert overall["nfa_flagged_good"] == 0 and overall["nfa_detection_rate"] >= 0.9
    assert overall["miou_all_empty"] == pytest.approx(8 / 24)
    assert overall["miou_nfa"] > overall["miou_all_empty"] + 0.1
    assert result["per_type"]["good"]["miou_nfa"] == 1.0
    assert overall["miou_oracle"] >= overall["miou_all_empty"]
    # latent statistics per scale, defect cells well above the good images
    for scale in result["latents"]:
        assert scale["defect_cells"]["mean"] > 2 * scale["good_images"]["mean"]
    assert result["nfa"]["min_log_nfa_defect"]["p50"] < 0 < result["nfa"]["min_log_nfa_good"]["p50"]


def test_metrics_match_an_independent_computation(
    torch_report: Path, tiny_run_dir: Path, synthetic_data_dir: Path
) -> None:
    from sklearn.metrics import roc_auc_score

    from edge_agent.inspection import nfa
    from training.data import load_images, load_mask, open_dataset
    from training.rundir import load_model
    from training.train import predict

    model, _ = load_model(tiny_run_dir)
    test = open_dataset(synthetic_data_dir).test
    amaps, maps = predict(model, load_images(test, 128, 128))
    masks = np.stack([load_mask(r.mask, 128, 128) for r in test])
    result = _metrics(torch_report)["overall"]
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), amaps.ravel()), abs=1e-9)
    labels = np.array([r.label for r in test])
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, amaps.reshape(24, -1).max(1)), abs=1e-9)
    channels = [s.channels for s in model.scales]
    # The run's own decision: the null fitted on its validation good images, at its log10 epsilon.
    val_scores = json.loads((tiny_run_dir / "val_scores.json").read_text())
    nulls = [nfa.ScaleNull(**item) for item in val_scores["nfa_null"]] if val_scores["nfa_null"] else None
    epsilon = val_scores["log10_epsilon"]
    ious = []
    for i in range(len(test)):
        predicted = nfa.log_nfa_map([m[i] for m in maps], channels, (128, 128), nulls) < epsilon
        union = (predicted | masks[i]).sum()
        ious.append((predicted & masks[i]).sum() / union if union else 1.0)
    assert result["miou_nfa"] == pytest.approx(float(np.mean(ious)), abs=1e-9)


def test_report_html_and_grids(torch_report: Path) -> None:
    html = (torch_report / "report.html").read_text()
    assert "mIoU (NFA)" in html and "pixel AUROC" in html
    for kind in TYPES:
        rel = f"images/{kind}.png"
        assert f"src='{rel}'" in html
        grid = cv2.imread(str(torch_report / rel))
        assert grid is not None, f"{rel} is not a readable image"
        # 2 sample rows of 4 captioned 128x128 tiles
        assert grid.shape == (2 * (128 + 22) + 6, 4 * 128 + 3 * 4, 3)
        assert grid.std() > 10  # not a blank canvas
    defect_grid = cv2.imread(str(torch_report / "images/dark_blob.png"))
    tile = defect_grid[22 : 22 + 128, 3 * (128 + 4) : 3 * (128 + 4) + 128].astype(int)
    green = (tile[..., 1] - np.maximum(tile[..., 0], tile[..., 2])) > 60
    assert green.sum() > 20, "the NFA mask of a detected defect is painted"


def test_report_lists_the_decisions_errors_worst_first(torch_report: Path) -> None:
    """The report names every false reject and escape, as many as the metrics count, with their grids."""
    metrics = _metrics(torch_report)
    errors = metrics["report"]["errors"]
    overall = metrics["overall"]
    assert len(errors["false rejects"]) == overall["nfa_flagged_good"]
    assert len(errors["escapes"]) == overall["defect_images"] - overall["nfa_flagged_defect"]
    html = (torch_report / "report.html").read_text()
    assert "The decision's errors" in html
    for kind, names in errors.items():
        assert f"{kind}: {len(names)} of" in html
        for name in names:
            assert name in html
        if names:
            grid = cv2.imread(str(torch_report / metrics["report"]["grids"][kind]))
            assert grid is not None and grid.shape[0] == min(len(names), 2) * (128 + 22) + (min(len(names), 2) - 1) * 6


def test_decision_errors_order_false_rejects_by_evidence_and_escapes_by_defect_size(tmp_path: Path) -> None:
    from dataclasses import dataclass

    from training.data import Record
    from training.report import decision_errors

    @dataclass
    class Tiny:
        records: tuple[Record, ...]
        images: np.ndarray
        masks: np.ndarray
        labels: np.ndarray
        types: list[str]

    labels = np.array([False, False, False, True, True, True])
    masks = np.zeros((6, 8, 8), bool)
    masks[3, :2, :2] = True  # 4 pixels
    masks[4, :4, :4] = True  # 16 pixels
    masks[5, :3, :3] = True  # 9 pixels
    log_nfa = np.zeros((6, 8, 8), np.float32)
    log_nfa[0, 1, 1] = -3.0  # flagged at -2
    log_nfa[1, 2, 2] = -9.0  # flagged, stronger
    log_nfa[2, 3, 3] = -1.0  # below 0 but not below -2: not flagged
    log_nfa[5, 0, 0] = -5.0  # the one defect found
    records = tuple(Record(Path(f"{i}.png"), None, int(labels[i]), "x" if labels[i] else "good") for i in range(6))
    test = Tiny(records, np.zeros((6, 8, 8, 3), np.uint8), masks, labels, ["good", "x"])
    errors = decision_errors(test, log_nfa, -2.0)
    assert errors == {"false rejects": [1, 0], "escapes": [4, 3]}
    assert decision_errors(test, log_nfa, 0.0)["false rejects"] == [1, 0, 2]

    # The grids of the errors: the worst first, at most samples_per_type rows; the page names them in order.
    from training.report import _errors_html, write_grids

    @dataclass
    class Maps:
        anomaly_maps: np.ndarray
        log10_epsilon: float

    out = tmp_path / "report"
    grids = write_grids(out, test, Maps(np.ones((6, 8, 8), np.float32), -2.0), log_nfa, 1, errors)
    assert set(grids) == {"good", "x", "false rejects", "escapes"}
    one_row = cv2.imread(str(out / grids["false rejects"]))
    assert one_row is not None and one_row.shape[0] == 8 + 22  # one captioned row
    page = _errors_html(test, errors, log_nfa, grids)
    assert page.index("1.png") < page.index("0.png") < page.index("4.png") < page.index("3.png")
    assert "false rejects: 2 of 3 good images" in page and "escapes: 2 of 3 defective images" in page
    assert "4.png (x, defect 16 px, min log10 NFA 0.0)" in page and "1.png (good, min log10 NFA -9.0)" in page


def test_report_states_the_decisions_epsilon(torch_report: Path) -> None:
    # issue 21: the report said "log10 NFA < 0" whatever epsilon the evaluation used
    epsilon = float(_metrics(torch_report)["nfa"]["log10_epsilon"])
    html = (torch_report / "report.html").read_text()
    assert f"mask log10 NFA &lt; {epsilon:g}" in html
    assert f"detected below {epsilon:g})" in html


def test_grid_mask_follows_the_epsilon() -> None:
    from training.report import grid_row

    image = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), bool)
    amap = np.zeros((32, 32), np.float32)
    log_nfa = np.zeros((32, 32), np.float32)
    log_nfa[4:12, 4:12] = -1.0  # significant at epsilon 0, not at -2

    def painted(epsilon: float) -> int:
        row = grid_row(image, mask, amap, log_nfa, (0.0, 1.0), "x", epsilon).astype(int)
        tile = row[:, 3 * (32 + 4) :]
        return int(((tile[..., 1] - np.maximum(tile[..., 0], tile[..., 2])) > 60).sum())

    assert painted(0.0) >= 64
    assert painted(-2.0) == 0


def test_bundle_through_onnxruntime_agrees_with_torch(
    torch_report: Path, tiny_bundle: Path, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    code = main(["evaluate", "--bundle", str(tiny_bundle), "--data", str(synthetic_data_dir), "--out", str(tmp_path)])
    assert code == 0
    onnx, torch_result = _metrics(tmp_path), _metrics(torch_report)
    assert onnx["source"] == "onnxruntime"
    for key in ("pixel_auroc", "aupro", "image_auroc", "image_auroc_nfa", "miou_oracle"):
        assert onnx["overall"][key] == pytest.approx(torch_result["overall"][key], abs=1e-3), key
    assert onnx["overall"]["miou_nfa"] == pytest.approx(torch_result["overall"]["miou_nfa"], abs=5e-3)
    assert onnx["overall"]["nfa_flagged_defect"] == torch_result["overall"]["nfa_flagged_defect"]
    assert onnx["overall"]["nfa_flagged_good"] == torch_result["overall"]["nfa_flagged_good"]


def test_evaluate_errors(tmp_path: Path, tiny_run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.synthetic import good_image

    folder = tmp_path / "goods"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), good_image(i, 32, 32))
    assert main(["evaluate", "--run", str(tiny_run_dir), "--data", str(folder), "--out", str(tmp_path / "r")]) == 1
    assert "has no test split" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(folder), "--out", str(tmp_path / "r")]) == 1
    assert "give a run directory (--run) or a bundle (--bundle)" in capsys.readouterr().err


def test_export_writes_the_test_metrics_into_the_manifest(
    torch_report: Path, tiny_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_agent.bundle import load_bundle

    out = tmp_path / "bundle"
    metrics = torch_report / "metrics.json"
    assert main(["export", "--run", str(tiny_run_dir), "--out", str(out), "--metrics", str(metrics)]) == 0
    manifest = load_bundle(out).manifest
    overall = _metrics(torch_report)["overall"]
    assert manifest.validation_metrics["test_pixel_auroc"] == pytest.approx(overall["pixel_auroc"])
    assert manifest.validation_metrics["test_miou_nfa"] == pytest.approx(overall["miou_nfa"])
    assert manifest.training_data["test_metrics_from"]["report"] == str(metrics)

    other = json.loads(metrics.read_text())
    other["model"]["model_config"]["feature_pool"] = 3
    wrong = tmp_path / "other.json"
    wrong.write_text(json.dumps(other))
    code = main(["export", "--run", str(tiny_run_dir), "--out", str(tmp_path / "b2"), "--metrics", str(wrong)])
    assert code == 1 and "evaluates another model config" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists()
