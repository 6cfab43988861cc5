"""Training side: synthetic data, backbone weights, flow, loss, datasets, and the tiny model's quality."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.data import (
    DatasetError,
    hold_out,
    list_images,
    load_image,
    load_images,
    load_mask,
    open_dataset,
)
from training.synthetic import DEFECT_KINDS, defect_image, good_image, write_synthetic_dataset

REAL_DATA = Path(os.environ.get("UFLOW_MAGNETIC_TILE", "/work/shared/data/magnetic_tile"))

# ---------------------------------------------------------------- synthetic data (torch-free)


def test_synthetic_images_are_deterministic_and_sized() -> None:
    a, b = good_image(3, 90, 130), good_image(3, 90, 130)
    assert a.shape == (90, 130, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, good_image(4, 90, 130))
    # a textured surface, not a flat fill, and grey like the magnetic tiles
    assert a[..., 0].std() > 3 and np.array_equal(a[..., 0], a[..., 1])


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_mask_covers_the_changed_pixels(kind: str) -> None:
    sample = defect_image(11, 128, 128, kind)
    clean = good_image(11, 128, 128).astype(np.int16)
    change = np.abs(sample.image.astype(np.int16) - clean)[..., 0]
    assert sample.kind == kind
    assert 0.003 < sample.mask.mean() < 0.1
    assert change[sample.mask].mean() > 25  # the masked pixels really changed
    assert change[~sample.mask].mean() < 3  # and little else did
    with pytest.raises(ValueError, match="unknown defect kind"):
        defect_image(1, 64, 64, "smudge")


def test_write_synthetic_dataset_mvtec_layout(tmp_path: Path) -> None:
    info = write_synthetic_dataset(tmp_path, train_good=5, test_good=2, defects_per_kind=1, height=48, width=64)
    splits = open_dataset(tmp_path)
    assert splits.layout == "mvtec"
    assert len(splits.train) + len(splits.val) == info.train_good == 5
    assert len(splits.test) == 2 + len(DEFECT_KINDS)
    for record in splits.test:
        if record.label:
            mask = load_mask(record.mask, 48, 64)
            assert mask.any()


# ---------------------------------------------------------------- dataset layouts


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def test_folder_layout_recursive_with_stable_holdout(tmp_path: Path) -> None:
    for i in range(12):
        _write(tmp_path / ("a" if i % 2 else "b/c") / f"{i}.png", good_image(i, 40, 50)[..., ::-1])
    (tmp_path / "notes.txt").write_text("not an image")
    splits = open_dataset(tmp_path, val_fraction=0.25)
    assert splits.layout == "folder" and not splits.test
    assert len(splits.train) == 9 and len(splits.val) == 3
    assert {r.label for r in splits.train + splits.val} == {0}
    # adding an image does not move the already held-out ones back into training
    _write(tmp_path / "a" / "extra.png", good_image(99, 40, 50))
    again = open_dataset(tmp_path, val_fraction=0.25)
    assert {r.image for r in splits.train} - {r.image for r in again.train} <= {r.image for r in again.val}
    assert len(list_images(tmp_path)) == 13


def test_folder_holdout_default_share_and_limit(tmp_path: Path) -> None:
    """The held-out share calibrates the NFA: 30 % by default, at most ``val_max``; a run reopens its own."""
    from edge_agent.promise import images_needed
    from edge_agent.service.review import EXPORT_VAL_FRACTION
    from training.data import DEFAULT_VAL_FRACTION, DEFAULT_VAL_MAX
    from training.finish import DEFAULT_IMAGE_SHARE, DEFAULT_LOG10_EPSILON
    from training.model import UFlowConfig
    from training.rundir import RunInfo

    for i in range(20):
        _write(tmp_path / f"{i}.png", good_image(i, 24, 24)[..., ::-1])
    default = open_dataset(tmp_path)
    assert len(default.val) == round(20 * DEFAULT_VAL_FRACTION) == 6 and len(default.train) == 14
    limited = open_dataset(tmp_path, val_fraction=0.5, val_max=4)
    assert len(limited.val) == 4 and len(limited.train) == 16
    assert {r.image for r in limited.val} <= {r.image for r in open_dataset(tmp_path, 0.5, None).val}
    with pytest.raises(ValueError):
        open_dataset(tmp_path, val_fraction=0.3, val_max=0)
    # the limit is what vouches for the regions' share of the default promise with none flagged, and the
    # data loop's exported split holds out the same share as a folder
    assert images_needed(10**DEFAULT_LOG10_EPSILON * (1 - DEFAULT_IMAGE_SHARE)) == DEFAULT_VAL_MAX
    assert EXPORT_VAL_FRACTION == DEFAULT_VAL_FRACTION

    def info(train_config: dict[str, object]) -> RunInfo:
        return RunInfo(tmp_path, UFlowConfig(), train_config, {"root": str(tmp_path)}, None, False, {}, {}, [])

    # a run reopens the split it was trained on; one from before the fields held out 10 %, unlimited
    assert info({"val_fraction": 0.5, "val_max": 4}).splits().val == limited.val
    assert len(info({}).splits().val) == 2


def test_folder_layout_reads_every_format_the_agent_reads(tmp_path: Path) -> None:
    # issue 21: `segment` and the agent read .webp; training refused it
    from edge_agent.inspection.drivers import IMAGE_SUFFIXES

    for i, suffix in enumerate(IMAGE_SUFFIXES):
        _write(tmp_path / f"{i}{suffix}", good_image(i, 40, 50)[..., ::-1])
    splits = open_dataset(tmp_path, val_fraction=0.25)
    records = splits.train + splits.val
    assert sorted(r.image.suffix for r in records) == sorted(IMAGE_SUFFIXES)
    images = load_images(records, 32, 32)
    assert images.shape == (len(IMAGE_SUFFIXES), 32, 32, 3) and images.std() > 0


def test_folder_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no images"):
        open_dataset(tmp_path)
    with pytest.raises(ValueError, match="fraction"):
        hold_out(tmp_path, [tmp_path / "x.png"], 1.5)


def test_mvtec_layout_missing_mask_and_root_with_categories(tmp_path: Path) -> None:
    category = tmp_path / "tile"
    write_synthetic_dataset(category, train_good=3, test_good=1, defects_per_kind=1, height=32, width=32)
    with pytest.raises(DatasetError, match=r"categories \['tile'\]"):
        open_dataset(tmp_path)
    (category / "ground_truth" / "crack" / "0000_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"0000_mask\.png"):
        open_dataset(category)


def _mvtec3d_category(root: Path, with_validation: bool = True) -> None:
    """A tiny MVTec 3D-AD category: rgb PNGs, gt masks, and xyz TIFFs that must be ignored."""
    xyz = np.zeros((24, 32, 3), np.float32)
    for split, count in (("train", 5), ("validation", 2 if with_validation else 0)):
        for i in range(count):
            _write(root / split / "good" / "rgb" / f"{i:03d}.png", good_image(i + 10 * len(split), 24, 32))
            _write(root / split / "good" / "xyz" / f"{i:03d}.tiff", xyz)
    _write(root / "test" / "good" / "rgb" / "000.png", good_image(99, 24, 32))
    _write(root / "test" / "good" / "gt" / "000.png", np.zeros((24, 32), np.uint8))
    for i, kind in enumerate(("crack", "hole")):
        sample = defect_image(50 + i, 24, 32, "crack" if kind == "crack" else "dark_blob")
        _write(root / "test" / kind / "rgb" / "000.png", sample.image)
        _write(root / "test" / kind / "gt" / "000.png", sample.mask.astype(np.uint8) * 255)
        _write(root / "test" / kind / "xyz" / "000.tiff", xyz)


def test_mvtec3d_rgb_layout(tmp_path: Path) -> None:
    _mvtec3d_category(tmp_path / "bagel")
    splits = open_dataset(tmp_path / "bagel")
    assert splits.layout == "mvtec3d"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5, 2, 3)
    assert all(
        r.image.parent.name == "rgb" and r.image.suffix == ".png" for r in splits.train + splits.val + splits.test
    )
    assert all("validation" in r.image.parts for r in splits.val)
    defects = {r.defect_type: r for r in splits.test if r.label}
    assert set(defects) == {"crack", "hole"}
    assert defects["hole"].mask == tmp_path / "bagel" / "test" / "hole" / "gt" / "000.png"
    assert load_mask(defects["hole"].mask, 24, 32).any()
    assert next(r for r in splits.test if not r.label).mask is None
    with pytest.raises(DatasetError, match=r"MVTec AD / 3D-AD root with categories \['bagel'\]"):
        open_dataset(tmp_path)


def test_mvtec3d_without_validation_holds_out_and_missing_mask_is_named(tmp_path: Path) -> None:
    _mvtec3d_category(tmp_path, with_validation=False)
    splits = open_dataset(tmp_path, val_fraction=0.2)
    assert (len(splits.train), len(splits.val)) == (4, 1)
    (tmp_path / "test" / "crack" / "gt" / "000.png").unlink()
    with pytest.raises(DatasetError, match=r"test/crack/rgb/000\.png has no mask at .*crack/gt/000\.png"):
        open_dataset(tmp_path)


def _split_json_dataset(root: Path) -> None:
    stems = {"train": [], "val": [], "test_good": [], "test_defect": {"MT_Crack": []}}
    for i in range(4):
        grey = good_image(i, 60, 90)[..., 0]
        _write(root / "MT_Free" / "Imgs" / f"g{i}.jpg", grey)
        stems["train" if i < 2 else "val" if i == 2 else "test_good"].append(f"MT_Free/Imgs/g{i}")
    sample = defect_image(7, 60, 90, "crack")
    _write(root / "MT_Crack" / "Imgs" / "d0.jpg", sample.image[..., 0])
    _write(root / "MT_Crack" / "Imgs" / "d0.png", sample.mask.astype(np.uint8) * 255)
    stems["test_defect"]["MT_Crack"].append("MT_Crack/Imgs/d0")
    (root / "split.json").write_text(json.dumps(stems))


def test_split_json_layout_grey_to_rgb_and_masks(tmp_path: Path) -> None:
    _split_json_dataset(tmp_path)
    splits = open_dataset(tmp_path)
    assert splits.layout == "split_json"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2, 1, 2)
    defect = next(r for r in splits.test if r.label == 1)
    assert defect.defect_type == "MT_Crack" and defect.mask is not None
    image = load_image(defect.image, 32, 48)
    assert image.shape == (32, 48, 3) and np.array_equal(image[..., 0], image[..., 2])
    mask = load_mask(defect.mask, 32, 48)
    assert mask.dtype == bool and set(np.unique(mask)) == {False, True}
    assert open_dataset(tmp_path / "split.json").test == splits.test


def test_split_json_missing_file_is_named(tmp_path: Path) -> None:
    _split_json_dataset(tmp_path)
    (tmp_path / "MT_Free" / "Imgs" / "g1.jpg").unlink()
    with pytest.raises(DatasetError, match="MT_Free/Imgs/g1"):
        open_dataset(tmp_path)
    (tmp_path / "split.json").write_text(json.dumps({"train": []}))
    with pytest.raises(DatasetError, match="lacks the key"):
        open_dataset(tmp_path)


@pytest.mark.skipif(not (REAL_DATA / "split.json").is_file(), reason="magnetic tile data not on this machine")
def test_magnetic_tile_split_reads() -> None:
    splits = open_dataset(REAL_DATA)
    assert (len(splits.train), len(splits.val)) == (600, 100)
    assert sum(r.label for r in splits.test) == 392 and len(splits.test) == 644
    record = next(r for r in splits.test if r.label)
    assert load_image(record.image, 256, 256).shape == (256, 256, 3)


# ---------------------------------------------------------------- backbone weights (torch from here on)

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("FrEIA")


def test_backbone_loads_imagenet_weights_in_order() -> None:
    import timm

    from training.backbones import create_backbone
    from training.catalog import backbone_info
    from training.weights import default_weights_path

    backbone = create_backbone("efficientnet_lite0", (4, 8, 16))
    assert backbone.channels == (24, 40, 112) and backbone.strides == (4, 8, 16)
    source = torch.load(default_weights_path(backbone_info("efficientnet_lite0")), weights_only=True)
    assert torch.equal(backbone.stem[0].weight, source["_conv_stem.weight"])
    assert not any(p.requires_grad for p in backbone.parameters())

    x = torch.rand(1, 3, 64, 96) * 2 - 1
    features = backbone(x)
    assert [tuple(f.shape) for f in features] == [(1, 24, 16, 24), (1, 40, 8, 12), (1, 112, 4, 6)]
    random_model = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(1,))
    random_model.eval()
    assert not torch.allclose(features[0], random_model(x)[0], atol=1e-3)

    backbone.train()  # stays frozen: BatchNorm statistics must not move
    assert not backbone.training and not backbone.stem[1].training

    # the static-padding variant (what gets exported) computes the same features, for its size only
    static = create_backbone("efficientnet_lite0", (4, 8, 16), input_size=(64, 96))
    for a, b in zip(static(x), features, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="built for 64x96 inputs"):
        static(torch.zeros(1, 3, 96, 64))


def test_weight_mapping_refuses_mismatches(tmp_path: Path) -> None:
    from training.backbones import create_backbone
    from training.weights import WeightsError, map_state_dict_in_order

    target = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))
    with pytest.raises(WeightsError, match="has 1 tensors, the model expects 2"):
        map_state_dict_in_order({"x": torch.zeros(2, 3)}, target, "test")
    with pytest.raises(WeightsError, match=r"tensor #1 y has shape \[5\] but maps to b with shape \[4\]"):
        map_state_dict_in_order({"x": torch.zeros(2, 3), "y": torch.zeros(5)}, target, "test")

    with pytest.raises(WeightsError, match="not found at"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "missing.pth")
    lite1 = tmp_path / "lite1.pth"
    from training.catalog import backbone_info
    from training.weights import default_weights_path

    lite1.write_bytes(default_weights_path(backbone_info("efficientnet_lite1")).read_bytes())
    with pytest.raises(WeightsError, match="has 386 tensors, the model expects 296"):
        create_backbone("efficientnet_lite0", weights=lite1)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot be read"):
        create_backbone("efficientnet_lite0", weights=garbage)
    with pytest.raises(ValueError, match="no stage at stride"):
        create_backbone("efficientnet_lite0", strides=(4, 12))
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("resnet9000")


# ---------------------------------------------------------------- flow


def test_flow_shapes_channels_and_invertibility() -> None:
    from training.flow import build_uflow_graph, upsampled_channels

    inputs = [(24, 32, 32), (40, 16, 16), (112, 8, 8)]
    graph, shapes = build_uflow_graph(inputs, steps=4)
    # coarsest: 112 -> 56 up (14 at 16x16) + 56 out; middle: 40 + 14 = 54 -> 24 up + 30 out; finest 24 + 6
    assert [(s.channels, s.height, s.width) for s in shapes] == [(30, 32, 32), (30, 16, 16), (56, 8, 8)]
    assert all(upsampled_channels(c) % 4 == 0 for c in (112, 54, 40))
    total_in = sum(c * h * w for c, h, w in inputs)
    assert total_in == sum(s.channels * s.height * s.width for s in shapes)

    graph.eval()
    x = [torch.randn(2, *shape) for shape in inputs]
    with torch.no_grad():
        z, log_jac = graph(x)
        back, _ = graph(list(z), rev=True)
    assert [tuple(t.shape[1:]) for t in z] == [(s.channels, s.height, s.width) for s in shapes]
    assert log_jac.shape == (2,)
    for original, restored in zip(x, back, strict=True):
        assert torch.allclose(original, restored, atol=1e-4)


def test_flow_refuses_scales_that_do_not_halve() -> None:
    from training.flow import build_uflow_graph

    with pytest.raises(ValueError, match="halve"):
        build_uflow_graph([(24, 32, 32), (40, 10, 10)])


def test_model_config_validation_and_roundtrip() -> None:
    from training.model import UFlowConfig

    config = UFlowConfig(image_height=64, image_width=96, strides=(8, 16))
    assert UFlowConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="divisible by the largest stride 16"):
        UFlowConfig(image_height=100, image_width=96, strides=(8, 16))
    with pytest.raises(ValueError, match="unknown model config key"):
        UFlowConfig.from_dict({"backbone": "efficientnet_lite0", "colour": "red"})
    with pytest.raises(ValueError, match="unknown feature norm"):
        UFlowConfig(norm="batch")


def test_anomaly_map_follows_the_design_formula() -> None:
    from training.model import anomaly_map, scale_maps

    z = [torch.randn(1, 5, 8, 8) * 2, torch.randn(1, 7, 4, 4)]
    maps = scale_maps(z)
    assert torch.allclose(maps[1], (z[1] ** 2).mean(1))
    amap = anomaly_map(maps, 16, 16)
    up = [
        torch.nn.functional.interpolate(torch.exp(-0.5 * m)[:, None], size=(16, 16), mode="bilinear")[:, 0]
        for m in maps
    ]
    assert torch.allclose(amap, 1 - (up[0] + up[1]) / 2, atol=1e-6)


@pytest.mark.parametrize("norm", ["chw", "channel"])
def test_norm_affine_is_part_of_the_jacobian(norm: str) -> None:
    """Shrinking the norms' affine must cost log-det, or the loss can fall without bound by shrinking it."""
    from training.model import UFlow, UFlowConfig

    config = UFlowConfig(image_height=64, image_width=64, strides=(8, 16), norm=norm, norm_in_jacobian=True)
    model = UFlow(config)
    features = [torch.randn(2, *shape) for shape in model.feature_shapes]
    before = model.encode(features).log_jac_det
    weight = model.norms[0].weight if norm == "chw" else model.norms[0].norm.weight
    with torch.no_grad():
        weight.mul_(0.5)
    shrunk = model.encode(features)
    flow_only = model.flow([n(f) for n, f in zip(model.norms, features, strict=True)])[1]
    c, h, w = model.feature_shapes[0]
    assert torch.allclose(shrunk.log_jac_det - flow_only, torch.full((2,), c * h * w * np.log(0.5)), rtol=1e-5)
    assert not torch.allclose(before, shrunk.log_jac_det)


def test_loss_decreases_on_synthetic_features(tmp_path: Path) -> None:
    from training.model import UFlow, UFlowConfig, nll_loss

    torch.manual_seed(0)
    model = UFlow(UFlowConfig(image_height=64, image_width=64, strides=(8, 16)))
    images = np.stack([good_image(i, 64, 64) for i in range(8)])
    features = model.extract(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    model.train()
    for _ in range(15):
        loss = nll_loss(model.encode(features))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1 * abs(losses[0])
    assert not model.backbone.training


# ---------------------------------------------------------------- the tiny trained model


def test_tiny_run_dir_contents(tiny_run_dir: Path) -> None:
    from training.rundir import read_run

    info = read_run(tiny_run_dir)
    assert info.model_config.image_height == 128
    history = json.loads((tiny_run_dir / "history.json").read_text())
    assert len(history) == info.train_config["epochs"]
    assert all(row["val_nll"] is not None for row in history)
    best = min(history, key=lambda row: row["val_nll"])
    assert torch.load(tiny_run_dir / "checkpoint.pt", weights_only=True)["meta"]["epoch"] == best["epoch"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert len(info.selftest_images) == 3
    assert len(info.val_scores["scores"]) == info.data_summary["val"]


@pytest.fixture(scope="module")
def tiny_predictions(tiny_run_dir: Path, synthetic_data_dir: Path):
    from training.data import load_images
    from training.rundir import load_model
    from training.train import predict

    model, _ = load_model(tiny_run_dir)
    test = open_dataset(synthetic_data_dir).test
    amaps, maps = predict(model, load_images(test, 128, 128))
    return model, test, amaps, maps


def test_tiny_model_separates_defects(tiny_predictions) -> None:
    from training.metrics import image_auroc, pixel_auroc

    _, test, amaps, _ = tiny_predictions
    labels = np.array([r.label for r in test])
    masks = np.stack([load_mask(r.mask, 128, 128) for r in test])
    scores = amaps.reshape(len(amaps), -1).max(1)
    assert scores[labels == 1].min() > scores[labels == 0].max()
    assert image_auroc(scores, labels) == 1.0
    assert pixel_auroc(amaps, masks) > 0.95


def test_tiny_model_nfa_flags_defects_not_good_parts(tiny_predictions) -> None:
    from edge_agent.inspection import nfa

    model, test, _, maps = tiny_predictions
    channels = [s.channels for s in model.scales]
    flagged = np.array(
        [(nfa.log_nfa_map([m[i] for m in maps], channels, (128, 128)) < 0).any() for i in range(len(test))]
    )
    labels = np.array([r.label for r in test])
    assert not flagged[labels == 0].any(), "the NFA flags good synthetic parts"
    assert flagged[labels == 1].mean() >= 0.9, f"the NFA flags only {flagged[labels == 1].sum()} of 16 defects"


def test_training_with_autocast_channels_last_and_early_stop(tmp_path: Path) -> None:
    """The AMP code path (bfloat16 autocast; on the CPU here, CUDA in production), NHWC, early stopping."""
    from training.model import UFlowConfig
    from training.train import TrainConfig, TrainingError, placement, train

    write_synthetic_dataset(tmp_path / "data", train_good=6, test_good=1, defects_per_kind=1, height=64, width=64)
    config = TrainConfig(epochs=30, batch_size=4, amp=True, channels_last=True, patience=1, lr=3e-2)
    where = placement(config)
    assert where.amp_dtype == torch.bfloat16 and where.channels_last
    result = train(
        tmp_path / "data",
        tmp_path / "run",
        UFlowConfig(image_height=64, image_width=64, strides=(8, 16)),
        config,
        progress=False,
    )
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert all(np.isfinite(row["train_loss"]) for row in history)
    # stopped one epoch after the last improvement, and the kept checkpoint is the best epoch
    assert result.stopped_early and result.epochs_run == len(history) < 30
    assert history[-1]["epoch"] - result.best_epoch == 1
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["meta"]["epoch"] == result.best_epoch
    with pytest.raises(TrainingError, match="no CUDA GPU") if not torch.cuda.is_available() else nullcontext():
        placement(TrainConfig(device="cuda"))
