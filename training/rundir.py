"""A training run directory: what it holds and how to rebuild the trained model from it.

``config.json``  model config (rebuilds the architecture), train config, data summary, versions
``checkpoint.pt`` best norms + flow weights (the frozen backbone is rebuilt from its weights file)
``history.json`` per-epoch losses, validation NLL, learning rate, seconds
``val_scores.json`` image scores of the validation good images under the best checkpoint
``selftest/``    a few validation good images at the model size (copied into the bundle)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from training.data import DatasetSplits, open_dataset
from training.model import UFlow, UFlowConfig

CONFIG_NAME = "config.json"
CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.json"
VAL_SCORES_NAME = "val_scores.json"
SELFTEST_DIR = "selftest"


class RunDirError(ValueError):
    """A run directory that is incomplete or does not match its checkpoint."""


@dataclass(frozen=True)
class RunInfo:
    """The parsed contents of a run directory (everything but the weights)."""

    root: Path
    model_config: UFlowConfig
    train_config: dict[str, Any]
    data_summary: dict[str, Any]
    weights: str | None
    random_weights: bool
    checkpoint_meta: dict[str, Any]
    val_scores: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def selftest_images(self) -> list[Path]:
        folder = self.root / SELFTEST_DIR
        return sorted(folder.glob("*.png")) if folder.is_dir() else []

    def splits(self, data: Path | str | None = None) -> DatasetSplits:
        """The run's data split as training made it (``data``: the same data at another path).

        The held-out share is the run's own: runs from before ``val_max`` held out their fraction alone,
        runs from before the recorded fraction 10 %.
        """
        most = self.train_config.get("val_max")
        return open_dataset(
            data or str(self.data_summary["root"]),
            float(self.train_config.get("val_fraction", 0.1)),
            None if most is None else int(most),
        )


def write_json(path: Path, data: Any) -> None:
    """Pretty JSON, written atomically (temp file + rename) so a killed run never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise RunDirError(f"run directory {path.parent} has no {path.name}; was training finished?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is not valid JSON: {exc}") from exc


def save_checkpoint(run_dir: Path, model: UFlow, meta: dict[str, Any]) -> Path:
    """Write checkpoint.pt (trainable weights + the model config + meta), atomically."""
    path = run_dir / CHECKPOINT_NAME
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"model_config": model.config.to_dict(), "state": model.trainable_state_dict(), "meta": meta}, tmp)
    tmp.replace(path)
    return path


def save_model(run_dir: Path, model: UFlow, meta: dict[str, Any]) -> None:
    """Write a model whose config changed after training (training's finish chose something): config.json's
    model config and checkpoint.pt together, so that ``load_model`` finds them in agreement."""
    path = run_dir / CONFIG_NAME
    document = _read_json(path)
    document["model"] = model.config.to_dict()
    write_json(path, document)
    save_checkpoint(run_dir, model, meta)


def read_run(run_dir: Path | str) -> RunInfo:
    """Parse a run directory's JSON files (no torch weights loaded)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise RunDirError(f"run directory {root} does not exist")
    config = _read_json(root / CONFIG_NAME)
    try:
        model_config = UFlowConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RunDirError(f"{root / CONFIG_NAME}: bad model config: {exc}") from exc
    val_path = root / VAL_SCORES_NAME
    history_path = root / HISTORY_NAME
    return RunInfo(
        root=root,
        model_config=model_config,
        train_config=dict(config.get("train", {})),
        data_summary=dict(config.get("data", {})),
        weights=config.get("weights"),
        random_weights=bool(config.get("random_weights", False)),
        checkpoint_meta={},
        val_scores=_read_json(val_path) if val_path.is_file() else {},
        history=_read_json(history_path) if history_path.is_file() else [],
    )


def load_model(run_dir: Path | str) -> tuple[UFlow, RunInfo]:
    """Rebuild the model of a run with its best checkpoint, in eval mode."""
    info = read_run(run_dir)
    path = info.root / CHECKPOINT_NAME
    if not path.is_file():
        raise RunDirError(f"run directory {info.root} has no {CHECKPOINT_NAME}; was training finished?")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # Compared as configs, not dicts: a checkpoint written before a config field existed has its default.
    if UFlowConfig.from_dict(checkpoint.get("model_config") or {}) != info.model_config:
        raise RunDirError(f"{path} was trained with another model config than {info.root / CONFIG_NAME}")
    model = UFlow(info.model_config, weights=info.weights, random_weights=info.random_weights)
    model.load_trainable_state_dict(checkpoint["state"])
    model.eval()
    meta = dict(checkpoint.get("meta", {}))
    return model, replace(info, checkpoint_meta=meta)
