"""Which evidence heads (training/heads.py) to turn on by default: a study on cached backbone features.

For each data set (features cached once by bench/heads_features.py) and each head map (kind x scale x
features x bank size), this does what ``uflow train`` does at the end (training/finish.py): fit the head
on the good training + validation images, give every good image an out-of-sample map (k folds for
the Gaussian, the image's own bank rows left out for the memory bank), fit the map's null on those,
then per combination of maps calibrate the evidence scale on the validation images and make the
deployed decision (the fitted NFA at log10 epsilon = -2) on:

- the defects planted on the validation images (heads that did not see the image): share found, and
  the pixel AUROC of the fused anomaly map on them: **the label-free criteria that choose**;
- the good validation images: images flagged;
- the test split (reporting only): pixel AUROC, AUPRO, image AUROC, defective and good images flagged.

The flow's maps need a trained flow; ``--flow-maps`` adds them from a ``bench/ablate.py`` maps.npz.

    nice .venv/bin/python bench/heads.py --features /tmp/heads20/magnetic_tile.npz [--out table.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.inspection import nfa
from training import metrics
from training.heads import GaussianHead, MemoryHead, fit_heads, out_of_sample_maps
from training.nfa_null import calibrate_evidence, fit_scale_null

LOG10_EPSILON = -2.0
SIZE = 256
STRIDES = (8, 16, 32)


@dataclass
class MapSet:
    """One head map on every image set: out-of-sample on the good and planted images, deployed on test."""

    name: str
    channels: int
    fit_seconds: float
    good: np.ndarray  # train + val, out of sample
    val: np.ndarray  # out of sample
    planted: np.ndarray  # out of sample (the source image left out)
    test: np.ndarray  # the deployed head (fitted on train + val)


def _unpack(data: np.lib.npyio.NpzFile, key: str, count: int) -> np.ndarray:
    return np.unpackbits(data[key], axis=-1)[..., :SIZE].astype(bool)[:count]


def _features(data: np.lib.npyio.NpzFile, split: str, scale: int, hyper: bool) -> torch.Tensor:
    f = data[f"{split}_{scale}"]
    if not hyper:
        f = f[:, -int(data["plain_channels"][scale]) :]
    return torch.from_numpy(f.astype(np.float32))


def head_maps(data: np.lib.npyio.NpzFile, kind: str, scale: int, hyper: bool, bank: int) -> MapSet:
    """Fit one head as training does and compute its maps on every image set."""
    good = torch.cat([_features(data, "train", scale, hyper), _features(data, "val", scale, hyper)])
    n_train = len(data[f"train_{scale}"])
    channels = good.shape[1]
    head: nn.Module = GaussianHead(channels) if kind == "gaussian" else MemoryHead(channels, bank, 3)
    key = f"{kind}_{scale}"
    heads = nn.ModuleDict({key: head})
    # fit_heads / out_of_sample_maps index features by scale: give them a list with this scale in place.
    place = [good if s == scale else torch.zeros(1) for s in range(scale + 1)]
    tick = time.perf_counter()
    with torch.no_grad():
        cross = fit_heads(heads, place)
    seconds = time.perf_counter() - tick

    def oos(features: torch.Tensor, owners: np.ndarray) -> np.ndarray:
        slots = [features if s == scale else torch.zeros(1) for s in range(scale + 1)]
        with torch.no_grad():
            return out_of_sample_maps(heads, cross, slots, owners)[key]

    good_maps = oos(good, np.arange(len(good)))
    planted = oos(_features(data, "planted", scale, hyper), n_train + data["planted_source"])
    test_f = _features(data, "test", scale, hyper)
    with torch.no_grad():
        test = torch.cat([head(test_f[i : i + 64]) for i in range(0, len(test_f), 64)]).numpy()
    name = f"{'G' if kind == 'gaussian' else 'M'}{STRIDES[scale]}{'h' if hyper else ''}"
    if kind == "memory":
        name += f"/{bank}"
    return MapSet(name, channels, seconds, good_maps, good_maps[n_train:], planted, test)


def cached_head_maps(path: Path, data: np.lib.npyio.NpzFile, kind: str, scale: int, hyper: bool, bank: int) -> MapSet:
    """:func:`head_maps`, kept next to the features file (``<features>.maps/``) for later runs."""
    folder = path.with_suffix(".maps")
    folder.mkdir(exist_ok=True)
    file = folder / f"{kind}_{scale}_{int(hyper)}_{bank}.npz"
    if file.is_file():
        z = np.load(file)
        return MapSet(str(z["name"]), int(z["channels"]), float(z["fit_seconds"]), *(z[k] for k in _MAP_KEYS))
    m = head_maps(data, kind, scale, hyper, bank)
    np.savez(file, name=m.name, channels=m.channels, fit_seconds=m.fit_seconds, **{k: getattr(m, k) for k in _MAP_KEYS})
    return m


_MAP_KEYS = ("good", "val", "planted", "test")


def flow_maps(run: Path, data: np.lib.npyio.NpzFile) -> list[MapSet]:
    """The trained flow's m_s (a flow-only run of the same backbone and strides) on the cached features."""
    from training.model import scale_maps
    from training.rundir import load_model

    model, _ = load_model(run)
    out: dict[str, list[np.ndarray]] = {}
    for split in ("val", "planted", "test"):
        feats = [_features(data, split, s, hyper=False) for s in range(3)]
        chunks = []
        with torch.no_grad():
            for i in range(0, len(feats[0]), 32):
                chunks.append([m.numpy() for m in scale_maps(model.encode([f[i : i + 32] for f in feats]).latents)])
        out[split] = [np.concatenate([c[s] for c in chunks]) for s in range(3)]
    return [
        MapSet(
            f"F{STRIDES[s]}",
            int(model.flow_scales[s].channels),
            0.0,
            out["val"][s],
            out["val"][s],
            out["planted"][s],
            out["test"][s],
        )
        for s in range(3)
    ]


def fused(maps: list[np.ndarray], means: list[float], how: str = "mean") -> np.ndarray:
    """The graph's anomaly map (mean of upsampled m / mean), or the max for comparison."""
    up = [
        F.interpolate(torch.from_numpy(m / mu).float().unsqueeze(1), size=(SIZE, SIZE), mode="bilinear").numpy()[:, 0]
        for m, mu in zip(maps, means, strict=True)
    ]
    return np.max(up, axis=0) if how == "max" else np.mean(up, axis=0)


def flagged(maps: list[np.ndarray], nulls: tuple[nfa.ScaleNull, ...], masks: np.ndarray | None = None) -> np.ndarray:
    """Per image: a region below epsilon (touching the mask when one is given)."""
    out = []
    for i in range(len(maps[0])):
        log_nfa = nfa.log_nfa_map([m[i] for m in maps], [1] * len(maps), (SIZE, SIZE), nulls)
        hit = log_nfa < LOG10_EPSILON
        out.append(bool((hit & masks[i]).any()) if masks is not None else bool(hit.any()))
    return np.array(out)


def evaluate(sets: list[MapSet], data: np.lib.npyio.NpzFile, test: bool) -> dict[str, object]:
    """The row of one combination of maps."""
    nulls = tuple(fit_scale_null(s.good) for s in sets)
    val = [s.val for s in sets]
    nulls, scale = calibrate_evidence(nulls, val, [1] * len(sets), (SIZE, SIZE), LOG10_EPSILON)
    means = [n.mean for n in nulls]
    planted = [s.planted for s in sets]
    pmasks = _unpack(data, "planted_masks", len(planted[0]))
    pmap = fused(planted, means)
    row: dict[str, object] = {
        "maps": "+".join(s.name for s in sets),
        "evidence_scale": scale,
        "planted_found": float(flagged(planted, nulls, pmasks).mean()),
        "planted_pixel_auroc": metrics.pixel_auroc(pmap, pmasks),
        "planted_pixel_auroc_max": metrics.pixel_auroc(fused(planted, means, "max"), pmasks),
        "val_flagged": float(flagged(val, nulls).mean()),
        "fit_s": round(sum(s.fit_seconds for s in sets), 1),
    }
    if test:
        maps = [s.test for s in sets]
        labels = data["test_labels"].astype(bool)
        masks = _unpack(data, "test_masks", len(labels))
        amap = fused(maps, means)
        flags = flagged(maps, nulls)
        row |= {
            "pixel_auroc": metrics.pixel_auroc(amap, masks),
            "aupro": metrics.aupro(amap, masks),
            "image_auroc": metrics.image_auroc(amap.reshape(len(amap), -1).max(1), labels),
            "defective_flagged": float(flags[labels].mean()),
            "good_flagged": float(flags[~labels].mean()),
        }
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True, type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--banks", type=int, nargs="+", default=[2048])
    parser.add_argument("--flow-run", type=Path, help="a flow-only run (uflow train --heads flow) of this data set")
    parser.add_argument("--flow-only-combos", action="store_true", help="with --flow-run: only rows with the flow")
    parser.add_argument("--only", nargs="+", default=[], help="only these rows (maps joined by +)")
    parser.add_argument("--memory-hyper", action="store_true", help="also memory banks on hypercolumn features")
    parser.add_argument("--memory-fine", action="store_true", help="also a memory bank at stride 8")
    parser.add_argument(
        "--fine-banks", type=int, nargs="+", default=[], help="with --memory-fine: these stride-8 bank sizes too"
    )
    parser.add_argument("--no-test", action="store_true", help="skip the test split")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = np.load(args.features)
    sets: dict[str, MapSet] = {}
    for kind, scale, hyper in itertools.product(("gaussian", "memory"), range(3), (False, True)):
        if hyper and scale == 0:
            continue  # lite0 has one stage at stride 8: the hypercolumn is the plain feature
        if kind == "memory" and hyper and not args.memory_hyper:
            continue  # the hypercolumn bank (--memory-hyper): the flow would need the hypercolumn too
        if kind == "memory" and scale == 0 and not args.memory_fine:
            continue  # a bank at stride 8: 4x the graph cost of stride 16 (--memory-fine to measure it)
        # bank sizes are compared on the plain coarse scales; the other memory maps use the largest
        banks = (args.banks if scale > 0 and not hyper else [max(args.banks)]) if kind == "memory" else [0]
        if kind == "memory" and scale == 0:
            banks = sorted({*banks, *args.fine_banks})  # the stride-8 bank's price is its rows (graph cost)
        for bank in banks:
            m = cached_head_maps(args.features, data, kind, scale, hyper, bank)
            sets[m.name] = m
            print(f"# {m.name}: C={m.channels}, fit {m.fit_seconds:.1f} s", flush=True)
    big = max(args.banks)
    flow_combos: list[list[str]] = []
    if args.flow_run:
        flows = flow_maps(args.flow_run, data)
        sets |= {m.name: m for m in flows}
        f = [m.name for m in flows]
        flow_combos = [
            f,
            [*f, "G8", "G16", "G32"],
            [*f, f"M16/{big}", f"M32/{big}"],
            [*f, "G8", "G16", "G32", f"M16/{big}", f"M32/{big}"],
            [*f, "G8", "G16", "G32", f"M32/{big}"],
        ]
    combos = [
        ["G8", "G16", "G32"],
        ["G8", "G16h", "G32h"],
        [f"M16/{big}", f"M32/{big}"],
        ["G8", "G16", "G32", f"M16/{big}", f"M32/{big}"],
        ["G16", "G32", f"M16/{big}", f"M32/{big}"],
    ]
    combos += [["G8", "G16", "G32", f"M16/{b}", f"M32/{b}"] for b in args.banks if b != big]
    combos += [["G8", "G16", "G32", f"M32/{big}"], [f"M32/{big}"], ["G16", "G32", f"M32/{big}"]]
    if args.memory_hyper:
        combos += [[f"M16h/{big}", f"M32h/{big}"], ["G8", "G16h", "G32h", f"M16h/{big}", f"M32h/{big}"]]
    if args.memory_fine:
        combos += [["G8", "G16", "G32", f"M8/{big}", f"M16/{big}", f"M32/{big}"]]
    if args.only:
        combos = [c for c in combos if "+".join(c) in args.only]
    combos = flow_combos if args.flow_run and args.flow_only_combos else flow_combos + combos
    rows = []
    header = (
        "| maps | planted found | planted pixel AUROC (mean / max fusion) | val flagged | evidence scale | "
        "pixel AUROC | AUPRO | image AUROC | defective flagged | good flagged | fit s |"
    )
    print(header + "\n" + "|---" * 10 + "|", flush=True)
    for combo in combos:
        row = evaluate([sets[n] for n in combo], data, test=not args.no_test)
        rows.append(row)
        t = (
            f"{row['pixel_auroc']:.3f} | {row['aupro']:.3f} | {row['image_auroc']:.3f} | "
            f"{row['defective_flagged']:.1%} | {row['good_flagged']:.1%}"
            if "pixel_auroc" in row
            else "- | - | - | - | -"
        )
        print(
            f"| {row['maps']} | {row['planted_found']:.1%} | {row['planted_pixel_auroc']:.3f} / "
            f"{row['planted_pixel_auroc_max']:.3f} | {row['val_flagged']:.1%} | {row['evidence_scale']:g} | {t} | "
            f"{row['fit_s']} |",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
