"""Cache lite0 backbone features of one data set once, for the head study (bench/heads.py).

Extracts the hypercolumn features (every stage at strides 8/16/32, concatenated stage order, so the
plain features of a stride are its last ``C_last`` channels) of the training, validation and test
images and of defects planted on the validation images (training/planted.py), at 256 px, and writes
them with masks and labels to one ``.npz`` (float16 features). Test images are for reporting only.

    nice .venv/bin/python bench/heads_features.py --data ../shared/data/magnetic_tile/split.json \
        --out /tmp/heads20/magnetic_tile.npz
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import load_images, open_dataset
from training.evaluate import load_test_set
from training.model import UFlow, UFlowConfig, to_float_nchw
from training.planted import PLANTED_KINDS, SIZES, Planted, plant

STRIDES = (8, 16, 32)
PLANTED_PER_IMAGE = 2  # two defects per validation image: more planted samples than finish.py's check


def extract(model: UFlow, images: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    """Backbone features (N x C_s x H_s x W_s float16 per stride) of uint8 N x H x W x 3 images."""
    out: list[list[np.ndarray]] = [[] for _ in STRIDES]
    for start in range(0, len(images), batch):
        with torch.no_grad():
            feats = model.extract(to_float_nchw(images[start : start + batch]))
        for s, f in enumerate(feats):
            out[s].append(f.numpy().astype(np.float16))
    return [np.concatenate(o) for o in out]


def plant_with_sources(images: np.ndarray, seed: int = 0) -> tuple[list[Planted], list[int]]:
    """training.planted.planted_set's loop, also returning each defect's validation image index."""
    rng = np.random.default_rng(seed)
    combos = [(k, s) for k in PLANTED_KINDS for s in SIZES]
    out, sources = [], []
    for index, image in enumerate(images):
        for j in range(PLANTED_PER_IMAGE):
            kind, size = combos[(index * PLANTED_PER_IMAGE + j) % len(combos)]
            sample = plant(image, rng, kind, size, images[(index + 1 + j) % len(images)])
            if sample.mask.any():
                out.append(sample)
                sources.append(index)
    return out, sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = UFlowConfig(image_height=args.size, image_width=args.size, strides=STRIDES, hypercolumn=True)
    model = UFlow(config).eval()
    plain = UFlow(UFlowConfig(image_height=args.size, image_width=args.size, strides=STRIDES), random_weights=True)
    splits = open_dataset(args.data)
    started = time.perf_counter()
    arrays: dict[str, np.ndarray] = {}
    train = load_images(splits.train, args.size, args.size)
    val = load_images(splits.val, args.size, args.size)
    test = load_test_set(splits, args.size, args.size)
    planted, sources = plant_with_sources(val)
    planted_images = np.stack([p.image for p in planted])
    for name, images in (("train", train), ("val", val), ("test", test.images), ("planted", planted_images)):
        for s, f in enumerate(extract(model, images)):
            arrays[f"{name}_{s}"] = f
        print(f"{name}: {len(images)} images, {time.perf_counter() - started:.0f} s", flush=True)
    arrays["test_masks"] = np.packbits(test.masks, axis=-1)
    arrays["test_labels"] = test.labels
    arrays["test_types"] = np.array([r.defect_type for r in test.records])
    arrays["planted_masks"] = np.packbits(np.stack([p.mask for p in planted]), axis=-1)
    arrays["planted_kinds"] = np.array([f"{p.kind}_{p.size}" for p in planted])
    arrays["planted_source"] = np.array(sources)
    arrays["plain_channels"] = np.array(plain.backbone.channels)
    arrays["hyper_channels"] = np.array(model.backbone.channels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
