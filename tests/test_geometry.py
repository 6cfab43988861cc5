"""Input geometry (issue 20 item 4) and the frozen feature norm (item 3).

- the aspect rule: the short side kept, the long side from the data, multiples of the largest stride,
  a pixel budget;
- ``uflow train`` on non-square images trains a non-square model, and evaluation (masks), the planted
  check, drift, self-tests, export and ``edge-agent segment`` all run at that shape;
- the aspect warning: once per frame size, in the agent's check, segment and doctor;
- ``norm_affine``: off means no trainable norm parameters; old config.json files still load.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.inspection.preprocess import AspectCheck, aspect_mismatch, model_input
from training.geometry import choose_geometry, data_aspect, input_size, resolve_geometry

# ------------------------------------------------------------------------------------------ the rule


@pytest.mark.parametrize(
    ("aspect", "expected"),
    [
        (1130 / 460, (256, 640)),  # bsdata: 2.46:1
        (800 / 600, (256, 352)),  # 4:3 landscape
        (600 / 800, (352, 256)),  # 3:4 portrait: the width is the short side
        (1.0, (256, 256)),
        (1.03, (256, 256)),  # within 5 % of square: square
    ],
)
def test_short_side_kept_long_side_follows_the_aspect(aspect: float, expected: tuple[int, int]) -> None:
    assert input_size(aspect, 256, 32) == expected


@pytest.mark.parametrize("aspect", [2.4565, 1.333, 0.5, 4.0])
def test_pixel_budget_shrinks_both_sides_on_the_stride_grid(aspect: float) -> None:
    budget = 256 * 384
    height, width = input_size(aspect, 256, 32, budget)
    assert height * width <= budget
    assert height % 32 == 0 and width % 32 == 0
    # still the data's aspect within one grid step
    assert abs(width / height - aspect) <= aspect * 32 / min(height, width)


def test_bad_aspect_and_short_side_are_refused() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        input_size(0.0, 256, 32)
    for short in (16, 100):
        with pytest.raises(ValueError, match="divisible by the largest stride 32"):
            input_size(1.0, short, 32)


def test_aspect_is_the_median_of_the_training_images(tmp_path: Path) -> None:
    paths = []
    for i, (h, w) in enumerate([(100, 250), (90, 220), (40, 300), (110, 260), (120, 100)]):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), np.zeros((h, w, 3), np.uint8))
        paths.append(path)
    aspect, count = data_aspect(paths)
    assert count == 5 and aspect == pytest.approx(220 / 90)  # ratios 2.5, 2.44, 7.5, 2.36, 0.83
    geometry = choose_geometry(paths, 64, 16)
    assert (geometry.height, geometry.width) == (64, 160) and not geometry.capped
    square = resolve_geometry(paths, 64, (8, 16), square=True)
    assert (square.height, square.width) == (64, 64)
    fixed = resolve_geometry(paths, 64, (8, 16), fixed_input_size=448)
    assert (fixed.height, fixed.width) == (448, 448)


# --------------------------------------------------------------------------------- aspect warnings


def test_aspect_mismatch_tolerates_rounding_and_reports_the_stretch() -> None:
    assert aspect_mismatch((460, 1130), (256, 640)) is None  # 2.457 vs 2.5: within 5 %
    assert aspect_mismatch((460, 1130), (256, 256)) == pytest.approx(1130 / 460)
    assert aspect_mismatch((800, 600), (256, 352)) == pytest.approx(0.75 / (352 / 256))
    with pytest.raises(ValueError, match="positive"):
        aspect_mismatch((0, 10), (256, 256))


def test_aspect_check_warns_once_per_frame_size(caplog: pytest.LogCaptureFixture) -> None:
    check = AspectCheck("cam0")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            check.check((460, 1130), (256, 256))
        check.check((256, 256), (256, 256))
        check.check((480, 640), (256, 256))
    events = [r for r in caplog.records if getattr(r, "event", None) == "frame_aspect_mismatch"]
    assert [(r.frame_width, r.frame_height) for r in events] == [(1130, 460), (640, 480)]  # type: ignore[attr-defined]
    assert events[0].source == "cam0" and events[0].model_width == 256  # type: ignore[attr-defined]


# -------------------------------------------------------------- non-square, train to the segment


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`uflow train` with no size flag on 64x160 synthetic images (random backbone, 2 epochs)."""
    pytest.importorskip("torch")
    from training.cli import main
    from training.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("wide")
    write_synthetic_dataset(root / "data", train_good=24, test_good=3, defects_per_kind=1, height=64, width=160)
    code = main(
        [
            "train",
            "--data",
            str(root / "data"),
            "--out",
            str(root / "run"),
            "--random-weights",
            "--image-size",
            "64",
            "--strides",
            "8",
            "16",
            "--epochs",
            "2",
            "--threads",
            "1",
            "--quiet",
        ]
    )
    assert code == 0
    return root / "data", root / "run"


def test_uflow_train_keeps_the_data_aspect(wide_run: tuple[Path, Path]) -> None:
    _, run = wide_run
    config = json.loads((run / "config.json").read_text())
    assert (config["model"]["image_height"], config["model"]["image_width"]) == (64, 160)
    assert config["data"]["image_height"] == 64 and config["data"]["image_width"] == 160
    selftest = sorted((run / "selftest").glob("*.png"))
    assert selftest and cv2.imread(str(selftest[0])).shape[:2] == (64, 160)
    scores = json.loads((run / "val_scores.json").read_text())
    assert scores["planted"]["count"] > 0  # planted on 64x160 images
    assert scores["drift_reference"] is not None


def test_wide_model_exports_evaluates_and_segments_at_its_shape(
    wide_run: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edge_agent.bundle import load_bundle
    from edge_agent.cli.segment import Segmenter
    from edge_agent.config import ModelConfig
    from edge_agent.engines import create_engine
    from training.evaluate import evaluate
    from training.export import export_bundle

    data, run = wide_run
    bundle_dir = export_bundle(run, tmp_path / "bundle", name="wide", version="1")
    bundle = load_bundle(bundle_dir)
    assert (bundle.manifest.input.height, bundle.manifest.input.width) == (64, 160)
    assert [(s.height, s.width) for s in bundle.manifest.scales] == [(8, 20), (4, 10)]

    result = evaluate(data, tmp_path / "eval", bundle_dir=bundle_dir, threads=1)
    assert result["image_size"] == [64, 160]
    assert math.isfinite(result["overall"]["pixel_auroc"])

    engine = create_engine(bundle, ModelConfig(backend="onnxruntime", threads=1))
    segmenter = Segmenter(bundle, engine)
    frame = cv2.imread(str(next((data / "test" / "good").glob("*.png"))))
    with caplog.at_level(logging.WARNING):
        verdict = segmenter.segment_image(frame)  # 64x160: the model's own aspect, no warning
        assert verdict.anomaly_map.shape == (64, 160)
        square = cv2.resize(frame, (96, 96))
        assert segmenter.segment_image(square).anomaly_map.shape == (96, 96)
        segmenter.segment_image(square)
    engine.close()
    events = [r for r in caplog.records if getattr(r, "event", None) == "frame_aspect_mismatch"]
    assert len(events) == 1 and events[0].frame_width == 96  # type: ignore[attr-defined]
    # the device's resize reads the manifest's (height, width), not a square size
    assert model_input(square, 64, 160).shape == (64, 160, 3)


# ---------------------------------------------------------------------------------- the norm's affine


def test_frozen_norm_has_no_trainable_parameters_and_old_configs_load(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from training.model import UFlow, UFlowConfig

    frozen = UFlow(UFlowConfig(image_height=64, image_width=64, strides=(8, 16), norm_affine=False))
    assert not any(k.startswith("norms.") for k in frozen.trainable_state_dict())
    features = [torch.randn(2, *shape) for shape in frozen.feature_shapes]
    assert torch.allclose(frozen.norms_log_jac_det(), torch.zeros(()))
    assert frozen.encode(features).log_jac_det.shape == (2,)

    # A config.json written before `norm_affine` existed trained the affine: it must read as True and
    # its checkpoint (with norms.*.weight/bias) must load.
    trained = UFlow(UFlowConfig(image_height=64, image_width=64, strides=(8, 16), norm_affine=True))
    old = trained.config.to_dict()
    del old["norm_affine"]
    restored = UFlow(UFlowConfig.from_dict(old))
    assert restored.config.norm_affine is True
    restored.load_trainable_state_dict(trained.trainable_state_dict())
    for name in ("chw", "channel"):
        model = UFlow(UFlowConfig(image_height=64, image_width=64, strides=(8, 16), norm=name, norm_affine=False))
        assert sum(p.numel() for p in model.norms.parameters()) == 0
