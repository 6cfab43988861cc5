"""A kept part holds the frame its decision names, the part outlined, a contact sheet, and a mask that is never empty.

Real parts: the agent in a thread (contract bundle on ONNX Runtime, real mosquitto) on the checker belt
(tests/checker_belt.py), whose second part carries a dark square the model flags while it crosses the view;
the part is decided frames later, once it has left, so the deciding frame no longer shows the defect.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_harness import AgentThread, agent_config
from checker_belt import STEP, CheckerBelt, write_checker_belt
from contract_bundle import build_contract_bundle
from mqtt_broker import MosquittoBroker, Subscriber, find_mosquitto

from edge_agent.service.review import ReviewError, ReviewStore

SPEC = CheckerBelt()


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, list[dict]]]:
    """The agent run once over the belt with [keep] on: (kept dir, belt frames, part messages)."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    root = tmp_path_factory.mktemp("part_evidence")
    broker = MosquittoBroker(root / "mosquitto").start()
    belt = write_checker_belt(root / "belt", SPEC)
    bundle = build_contract_bundle(root / "bundle", height=SPEC.height, width=SPEC.width)
    values = agent_config(root / "state", bundle, str(belt), broker.port, parts={"mode": "tracked"},
                          keep={"flagged": True, "min_free_mb": 0})  # fmt: skip
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    agent.thread.join(120)  # the folder ends: the agent stops by itself
    assert agent.stop() == 0
    assert subscriber.wait_for(lambda ms: sum(m.topic.endswith("/part") for m in ms) >= SPEC.parts, 10)
    parts = [m.json() for m in subscriber.on("/part")]
    subscriber.close()
    yield root / "state" / "kept", belt, parts
    broker.stop()


def test_the_kept_part_shows_the_frame_its_decision_names(kept: tuple[Path, Path, list[dict]]) -> None:
    kept_dir, belt, parts = kept
    rejected = [p for p in parts if p["anomalous"]]
    assert [p["part_id"].rsplit("-", 1)[1] for p in rejected] == [str(SPEC.defect_parts[0] + 1)]
    part = rejected[0]
    folders = [f for f in kept_dir.iterdir() if f.is_dir()]
    assert len(folders) == 1 and folders[0].name.endswith(f"-part-{part['part_id']}")
    folder = folders[0]
    best = min(part["regions"], key=lambda r: r["log_nfa"])["best_sequence"]
    assert part["frames"]["last_sequence"] - best >= 4  # decided well after its evidence: the deciding frame differs
    # frame.png is the named frame, pixel for pixel, and that frame shows the defect.
    assert np.array_equal(cv2.imread(str(folder / "frame.png")), cv2.imread(str(belt / f"{best:06d}.png")))
    evidence = json.loads((folder / "evidence.json").read_text())
    assert evidence["shown_sequence"] == evidence["best_sequence"] == best and evidence["shown_is_best"]
    assert json.loads((folder / "part.json").read_text())["part_id"] == part["part_id"]
    # The mask lies on the defect: the dark 16x16 square, 24 px into the part.
    mask = cv2.imread(str(folder / "mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    x0, _ = SPEC.part_columns(best, SPEC.defect_parts[0])
    ys, xs = np.nonzero(mask)
    assert mask.sum() >= 64
    assert x0 + 16 <= xs.mean() <= x0 + 48 and SPEC.height // 2 - 16 <= ys.mean() <= SPEC.height // 2 + 16
    # The part is outlined on the overlay in the part colour (BGR 255, 200, 0) along its columns.
    overlay = cv2.imread(str(folder / "overlay.png"))
    factor = overlay.shape[1] // SPEC.width
    column = overlay[: SPEC.height * factor, evidence["part_columns"][0] * factor]
    assert (np.abs(column.astype(int) - (255, 200, 0)).sum(axis=1) < 60).mean() > 0.8
    # The strip: one crop per frame of the part, the shown one marked (a red frame).
    strip = cv2.imread(str(folder / "strip.png"))
    assert best in evidence["strip_sequences"] and len(evidence["strip_sequences"]) >= (SPEC.width // STEP) - 4
    red = (strip[:, :, 2] > 200) & (strip[:, :, 1] < 60) & (strip[:, :, 0] < 60)
    assert red.sum() > 100
    assert "REJECTED" in evidence["caption"] and f"frame {best}" in evidence["caption"]


def test_review_says_the_part_verdict_and_stores_its_mask(kept: tuple[Path, Path, list[dict]], tmp_path: Path) -> None:
    kept_dir = kept[0]
    store = ReviewStore(kept_dir, tmp_path / "training")
    (card,) = store.frames()
    assert card.kind == "part" and card.anomalous and card.regions >= 1
    assert store.file(card.id, "strip.png").is_file()
    # A kept folder whose mask is empty is refused, with the reason.
    empty = kept_dir.parent / "empty-kept"
    empty.mkdir()
    (empty / "x-flagged").mkdir()
    for name in ("frame.png", "inspection.json"):
        (empty / "x-flagged" / name).write_bytes((kept_dir / card.id / name).read_bytes())
    cv2.imwrite(str(empty / "x-flagged" / "mask.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ReviewError, match="empty"):
        ReviewStore(empty, tmp_path / "training").confirm_defect("x-flagged")
    target = store.confirm_defect(card.id)
    assert (cv2.imread(str(target.with_name(f"{card.id}_mask.png")), cv2.IMREAD_GRAYSCALE) > 0).sum() >= 64


def test_frame_captions_tell_the_parts_verdicts_around_the_decision(tmp_path: Path) -> None:
    """decision_line 0.3: the defective part is decided while still in view; every caption after says REJECTED."""
    from edge_agent.config import ModelConfig, PartsConfig, SourceConfig
    from edge_agent.inspection.frame_source import FrameSource
    from edge_agent.inspection.loaded_model import load_model
    from edge_agent.inspection.parts import TrackedParts
    from edge_agent.inspection.single import inspect_frame
    from edge_agent.service.preview import PreviewFacts, PreviewPage
    from edge_agent.service.snapshot import frame_caption, save_snapshot

    belt = write_checker_belt(tmp_path / "belt", SPEC)
    model = load_model(build_contract_bundle(tmp_path / "bundle", height=SPEC.height, width=SPEC.width),
                       ModelConfig(backend="onnxruntime", threads=1))  # fmt: skip
    source = FrameSource(SourceConfig(uri=str(belt)))
    source.open()
    parts = TrackedParts(PartsConfig(mode="tracked", decision_line=0.3), "cam1")
    facts = PreviewFacts(1.0, 1.0, 1.0, "open", "", "tracked")
    seen: dict[str, list[str]] = {"before": [], "after": []}
    rejected: str | None = None
    try:
        while (frame := source.read()) is not None:
            job = inspect_frame(model, frame, "cam1")
            for message in parts.observe(frame, job.verdict, model.ref):
                if message.anomalous:
                    rejected = message.part_id
            view = parts.view
            assert view is not None
            job = replace(job, parts_view=view)  # as the pipeline's publish stage makes it
            if not SPEC.in_view(frame.sequence, SPEC.defect_parts[0]) or not view.parts:
                continue
            caption = frame_caption(job)
            details = PreviewPage(lambda job=job: job, lambda: facts).current().details  # type: ignore[union-attr]
            seen["after" if rejected else "before"].append(f"{caption} | {details['verdict']} | {details['caption']}")
            if rejected and frame.sequence % 5 == 0:
                save_snapshot(job, tmp_path / "snapshots")
    finally:
        source.close()
        model.close()
    number = str(SPEC.defect_parts[0] + 1)
    assert rejected is not None and seen["before"] and seen["after"]
    assert all(f"#{number} pending" in line and "REJECTED" not in line for line in seen["before"])
    # After the decision the part is still in view: frame, page verdict and caption all say it was rejected.
    assert all(f"#{number} REJECTED" in line and "| REJECTED |" in line for line in seen["after"]), seen["after"]
    assert not any(" good" in line for line in seen["before"] + seen["after"])
    snapshots = list((tmp_path / "snapshots").iterdir())
    assert snapshots and all(json.loads((s / "inspection.json").read_text())["sequence"] >= 0 for s in snapshots)
