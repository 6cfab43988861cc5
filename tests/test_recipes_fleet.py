"""The fleet updates a box's recipes one by one (docs/recipes.md): latest.json's ``recipes`` table maps each group's
recipe names to versions; real HTTP fleet server, signed bundles, ONNX Runtime self-tests, mosquitto, and a
running ``edge-agent run`` that reloads the recipe being updated (active or not).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from agent_harness import REPO, send_command, write_toml
from fleet_helpers import make_bundle, serving
from mqtt_broker import MosquittoBroker, Subscriber

from edge_agent.config import AgentSettings, ConfigError, load_settings
from edge_agent.fleet.index import read_index
from edge_agent.fleet.models_dir import ModelsDir
from edge_agent.fleet.publish import publish
from edge_agent.fleet.signing import generate_keypair
from edge_agent.fleet.update import apply_recipe_updates, models_dir_for

RECIPES = ("bottle", "cap")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


def release(
    root: Path, fleet: Path, key: Path, version: str, recipe: str, groups: tuple[str, ...] = ("default",)
) -> None:
    bundle = make_bundle(root / f"src-{recipe}-{version}", version, key)
    publish(bundle, fleet, groups, index_key=key, recipe=recipe)


def settings_for(tmp_path: Path, url: str, keys: Any, broker: MosquittoBroker, **extra: Any) -> dict[str, Any]:
    state = tmp_path / "state"
    return {
        "device_id": "cam1",
        "state_dir": str(state),
        "log_format": "json",
        "mqtt": {"host": broker.host, "port": broker.port, "prefix": "plant"},
        "update": {"source": url, "public_key": str(keys.public_key), "health_timeout_s": 20.0},
        "recipes": [{"name": name, "bundle": str(state / "recipes" / name / "current")} for name in RECIPES],
        **extra,
    }


def current(settings: AgentSettings, recipe: str) -> str | None:
    return ModelsDir(settings.state_dir / "recipes" / recipe).current_version()


def test_each_recipe_takes_its_own_version_and_group_fallback(
    tmp_path: Path, keys: Any, broker: MosquittoBroker
) -> None:
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    with serving(fleet) as server:
        settings = load_settings(None, **settings_for(tmp_path, server.url, keys, broker))
        release(tmp_path, fleet, keys.private_key, "1.0.0", "bottle")
        release(tmp_path, fleet, keys.private_key, "3.0.0", "cap", groups=("*",))
        index, _ = read_index(str(fleet / "latest.json"), 10)
        assert index.recipes == {"default": {"bottle": "1.0.0"}, "*": {"cap": "3.0.0"}} and index.groups == {}

        results = dict(apply_recipe_updates(settings, reload=False))
        assert {name: (r.status, r.version) for name, r in results.items()} == {
            "bottle": ("updated", "1.0.0"),
            "cap": ("updated", "3.0.0"),
        }
        assert (current(settings, "bottle"), current(settings, "cap")) == ("1.0.0", "3.0.0")

        release(tmp_path, fleet, keys.private_key, "1.1.0", "bottle")  # one recipe moves, the other stays
        results = dict(apply_recipe_updates(settings, reload=False))
        assert (results["bottle"].status, results["cap"].status) == ("updated", "current")
        assert (current(settings, "bottle"), current(settings, "cap")) == ("1.1.0", "3.0.0")

        other_group = load_settings(
            None, **{**settings_for(tmp_path, server.url, keys, broker), "state_dir": str(tmp_path / "s2")}
        )
        other_group.update.group = "canary"
        other_group.recipes = [
            r.model_copy(update={"bundle": tmp_path / "s2" / "recipes" / r.name / "current"})
            for r in other_group.recipes
        ]
        results = dict(apply_recipe_updates(other_group, reload=False))
        assert results["bottle"].status == "no_release" and results["cap"].version == "3.0.0"  # '*' covers canary


def test_a_recipe_bundle_outside_its_models_dir_is_a_config_error(tmp_path: Path) -> None:
    settings = load_settings(None, state_dir=str(tmp_path), recipes=[{"name": "bottle", "bundle": "/opt/bottle"}])
    with pytest.raises(ConfigError, match="recipes/bottle/current"):
        models_dir_for(settings, "bottle")


@pytest.mark.slow
def test_the_running_agent_reloads_each_recipe_and_the_switch_shows_the_new_version(
    tmp_path: Path, keys: Any, broker: MosquittoBroker, pytestconfig: pytest.Config
) -> None:
    import cv2
    import numpy as np
    from contract_bundle import good_frame

    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):
        cv2.imwrite(str(frames / f"f{i:02d}.png"), good_frame(rng, 64, 64))
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    with serving(fleet) as server:
        values = settings_for(
            tmp_path, server.url, keys, broker, source={"uri": str(frames), "loop": True, "fps_limit": 10.0},
            http={"enabled": False},
        )  # fmt: skip
        config = write_toml(tmp_path / "agent.toml", values)
        settings = load_settings(config)
        # A version names one bundle fleet-wide: each product's bundles are numbered apart.
        release(tmp_path, fleet, keys.private_key, "1.0.0", "bottle")
        release(tmp_path, fleet, keys.private_key, "1.5.0", "cap")
        assert all(r.status == "updated" for _, r in apply_recipe_updates(settings, reload=False))
        inspections = Subscriber(broker, "plant/cam1/#")
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
            env={**os.environ, "NUMBA_CACHE_DIR": str(pytestconfig.cache.mkdir("numba-agent"))},
        )  # fmt: skip
        try:
            assert inspections.wait_for(lambda _: len(inspections.on("/inspection")) >= 2, 180), "never inspected"
            release(tmp_path, fleet, keys.private_key, "2.0.0", "bottle")  # the active recipe
            release(tmp_path, fleet, keys.private_key, "2.5.0", "cap")  # not active: loaded, judged nothing yet
            results = dict(apply_recipe_updates(settings))
            assert agent.poll() is None
            assert (results["bottle"].status, results["bottle"].version) == ("updated", "2.0.0"), results["bottle"]
            assert (results["cap"].status, results["cap"].version) == ("updated", "2.5.0"), results["cap"]
            last = inspections.on("/inspection")[-1].json()["model"]
            assert (last["recipe"], last["version"]) == ("bottle", "2.0.0")
            send_command(broker, "recipe", {"name": "cap"}, prefix="plant")
            assert inspections.wait_for(
                lambda _: any(m.json()["model"] == {**m.json()["model"], "recipe": "cap", "version": "2.5.0"}
                              for m in inspections.on("/inspection")), 30,
            )  # fmt: skip
        finally:
            agent.terminate()
            agent.wait(timeout=30)
            inspections.close()
