"""``uflow calibrate nfa``: the NFA false-alarm check, on real ONNX Runtime sessions and image files.

The bundle is the contract bundle (tests/contract_bundle.py): a real ONNX graph whose m_s on "good"
frames (flat grey plus independent pixel noise of the declared std) is exactly chi^2(3)/3 with
independent pixels, so the a-contrario promise holds and the check can be held to numbers. Frames
with twice the noise, or with spatially correlated noise, break the model's assumptions the way a
badly fitted flow does, and the check must say so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from contract_bundle import build_contract_bundle, defect_frame, good_frame

from calibration.data import select_images
from calibration.nfa_check import check_bundle, format_report, lag1_autocorrelation
from edge_agent.promise import poisson_interval

SIZE = 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_contract_bundle(tmp_path_factory.mktemp("nfa_check_bundle"), height=SIZE, width=SIZE, strides=(4, 8))


def write_frames(folder: Path, frames: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"frame_{i:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return folder


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("nfa_check_frames")
    good = [good_frame(rng, SIZE, SIZE) for _ in range(30)]
    defects = [defect_frame(rng, SIZE, SIZE, (8 + i, 20, 16, 12)) for i in range(6)]
    noisy = [good_frame(rng, SIZE, SIZE, pixel_noise=16.0) for _ in range(10)]
    correlated = []
    for _ in range(10):
        # Noise blurred over ~3 pixels, rescaled to the declared per-pixel std of 8 grey levels.
        noise = cv2.GaussianBlur(rng.normal(size=(SIZE, SIZE, 3)), (0, 0), 1.5)
        noise *= 8.0 / noise.std()
        correlated.append(np.clip(np.rint(127.5 + noise), 0, 255).astype(np.uint8))
    return {
        "good": write_frames(root / "good", good),
        "defect": write_frames(root / "defect", defects),
        "noisy": write_frames(root / "noisy", noisy),
        "correlated": write_frames(root / "correlated", correlated),
    }


def test_lag1_autocorrelation_separates_independent_from_smooth_maps() -> None:
    rng = np.random.default_rng(0)
    independent = rng.chisquare(16, size=(64, 64)) / 16
    assert abs(lag1_autocorrelation(independent)) < 0.05
    z = rng.normal(size=(16, 66, 66))
    smooth = (z[:, :-2, 1:-1] + z[:, 1:-1, 1:-1] + z[:, 2:, 1:-1] + z[:, 1:-1, :-2] + z[:, 1:-1, 2:]) / math.sqrt(5)
    assert lag1_autocorrelation((smooth**2).mean(axis=0)) > 0.1
    assert math.isnan(lag1_autocorrelation(np.ones((3, 3))))


def test_calibrated_model_keeps_the_promise(bundle: Path, frames: dict[str, Path]) -> None:
    report = check_bundle(bundle, select_images(frames["good"], None))
    assert report.images == 30
    assert report.mean_regions_per_image <= 0.2
    regions = [r.regions for r in report.per_image]
    assert report.mean_regions_per_image == pytest.approx(np.mean(regions))
    assert report.fraction_with_detection == pytest.approx(np.mean([n > 0 for n in regions]))
    q = report.min_log_nfa_quantiles
    assert q["min"] <= q["p25"] <= q["median"] <= q["p75"] <= q["max"]
    assert q["min"] == pytest.approx(min(r.min_log_nfa for r in report.per_image))
    assert q["min"] > 0  # nothing comes close to the threshold on calibrated noise
    for r in report.per_image:
        # Bilinear upsampling blends a map's minimum with its neighbours: never below it.
        assert r.min_log_nfa >= min(r.scale_min_log_nfa) - 1e-3
    # The diagnostics recognise chi^2(3)/3 with independent pixels.
    for scale in report.scales:
        assert scale["channels"] == 3
        assert scale["mean_m"] == pytest.approx(1.0, abs=0.1)
        assert scale["variance_m"] == pytest.approx(2 / 3, rel=0.25)
        assert abs(scale["lag1_autocorrelation"]) < 0.1
        for tail in scale["tail"]:
            assert tail["empirical"] <= tail["chernoff_bound"]
        # The model's m_s is the null: its best nodes look like the simulated null's.
        real, null = scale["best_log_p_real"], scale["best_log_p_null"]
        assert null["min"] <= null["median"] <= null["max"] <= 0
        assert abs(real["median"] - null["median"]) < 0.5 * abs(null["median"]) + 1.0
    text = format_report(report)
    assert "mean regions / image" in text and "P(m >= 2) / bound" in text
    # The promise rows: at the bundle's epsilon and at 0, each with its exact 95 % interval.
    at_bundle, at_0 = report.promise
    assert at_bundle["log10_epsilon"] == report.log10_epsilon and at_0["log10_epsilon"] == 0.0
    assert at_bundle["false_regions"] == sum(regions) and at_bundle["images"] == 30
    assert at_0["false_regions"] == sum(r.regions_at_epsilon_1 for r in report.per_image)
    for row in report.promise:
        low, high = poisson_interval(row["false_regions"], 30)
        assert row["regions_per_image_interval95"] == [low, high]
        assert low <= row["regions_per_image"] <= high
        flow, fhigh = row["flagged_share_interval95"]
        assert flow <= row["flagged_share"] <= fhigh
    # no false region on 30 images is not enough to show one per image is kept at 95 %: high = 3.69 / 30
    assert at_0["verdict"] == "kept" and at_0["regions_per_image_interval95"][1] < 1.0
    assert "[95 % interval]" in text and f"{at_0['regions_per_image_interval95'][1]:.3f}]" in text


def test_promise_row_verdicts() -> None:
    from calibration.nfa_promise import promise_row

    assert promise_row(-2.0, [0] * 25)["verdict"] == "not contradicted"  # 25 images cannot show 1 in 100
    broken = promise_row(-2.0, [1] * 5 + [0] * 20)  # the held-out product: 5 of 25 good images flagged
    assert broken["verdict"] == "broken" and broken["flagged_share"] == 0.2
    assert broken["flagged_share_interval95"][0] > 0.01
    assert promise_row(0.0, [0] * 30)["verdict"] == "kept"


def test_defects_are_detected(bundle: Path, frames: dict[str, Path]) -> None:
    report = check_bundle(bundle, select_images(frames["defect"], None))
    assert report.fraction_with_detection == 1.0
    assert report.min_log_nfa_quantiles["max"] < 0
    assert sum(report.images_triggered_by_scale.values()) == report.images
    strict = check_bundle(bundle, select_images(frames["defect"], None), log10_epsilon=-1e6)
    assert strict.log10_epsilon == -1e6 and strict.mean_regions_per_image == 0


def test_broken_assumptions_show_in_the_diagnostics(bundle: Path, frames: dict[str, Path]) -> None:
    noisy = check_bundle(bundle, select_images(frames["noisy"], None))
    good = check_bundle(bundle, select_images(frames["good"], None))
    # Latents with variance 4 instead of 1: closer to a false alarm than calibrated noise (with C = 3
    # and log10 N = 156 not yet over the line), and the tail is far above the bound.
    assert noisy.min_log_nfa_quantiles["median"] < good.min_log_nfa_quantiles["min"]
    for scale in noisy.scales:
        assert scale["mean_m"] == pytest.approx(4.0, rel=0.15)
        assert scale["tail"][-1]["empirical"] > 5 * scale["tail"][-1]["chernoff_bound"]  # P(m >= 5)
        # Its best nodes are far more significant than any on the null.
        assert scale["best_log_p_real"]["median"] < 2 * scale["best_log_p_null"]["min"]

    correlated = check_bundle(bundle, select_images(frames["correlated"], None))
    fine = 0  # stride 4: neighbouring cells share blurred noise
    assert correlated.scales[fine]["lag1_autocorrelation"] > good.scales[fine]["lag1_autocorrelation"] + 0.1
    assert correlated.scales[fine]["mean_m"] > 1.5  # correlated pixels do not average out in the pooling


def test_cli_writes_table_and_json(
    bundle: Path, frames: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.cli import main

    out = tmp_path / "report" / "nfa.json"
    data = frames["good"]
    code = main(["calibrate", "nfa", "--bundle", str(bundle), "--data", str(data), "--images", "3", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "NFA false-alarm check" in printed and "| scale |" in printed
    report = json.loads(out.read_text())
    assert report["images"] == 3 and len(report["per_image"]) == 3
    assert set(report["min_log_nfa_quantiles"]) == {"min", "p5", "p25", "median", "p75", "p95", "max"}


def test_cli_errors_name_the_problem(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["calibrate", "nfa", "--bundle", str(bundle), "--data", str(empty)]) == 1
    assert "holds no images" in capsys.readouterr().err
    (empty / "a.png").write_bytes(b"not a png")
    assert main(["calibrate", "nfa", "--bundle", str(tmp_path / "missing"), "--data", str(empty)]) == 1
    assert "uflow calibrate nfa: error:" in capsys.readouterr().err


def test_cli_refuses_a_missing_training_run(bundle: Path, frames: dict[str, Path], tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    from training.cli import main

    missing = tmp_path / "no_run"
    code = main(["calibrate", "nfa", "--bundle", str(bundle), "--data", str(frames["good"]), "--run", str(missing)])
    assert code == 1
    err = capsys.readouterr().err
    assert "uflow calibrate nfa: error:" in err and "no_run" in err


@pytest.mark.slow
def test_latent_statistics_of_a_trained_run(tiny_run_dir: Path, synthetic_data_dir: Path) -> None:
    from calibration.nfa_check import format_latent_statistics, latent_statistics

    paths = select_images(synthetic_data_dir / "test" / "good", 4).paths
    rows = latent_statistics(tiny_run_dir, paths)
    assert len(rows) >= 2 and all(r["images"] == 4 for r in rows)
    for r in rows:
        assert r["channels"] > 1 and r["variance_z"] > 0
        assert -1.0 <= r["lag1_autocorrelation_z"] <= 1.0
        assert 0.0 <= r["mean_abs_channel_correlation"] <= 1.0
    assert "lag-1 autocorr of z" in format_latent_statistics(rows)
