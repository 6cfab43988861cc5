"""Chosen rows of the heads study (bench/heads.py) on cached head maps, under today's calibration.

bench/heads.py fits every head once and caches its maps next to the features (``<features>.maps/``);
this evaluates any combination of cached maps with that bench's own ``evaluate`` (the deployed decision
at log10 epsilon = -2 after the cross-fitted calibration, planted defects found, test columns).

    nice .venv/bin/python bench/heads.py --features F.npz --memory-fine --only NONE   # caches M8 too
    nice .venv/bin/python bench/heads_rows.py --features F.npz --rows G16+G32+M16+M32 G16+G32+M8+M16+M32
    nice .venv/bin/python bench/heads.py --features F.npz --memory-fine --fine-banks 256 512 --only NONE
    nice .venv/bin/python bench/heads_rows.py --features F.npz --rows G16+G32+M8/512+M16+M32   # a smaller bank
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import heads

# map name -> (kind, scale index, hypercolumn, bank rows), the keys of heads.cached_head_maps
MAPS = {
    "G8": ("gaussian", 0, False, 0),
    "G16": ("gaussian", 1, False, 0),
    "G32": ("gaussian", 2, False, 0),
    "M8": ("memory", 0, False, 2048),
    "M16": ("memory", 1, False, 2048),
    "M32": ("memory", 2, False, 2048),
}


def map_key(name: str) -> tuple[str, int, bool, int] | None:
    """A map name (``G16``, ``M8``, or a bank with its rows, ``M8/512``) -> its cached_head_maps key."""
    base, _, rows = name.partition("/")
    if base not in MAPS or (rows and (not rows.isdigit() or MAPS[base][0] != "memory")):
        return None
    kind, scale, hyper, bank = MAPS[base]
    return kind, scale, hyper, int(rows) if rows else bank


def print_rows(rows: list[str], data: np.lib.npyio.NpzFile, resolve: Callable[[str], heads.MapSet]) -> None:
    """One table row per combination of maps (names joined by +), each map from ``resolve``."""
    print(
        "| maps | planted found | planted pixel AUROC | val flagged | evidence scale | pixel AUROC | AUPRO | image AUROC | defective flagged | good flagged |"
    )
    print("|---" * 10 + "|")
    for row in rows:
        r = heads.evaluate([resolve(n) for n in row.split("+")], data, test=True)
        print(
            f"| {row} | {r['planted_found']:.1%} | {r['planted_pixel_auroc']:.3f} | {r['val_flagged']:.1%} | "
            f"{r['evidence_scale']:g} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['image_auroc']:.3f} | "
            f"{r['defective_flagged']:.1%} | {r['good_flagged']:.1%} |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True, type=Path, help="bench/heads_features.py's file")
    parser.add_argument("--rows", nargs="+", required=True, help="maps joined by +, from " + " ".join(MAPS))
    args = parser.parse_args(argv)
    data = np.load(args.features)
    unknown = [n for row in args.rows for n in row.split("+") if map_key(n) is None]
    if unknown:
        raise SystemExit(f"unknown map(s) {unknown}: use {sorted(MAPS)}, a bank as M8/512")
    print_rows(args.rows, data, lambda n: heads.cached_head_maps(args.features, data, *map_key(n)))  # type: ignore[misc]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
