"""Recipes (docs/recipes.md): the config, and a real agent switched back and forth under load over a real mosquitto,
every message checked against the recipe that must have judged it.

The two recipes differ in everything a wrong pairing would show: bundle version (1.0.0 / 2.0.0), rotation (the
frame_size of a 96x64 frame is 96x64 unrotated, 64x96 turned) and log10 epsilon. A frame cut by one recipe's
geometry and judged by the other's model would carry a mixed triple.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from agent_harness import AgentThread, Running, agent_config
from contract_bundle import good_frame
from mqtt_broker import MosquittoBroker, Subscriber
from relay_helpers import MODEL, RecordingHttpServer, http_actuator, inspection, wait_until

from edge_agent.config import ConfigError, load_settings
from edge_agent.demo.conveyor import ConveyorSpec, write_conveyor_video
from edge_agent.publish.mqtt import MqttPublisher
from edge_agent.relay.relay import RejectRelay

# name -> (bundle fixture key, version, frame_size of a 96x64 frame, log10 epsilon)
EXPECTED = {"a": ("v1", "1.0.0", [96, 64], -1.0), "b": ("v2", "2.0.0", [64, 96], -2.5)}


def recipe_values(bundles: dict[str, Path]) -> list[dict[str, Any]]:
    return [
        {"name": "a", "bundle": str(bundles["v1"]), "log10_epsilon": -1.0},
        {"name": "b", "bundle": str(bundles["v2"]), "rotate": 90, "roi": [0, 16, 64, 64], "log10_epsilon": -2.5},
        # Fits the 96x64 frames unrotated, not turned 90: switching to it is refused, the source keeps working.
        {"name": "tall", "bundle": str(bundles["v1"]), "rotate": 90, "roi": [0, 0, 96, 64]},
    ]


def wide_frames(folder: Path, count: int) -> Path:
    """``count`` 96x64 PNG frames (not square, so that a rotation shows in frame_size)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for index in range(count):
        cv2.imwrite(str(folder / f"{index:06d}.png"), cv2.cvtColor(good_frame(rng, 64, 96), cv2.COLOR_RGB2BGR))
    return folder


# -- config -------------------------------------------------------------------------------------------


def test_without_recipes_the_config_is_the_one_bundle_it_was(tmp_path: Path) -> None:
    settings = load_settings(None, state_dir=str(tmp_path), model={"bundle": str(tmp_path / "b")})
    assert settings.recipes == [] and settings.recipe is None
    assert settings.bundle_dir == tmp_path / "b"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"recipes": [{"name": "a", "bundle": "/x", "rotation": 90}]}, "rotation"),
        ({"recipes": [{"name": "a", "bundle": "/x", "parts": {"decision_lines": 0.2}}]}, "decision_lines"),
        ({"recipes": [{"name": "a", "bundle": "/x"}, {"name": "a", "bundle": "/y"}]}, "each name once"),
        ({"recipes": [{"name": "a", "bundle": "/x"}], "recipe": "c"}, "'c' is not one of the [[recipes]] names (a)"),
        ({"recipe": "c"}, "there is no [[recipes]] list"),
        ({"recipes": [{"name": "../a", "bundle": "/x"}]}, "name"),
        ({"recipes": [{"name": "a"}]}, "bundle"),
    ],
)
def test_a_wrong_recipe_key_is_a_clear_error(tmp_path: Path, values: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, state_dir=str(tmp_path), **values)
    assert expected in str(caught.value)


def test_recipes_from_a_toml_file_keep_their_order_and_own_tables(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'state_dir = "{tmp_path}"\nrecipe = "cap"\n'
        '[[recipes]]\nname = "bottle"\nbundle = "/r/bottle"\nroi = [0, 0, 64, 64]\n'
        '[recipes.parts]\ndecision_line = 0.25\n'
        '[[recipes]]\nname = "cap"\nbundle = "/r/cap"\nrotate = 180\nmin_region_area = 40\n'
    )  # fmt: skip
    settings = load_settings(config)
    assert [r.name for r in settings.recipes] == ["bottle", "cap"] and settings.recipe == "cap"
    assert settings.recipes[0].parts.decision_line == 0.25 and settings.recipes[1].parts.decision_line is None
    assert settings.recipes[1].rotate == 180 and settings.recipes[1].min_region_area == 40


# -- a running agent ----------------------------------------------------------------------------------


@pytest.fixture
def running(tmp_path: Path, bundles: dict[str, Path], broker: MosquittoBroker) -> Iterator[Running]:
    frames = wide_frames(tmp_path / "frames", 24)
    values = agent_config(
        tmp_path / "state",
        tmp_path / "no-such-bundle",  # [[recipes]] replaces model.bundle: it is never read
        str(frames),
        broker.port,
        # No frame-rate limit: capture runs ahead of inference and every queue is full when a switch comes.
        source={"loop": True},
        recipes=recipe_values(bundles),
    )
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    run = Running(agent, subscriber, broker, 0)
    run.wait_inspections(5, timeout=90)
    yield run
    assert agent.stop() == 0
    subscriber.close()


def recipe_runs(messages: list[dict[str, Any]]) -> list[str]:
    """The recipes in sequence order, consecutive repeats collapsed."""
    runs: list[str] = []
    for message in messages:
        if not runs or runs[-1] != message["model"]["recipe"]:
            runs.append(message["model"]["recipe"])
    return runs


def wait_recipe(run: Running, name: str, count: int = 8) -> None:
    def enough(_: object) -> bool:
        ordered = sorted(run.inspections(), key=lambda m: m["sequence"])
        tail = ordered[-count:]
        return len(tail) == count and all(m["model"]["recipe"] == name for m in tail)

    assert run.subscriber.wait_for(enough, 60), f"no {count} frames of recipe {name} in a row"


def test_switching_under_load_judges_every_frame_by_the_recipe_that_cut_it(running: Running) -> None:
    done = []
    for payload, name in (({"name": "b"}, "b"), ({"index": 0}, "a"), ({"name": "b", "request_id": "r3"}, "b")):
        reply = running.command("recipe", payload)
        assert reply["ok"] is True, reply
        assert reply["data"]["recipe"] == name and reply["data"]["model"]["version"] == EXPECTED[name][1]
        done.append(name)
        wait_recipe(running, name)
    assert reply["request_id"] == "r3"

    # Unknown name or index: refused with what exists, and the active recipe stays.
    for payload, expected in (
        ({"name": "nope"}, "no recipe named 'nope'"),
        ({"index": 7}, "recipe index 7"),
        ({"name": "tall"}, "roi [0, 0, 96, 64] does not fit the camera's 64x96 frames"),
    ):
        reply = running.command("recipe", payload)
        assert reply["ok"] is False and expected in reply["message"] and "still inspecting b" in reply["message"]
    # The command's own validation: neither or both keys, a bad name (retained commands are refused for every
    # command alike: test_security_triggers.py).
    for payload in ({}, {"name": "a", "index": 0}, {"name": "../a"}):
        assert running.command("recipe", payload)["ok"] is False
    wait_recipe(running, "b", count=12)  # still b after every refusal

    messages = sorted(running.inspections(), key=lambda m: m["sequence"])
    assert [m["sequence"] for m in messages] == list(range(len(messages)))  # a file source: no frame skipped
    for message in messages:
        _, version, frame_size, epsilon = EXPECTED[message["model"]["recipe"]]
        assert (message["model"]["version"], message["frame_size"], message["log10_epsilon"]) == (
            version, frame_size, epsilon,
        ), message["sequence"]  # fmt: skip
    # Exactly the commanded switches, in order: no frame of the old recipe after a new one began.
    assert recipe_runs(messages) == ["a", *done]
    seen = len(running.subscriber.on("/stats"))
    assert running.subscriber.wait_for(lambda _: len(running.subscriber.on("/stats")) > seen, 30)
    assert running.subscriber.on("/stats")[-1].json()["model"]["recipe"] == "b"  # the active recipe


def test_a_box_without_recipes_refuses_cmd_recipe(
    tmp_path: Path, bundles: dict[str, Path], broker: MosquittoBroker
) -> None:
    frames = wide_frames(tmp_path / "frames", 6)
    values = agent_config(
        tmp_path / "state", bundles["v1"], str(frames), broker.port, source={"loop": True, "fps_limit": 20.0}
    )
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    run = Running(agent, subscriber, broker, 0)
    try:
        run.wait_inspections(2, timeout=90)
        reply = run.command("recipe", {"index": 0})
        assert reply["ok"] is False and "no [[recipes]]" in reply["message"]
        assert run.inspections()[-1]["model"].get("recipe") is None
    finally:
        assert agent.stop() == 0
        subscriber.close()


# -- the reject relay ---------------------------------------------------------------------------------


def test_the_relay_shows_each_cameras_active_recipe(
    relay_factory: Callable[..., RejectRelay], camera: Callable[[str], MqttPublisher], http: RecordingHttpServer
) -> None:
    relay = relay_factory(http_actuator(http), extra="[timing]\ndelay_s = 0.3\n")
    cam1, cam2 = camera("cam1"), camera("cam2")
    for sequence, (recipe, version) in enumerate([("a", "1.0.0"), ("a", "1.0.0"), ("b", "2.0.0")]):
        model = MODEL.model_copy(update={"recipe": recipe, "version": version})
        cam1.publish_inspection(inspection("cam1", sequence, anomalous=False).model_copy(update={"model": model}))
        time.sleep(0.05)  # in order: the stats show the latest
    cam2.publish_inspection(inspection("cam2", 0, anomalous=False))  # a box without recipes
    assert wait_until(lambda: sum(d.received for d in relay.stats().devices.values()) == 4)
    devices = relay.stats().devices
    assert (devices["cam1"].recipe, devices["cam1"].model_version) == ("b", "2.0.0")
    assert (devices["cam2"].recipe, devices["cam2"].model_version) == (None, MODEL.version)


# -- tracked parts --------------------------------------------------------------------------------------


def test_tracked_parts_switch_to_the_recipes_own_settings_and_part_ids_continue(
    tmp_path: Path, bundles: dict[str, Path], broker: MosquittoBroker
) -> None:
    spec = ConveyorSpec(width=192, height=128, parts=6, speed_px=12, defect_parts=(), seed=4)
    write_conveyor_video(tmp_path / "conveyor.avi", spec)
    recipes = [
        {"name": "a", "bundle": str(bundles["v1"]), "parts": {"px_per_m": 1000.0}},
        {"name": "b", "bundle": str(bundles["v2"]), "parts": {"px_per_m": 4000.0}},
    ]
    values = agent_config(
        tmp_path / "state", tmp_path / "unused", str(tmp_path / "conveyor.avi"), broker.port,
        source={"loop": True, "fps_limit": 60.0}, mqtt={"publish": "none"},
        parts={"mode": "tracked", "px_per_m": 100.0}, recipes=recipes,
    )  # fmt: skip
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    run = Running(agent, subscriber, broker, 0)
    try:
        parts = lambda: [m.json() for m in subscriber.on("/part")]  # noqa: E731
        assert subscriber.wait_for(lambda _: len(parts()) >= 2, 120), "no parts of recipe a"
        assert run.command("recipe", {"name": "b"})["ok"] is True
        assert subscriber.wait_for(lambda _: sum(p["model"]["recipe"] == "b" for p in parts()) >= 3, 120)
    finally:
        assert agent.stop() == 0
        subscriber.close()
    decided = parts()
    assert recipe_runs(decided) == ["a", "b"]  # a part in view at the switch was decided by a, with a's frame
    numbers = [int(p["part_id"].split("-")[1]) for p in decided]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)  # ids continue across the switch
    for part in decided:
        version, px_per_m = {"a": ("1.0.0", 1000.0), "b": ("2.0.0", 4000.0)}[part["model"]["recipe"]]
        assert part["model"]["version"] == version
        position = part["position_at_decision"]
        assert position["beyond_line_m"] == pytest.approx(position["beyond_line_px"] / px_per_m, abs=1e-4)


def test_config_check_names_a_missing_recipe_bundle_but_not_an_empty_fleet_location(tmp_path: Path) -> None:
    from edge_agent.cli.config import missing_files

    fleet_location = tmp_path / "recipes" / "b" / "current"
    settings = load_settings(
        None,
        state_dir=str(tmp_path),
        recipes=[{"name": "a", "bundle": str(tmp_path / "gone")}, {"name": "b", "bundle": str(fleet_location)}],
    )
    assert missing_files(settings) == [("recipes[a].bundle", tmp_path / "gone")]
