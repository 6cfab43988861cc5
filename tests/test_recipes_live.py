"""A running agent with recipes (docs/recipes.md), a real mosquitto and its HTTP server: a retained ``cmd/recipe`` is
refused (the broker would replay it at every reconnect and switch the line back), and the live preview shows the
recipe that judged the frame on it, following a switch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.publish as mqtt_publish
import pytest
from agent_harness import AgentThread, Running, agent_config, http_get, write_frames
from mqtt_broker import MosquittoBroker, Subscriber, free_port

RETAINED = "uflow/cam1/cmd/recipe"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]) -> Iterator[Running]:
    """Recipes a (1.0.0) and b (2.0.0); a retained cmd/recipe for b waits on the broker before the agent starts."""
    tmp = tmp_path_factory.mktemp("recipes-live")
    broker = MosquittoBroker(tmp / "mosquitto", None).start()
    mqtt_publish.single(
        RETAINED, json.dumps({"name": "b", "request_id": "retained"}), qos=1, retain=True,
        hostname=broker.host, port=broker.port,
    )  # fmt: skip
    http_port = free_port()
    values = agent_config(
        tmp / "state", tmp / "no-such-bundle", str(write_frames(tmp / "frames", 20)), broker.port, http_port,
        source={"loop": True, "fps_limit": 15.0}, http={"preview": True, "preview_max_fps": 10.0},
        recipes=[{"name": "a", "bundle": str(bundles["v1"])}, {"name": "b", "bundle": str(bundles["v2"])}],
    )  # fmt: skip
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    run = Running(agent, subscriber, broker, http_port)
    try:
        run.wait_inspections(3, timeout=120)
        yield run
    finally:
        assert agent.stop() == 0
        subscriber.close()
        broker.stop()


def test_a_retained_cmd_recipe_is_refused_and_the_active_recipe_stays(running: Running) -> None:
    def refused(_: object) -> bool:
        return any(m.get("request_id") == "retained" for m in running.results("recipe"))

    assert running.subscriber.wait_for(refused, 30), "the retained cmd/recipe was never answered"
    [reply] = [m for m in running.results("recipe") if m.get("request_id") == "retained"]
    assert reply["ok"] is False and "retained" in reply["message"]
    seen = len(running.inspections())
    assert running.subscriber.wait_for(lambda _: len(running.inspections()) >= seen + 3, 30)
    assert {m["model"]["recipe"] for m in running.inspections()} == {"a"}  # b never judged a frame

    # Cleared (an empty retained message), the same switch sent live is carried out: the refusal was the retain flag.
    # The agent, subscribed, gets the empty clearing message as a plain command ({}: neither name nor index) and
    # refuses it; wait for that answer before the live switch.
    answered = len(running.results("recipe"))
    mqtt_publish.single(RETAINED, b"", qos=1, retain=True, hostname=running.broker.host, port=running.broker.port)
    assert running.subscriber.wait_for(lambda _: len(running.results("recipe")) > answered, 30)
    assert running.results("recipe")[answered]["ok"] is False
    answer = running.command("recipe", {"name": "b", "request_id": "live"})
    assert answer["ok"] is True and answer["data"]["recipe"] == "b"
    answer = running.command("recipe", {"name": "a"})
    assert answer["ok"] is True and answer["data"]["recipe"] == "a"


def preview(running: Running) -> dict[str, Any]:
    status, _, body = http_get(running.http_port, "/preview.json")
    assert status == 200, body
    return dict(json.loads(body))


def wait_preview(running: Running, recipe: str) -> dict[str, Any]:
    """The inspection on the preview once one judged by ``recipe`` is there (new frames replace it several times a
    second)."""
    shown: dict[str, Any] = {}
    for _ in range(200):
        shown = preview(running).get("inspection") or {}
        if f"recipe {recipe}" in str(shown.get("model", "")):
            return shown
        time.sleep(0.1)
    raise AssertionError(f"the preview never showed recipe {recipe}: {shown.get('model')}, {shown.get('caption')}")


def test_the_preview_shows_the_recipe_of_the_frame_on_it(running: Running) -> None:
    for recipe, version in (("b", "2.0.0"), ("a", "1.0.0")):
        answer = running.command("recipe", {"name": recipe})
        assert answer["ok"] is True, answer
        shown = wait_preview(running, recipe)
        assert f"{version} (onnxruntime), recipe {recipe}" in shown["model"]
        assert f"recipe {recipe}" in shown["caption"]
        published = {m["message_id"]: m for m in running.inspections()}
        # The page shows a published inspection, judged by the recipe it names.
        if shown["message_id"] in published:
            assert published[shown["message_id"]]["model"]["recipe"] == recipe
    status, content_type, page = http_get(running.http_port, "/preview")  # the page that draws that caption
    assert status == 200 and "text/html" in content_type and "inspection.caption" in page
