"""One training-recipe ablation: train with overrides, score val (good) and test, print one table row.

Issue 11's ablations change one thing at a time against a baseline. Each run trains through the
normal ``training.train.train`` (so the recipe is exactly what ``uflow train`` does with the same
settings), then saves the per-scale maps of the validation good images and of the test images in
``<out>/maps.npz``. The NFA variants are compared later on these saved maps (bench/nfa_null.py)
without retraining. Selection-relevant numbers use validation good images only; the test metrics
are for reporting.

Example (the rows of docs/results.md "Ablations")::

    nice .venv/bin/python bench/ablate.py --data ../shared/data/magnetic_tile/split.json \
        --out runs/abl/base --set epochs=30 --set strides=8,16,32
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import metrics
from training.data import load_images, open_dataset
from training.evaluate import load_test_set
from training.model import UFlowConfig
from training.train import TrainConfig, predict, train


def _parse_value(text: str) -> object:
    if "," in text:
        return tuple(int(v) for v in text.split(","))
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def split_overrides(pairs: list[str]) -> tuple[dict[str, object], dict[str, object]]:
    """``key=value`` pairs -> (UFlowConfig overrides, TrainConfig overrides)."""
    model_keys = {f.name for f in fields(UFlowConfig)}
    train_keys = {f.name for f in fields(TrainConfig)}
    model, train_cfg = {}, {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        parsed = _parse_value(value)
        if key == "image_size":
            model["image_height"] = model["image_width"] = parsed
        elif key in model_keys:
            model[key] = parsed
        elif key in train_keys:
            train_cfg[key] = parsed
        else:
            raise SystemExit(f"unknown setting {key!r}")
    if "strides" in model and isinstance(model["strides"], int):
        model["strides"] = (model["strides"],)
    return model, train_cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--set", action="append", default=[], help="key=value of UFlowConfig or TrainConfig")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-train", type=int, help="the first N training images only (a capped run; say so)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model_over, train_over = split_overrides(args.set)
    model_config = UFlowConfig(**model_over)  # type: ignore[arg-type]
    train_config = TrainConfig(**{"threads": args.threads, **train_over})  # type: ignore[arg-type]
    splits = open_dataset(args.data)
    if args.max_train is not None:
        splits = replace(splits, train=splits.train[: args.max_train])
    started = time.perf_counter()
    result = train(splits, args.out, model_config, train_config, progress=False)
    train_s = time.perf_counter() - started

    from training.rundir import load_model

    model, _ = load_model(args.out)
    h, w = model_config.image_height, model_config.image_width
    val_images = load_images(splits.val, h, w)
    test = load_test_set(splits, h, w)
    _, val_maps = predict(model, val_images)
    tick = time.perf_counter()
    amaps, test_maps = predict(model, test.images)
    per_image_ms = (time.perf_counter() - tick) / len(test.images) * 1000
    scores = amaps.reshape(len(amaps), -1).max(axis=1)
    row = {
        "name": args.out.name,
        "settings": args.set,
        "pixel_auroc": metrics.pixel_auroc(amaps, test.masks),
        "aupro": metrics.aupro(amaps, test.masks),
        "image_auroc": metrics.image_auroc(scores, test.labels),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "best_val_nll": result.best_val_nll,
        "train_s": round(train_s, 1),
        "s_per_epoch": round(result.seconds_per_epoch, 2),
        "torch_ms_per_image": round(per_image_ms, 1),
        "channels": [s.channels for s in model.scales],
        "train_images": len(splits.train),
        "planted": json.loads((args.out / "val_scores.json").read_text()).get("planted"),
    }
    np.savez_compressed(
        args.out / "maps.npz",
        **{f"val_{s}": m.astype(np.float32) for s, m in enumerate(val_maps)},
        **{f"test_{s}": m.astype(np.float32) for s, m in enumerate(test_maps)},
        channels=np.array(row["channels"]),
        labels=test.labels,
        masks=np.packbits(test.masks, axis=-1),
        amaps=amaps.astype(np.float16),
        types=np.array([r.defect_type for r in test.records]),
    )
    (args.out / "ablation.json").write_text(json.dumps(row, indent=2))
    print(
        f"| {row['name']} | {' '.join(args.set)} | {row['pixel_auroc']:.3f} | {row['aupro']:.3f} | "
        f"{row['image_auroc']:.3f} | {row['best_epoch']}/{row['epochs_run']} | {row['train_s']:.0f} s |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
