"""U-Flow: frozen backbone + per-scale norms + U-shaped flow; its loss, anomaly maps and export wrapper.

docs/design.md section 2, "The model":
- loss = mean over the batch of (0.5 * sum of z^2 over all scales and elements - log|det J|);
- m_s = mean over channels of z_s^2; anomaly map = 1 - mean over scales of bilinear-upsampled
  exp(-0.5 m_s); image score = max of the map.
Scales are always ordered finest first (``m_0`` is the finest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_agent.bundle import REGION_HEADS
from training.backbones import CaitFeatureExtractor, FeatureExtractor, create_backbone
from training.catalog import (
    DEFAULT_BACKBONE,
    DEFAULT_RECIPE,
    DEFAULT_STRIDES,
    DETAIL_AUTO,
    DETAIL_COVARIANCES,
    HEAD_KINDS,
    MAP_FUSIONS,
    NORM_KINDS,
    backbone_info,
)
from training.flow import LatentShape, build_uflow_graph, create_scale_norm, norm_log_jac_det
from training.heads import DETAIL_KEY, MAP_PREFIX, TEXTURE_KEY, GaussianHead, MemoryHead, TextureHead

# The floor of m / mean under the geometric fusion's log. No pixel of an unseen image goes below it on the
# three data sets (0 of every test map pixel), so it changes no score; it matters only on images the bank
# holds (distance ~0, where ONNX Runtime's and torch's rounding differ and a log would magnify it).
GEOMETRIC_FLOOR = 0.05


@dataclass(frozen=True)
class UFlowConfig:
    """Everything needed to rebuild a U-Flow model (stored as ``config.json`` in a run dir)."""

    backbone: str = DEFAULT_BACKBONE
    image_height: int = DEFAULT_RECIPE.image_size
    image_width: int = DEFAULT_RECIPE.image_size
    strides: tuple[int, ...] = DEFAULT_STRIDES
    norm: str = "chw"
    hypercolumn: bool = DEFAULT_RECIPE.hypercolumn  # every backbone stage at a stride (more channels per scale)
    feature_pool: int = 1  # k x k local averaging of the backbone features (1 = off)
    norm_in_jacobian: bool = DEFAULT_RECIPE.norm_in_jacobian  # the norms' affine in log|det J| (False: reference's)
    # A trainable elementwise affine in the feature LayerNorm (the reference's). Run configs written
    # before this key existed trained it, so from_dict reads a missing key as True.
    norm_affine: bool = DEFAULT_RECIPE.norm_affine
    flow_steps: int = 4
    hidden_ratio: float = 1.0
    affine_clamping: float = 2.0
    seed: int = 0
    # The evidence per scale (training/heads.py, docs/design.md section 2): which kinds, at which strides.
    heads: tuple[str, ...] = DEFAULT_RECIPE.heads
    gaussian_scales: int = DEFAULT_RECIPE.gaussian_scales  # the coarsest N scales carry one (0: every scale)
    # A mean per position in the Gaussian heads (one covariance of the residuals). Run configs written
    # before this key had one mean per scale, so from_dict reads a missing key as False.
    gaussian_positional: bool = DEFAULT_RECIPE.gaussian_positional
    memory_scales: int = DEFAULT_RECIPE.memory_scales  # the coarsest N scales carry a bank (0: every scale)
    bank_size: int = DEFAULT_RECIPE.bank_size  # memory-bank rows per scale (graph cost: H_s W_s x bank x C_s)
    # Rows of a bank at the finest stride (0: bank_size): that scale has 4x the queries of the next.
    fine_bank_size: int = DEFAULT_RECIPE.fine_bank_size
    memory_pool: int = 3  # k x k local averaging of the bank's features (PatchCore's aggregation)
    # How the anomaly map fuses the maps of a model with heads (the NFA does not read it): "geometric"
    # (exp of the mean log of m / mean) or "mean". Run configs written before this key fused by "mean".
    map_fusion: str = DEFAULT_RECIPE.map_fusion
    # The detail map's share of the fused anomaly map's weight (the geometric mean's log, or the arithmetic
    # mean); the other maps share the rest equally. None: every map weighs the same. Only with the detail head.
    # "auto": training's finish chooses it on the planted defects (training/detail_choice.py) and writes the
    # choice into the run (a share, None, or the run without the detail head).
    detail_share: float | str | None = DEFAULT_RECIPE.detail_share
    # The detail head's covariance: "position" (one per position, PaDiM's fit) or "shared" (one for the
    # residuals around the positional mean). Run configs written before this key shared one.
    detail_covariance: str = DEFAULT_RECIPE.detail_covariance

    def __post_init__(self) -> None:
        info = backbone_info(self.backbone)
        if info.fixed_input_size is not None and (self.image_height, self.image_width) != (info.fixed_input_size,) * 2:
            size = info.fixed_input_size
            raise ValueError(f"{self.backbone} works at {size}x{size} only, got {self.image_height}x{self.image_width}")
        if self.feature_pool < 1 or self.feature_pool % 2 == 0:
            raise ValueError(f"feature_pool must be an odd size >= 1, got {self.feature_pool}")
        if self.norm not in NORM_KINDS:
            raise ValueError(f"unknown feature norm {self.norm!r}; choose one of {', '.join(NORM_KINDS)}")
        largest = max(self.strides)
        if self.image_height % largest or self.image_width % largest:
            raise ValueError(
                f"image size {self.image_height}x{self.image_width} must be divisible by the largest stride {largest}"
            )
        if self.flow_steps < 1:
            raise ValueError(f"flow_steps must be >= 1, got {self.flow_steps}")
        unknown = sorted(set(self.heads) - set(HEAD_KINDS))
        if unknown or not self.heads or len(set(self.heads)) != len(self.heads):
            raise ValueError(f"heads must be distinct names among {', '.join(HEAD_KINDS)}, got {list(self.heads)}")
        if "flow" not in self.heads:
            raise ValueError("the flow head is required (it gives the paper's NFA and the drift check's m_0)")
        if self.gaussian_scales < 0 or self.memory_scales < 0:
            raise ValueError(f"head scale counts must be >= 0, got {self.gaussian_scales}, {self.memory_scales}")
        if self.map_fusion not in MAP_FUSIONS:
            raise ValueError(f"unknown map fusion {self.map_fusion!r}; choose one of {', '.join(MAP_FUSIONS)}")
        if isinstance(self.detail_share, str) and self.detail_share != DETAIL_AUTO:
            raise ValueError(f"detail_share must be in (0, 1), {DETAIL_AUTO!r} or None, got {self.detail_share!r}")
        if isinstance(self.detail_share, float | int) and not 0.0 < self.detail_share < 1.0:
            raise ValueError(f"detail_share must be in (0, 1), {DETAIL_AUTO!r} or None, got {self.detail_share}")
        if self.detail_covariance not in DETAIL_COVARIANCES:
            raise ValueError(
                f"unknown detail covariance {self.detail_covariance!r}; choose one of {', '.join(DETAIL_COVARIANCES)}"
            )
        if self.detail_share not in (None, DETAIL_AUTO) and "detail" not in self.heads:
            raise ValueError("detail_share weighs the detail map: add the detail head (--heads ... detail)")
        if self.bank_size < 1 or self.fine_bank_size < 0 or self.memory_pool < 1 or self.memory_pool % 2 == 0:
            raise ValueError(
                "need bank_size >= 1, fine_bank_size >= 0 and an odd memory_pool, got "
                f"{self.bank_size}, {self.fine_bank_size}, {self.memory_pool}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            **{k: list(getattr(self, k)) for k in ("strides", "heads")},
        }

    def head_strides(self, kind: str) -> tuple[int, ...]:
        """The strides that carry a ``kind`` head (none when the head is off)."""
        if kind not in self.heads:
            return ()
        if kind == "flow":
            return self.strides
        count = self.gaussian_scales if kind == "gaussian" else self.memory_scales
        return self.strides[-count:] if count else self.strides

    def bank_rows(self, scale: int) -> int:
        """The memory bank's rows at scale index ``scale`` (0: the finest stride)."""
        return self.fine_bank_size if scale == 0 and self.fine_bank_size else self.bank_size

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UFlowConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; known: {sorted(known)}")
        values = dict(data)
        values.setdefault("norm_affine", True)  # older config.json: the affine existed and was trained
        values.setdefault("gaussian_positional", False)  # older config.json: one mean per scale
        # A run from before the heads existed is a flow-only model, whatever today's default is.
        values.setdefault("heads", ("flow",))
        values.setdefault("fine_bank_size", 0)  # before the key: every bank had bank_size rows
        values.setdefault("map_fusion", "mean")  # before the key: the arithmetic mean
        values.setdefault("detail_share", None)  # before the key: no detail head, every map weighed the same
        values.setdefault("detail_covariance", "shared")  # before the key: one covariance of the residuals
        for key in ("strides", "heads"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass(frozen=True)
class ScaleInfo:
    """One output scale as the engine and the manifest see it."""

    name: str
    channels: int
    height: int
    width: int
    stride: int
    head: str = "flow"


@dataclass
class FlowOutput:
    """Latents (finest first) and the log-determinant of the Jacobian per sample."""

    latents: tuple[torch.Tensor, ...]
    log_jac_det: torch.Tensor


class UFlow(nn.Module):
    """Backbone (frozen, eval) -> per-scale norm (trainable) -> U-shaped flow (trainable)."""

    mean: torch.Tensor  # buffers, registered in __init__ (register_buffer leaves mypy blind to them)
    std: torch.Tensor
    map_means: torch.Tensor  # registered only when the model has heads

    def __init__(self, config: UFlowConfig, weights: Path | str | None = None, *, random_weights: bool = False) -> None:
        super().__init__()
        self.config = config
        info = backbone_info(config.backbone)
        self.backbone: FeatureExtractor | CaitFeatureExtractor = create_backbone(
            config.backbone,
            config.strides,
            weights,
            input_size=(config.image_height, config.image_width),
            hypercolumn=config.hypercolumn,
            pool=config.feature_pool,
            random_weights=random_weights,
        )
        self.register_buffer("mean", torch.tensor(info.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(info.std).view(1, 3, 1, 1), persistent=False)
        shapes = [
            (c, config.image_height // s, config.image_width // s)
            for c, s in zip(self.backbone.channels, config.strides, strict=True)
        ]
        self.feature_shapes = tuple(shapes)
        self.norms = nn.ModuleList(
            [create_scale_norm(config.norm, *shape, affine=config.norm_affine) for shape in shapes]
        )
        self.flow, latent_shapes = build_uflow_graph(
            shapes,
            steps=config.flow_steps,
            clamp=config.affine_clamping,
            hidden_ratio=config.hidden_ratio,
            seed=config.seed,
        )
        self.flow_scales = _scale_infos(latent_shapes, config)
        self.heads = nn.ModuleDict()
        head_scales: list[ScaleInfo] = []
        for kind in ("gaussian", "memory"):
            for s, stride in enumerate(config.strides):
                if stride not in config.head_strides(kind):
                    continue
                c, h, w = shapes[s]
                head = (
                    GaussianHead(c, (h, w) if config.gaussian_positional else None)
                    if kind == "gaussian"
                    else MemoryHead(c, config.bank_rows(s), config.memory_pool)
                )
                self.heads[f"{kind}_{s}"] = head
                head_scales.append(ScaleInfo(f"{MAP_PREFIX[kind]}_{s}", c, h, w, stride, kind))
        if "detail" in config.heads:
            c, h, w = shapes[0]
            self.heads[DETAIL_KEY] = GaussianHead(c, (h, w), per_position=config.detail_covariance == "position")
            head_scales.append(ScaleInfo(f"{MAP_PREFIX['detail']}_0", c, h, w, config.strides[0], "detail"))
        if "texture" in config.heads:
            dims = 2 * sum(c for c, _, _ in shapes)
            self.heads[TEXTURE_KEY] = TextureHead(dims)
            side = max(config.image_height, config.image_width)  # one map pixel covers the frame
            head_scales.append(ScaleInfo(f"{MAP_PREFIX['texture']}_0", dims, 1, 1, side, "texture"))
        self.scales = (*self.flow_scales, *head_scales)
        # The maps the region tests read: all but the texture head's (the image test's) and the detail head's.
        self.region_indices = tuple(i for i, s in enumerate(self.scales) if s.head in REGION_HEADS)
        # The maps the anomaly map fuses: all but the texture head's 1 x 1 score (not a place in the frame).
        self.fusion_indices = tuple(i for i, s in enumerate(self.scales) if s.head != "texture")
        if self.heads:
            # Per map, its mean on good images (the fitted null's mean); the anomaly map fuses m / mean.
            self.register_buffer("map_means", torch.ones(len(self.scales)))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Float NCHW RGB in [0, 1] -> the backbone's input normalisation."""
        return (images - self.mean) / self.std

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Raw backbone features (finest first) of float NCHW RGB images in [0, 1]."""
        return self.backbone(self.normalise(images))

    def encode(self, features: Sequence[torch.Tensor]) -> FlowOutput:
        """Norms + flow on (cached or fresh) backbone features."""
        normed = [norm(f) for norm, f in zip(self.norms, features, strict=True)]
        latents, log_jac_det = self.flow(normed)
        if self.config.norm_in_jacobian:
            log_jac_det = log_jac_det + self.norms_log_jac_det()
        return FlowOutput(tuple(latents), log_jac_det)

    def norms_log_jac_det(self) -> torch.Tensor:
        """log|det| of all scale norms' trainable affines (see training.backbones.norm_log_jac_det)."""
        return sum(
            (norm_log_jac_det(norm, h, w) for norm, (_, h, w) in zip(self.norms, self.feature_shapes, strict=True)),
            torch.zeros(()),
        )

    def forward(self, images: torch.Tensor) -> FlowOutput:
        """Float NCHW RGB in [0, 1] -> latents and log|det J|."""
        return self.encode(self.extract(images))

    def maps(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every evidence map of ``self.scales`` (flow m_s first, then the heads'), each N x H_s x W_s."""
        return scale_maps(self.encode(features).latents) + self.head_maps(features)

    def head_maps(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The heads' maps in ``self.scales`` order: each reads its scale's features, the texture head all."""
        return [
            head(features) if key == TEXTURE_KEY else head(features[int(key.split("_")[1])])
            for key, head in self.heads.items()
        ]

    def fused_map(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The anomaly map: the flow-only formula, or with heads the fusion of the upsampled m / mean."""
        return self.fuse(maps, self.fusion_weights())

    def fuse(self, maps: Sequence[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
        """:meth:`fused_map` with these weights of the fused maps (``fusion_indices`` order; None: every map the
        same) instead of the model's own: a candidate weight of the detail map (training/detail_choice.py)."""
        height, width = self.config.image_height, self.config.image_width
        if not self.heads:
            return anomaly_map(maps, height, width)
        geometric = self.config.map_fusion == "geometric"
        # The texture head's 1 x 1 score is the image test's, not a place in the frame: not in the map.
        keep = list(self.fusion_indices)
        if len(keep) < len(maps):
            maps, means = [maps[i] for i in keep], self.map_means[keep]
        else:
            means = self.map_means
        return fused_anomaly_map(maps, means, height, width, geometric=geometric, weights=weights)

    def fusion_weights(self) -> torch.Tensor | None:
        """Each fused map's weight (``fusion_indices`` order, summing to 1), or None: every map the same."""
        share = self.config.detail_share
        return self.detail_weights(None if isinstance(share, str) else share)  # DETAIL_AUTO: until finish chooses

    def detail_weights(self, share: float | None) -> torch.Tensor | None:
        """The fusion's weights with the detail map at ``share`` (0: not fused at all), the others sharing the
        rest equally; None (every map the same) for ``share`` None or a model without the detail head."""
        detail = self._detail_position()
        if share is None or detail is None:
            return None
        weights = torch.full((len(self.fusion_indices),), (1.0 - share) / max(1, len(self.fusion_indices) - 1))
        weights[detail] = share
        return weights

    def detail_weight(self) -> float | None:
        """The detail map's weight in the anomaly map as the graph fuses it (None: the model has no detail head)."""
        detail = self._detail_position()
        if detail is None:
            return None
        weights = self.fusion_weights()
        return 1.0 / len(self.fusion_indices) if weights is None else float(weights[detail])

    def _detail_position(self) -> int | None:
        """The detail map's place among the fused maps (``fusion_indices`` order), if the model has one."""
        return next((k for k, i in enumerate(self.fusion_indices) if self.scales[i].head == "detail"), None)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Norms and flow only: the backbone is rebuilt from its ImageNet weights file."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trainable_state_dict`; strict about missing and unexpected keys."""
        expected = {k for k in self.state_dict() if not k.startswith("backbone.")}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not fit this model config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        self.load_state_dict(dict(state), strict=False)


def _scale_infos(latent_shapes: Sequence[LatentShape], config: UFlowConfig) -> tuple[ScaleInfo, ...]:
    return tuple(
        ScaleInfo(f"m_{i}", shape.channels, shape.height, shape.width, config.image_height // shape.height)
        for i, shape in enumerate(latent_shapes)
    )


def nll_loss(output: FlowOutput) -> torch.Tensor:
    """docs/design.md section 2: mean over the batch of 0.5 * sum(z^2) - log|det J| (nats per image, constants dropped)."""
    half_sq = sum(0.5 * z.pow(2).flatten(1).sum(1) for z in output.latents)
    return (half_sq - output.log_jac_det).mean()


def scale_maps(latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """m_s = mean over channels of z_s^2, each N x H_s x W_s."""
    return [z.pow(2).mean(dim=1) for z in latents]


def anomaly_map(maps: Sequence[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """1 - mean over scales of bilinear-upsampled exp(-0.5 m_s): N x H x W in [0, 1]."""
    likelihoods = [
        F.interpolate(torch.exp(-0.5 * m).unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)
        for m in maps
    ]
    # [:, 0] rather than squeeze(1): the ONNX exporter turns squeeze into a shape-dependent If node
    return 1.0 - torch.stack(likelihoods, dim=0).mean(dim=0)[:, 0]


def fused_arrays(model: UFlow, maps: Sequence[np.ndarray], weights: torch.Tensor | None) -> np.ndarray:
    """:meth:`UFlow.fuse` of per-map arrays (each N x H_s x W_s, ``model.scales`` order): N x H x W."""
    with torch.no_grad():
        return model.fuse([torch.from_numpy(np.asarray(m, dtype=np.float32)) for m in maps], weights).numpy()


def without_heads(model: UFlow, drop: set[str]) -> UFlow:
    """The same trained model without the heads of the kinds in ``drop`` (their maps and fusion means)."""
    heads = tuple(h for h in model.config.heads if h not in drop)
    share = None if "detail" in drop else model.config.detail_share  # nothing left to weigh
    bare = UFlow(replace(model.config, heads=heads, detail_share=share), weights=None, random_weights=True)
    bare.backbone = model.backbone
    prefixes = tuple(f"heads.{kind}_" for kind in drop)
    state = {k: v for k, v in model.trainable_state_dict().items() if not k.startswith(prefixes) and k != "map_means"}
    if bare.heads:
        state["map_means"] = model.map_means[[i for i, s in enumerate(model.scales) if s.head not in drop]]
    bare.load_trainable_state_dict(state)
    return bare.eval()


def fused_anomaly_map(
    maps: Sequence[torch.Tensor],
    means: torch.Tensor,
    height: int,
    width: int,
    geometric: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fusion over maps of bilinear-upsampled m_k / mean_k: N x H x W, about 1 on good parts.

    ``geometric``: exp of the mean of log(max(m_k / mean_k, GEOMETRIC_FLOOR)); otherwise the arithmetic mean.
    ``weights`` (one per map, summing to 1): a weighted mean instead (None: every map the same).
    The geometric mean lets a pixel stand out only where the maps agree: one map's spike (a heavy-tailed
    head's noise, a coarse map's blob around a small defect) is damped by the others (docs/results.md,
    "How the anomaly map fuses the maps").
    """
    upsampled = [
        F.interpolate((m / means[k]).unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)
        for k, m in enumerate(maps)
    ]
    terms = [torch.log(torch.clamp(u, min=GEOMETRIC_FLOOR)) for u in upsampled] if geometric else upsampled
    stacked = torch.stack(terms, dim=0)
    mean = stacked.mean(dim=0) if weights is None else (stacked * weights.view(-1, 1, 1, 1, 1)).sum(dim=0)
    return (torch.exp(mean) if geometric else mean)[:, 0]


def image_scores(amap: torch.Tensor) -> torch.Tensor:
    """Image score = max of the anomaly map, per image."""
    return amap.flatten(1).max(dim=1).values


def to_float_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 RGB -> float32 NCHW in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)


def predict(model: UFlow, images: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, list[np.ndarray]]:
    """Anomaly maps (N x H x W) and per-scale m_s maps of uint8 NxHxWx3 images, in eval mode."""
    model.eval()
    maps_out: list[list[np.ndarray]] = [[] for _ in model.scales]
    amaps: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            maps = model.maps(model.extract(to_float_nchw(images[start : start + batch_size])))
            amaps.append(model.fused_map(maps).numpy())
            for s, m in enumerate(maps):
                maps_out[s].append(m.numpy())
    return np.concatenate(amaps), [np.concatenate(m) for m in maps_out]


class ExportWrapper(nn.Module):
    """The engine I/O contract around a trained U-Flow.

    Input ``image``: uint8 1xHxWx3 RGB at the model size (cast, NHWC->NCHW, /255 and normalise happen
    in the graph, the cast first: see ``forward``). Outputs: ``anomaly_map`` float32 1xHxW, then ``m_0..m_{S-1}``
    float32 1xH_sxW_s, then the heads' maps (``g_s``, ``k_s``) in the order of ``model.scales``.
    """

    def __init__(self, model: UFlow) -> None:
        super().__init__()
        self.model = model.eval()

    @property
    def output_names(self) -> list[str]:
        return ["anomaly_map", *(s.name for s in self.model.scales)]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Cast first: TensorRT takes a UINT8 network input only straight into a Cast layer (even a
        # Transpose rejects UINT8), so the exported graph must read image -> Cast -> Transpose.
        x = image.to(torch.float32).permute(0, 3, 1, 2) / 255.0
        maps = self.model.maps(self.model.extract(x))
        return (self.model.fused_map(maps), *maps)
