"""The review page as ground truth: raw beside overlay, filters, paging, undo, a polygon mask editor (issue 21).

Kept frames come from a real FrameKeeper on real inspections (contract bundle, ONNX Runtime), a kept part from
edge_agent/service/part_snapshot.py; the page runs on the agent's real HTTP server and is clicked in headless
Chromium (Debian's chromium driven by Playwright); ``uflow evaluate`` runs as a process on the export.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from line_helpers import inspected_job, keep_frames

from edge_agent.inspection.loaded_model import LoadedModel
from edge_agent.messages import PartFrames, PartMessage, PartRegion
from edge_agent.service.http_server import HttpServer
from edge_agent.service.part_frames import PartEvidence, PartShot
from edge_agent.service.part_snapshot import save_part
from edge_agent.service.review import MaskEdit, ReviewError, ReviewStore, export_split
from edge_agent.service.review_page import ReviewPage

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REPO = Path(__file__).resolve().parent.parent


def _kept_part(model: LoadedModel, directory: Path) -> str:
    """A kept rejected part: its evidence frame (a dark square at 20..36) and a strip of three frames."""
    jobs = [inspected_job(model, 3000 + i, defect=(i == 1)) for i in range(3)]
    best = jobs[1]
    part = PartMessage(
        device_id="cam1", part_id="1700000000-7", mode="tracked", anomalous=True, log_nfa=-12.0, log10_epsilon=0.0,
        first_capture_time=time.time(), decision_time=time.time(),
        frames=PartFrames(count=3, first_sequence=3000, last_sequence=3002),
        regions=[PartRegion(bbox=(20, 20, 16, 16), log_nfa=-12.0, frames=1, best_sequence=3001,
                            best_bbox=(20, 20, 16, 16), best_frame_log_nfa=-12.0)],
    )  # fmt: skip
    thumbs = tuple((j.frame.sequence, j.frame.image[:, 8:56]) for j in jobs)
    save_part(jobs[2], part, PartEvidence(PartShot(best, 8, 56, -12.0), True, thumbs), directory)
    return part.part_id


@pytest.fixture
def store(contract_model: LoadedModel, tmp_path: Path) -> ReviewStore:
    keep_frames(contract_model, tmp_path / "kept", defects=8, goods=1)
    _kept_part(contract_model, tmp_path / "kept")
    return ReviewStore(tmp_path / "kept", tmp_path / "training")


@pytest.fixture
def url(store: ReviewStore) -> Iterator[str]:
    server = HttpServer("127.0.0.1", 0)
    ReviewPage(store).register(server)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def test_mask_edits_undo_and_the_mask_source(store: ReviewStore, tmp_path: Path) -> None:
    flagged = [f.id for f in store.frames(kind="flagged")]
    assert len(flagged) == 8 and len(store.frames(kind="part")) == 1 and len(store.frames(kind="good")) == 1
    square = ((10.0, 10.0), (30.0, 10.0), (30.0, 30.0), (10.0, 30.0))
    drawn = store.confirm_defect(flagged[0], MaskEdit("empty", (square,)))
    mask = cv2.imread(str(drawn.with_name(f"{flagged[0]}_mask.png")), cv2.IMREAD_GRAYSCALE) > 0
    assert mask[12:29, 12:29].all() and not mask[35:, :].any() and not mask[:, 35:].any()
    model = store.confirm_defect(flagged[1])
    with pytest.raises(ReviewError, match="empty"):
        store.confirm_defect(flagged[2], MaskEdit("empty"))
    erased = MaskEdit("model", erase=(((0.0, 0.0), (64.0, 0.0), (64.0, 64.0), (0.0, 64.0)),))
    with pytest.raises(ReviewError, match="empty"):
        store.confirm_defect(flagged[2], erased)
    store.mark_good(store.frames(kind="good")[0].id)
    split = export_split(store.training_dir, tmp_path / "dataset")
    assert split["mask_source"] == {f"defect/{flagged[0]}": "person", f"defect/{flagged[1]}": "model"}
    # Undo: the copies go, the kept folder comes back and can be decided again.
    store.undo(flagged[1])
    assert not model.exists() and not model.with_name(f"{flagged[1]}_mask.png").exists()
    assert flagged[1] in [f.id for f in store.frames(kind="flagged")]
    with pytest.raises(ReviewError, match="no decision"):
        store.undo(flagged[1])


def test_evaluate_refuses_masks_the_model_drew(store: ReviewStore, tmp_path: Path, contract_bundle: Path) -> None:
    pytest.importorskip("torch")
    from contract_bundle import good_frame

    flagged = [f.id for f in store.frames(kind="flagged")]
    recorded = store.training_dir / "good" / "recorded"
    recorded.mkdir(parents=True)
    for seed in range(8):  # recorded good images (edge-agent record writes PNGs there)
        cv2.imwrite(str(recorded / f"frame-{seed}.png"), good_frame(np.random.default_rng(seed), 64, 64))
    store.confirm_defect(flagged[0])
    store.confirm_defect(flagged[1], MaskEdit("empty", (((10.0, 10.0), (40.0, 10.0), (40.0, 40.0)),)))
    split = export_split(store.training_dir, tmp_path / "dataset", val_fraction=0.0, test_fraction=0.5)
    assert split["test_good"] and split["train"]
    command = [sys.executable, "-m", "training.cli", "evaluate", "--bundle", str(contract_bundle), "--data",
               str(tmp_path / "dataset" / "split.json"), "--out", str(tmp_path / "report")]  # fmt: skip
    refused = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert (
        refused.returncode == 2 and "mask_source: model" in refused.stderr and "--allow-model-masks" in refused.stderr
    )
    assert not (tmp_path / "report" / "metrics.json").exists()
    allowed = subprocess.run([*command, "--allow-model-masks"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert (tmp_path / "report" / "metrics.json").is_file()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_the_review_page_in_a_real_browser(url: str, store: ReviewStore, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (dev extra)")
    loaded = "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            tab = browser.new_page(viewport={"width": 1100, "height": 1000})
            tab.goto(f"{url}/review")
            tab.wait_for_selector(".card")
            # Paging: 10 kept, 6 a page.
            assert tab.locator(".card").count() == 6 and "page 1 of 2" in tab.text_content("#page")
            tab.click("#next")
            tab.wait_for_function("document.getElementById('page').textContent.startsWith('page 2')")
            assert tab.locator(".card").count() == 4
            # The rejected parts: raw frame beside the overlay, the strip, the part's verdict as the caption.
            tab.click("button.filter[data-kind=part]")
            tab.wait_for_function("document.querySelectorAll('.card').length === 1")
            tab.wait_for_function(loaded)
            part_card = tab.locator(".card").first
            assert "part #7 REJECTED" in part_card.locator(".caption").text_content()
            assert part_card.locator("img.raw").count() == 1 and part_card.locator("img.overlay").count() == 1
            assert part_card.locator("img.strip").count() == 1
            shot = part_card.screenshot()
            # Flagged frames: correct the model's mask with a polygon drawn from scratch.
            tab.click("button.filter[data-kind=flagged]")
            tab.wait_for_function("document.querySelectorAll('.card').length === 6")
            first = tab.locator(".card").first.get_attribute("id").removeprefix("card-")
            tab.locator(f"#card-{first} .edit-mask").click()
            tab.wait_for_function("document.getElementById('canvas').dataset.maskPixels > 0")
            tab.click("#start-empty")
            box = tab.locator("#canvas").bounding_box()
            assert box is not None
            per_px = box["width"] / 64
            for x, y in ((10, 10), (30, 10), (30, 30), (10, 30)):
                tab.mouse.click(box["x"] + x * per_px, box["y"] + y * per_px)
            tab.click("#close-polygon")
            pixels = int(tab.locator("#canvas").get_attribute("data-mask-pixels") or 0)
            assert 300 <= pixels <= 500  # a 20 x 20 square
            editor_shot = tab.locator("#editor").screenshot()
            tab.click("#save-mask")
            tab.wait_for_function(f"() => !document.getElementById('card-{first}')")
            tab.wait_for_function("!document.getElementById('undo').disabled")
            # Undo brings the card back.
            second = tab.locator(".card").first.get_attribute("id").removeprefix("card-")
            tab.locator(f"#card-{second} .confirm-defect").click()
            tab.wait_for_function(f"() => !document.getElementById('card-{second}')")
            tab.click("#undo")
            tab.wait_for_function(f"() => !!document.getElementById('card-{second}')")
            page_shot = tab.screenshot(full_page=True)
        finally:
            browser.close()
    mask = cv2.imread(str(store.training_dir / "defect" / f"{first}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert 300 <= mask.sum() <= 500 and mask[15:25, 15:25].all() and not mask[40:, :].any()
    review = json.loads((store.training_dir / "defect" / f"{first}_review.json").read_text())
    assert review["mask_source"] == "person"
    assert not (store.training_dir / "defect" / f"{second}.png").exists()
    if artifacts := os.environ.get("UFLOW_ARTIFACTS"):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        for name, data in (("review-part.png", shot), ("review-mask-edit.png", editor_shot),
                           ("review-page.png", page_shot)):  # fmt: skip
            (Path(artifacts) / name).write_bytes(data)
    assert np.frombuffer(editor_shot[:8], np.uint8).tolist()[:4] == [0x89, 0x50, 0x4E, 0x47]
