"""The preview in triggered mode: the live camera between triggers (not a broken image), the inspected frame after one.

A real agent in a thread (contract bundle on ONNX Runtime, a looping folder, real mosquitto and HTTP); the page
read over HTTP and in headless Chromium (Debian's chromium driven by Playwright), as tests/test_preview.py does.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_harness import AgentThread, agent_config, http_get, write_frames
from mqtt_broker import MosquittoBroker, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _json(port: int) -> dict:
    deadline = time.monotonic() + 60
    while True:  # the agent's HTTP server starts once the model is loaded
        try:
            status, _, body = http_get(port, "/preview.json")
            break
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert status == 200, body
    return json.loads(body)


def test_triggered_preview_shows_the_live_camera_between_triggers(
    tmp_path: Path, contract_bundle: Path, broker: MosquittoBroker
) -> None:
    http_port = free_port()
    values = agent_config(tmp_path / "state", contract_bundle, str(write_frames(tmp_path / "frames", 20)),
                          broker.port, http_port, source={"loop": True, "fps_limit": 15.0},
                          parts={"mode": "triggered", "trigger_delay_s": 0.0, "trigger_timeout_s": 2.0})  # fmt: skip
    values["http"].update({"preview": True, "preview_max_fps": 5.0})
    agent = AgentThread.from_values(values).start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (_json(http_port)["inspection"] or {}).get("live"):
            time.sleep(0.2)
        before = _json(http_port)
        inspection = before["inspection"]
        # No trigger yet: the camera, said to be live and not inspected, with the trigger state beside it.
        assert inspection["live"] and "waiting for a trigger" in inspection["caption"]
        assert inspection["verdict"] == "waiting for a trigger" and before["fps"] == 0
        assert before["camera_fps"] > 0 and before["trigger_line"].startswith("0 triggers")
        image = cv2.imdecode(np.frombuffer(base64.b64decode(before["image"].split(",", 1)[1]), np.uint8), 1)
        assert image is not None and image.shape[1] >= 384
        time.sleep(1.0)
        assert _json(http_port)["inspection"]["sequence"] > inspection["sequence"]  # it moves, at a low rate
        if CHROMIUM is not None:
            _check_page(f"http://127.0.0.1:{http_port}/preview")
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/trigger", data=b'{"trigger_id": "p-1"}',
                                         method="POST", headers={"X-Edge-Agent": "plc"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 202
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (_json(http_port)["inspection"] or {}).get("live"):
            time.sleep(0.1)
        after = _json(http_port)
        assert not after["inspection"].get("live") and after["inspection"]["verdict"] in ("good", "ANOMALOUS")
        assert after["trigger_line"].startswith("1 triggers")
        deadline = time.monotonic() + 15  # the inspected frame stays a few seconds, then the camera again
        while time.monotonic() < deadline and not _json(http_port)["inspection"].get("live"):
            time.sleep(0.2)
        assert _json(http_port)["inspection"]["live"]
    finally:
        assert agent.stop() == 0


def _check_page(url: str) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (dev extra)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 900})
            page.goto(url)
            page.wait_for_function("document.getElementById('frame').naturalWidth > 0", timeout=20000)
            assert page.get_attribute("#frame", "data-live") == "1"
            assert "waiting for a trigger" in (page.text_content("#caption") or "")
            assert "from the camera" in (page.text_content("#fps") or "")
        finally:
            browser.close()
