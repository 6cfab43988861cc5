"""Backbone families behind one interface: timm ResNets, the multi-scale CaiT, hypercolumns, pooling, weights.

ResNet and CaiT ImageNet weights are not on this machine, so these tests use seeded random weights
(``random_weights=True``, the tests-only switch) and, for CaiT, the small models only; the weight
lookup itself is tested with real state-dict files written here, in every place it searches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("FrEIA")

from training.backbones import cait_extractor, create_backbone  # noqa: E402
from training.catalog import CaitBranch  # noqa: E402
from training.model import UFlow, UFlowConfig, nll_loss  # noqa: E402
from training.weights import WeightsError, timm_state_dict  # noqa: E402


def test_resnet18_stages_at_strides_4_8_16_frozen_and_reproducible() -> None:
    backbone = create_backbone("resnet18", (4, 8, 16), random_weights=True, input_size=(64, 96))
    assert backbone.channels == (64, 128, 256) and backbone.strides == (4, 8, 16)
    assert not any(p.requires_grad for p in backbone.parameters())
    x = torch.rand(2, 3, 64, 96)
    features = backbone(x)
    assert [tuple(f.shape) for f in features] == [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6)]
    backbone.train()
    assert not backbone.training
    # the seeded random init is the same every time: a run trained on it can be reloaded
    again = create_backbone("resnet18", (4, 8, 16), random_weights=True, input_size=(64, 96))
    assert all(torch.equal(a, b) for a, b in zip(again(x), features, strict=True))
    with pytest.raises(ValueError, match="built for 64x96"):
        backbone(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"no stage at stride 2"):
        create_backbone("resnet18", (2, 4), random_weights=True)


def test_wide_resnet50_2_channels() -> None:
    backbone = create_backbone("wide_resnet50_2", (4, 8, 16), random_weights=True)
    assert backbone.channels == (256, 512, 1024)
    # truncated after the deepest requested stage: layer4 is not part of the extractor
    assert len(backbone.blocks) == 3


def test_hypercolumn_concatenates_every_stage_of_a_stride() -> None:
    plain = create_backbone("efficientnet_lite0", (8, 16, 32))
    hyper = create_backbone("efficientnet_lite0", (8, 16, 32), hypercolumn=True)
    assert plain.channels == (40, 112, 320)
    assert hyper.channels == (40, 80 + 112, 192 + 320)
    assert hyper.taps == ((2,), (3, 4), (5, 6))
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    a, b = plain(x), hyper(x)
    # the last stage of each stride is the tail of the hypercolumn
    assert torch.allclose(b[1][:, 80:], a[1]) and torch.allclose(b[2][:, 192:], a[2])


def test_feature_pool_is_a_local_mean() -> None:
    plain = create_backbone("efficientnet_lite0", (8, 16))
    pooled = create_backbone("efficientnet_lite0", (8, 16), pool=3)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    raw, smooth = plain(x), pooled(x)
    want = torch.nn.functional.avg_pool2d(raw[0], 3, stride=1, padding=1, count_include_pad=False)
    assert torch.allclose(smooth[0], want, atol=1e-6)
    assert smooth[0].shape == raw[0].shape
    # an interior value is the mean of its 3x3 neighbourhood
    assert torch.allclose(smooth[0][0, :, 2, 2], raw[0][0, :, 1:4, 1:4].mean(dim=(1, 2)), atol=1e-6)
    with pytest.raises(ValueError, match="odd size"):
        create_backbone("efficientnet_lite0", (8, 16), pool=2)


def test_multiscale_cait_small_models_feed_a_uflow() -> None:
    """The MS-CaiT path with two small CaiTs (random weights): maps at 1/16 and 1/32 of the input."""
    branches = [CaitBranch("cait_xxs24_224", 2, 448), CaitBranch("cait_xxs24_224", 2, 224)]
    extractor = cait_extractor("test-cait", branches, 448, random_weights=True)
    assert extractor.strides == (16, 32) and extractor.channels == (192, 192)
    assert len(extractor.models[0].blocks) == 2  # blocks past the ones used are dropped
    x = torch.rand(1, 3, 448, 448)
    features = extractor(x)
    assert [tuple(f.shape) for f in features] == [(1, 192, 28, 28), (1, 192, 14, 14)]
    # patch tokens went through the model's own final norm: zero mean over channels at each position
    assert features[0].mean(dim=1).abs().max() < 1e-4
    # the coarse branch really saw the downsized image
    small = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    model = extractor.models[1]
    tokens = model.pos_drop(model.patch_embed(small) + model.pos_embed)
    for block in model.blocks:
        tokens = block(tokens)
    assert torch.allclose(model.norm(tokens).transpose(1, 2).reshape(1, 192, 14, 14), features[1], atol=1e-5)
    with pytest.raises(ValueError, match="built for 448x448"):
        extractor(torch.rand(1, 3, 224, 224))


def test_uflow_on_random_resnet18_trains() -> None:
    torch.manual_seed(0)
    model = UFlow(
        UFlowConfig(backbone="resnet18", image_height=64, image_width=64, strides=(8, 16), heads=("flow",)),
        random_weights=True,
    )
    assert [s.channels for s in model.scales] == [128 + 32, 128]
    features = model.extract(torch.rand(4, 3, 64, 64))
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        loss = nll_loss(model.encode(features))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_mcait_config_is_fixed_to_448() -> None:
    with pytest.raises(ValueError, match="448x448 only"):
        UFlowConfig(backbone="mcait", image_height=256, image_width=256, strides=(16, 32))
    assert UFlowConfig(backbone="mcait", image_height=448, image_width=448, strides=(16, 32)).backbone == "mcait"


# ---------------------------------------------------------------- weights: where they are looked for


@pytest.fixture()
def no_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every hub cache location at an empty directory (the real home may hold anything)."""
    empty = tmp_path / "empty_hub"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    monkeypatch.setenv("HF_HOME", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return empty


def _resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False).state_dict()


def test_missing_timm_weights_say_where_to_put_them(no_hub_cache: Path) -> None:
    with pytest.raises(WeightsError) as error:
        create_backbone("resnet18", (4, 8, 16))
    message = str(error.value)
    assert "resnet18.safetensors" in message and "--weights DIR" in message
    assert "models--timm--resnet18.a1_in1k" in message and str(no_hub_cache) in message
    with pytest.raises(WeightsError, match=r"cait_m48_448\.safetensors and DIR/cait_s24_224\.safetensors"):
        create_backbone("mcait", (16, 32))
    with pytest.raises(WeightsError, match="one weights file per CaiT"):
        create_backbone("mcait", (16, 32), weights=Path(__file__))


def test_timm_weights_from_a_directory_a_file_and_a_hub_cache(tmp_path: Path, no_hub_cache: Path) -> None:
    from safetensors.torch import save_file

    state = _resnet18_state(seed=3)
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(state, folder / "resnet18.pth")
    from_dir = create_backbone("resnet18", (4, 8), weights=folder)
    assert torch.equal(from_dir.stem[0].weight, state["conv1.weight"])
    from_file = create_backbone("resnet18", (4, 8), weights=folder / "resnet18.pth")
    assert torch.equal(from_file.blocks[1][0].conv1.weight, state["layer2.0.conv1.weight"])

    # timm's own Hugging Face cache layout, found without --weights through HF_HUB_CACHE
    snapshot = no_hub_cache / "models--timm--resnet18.a1_in1k" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    from_cache = create_backbone("resnet18", (4, 8))
    assert torch.equal(from_cache.stem[0].weight, state["conv1.weight"])
    assert timm_state_dict("resnet18", None, "resnet18")["fc.bias"].shape == (1000,)


def test_timm_weights_of_another_architecture_are_refused(tmp_path: Path, no_hub_cache: Path) -> None:
    import timm

    wrong = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), wrong)
    with pytest.raises(WeightsError, match="do not fit the architecture"):
        create_backbone("resnet18", (4, 8), weights=wrong)
    garbage = tmp_path / "g" / "resnet18.safetensors"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="cannot be read"):
        create_backbone("resnet18", (4, 8), weights=garbage.parent)


def test_uflow_train_cli_missing_weights_is_one_clear_line(
    tmp_path: Path, no_hub_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.cli import main
    from training.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", train_good=3, test_good=1, defects_per_kind=1, height=32, width=32)
    code = main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--backbone", "resnet18"])
    err = capsys.readouterr().err
    assert code == 1
    assert "uflow train: error: ImageNet weights for resnet18" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_random_weights_run_reloads_the_same_backbone(tmp_path: Path) -> None:
    from training.rundir import load_model, read_run
    from training.synthetic import write_synthetic_dataset
    from training.train import TrainConfig, predict, train

    write_synthetic_dataset(tmp_path / "data", train_good=6, test_good=1, defects_per_kind=1, height=64, width=64)
    config = UFlowConfig(backbone="resnet18", image_height=64, image_width=64, strides=(8, 16))
    train(
        tmp_path / "data",
        tmp_path / "run",
        config,
        TrainConfig(epochs=2, batch_size=4),
        random_weights=True,
        progress=False,
    )
    assert read_run(tmp_path / "run").random_weights
    first, _ = load_model(tmp_path / "run")
    second, _ = load_model(tmp_path / "run")
    images = np.zeros((1, 64, 64, 3), np.uint8) + 100
    assert np.array_equal(predict(first, images)[0], predict(second, images)[0])


def test_building_the_extractor_leaves_the_batchnorm_statistics_as_loaded() -> None:
    """Measuring the stages must not run the model in train mode (it would shift BatchNorm running stats)."""
    import timm

    from training.backbones import _stem_and_stages

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1.0, 1.0)
            module.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    _stem_and_stages(model, "efficientnet_lite")
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
