"""edge-agent doctor on real parts: a contract bundle, a real mosquitto, a real image folder."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from contract_bundle import build_contract_bundle, good_frame
from mqtt_broker import MosquittoBroker, free_port


def _doctor(config: Path, *extra: str) -> tuple[int, list[dict[str, str]]]:
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "doctor", "--config", str(config), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, json.loads(proc.stdout)


def _by_name(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {row["name"]: row for row in rows}


def _write_config(tmp_path: Path, bundle: Path, port: int, source: Path, public_key: Path | None = None) -> Path:
    config = tmp_path / "agent.toml"
    lines = [
        'device_id = "doctor-test"',
        f'state_dir = "{tmp_path / "state"}"',
        "[model]",
        f'bundle = "{bundle}"',
        "[source]",
        f'uri = "{source}"',
        "[mqtt]",
        f"port = {port}",
    ]
    if public_key is not None:
        lines += ["[update]", f'public_key = "{public_key}"']
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(folder / f"{i:03d}.png"), good_frame(rng, 64, 64))
    return folder


def test_healthy_box_passes_every_check(
    tmp_path: Path,
    broker_factory: Callable[[], MosquittoBroker],
    image_folder: Path,
) -> None:
    broker = broker_factory()
    bundle = build_contract_bundle(tmp_path / "bundle")
    code, rows = _doctor(_write_config(tmp_path, bundle, broker.port, image_folder), "--open-source")
    checks = _by_name(rows)
    assert code == 0, rows
    assert checks["bundle"]["status"] == "ok" and "contract 1.0.0" in checks["bundle"]["detail"]
    assert checks["engine"]["status"] == "ok" and checks["engine"]["detail"].startswith("onnxruntime")
    # What model.threads = 0 chose here, and for which source (a folder: not live).
    assert checks["threads"]["status"] == "ok" and "file/folder" in checks["threads"]["detail"]
    assert "spinning off" in checks["threads"]["detail"]
    assert checks["source"]["status"] == "ok" and "64x64" in checks["source"]["detail"]
    assert checks["mqtt broker"]["status"] == "ok"
    assert checks["nfa"]["status"] in ("ok", "warn")
    # No fleet key configured: signatures unchecked is worth a warning, not a failure.
    assert checks["signature"]["status"] == "warn"


def test_corrupt_bundle_fails_and_names_the_file(tmp_path: Path, image_folder: Path) -> None:
    bundle = build_contract_bundle(tmp_path / "bundle")
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    code, rows = _doctor(_write_config(tmp_path, bundle, free_port(), image_folder))
    checks = _by_name(rows)
    assert code == 1
    assert checks["bundle"]["status"] == "fail"
    assert "model.onnx" in checks["bundle"]["detail"] and "corrupt" in checks["bundle"]["detail"]
    # A broker that is down is a warning: the agent spools and retries.
    assert checks["mqtt broker"]["status"] == "warn"


def test_wrong_fleet_key_fails_the_signature(tmp_path: Path, image_folder: Path) -> None:
    from edge_agent.fleet.signing import generate_keypair, sign_bundle

    bundle = build_contract_bundle(tmp_path / "bundle")
    signer = generate_keypair(tmp_path / "signer")
    other = generate_keypair(tmp_path / "other")
    sign_bundle(bundle, signer.private_key)
    good_code, good_rows = _doctor(_write_config(tmp_path, bundle, free_port(), image_folder, signer.public_key))
    assert _by_name(good_rows)["signature"]["status"] == "ok"
    assert good_code == 0
    code, rows = _doctor(_write_config(tmp_path, bundle, free_port(), image_folder, other.public_key))
    assert code == 1
    assert _by_name(rows)["signature"]["status"] == "fail"


def test_unknown_config_key_is_reported_by_name(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[mqtt]\nhots = 'broker'\n")
    code, rows = _doctor(config)
    assert code == 1
    assert _by_name(rows)["config"]["status"] == "fail"
    assert "mqtt.hots" in _by_name(rows)["config"]["detail"]


def test_missing_source_fails_with_its_path(tmp_path: Path) -> None:
    bundle = build_contract_bundle(tmp_path / "bundle")
    missing = tmp_path / "no-such-video.mp4"
    code, rows = _doctor(_write_config(tmp_path, bundle, free_port(), missing), "--open-source")
    assert code == 1
    source = _by_name(rows)["source"]
    assert source["status"] == "fail" and str(missing) in source["detail"]


def test_detection_power_row_reports_the_planted_check_and_warns_below_half(tmp_path: Path) -> None:
    from edge_agent.bundle import load_bundle
    from edge_agent.cli.doctor import check_detection_power

    manifest = load_bundle(build_contract_bundle(tmp_path / "bundle")).manifest
    assert check_detection_power(manifest).status == "warn"  # no planted check recorded
    seeing = manifest.model_copy(update={"validation_metrics": {"planted_detection_rate": 0.9, "planted_count": 48.0}})
    row = check_detection_power(seeing)
    assert row.status == "ok" and "90%" in row.detail and "48" in row.detail
    blind = manifest.model_copy(update={"validation_metrics": {"planted_detection_rate": 0.2, "planted_count": 48.0}})
    assert check_detection_power(blind).status == "warn"


def test_aspect_row_warns_when_frames_are_not_the_models_shape(
    tmp_path: Path, broker_factory: Callable[[], MosquittoBroker]
) -> None:
    """Frames of 2.5:1 into a square model: the resize would squash every part, and doctor says so."""
    broker = broker_factory()
    bundle = build_contract_bundle(tmp_path / "bundle")  # 64x64
    wide = tmp_path / "wide"
    wide.mkdir()
    cv2.imwrite(str(wide / "000.png"), good_frame(np.random.default_rng(0), 64, 160))
    _, rows = _doctor(_write_config(tmp_path, bundle, broker.port, wide), "--open-source")
    aspect = _by_name(rows)["aspect"]
    assert aspect["status"] == "warn"
    assert "160x64" in aspect["detail"] and "64x64" in aspect["detail"] and "source.roi" in aspect["detail"]
    # Without --open-source the frame size is unknown: the row says how to check it, and does not warn.
    _, rows = _doctor(_write_config(tmp_path, bundle, broker.port, wide))
    assert _by_name(rows)["aspect"]["status"] == "ok" and "--open-source" in _by_name(rows)["aspect"]["detail"]


def test_false_alarm_row_says_what_the_calibration_images_can_vouch_for(tmp_path: Path) -> None:
    from edge_agent.bundle import NfaCalibration, ScaleNullSpec, load_bundle
    from edge_agent.cli.doctor import Check, check_false_alarm_promise
    from edge_agent.promise import check_promise

    manifest = load_bundle(build_contract_bundle(tmp_path / "bundle")).manifest
    assert manifest.nfa.null_model == "polyomino"
    assert check_false_alarm_promise(manifest).status == "ok"  # the paper's NFA: conservative by construction
    nulls = tuple(ScaleNullSpec(mean=1.0, dof=4.0, area=1.0) for _ in manifest.scales)
    fitted = manifest.nfa.model_copy(update={"null_model": "fitted", "scale_nulls": nulls, "log10_epsilon": -2.0})
    unknown = check_false_alarm_promise(manifest.model_copy(update={"nfa": fitted}))
    assert unknown.status == "warn" and "1 per 100 parts" in unknown.detail and "no calibration" in unknown.detail

    def row(images: int, false_regions: int) -> Check:
        check = check_promise(0.01, images, false_regions, false_regions)
        calibration = NfaCalibration(
            images=images,
            folds=10,
            evidence_scale=1.0,
            log10_epsilon=-2.0,
            false_regions=false_regions,
            images_flagged=false_regions,
            false_regions_per_image_upper95=check.regions_upper,
            flagged_share_upper95=check.flagged_upper,
            images_needed=check.needed,
        )
        nfa = fitted.model_copy(update={"calibration": calibration})
        return check_false_alarm_promise(manifest.model_copy(update={"nfa": nfa}))

    few = row(21, 0)
    assert few.status == "warn"
    for fact in ("1 per 100 parts", "300", "had 21", "279 more good images"):
        assert fact in few.detail
    enough = row(320, 0)
    assert enough.status == "ok" and "320 good calibration images" in enough.detail
    noisy = row(100, 4)
    assert noisy.status == "warn" and "not met" in noisy.detail and "4 false regions" in noisy.detail
