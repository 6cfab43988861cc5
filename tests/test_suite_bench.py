"""bench/suite.py on two tiny data sets (one 2.5:1, one square): geometry, tables, docs blocks, cache.

Ours is real (`uflow train` in a subprocess with the lite0 weights, 1 epoch at a 64 px short side,
then `training.evaluate`, `uflow export`'s code and the agent's ONNX Runtime engine). The peers need
anomalib, which the main venv lacks by design: PaDiM's runner is replaced by a fake that scores the
masks themselves, as in tests/test_peers_bench.py, so what is checked is the suite's own logic.
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


def _load_suite() -> Any:
    spec = importlib.util.spec_from_file_location("bench_suite_under_test", REPO / "bench" / "suite.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


suite = _load_suite()


def _write_split(root: Path, height: int, width: int) -> Path:
    """A split.json of grey JPEGs (6 train, 2 val, 2 good + 2 defective test) with PNG masks."""
    rng = np.random.default_rng(0)
    stems: dict[str, Any] = {"train": [], "val": [], "test_good": [], "test_defect": {"scratch": []}}

    def image(stem: str, defect: bool) -> None:
        path = root / f"{stem}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(60, 90, size=(height, width), dtype=np.uint8)
        if defect:
            mask = np.zeros_like(pixels)
            pixels[4:12, 6:18] = mask[4:12, 6:18] = 250
            cv2.imwrite(str(path.with_suffix(".png")), mask)
        cv2.imwrite(str(path), pixels)

    for split, count in (("train", 6), ("val", 2), ("test_good", 2)):
        for i in range(count):
            stems[split].append(f"good/{split}_{i}")
            image(f"good/{split}_{i}", False)
    for i in range(2):
        stems["test_defect"]["scratch"].append(f"scratch/{i}")
        image(f"scratch/{i}", True)
    (root / "split.json").write_text(json.dumps(stems), encoding="utf-8")
    return root / "split.json"


def test_suite_runs_every_data_set_at_its_own_geometry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    data = tmp_path / "data"
    _write_split(data / "wide", 32, 80)  # 2.5:1
    _write_split(data / "square", 48, 48)
    peers = suite.load_peers()
    calls: list[tuple[int, ...]] = []

    def fake_padim(arrays: Any, args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
        calls.append(arrays.train.shape)
        maps = arrays.masks.astype(np.float32)
        values = peers.score(maps, maps.max(axis=(1, 2)), arrays.masks, arrays.labels, arrays.masks, arrays.labels)
        return {"threshold": "fake", "epochs": None, "metrics": {**values, "ms_per_image": 10.0}}

    monkeypatch.setattr(peers, "PEER_RUNNERS", {"padim": fake_padim})
    monkeypatch.setattr(peers, "anomalib_available", lambda: True)
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\nkept text\n", encoding="utf-8")
    argv = ["--data-root", str(data), "--results", str(tmp_path / "suite"), "--docs", str(docs)]
    argv += ["--methods", "ours", "padim", "--ours-epochs", "1", "--image-size", "64"]
    assert suite.main(argv) == 0

    # every method saw each data set at the geometry `uflow train` chose for it
    assert sorted(calls) == sorted([(6, 64, 64, 3), (6, 64, 160, 3)])
    for name, (height, width) in (("wide", (64, 160)), ("square", (64, 64))):
        run = json.loads(next((tmp_path / "suite" / name).glob("ours-*/run/config.json")).read_text())
        assert (run["model"]["image_height"], run["model"]["image_width"]) == (height, width)
    text = docs.read_text(encoding="utf-8")
    assert text.startswith("# Results\n\nkept text\n")
    for name, shape in (("wide", "160x64"), ("square", "64x64")):
        block = text[text.index(f"<!-- suite:{name} -->") : text.index(f"<!-- /suite:{name} -->")]
        assert f"**{shape}**" in block
        ours = next(line for line in block.splitlines() if line.startswith("| ours |"))
        assert ours.rstrip(" |").endswith("(engine)") and float(ours.split("|")[-2].split()[0]) > 0
        assert "| padim | fake | - | 1.000 |" in block and "100.0 (torch)" in block
        assert "**Capped run**" in block and "ours 1 epochs" in block

    # A second run takes everything from the cache (ours' engine fps included) and replaces the blocks.
    before = len(calls)
    assert suite.main(argv) == 0
    assert len(calls) == before
    again = docs.read_text(encoding="utf-8")
    assert again.count("<!-- suite:wide -->") == 1 and again.count("<!-- /suite:square -->") == 1


def test_missing_data_sets_and_peers_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match="no data sets"):
        suite.find_datasets(tmp_path)
    with pytest.raises(SystemExit, match=r"nothing/split\.json"):
        suite.find_datasets(tmp_path, ["nothing"])
    peers = suite.load_peers()
    monkeypatch.setattr(peers, "anomalib_available", lambda: False)
    assert "anomalib is not installed" in suite._why_missing(peers, "patchcore")
    run = suite.DatasetRun(
        name="x",
        split=tmp_path / "x" / "split.json",
        height=64,
        width=160,
        aspect=2.5,
        results=[],
        missing={"patchcore": suite._why_missing(peers, "patchcore")},
        counts={"train": 1, "val": 1, "test_good": 1, "test_defect": 1},
        ours_engine_fps=None,
        caps=[],
        load=1.0,
    )
    table = suite.format_dataset(run)
    assert "| patchcore | not run: anomalib is not installed here" in table and "Capped" not in table


def test_only_recomputes_one_method_and_shows_the_others_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--only M`: M is computed again, every other method comes from the cache or says it has none."""
    pytest.importorskip("torch")
    data = tmp_path / "data"
    _write_split(data / "square", 48, 48)
    peers = suite.load_peers()
    calls: list[str] = []

    def fake(method: str) -> Any:
        def run(arrays: Any, args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
            calls.append(method)
            maps = arrays.masks.astype(np.float32)
            values = peers.score(maps, maps.max(axis=(1, 2)), arrays.masks, arrays.labels, arrays.masks, arrays.labels)
            return {"threshold": "fake", "epochs": None, "metrics": {**values, "ms_per_image": 10.0}}

        return run

    monkeypatch.setattr(peers, "PEER_RUNNERS", {"padim": fake("padim"), "patchcore": fake("patchcore")})
    monkeypatch.setattr(peers, "anomalib_available", lambda: True)
    docs = tmp_path / "results.md"
    base = ["--data-root", str(data), "--results", str(tmp_path / "suite"), "--docs", str(docs), "--image-size", "64"]

    def block() -> str:
        text = docs.read_text(encoding="utf-8")
        return text[text.index("<!-- suite:square -->") : text.index("<!-- /suite:square -->")]

    assert suite.main([*base, "--methods", "padim"]) == 0
    assert calls == ["padim"]
    # --only patchcore: patchcore is computed, padim (in --methods) comes from the cache; both are shown.
    assert suite.main([*base, "--methods", "padim", "--only", "patchcore"]) == 0
    assert calls == ["padim", "patchcore"]
    assert "| patchcore | fake |" in block() and "| padim | fake |" in block()
    # --only padim recomputes it although cached; ours has no cached result and is not trained.
    assert suite.main([*base, "--methods", "ours", "padim", "--only", "padim"]) == 0
    assert calls == ["padim", "patchcore", "padim"]
    assert not list((tmp_path / "suite" / "square").glob("ours-*"))
    assert "| ours | not run: no cached result for this data and config |" in block()
    assert "| padim | fake |" in block()


def test_capped_peers_are_said_under_the_table() -> None:
    """A lower PatchCore coreset or a shorter U-Flow budget than the bench's is a cap, named as such."""
    args = suite.build_parser().parse_args([])
    assert suite.caps_of(args) == []
    args = suite.build_parser().parse_args(["--coreset-ratio", "0.001", "--uflow-budget-min", "15"])
    caps = "; ".join(suite.caps_of(args))
    assert "PatchCore coreset 0.10% of the patches" in caps
    assert "U-Flow at most 100 epochs and 15 minutes" in caps
    only_ours = suite.build_parser().parse_args(["--methods", "ours", "--coreset-ratio", "0.001"])
    assert suite.caps_of(only_ours) == []  # no PatchCore row: nothing to say
