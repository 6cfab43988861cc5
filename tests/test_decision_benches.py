"""bench/decision_limit.py and bench/drift_real.py on a real exported bundle and a real image folder."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import decision_limit  # noqa: E402
import drift_real  # noqa: E402

from edge_agent.config import ModelConfig  # noqa: E402
from edge_agent.inspection.loaded_model import load_model  # noqa: E402
from edge_agent.inspection.preprocess import model_input  # noqa: E402
from training.data import open_dataset  # noqa: E402


def _rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| images") and not line.startswith("| phase"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_the_deployed_column_is_the_agents_own_decision(
    tiny_bundle: Path, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert decision_limit.main(["--bundle", str(tiny_bundle), "--data", str(synthetic_data_dir), "--threads", "1"]) == 0
    rows = _rows(capsys.readouterr().out)
    # What the agent's scorer decides on the same images, counted here independently.
    model = load_model(tiny_bundle, ModelConfig(backend="onnxruntime", threads=1))
    try:
        counts: dict[str, list[bool]] = {}
        for record in open_dataset(synthetic_data_dir).test:
            bgr = cv2.imread(str(record.image), cv2.IMREAD_COLOR)
            verdict = model.scorer.score(model.engine.infer(model_input(bgr, *model.input_size)), (bgr.shape[1], bgr.shape[0]))
            kind = "good" if record.label == 0 else "all defective"
            counts.setdefault(kind, []).append(verdict.anomalous)
    finally:
        model.close()
    for kind, flags in counts.items():
        assert int(rows[kind][0]) == len(flags)
        assert rows[kind][1] == f"{sum(flags) / len(flags):.1%}"
    # The oracle threshold is a quantile of the good images' evidence: it flags at most 2 % of them.
    assert float(rows["good"][4].rstrip("%")) <= 2.0


def test_the_drift_check_sees_darker_good_parts_and_not_the_same_ones(
    tiny_bundle: Path, synthetic_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    darker = tmp_path / "data"
    shutil.copytree(synthetic_data_dir, darker)
    for path in (darker / "test" / "good").iterdir():
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        cv2.imwrite(str(path), (image * 0.5).astype("uint8"))
    args = ["--bundle", str(tiny_bundle), "--data", str(darker), "--before", "train", "--window", "8", "--threads", "1"]
    assert drift_real.main(args) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["train"][2] == "none"  # good parts like the training parts: no drift
    assert "brightness" in rows["test_good"][2]
