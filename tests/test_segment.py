"""``edge-agent segment`` outputs, and bundles that must be refused with a message saying why."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from contract_bundle import defect_frame, good_frame

from edge_agent.cli import main


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(11)
    cv2.imwrite(str(folder / "good.png"), good_frame(rng, 100, 150))
    # 150x100 image, defect at x 90..120, y 20..44 in the image's own pixels.
    cv2.imwrite(str(folder / "scratch.png"), defect_frame(rng, 100, 150, (90, 20, 30, 24)))
    return folder


def test_segment_writes_json_maps_and_overlay_at_image_size(
    contract_bundle: Path,
    images: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "segment",
            "--bundle",
            str(contract_bundle),
            "--out",
            str(out),
            str(images / "good.png"),
            str(images / "scratch.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for stem in ("good", "scratch"):
        assert (out / f"{stem}_overlay.png").is_file()
        overlay = cv2.imread(str(out / f"{stem}_overlay.png"))
        assert overlay is not None and overlay.shape[1] >= 150
        for suffix in ("_map.npy", "_lognfa.npy"):
            array = np.load(out / f"{stem}{suffix}")
            assert array.dtype == np.float32 and array.shape == (100, 150)

    good = json.loads((out / "good.json").read_text())
    assert good["anomalous"] is False and good["regions"] == []
    assert good["image_size"] == [150, 100]

    bad = json.loads((out / "scratch.json").read_text())
    assert bad["anomalous"] is True and len(bad["regions"]) == 1
    region = bad["regions"][0]
    x, y, w, h = region["bbox"]
    assert x <= 90 and y <= 20 and x + w >= 120 and y + h >= 44
    assert x + w <= 150 and y + h <= 100
    assert region["log_nfa"] < 0 and region["area"] > 0 and 0 < region["max_score"] <= 1
    lognfa = np.load(out / "scratch_lognfa.npy")
    anomaly_map = np.load(out / "scratch_map.npy")
    assert float(lognfa.min()) == pytest.approx(region["log_nfa"], abs=1e-3)
    assert bad["image_score"] == pytest.approx(float(anomaly_map.max()), abs=1e-6)
    assert int((lognfa < 0).sum()) == region["area"]


def test_unreadable_image_is_named_and_the_others_are_still_written(
    contract_bundle: Path,
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    out = tmp_path / "out"
    code = main(["segment", "--bundle", str(contract_bundle), "--out", str(out), str(broken), str(images / "good.png")])
    assert code == 1
    assert "broken.png: not an image OpenCV can read" in capsys.readouterr().err
    assert (out / "good.json").is_file() and not (out / "broken.json").exists()


def test_folder_argument_and_duplicate_stems(contract_bundle: Path, images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["segment", "--bundle", str(contract_bundle), "--out", str(out), "--no-overlay", str(images)]) == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["good.json", "scratch.json"]
    assert not list(out.glob("*_overlay.png"))
    twin = tmp_path / "other"
    twin.mkdir()
    shutil.copy(images / "good.png", twin / "good.png")
    assert main(["segment", "--bundle", str(contract_bundle), "--out", str(out), str(images), str(twin)]) == 1
    assert "would write the same outputs (good.json)" in capsys.readouterr().err


def copy_bundle(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def segment_error(bundle: Path, image: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["segment", "--bundle", str(bundle), "--out", str(out), str(image)]) == 1
    assert not out.exists() or not list(out.iterdir())
    return capsys.readouterr().err


def test_corrupt_model_file_is_refused_naming_the_file(
    contract_bundle: Path,
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = copy_bundle(contract_bundle, tmp_path / "bundle")
    with (bundle / "model.onnx").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    err = segment_error(bundle, images / "good.png", tmp_path / "out", capsys)
    assert "model.onnx is corrupt or was modified" in err


def test_manifest_scale_not_matching_onnx_names_the_output(
    contract_bundle: Path,
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = copy_bundle(contract_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "model.json").read_text())
    manifest["scales"][1]["height"] = 9
    (bundle / "model.json").write_text(json.dumps(manifest))
    err = segment_error(bundle, images / "good.png", tmp_path / "out", capsys)
    assert "output 'm_1' has shape [1, 8, 8], the manifest says [1, 9, 8]" in err


def test_manifest_naming_an_output_the_onnx_lacks(contract_bundle: Path, images: Path, tmp_path: Path, capsys) -> None:
    bundle = copy_bundle(contract_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "model.json").read_text())
    manifest["scales"][0]["name"] = "m_7"
    (bundle / "model.json").write_text(json.dumps(manifest))
    err = segment_error(bundle, images / "good.png", tmp_path / "out", capsys)
    assert "the model has no output 'm_7'" in err


def test_missing_file_and_wrong_schema_are_refused(contract_bundle: Path, images: Path, tmp_path: Path, capsys) -> None:
    bundle = copy_bundle(contract_bundle, tmp_path / "bundle")
    (bundle / "model.onnx").unlink()
    assert "model.onnx is listed in model.json but missing" in segment_error(
        bundle, images / "good.png", tmp_path / "o1", capsys
    )
    bundle = copy_bundle(contract_bundle, tmp_path / "bundle2")
    manifest = json.loads((bundle / "model.json").read_text())
    manifest["schema_version"] = 99
    (bundle / "model.json").write_text(json.dumps(manifest))
    assert "schema_version 99 is not supported" in segment_error(bundle, images / "good.png", tmp_path / "o2", capsys)
