"""Review: kept frames -> training folder -> split.json that trains (edge_agent/service/review.py, review_page.py).

Kept frames are written by a real FrameKeeper from real inspections (contract bundle, ONNX Runtime); the
page runs on the agent's real HTTP server and is clicked in headless Chromium as the preview is.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
from line_helpers import keep_frames

from edge_agent.inspection.loaded_model import LoadedModel
from edge_agent.service.http_server import HttpServer
from edge_agent.service.review import DEFECT_TYPE, ReviewError, ReviewStore, export_split
from edge_agent.service.review_page import ReviewPage

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def store(contract_model: LoadedModel, tmp_path: Path) -> ReviewStore:
    keep_frames(contract_model, tmp_path / "kept", defects=3, goods=1)
    return ReviewStore(tmp_path / "kept", tmp_path / "training")


def test_decisions_move_the_files(store: ReviewStore, tmp_path: Path) -> None:
    frames = store.frames()
    assert [f.kind for f in frames] == ["good", "flagged", "flagged", "flagged"]  # newest first
    good_id, defect_id = frames[1].id, frames[2].id
    moved = store.mark_good(good_id)
    assert moved == tmp_path / "training" / "good" / f"{good_id}.png" and cv2.imread(str(moved)) is not None
    assert not (tmp_path / "kept" / good_id).exists()
    image = store.confirm_defect(defect_id)
    mask = cv2.imread(str(image.with_name(f"{defect_id}_mask.png")), cv2.IMREAD_GRAYSCALE)
    assert image.parent == tmp_path / "training" / "defect" and mask.max() == 255
    assert json.loads(image.with_suffix(".json").read_text())["anomalous"] is True
    assert len(store.frames()) == 2
    with pytest.raises(ReviewError, match="already reviewed"):
        store.mark_good(good_id)
    for bad in ("../kept", "a/b", "", "x" * 200):
        with pytest.raises(ReviewError):
            store.folder(bad)
    with pytest.raises(ReviewError, match="not one of"):
        store.file(frames[0].id, "inspection.json")


@pytest.fixture
def page(store: ReviewStore) -> Iterator[tuple[str, ReviewStore]]:
    server = HttpServer("127.0.0.1", 0)
    moved: list[Path] = []
    ReviewPage(store, moved.append).register(server)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", store
    finally:
        server.stop()


def _post(url: str, document: dict, header: bool = True) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"X-Edge-Agent": "review"} if header else {})}
    request = urllib.request.Request(url, json.dumps(document).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body.startswith(b"{") else {"text": body.decode()}


def test_page_routes_over_http(page: tuple[str, ReviewStore]) -> None:
    url, store = page
    with urllib.request.urlopen(f"{url}/review.json", timeout=10) as response:
        listed = json.loads(response.read())["frames"]
    assert len(listed) == 4
    frame_id = listed[1]["id"]
    with urllib.request.urlopen(f"{url}/review/image?id={frame_id}&file=overlay.png", timeout=10) as response:
        assert response.headers["Content-Type"] == "image/png" and response.read()[:4] == b"\x89PNG"
    # Without the action header (a form posted by another site's page) nothing happens.
    status, _ = _post(f"{url}/review/decide", {"id": frame_id, "decision": "good"}, header=False)
    assert status == 403 and len(store.frames()) == 4
    assert _post(f"{url}/review/decide", {"id": frame_id, "decision": "maybe"})[0] == 400
    assert _post(f"{url}/review/decide", {"id": "../../etc", "decision": "good"})[0] == 404
    status, answer = _post(f"{url}/review/decide", {"id": frame_id, "decision": "defect"})
    assert status == 200 and answer["ok"] and Path(answer["path"]).is_file()
    assert len(store.frames()) == 3


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_page_in_a_real_browser(page: tuple[str, ReviewStore], tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (dev extra)")
    url, store = page
    first = store.frames()[1].id
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            tab = browser.new_page()
            tab.goto(f"{url}/review")
            tab.wait_for_selector(".card img")
            assert tab.locator(".card").count() == 4
            tab.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
            tab.locator(f"#card-{first} .mark-good").click()
            tab.wait_for_function(f"() => !document.getElementById('card-{first}')")
            assert tab.locator(".card").count() == 3
            assert "good" in tab.locator("#summary").text_content()
        finally:
            browser.close()
    assert (store.training_dir / "good" / f"{first}.png").is_file()


def test_exported_split_trains(store: ReviewStore, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    from edge_agent.demo.synthetic import good_image
    from training.data import load_images, open_dataset
    from training.evaluate import load_test_set
    from training.model import UFlowConfig
    from training.train import TrainConfig, train

    # Recorded good images (edge-agent record writes PNGs into training/good) plus the page's decisions.
    recorded = store.training_dir / "good" / "recorded"
    recorded.mkdir(parents=True)
    for seed in range(12):
        cv2.imwrite(str(recorded / f"frame-{seed:03d}.png"), good_image(seed, 128, 128)[:, :, ::-1])
    frames = store.frames()
    store.mark_good(frames[0].id)
    store.confirm_defect(frames[1].id)
    store.confirm_defect(frames[2].id)

    split = export_split(store.training_dir, tmp_path / "dataset")
    assert len(split["test_defect"][DEFECT_TYPE]) == 2 and len(split["train"]) + len(split["val"]) >= 10
    assert split["test_good"]  # kept even where the hash gives none: evaluation needs a good image beside the defects
    splits = open_dataset(tmp_path / "dataset" / "split.json")
    assert splits.layout == "split_json" and len(splits.test) == len(split["test_good"]) + 2
    test_set = load_test_set(splits, 64, 64)  # what uflow evaluate reads: images and masks
    assert test_set.masks[test_set.labels == 1].any()
    assert load_images(splits.train, 64, 64).shape[0] == len(split["train"])

    run_dir = tmp_path / "run"
    config = UFlowConfig(image_height=64, image_width=64, strides=(8, 16), seed=0)
    train(tmp_path / "dataset" / "split.json", run_dir, config, TrainConfig(epochs=2, batch_size=4), progress=False)
    scores = json.loads((run_dir / "val_scores.json").read_text())
    assert scores["scores"] and scores["drift_reference"]["brightness"]["count"] == len(split["train"]) + len(
        split["val"]
    )


def test_review_from_the_command_line(store: ReviewStore, tmp_path: Path) -> None:
    import subprocess
    import sys

    from agent_harness import REPO, write_toml

    config = write_toml(tmp_path / "agent.toml", {"state_dir": str(tmp_path / "state"),
                        "keep": {"dir": str(store.kept_dir), "training_dir": str(store.training_dir)}})  # fmt: skip

    def review(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "edge_agent.cli", "review", "--config", str(config), *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)

    listed = review("list")
    ids = [line.split()[0] for line in listed.stdout.splitlines()]
    assert listed.returncode == 0 and ids == [f.id for f in store.frames()]
    assert review("good", ids[0], ids[3]).returncode == 0
    assert review("defect", ids[1]).returncode == 0
    missing = review("good", ids[0])
    assert missing.returncode == 1 and "already reviewed" in missing.stderr
    exported = review("export", str(tmp_path / "dataset"))
    assert exported.returncode == 0, exported.stderr
    split = json.loads((tmp_path / "dataset" / "split.json").read_text())
    assert split["test_defect"][DEFECT_TYPE] == [f"defect/{ids[1]}"]
    assert sorted(split["train"] + split["val"] + split["test_good"]) == sorted(f"good/{i}" for i in (ids[0], ids[3]))
