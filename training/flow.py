"""The U-shaped normalizing flow of U-Flow (FrEIA GraphINN), coarse to fine.

Per scale, from the coarsest: a stage of ``AllInOneBlock``s (affine clamping 2.0, fixed hard
permutation, subnet conv-ReLU-conv with kernel 3 and 1 alternating), then the stage's output is split
along channels: ``C // 8 * 4`` channels (about half, a multiple of 4) go through ``IRevNetUpsampling``
(C -> C/4, HxW -> 2Hx2W) and are concatenated with the next finer scale's features; the rest is that
scale's latent output. The finest stage outputs everything. Latents are returned finest first.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
from torch import nn

from training.catalog import NORM_KINDS


@dataclass(frozen=True)
class LatentShape:
    """One latent output z_s of the flow: channels (the NFA's chi^2 degrees of freedom) and map size."""

    channels: int
    height: int
    width: int


def upsampled_channels(channels: int) -> int:
    """How many of a stage's channels go up to the finer scale: about half, a multiple of 4."""
    return channels // 8 * 4


def _subnet(kernel_size: int, hidden_ratio: float):
    def build(channels_in: int, channels_out: int) -> nn.Module:
        hidden = max(1, round(channels_in * hidden_ratio))
        return nn.Sequential(
            nn.Conv2d(channels_in, hidden, kernel_size, padding=kernel_size // 2),
            nn.ReLU(),
            nn.Conv2d(hidden, channels_out, kernel_size, padding=kernel_size // 2),
        )

    return build


@contextmanager
def _seeded_numpy(seed: int) -> Iterator[None]:
    """AllInOneBlock draws its hard permutation from numpy's global RNG: make it reproducible, then restore."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _stage(node: Ff.Node, steps: int, clamp: float, hidden_ratio: float, label: str) -> list[Ff.Node]:
    nodes = []
    for step in range(steps):
        kernel = 3 if step % 2 == 0 else 1
        node = Ff.Node(
            node,
            Fm.AllInOneBlock,
            {"subnet_constructor": _subnet(kernel, hidden_ratio), "affine_clamping": clamp, "permute_soft": False},
            name=f"{label}_step{step}",
        )
        nodes.append(node)
    return nodes


def _check_inputs(inputs: Sequence[tuple[int, int, int]]) -> None:
    if not inputs:
        raise ValueError("the flow needs at least one input scale")
    for finer, coarser in itertools.pairwise(inputs):
        if (coarser[1] * 2, coarser[2] * 2) != (finer[1], finer[2]):
            raise ValueError(
                f"flow scales must halve in size from fine to coarse, got {finer[1]}x{finer[2]} then "
                f"{coarser[1]}x{coarser[2]}; use consecutive strides (e.g. 4/8/16) and an input size "
                "divisible by the largest stride"
            )
    for channels, _, _ in inputs[1:]:
        if upsampled_channels(channels) == 0:
            raise ValueError(f"a scale with {channels} channels is too narrow to split and upsample (need >= 8)")


def build_uflow_graph(
    inputs: Sequence[tuple[int, int, int]],
    steps: int = 4,
    clamp: float = 2.0,
    hidden_ratio: float = 1.0,
    seed: int = 0,
) -> tuple[Ff.GraphINN, tuple[LatentShape, ...]]:
    """Build the flow for feature maps ``inputs`` = [(C, H, W), ...] finest first.

    Returns the GraphINN (inputs and outputs finest first) and the latent shapes, finest first.
    """
    _check_inputs(inputs)
    with _seeded_numpy(seed):
        in_nodes = [Ff.InputNode(c, h, w, name=f"features_{i}") for i, (c, h, w) in enumerate(inputs)]
        nodes: list[Ff.Node] = []
        outputs: dict[int, Ff.OutputNode] = {}
        current: Ff.Node = in_nodes[-1]
        for index in range(len(inputs) - 1, 0, -1):
            stage = _stage(current, steps, clamp, hidden_ratio, f"scale{index}")
            channels = stage[-1].output_dims[0][0]
            up = upsampled_channels(channels)
            split = Ff.Node(stage[-1], Fm.Split, {"section_sizes": (up, channels - up), "dim": 0}, name=f"split{index}")
            outputs[index] = Ff.OutputNode(split.out1, name=f"z_{index}")
            upsample = Ff.Node(split.out0, Fm.IRevNetUpsampling, {}, name=f"up{index}")
            current = Ff.Node(
                [in_nodes[index - 1].out0, upsample.out0], Fm.Concat, {"dim": 0}, name=f"concat{index - 1}"
            )
            nodes += [*stage, split, upsample, current]
        stage = _stage(current, steps, clamp, hidden_ratio, "scale0")
        nodes += stage
        outputs[0] = Ff.OutputNode(stage[-1], name="z_0")
        ordered_outputs = [outputs[i] for i in range(len(inputs))]
        graph = Ff.GraphINN([*in_nodes, *nodes, *ordered_outputs], force_tuple_output=True)
    shapes = tuple(LatentShape(*(int(d) for d in node.input_dims[0])) for node in ordered_outputs)
    return graph, shapes


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels at every position (affine per channel; independent of the map size)."""

    def __init__(self, channels: int, affine: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def create_scale_norm(kind: str, channels: int, height: int, width: int, affine: bool = True) -> nn.Module:
    """The normalisation of one scale's features.

    ``chw``: LayerNorm over (C, H, W), as in the U-Flow reference (its affine is per position, so it
    is tied to the input size). ``channel``: LayerNorm over C at each position. ``none``: identity.
    ``affine``: whether the LayerNorm has a trainable elementwise affine (the reference's); without
    it the norm is fixed standardisation and the flow alone is trained (docs/results.md "The objective").
    """
    if kind == "chw":
        return nn.LayerNorm([channels, height, width], elementwise_affine=affine)
    if kind == "channel":
        return ChannelLayerNorm(channels, affine)
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
