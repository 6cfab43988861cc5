"""bench/peers.py without anomalib: subsets, data hashing, the result cache, scoring and the table.

A tiny split.json of synthetic images is written per test; the peers' runners are replaced by fakes
so that what is checked is the bench's own logic (which method is recomputed, what the table shows).
The one anomalib call (its F1-adaptive threshold) is tested only where anomalib is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_bench() -> Any:
    # bench/ is not an installed package: load the script by path (registered first, as dataclasses need).
    spec = importlib.util.spec_from_file_location("bench_peers_under_test", REPO / "bench" / "peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


peers = _load_bench()


def _write_split(root: Path, train: int = 6, val: int = 2, good: int = 3, defects: int = 2) -> Path:
    """A split.json with grey JPEGs and PNG masks (a bright square on each defect image and in its mask)."""
    rng = np.random.default_rng(0)
    stems: dict[str, Any] = {"train": [], "val": [], "test_good": [], "test_defect": {"scratch": [], "blob": []}}

    def image(stem: str, defect: bool) -> None:
        path = root / f"{stem}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(60, 90, size=(40, 48), dtype=np.uint8)
        mask = np.zeros_like(pixels)
        if defect:
            pixels[10:20, 12:24] = 250
            mask[10:20, 12:24] = 255
            cv2.imwrite(str(path.with_suffix(".png")), mask)
        cv2.imwrite(str(path), pixels)

    for split, count in (("train", train), ("val", val), ("test_good", good)):
        for i in range(count):
            stems[split].append(f"good/{split}_{i}")
            image(f"good/{split}_{i}", False)
    for kind in ("scratch", "blob"):
        for i in range(defects):
            stems["test_defect"][kind].append(f"{kind}/{i}")
            image(f"{kind}/{i}", True)
    path = root / "split.json"
    path.write_text(json.dumps(stems), encoding="utf-8")
    return path


def _args(tmp_path: Path, data: Path, **overrides: Any) -> argparse.Namespace:
    args = peers.build_parser().parse_args(["--data", str(data), "--results", str(tmp_path / "results")])
    args.image_size = 32
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_subset_keeps_both_classes_and_reads_back(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "data")
    full = peers.open_dataset(split)
    small = peers.subset_splits(full, max_train=4, max_test=4)
    assert [r.image for r in small.train] == [r.image for r in full.train[:4]]
    assert len(small.val) == 2
    kinds = [r.defect_type for r in small.test]
    assert len(kinds) == 4 and set(kinds) == {"good", "scratch", "blob"}
    # The written split.json (absolute stems, any folder) is what `uflow train --data` will read.
    again = peers.open_dataset(peers.write_split_json(small, tmp_path / "elsewhere" / "split.json"))
    for name in ("train", "val", "test"):
        got = [(r.image.resolve(), r.mask, r.label, r.defect_type) for r in getattr(again, name)]
        want = [(r.image.resolve(), r.mask, r.label, r.defect_type) for r in getattr(small, name)]
        assert sorted(got, key=str) == sorted(want, key=str)


def test_data_key_follows_image_bytes_and_size(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "data")
    splits = peers.open_dataset(split)
    key = peers.data_key(splits, 32)
    assert peers.data_key(splits, 32) == key
    assert peers.data_key(splits, 64) != key
    cv2.imwrite(str(splits.test[0].image), np.full((40, 48), 7, dtype=np.uint8))
    assert peers.data_key(splits, 32) != key


def test_cache_round_trip_and_mismatch(tmp_path: Path) -> None:
    key = peers.cache_key("padim", {"n_features": 100}, "data1")
    assert key != peers.cache_key("padim", {"n_features": 50}, "data1")
    assert key != peers.cache_key("padim", {"n_features": 100}, "data2")
    assert key != peers.cache_key("uflow", {"n_features": 100}, "data1")
    peers.save_result(tmp_path, {"method": "padim", "key": key, "metrics": {"pixel_auroc": 0.5}})
    assert peers.load_cached(tmp_path, "padim", key)["metrics"] == {"pixel_auroc": 0.5}
    assert peers.load_cached(tmp_path, "padim", "0" * 16) is None
    peers.result_path(tmp_path, "padim", key).write_text("{truncated", encoding="utf-8")
    assert peers.load_cached(tmp_path, "padim", key) is None


def test_score_on_a_perfect_and_a_blind_method() -> None:
    masks = np.zeros((4, 8, 8), dtype=bool)
    masks[2, 2:4, 2:4] = True
    masks[3, 5:7, 1:3] = True
    labels = np.array([False, False, True, True])
    maps = masks.astype(np.float32) + 0.01 * np.arange(4)[:, None, None]
    perfect = peers.score(maps, maps.max(axis=(1, 2)), masks, labels, masks, labels)
    assert perfect["pixel_auroc"] == pytest.approx(1.0)
    assert perfect["image_auroc"] == pytest.approx(1.0)
    assert perfect["miou_deploy"] == pytest.approx(1.0)
    assert perfect["flagged_defect_share"] == 1.0 and perfect["flagged_good_share"] == 0.0
    nothing = np.zeros_like(masks)
    blind = peers.score(maps, maps.max(axis=(1, 2)), masks, labels, nothing, np.zeros(4, dtype=bool))
    assert blind["miou_deploy"] == pytest.approx(0.5)  # the two good images are right, the defects missed
    assert blind["flagged_defect"] == 0 and blind["good_images"] == 2


def test_table_has_every_method_and_dashes_for_gaps() -> None:
    rows = [
        {"method": "ours", "key": "k1", "threshold": "NFA", "epochs": 12, "metrics": {"pixel_auroc": 0.91234}},
        {"method": "padim", "key": "k2", "threshold": "F1", "metrics": {"pixel_auroc": 0.8, "ms_per_image": 12.345}},
    ]
    table = peers.format_table(rows, missing={"uflow": "no cached result"})
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert "| ours | NFA | 12 | 0.912 |" in lines[2]
    assert lines[3].startswith("| padim | F1 | - | 0.800 |") and lines[3].rstrip(" |").endswith("12.3")
    assert lines[4].startswith("| uflow | not run: no cached result |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_run_bench_caches_and_recomputes_only_what_is_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")  # run_bench sets torch's thread count before a method runs
    split = _write_split(tmp_path / "data")
    calls: list[str] = []

    def fake(method: str) -> Any:
        def runner(arrays: Any, args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
            calls.append(method)
            assert arrays.train.shape == (6, 32, 32, 3) and arrays.test.shape[0] == arrays.masks.shape[0] == len(
                arrays.labels
            )
            maps = arrays.masks.astype(np.float32)
            result = peers.score(maps, maps.max(axis=(1, 2)), arrays.masks, arrays.labels, arrays.masks, arrays.labels)
            return {"threshold": "fake", "epochs": None, "metrics": result}

        return runner

    monkeypatch.setattr(peers, "PEER_RUNNERS", {m: fake(m) for m in peers.PEERS})
    monkeypatch.setattr(peers, "anomalib_available", lambda: True)
    args = _args(tmp_path, split, methods=["padim", "uflow"])
    first = peers.run_bench(args)
    assert calls == ["padim", "uflow"] and [r["method"] for r in first] == ["padim", "uflow"]
    assert first[0]["data"]["test_defect"] == 4

    peers.run_bench(_args(tmp_path, split, methods=["padim", "uflow"]))
    assert calls == ["padim", "uflow"]  # both cached

    peers.run_bench(_args(tmp_path, split, methods=["padim", "uflow", "patchcore"], only=["uflow"]))
    assert calls == ["padim", "uflow", "uflow"]  # --only: uflow again, patchcore not computed
    table = (tmp_path / "results" / "table.md").read_text(encoding="utf-8")
    assert "| padim | fake |" in table and "| uflow | fake |" in table and "| patchcore | not run" in table
    assert "Predicting nothing anywhere scores mIoU 0.429" in table  # 3 good of 7 test images

    peers.run_bench(_args(tmp_path, split, methods=["padim"], epochs=3, max_test=3))
    assert calls == ["padim", "uflow", "uflow", "padim"]  # other data: another key


def test_anomalib_f1_threshold_falls_back_to_the_highest_normal_score() -> None:
    pytest.importorskip("anomalib")
    scores = np.array([0.1, 0.4, 0.3], dtype=np.float32)
    assert peers.f1_threshold(scores, np.zeros(3, dtype=bool)) == pytest.approx(0.4)
    labelled = peers.f1_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
    assert 0.2 < labelled <= 0.8 + 1e-6  # float32 inside anomalib


def test_peers_without_anomalib_are_reported_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split = _write_split(tmp_path / "data")
    monkeypatch.setattr(peers, "anomalib_available", lambda: False)
    assert peers.run_bench(_args(tmp_path, split, methods=["padim"])) == []
    table = (tmp_path / "results" / "table.md").read_text(encoding="utf-8")
    assert "| padim | not run: anomalib is not installed here" in table
