"""edge-agent doctor on a box with [[recipes]]: one row per recipe, on real exported bundles and a real image folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_harness import write_toml
from contract_bundle import build_contract_bundle, good_frame
from mqtt_broker import free_port


def _doctor(config: Path, *extra: str) -> tuple[int, dict[str, dict[str, str]]]:
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "doctor", "--config", str(config), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout.startswith("["), proc.stderr[-3000:]
    return proc.returncode, {row["name"]: row for row in json.loads(proc.stdout)}


@pytest.fixture(scope="module")
def recipe_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe-bundles")
    return {
        "a": build_contract_bundle(root / "a", version="1.0.0"),
        "b": build_contract_bundle(root / "b", version="2.0.0"),
    }


def _config(tmp_path: Path, recipes: list[dict[str, object]], **top: object) -> Path:
    """Wide frames (160x64: the camera) in a folder, the given recipes."""
    frames = tmp_path / "frames"
    frames.mkdir(exist_ok=True)
    cv2.imwrite(str(frames / "000.png"), good_frame(np.random.default_rng(0), 64, 160))
    values: dict[str, object] = {
        "device_id": "doctor-recipes",
        "state_dir": str(tmp_path / "state"),
        "source": {"uri": str(frames)},
        "mqtt": {"port": free_port()},
        "recipes": recipes,
        **top,
    }
    return write_toml(tmp_path / "agent.toml", values)


def test_every_recipe_gets_a_row_and_a_roi_that_does_not_fit_the_turned_frames_fails(
    tmp_path: Path, recipe_bundles: dict[str, Path]
) -> None:
    config = _config(
        tmp_path,
        [
            {"name": "bottle", "bundle": str(recipe_bundles["a"]), "roi": [48, 0, 64, 64], "log10_epsilon": -2.5},
            # turned 90 degrees the camera's 160x64 frames are 64x160: x 96 + 64 is past their width
            {"name": "cap", "bundle": str(recipe_bundles["b"]), "rotate": 90, "roi": [96, 0, 64, 64]},
        ],
        recipe="cap",
    )
    code, rows = _doctor(config)  # the camera not opened: the ROIs cannot be checked, the rows say so
    bottle, cap = rows["recipe bottle"], rows["recipe cap"]
    assert code == 0, rows
    assert bottle["status"] == "ok" and cap["status"] == "ok"
    assert "index 0" in bottle["detail"] and "1.0.0" in bottle["detail"] and "-2.5 (the recipe's)" in bottle["detail"]
    assert "index 1" in cap["detail"] and "2.0.0" in cap["detail"] and "(the bundle's)" in cap["detail"]
    assert "--open-source" in cap["detail"]
    # The engine rows ran the active recipe's bundle, not [model] bundle (unused with recipes).
    assert rows["bundle"]["status"] == "ok" and str(recipe_bundles["b"]) in rows["bundle"]["detail"]
    assert rows["engine"]["status"] == "ok" and "aspect" not in rows

    code, rows = _doctor(config, "--open-source")
    assert code == 1
    assert rows["source"]["status"] == "ok" and "160x64" in rows["source"]["detail"]  # the raw frame
    bottle, cap = rows["recipe bottle"], rows["recipe cap"]
    assert bottle["status"] == "ok" and "fits the camera's 160x64 frames" in bottle["detail"]
    assert cap["status"] == "fail" and "[96, 0, 64, 64]" in cap["detail"] and "64x160" in cap["detail"]


def test_a_recipe_whose_whole_frame_is_not_the_models_shape_warns(
    tmp_path: Path, recipe_bundles: dict[str, Path]
) -> None:
    config = _config(tmp_path, [{"name": "wide", "bundle": str(recipe_bundles["a"])}])
    code, rows = _doctor(config, "--open-source")
    assert code == 0, rows
    assert rows["recipe wide"]["status"] == "warn" and "stretched" in rows["recipe wide"]["detail"]


def test_a_missing_or_corrupt_recipe_bundle_fails_its_row_by_name(
    tmp_path: Path, recipe_bundles: dict[str, Path]
) -> None:
    corrupt = build_contract_bundle(tmp_path / "corrupt", version="3.0.0")
    data = bytearray((corrupt / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "model.onnx").write_bytes(bytes(data))
    missing = tmp_path / "recipes" / "gone" / "current"
    config = _config(
        tmp_path,
        [
            {"name": "good", "bundle": str(recipe_bundles["a"])},
            {"name": "broken", "bundle": str(corrupt)},
            {"name": "gone", "bundle": str(missing)},
        ],
    )
    code, rows = _doctor(config)
    assert code == 1
    assert rows["recipe good"]["status"] == "ok"
    broken, gone = rows["recipe broken"], rows["recipe gone"]
    assert broken["status"] == "fail" and "index 1" in broken["detail"] and "model.onnx" in broken["detail"]
    assert gone["status"] == "fail" and "index 2" in gone["detail"] and str(missing) in gone["detail"]
