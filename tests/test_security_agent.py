"""Trust boundaries of the agent's commands (issue 13): a real agent, a real mosquitto, real HTTP fleet servers.

A broker client may send commands; it must not choose where a box gets its model, make it go back to
an older one, silence or flood rejects through the threshold, or disable the command worker.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import AgentThread, Running, agent_config, http_get
from fleet_helpers import make_bundle, serving
from mqtt_broker import MosquittoBroker, Subscriber, free_port

from edge_agent.config import MqttConfig, load_settings
from edge_agent.fleet.models_dir import ModelsDir
from edge_agent.fleet.publish import publish
from edge_agent.fleet.signing import generate_keypair
from edge_agent.fleet.update import apply_update, version_key
from edge_agent.messages import CommandResult, parse_json_object
from edge_agent.publish.commands import CommandProcessor
from edge_agent.publish.mqtt import MqttPublisher


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def running(
    tmp_path: Path,
    bundles: dict[str, Path],
    frames: Path,
    broker: MosquittoBroker,
) -> Iterator[Running]:
    """The agent with the default threshold band (nfa.command_band 2 around the bundle's log10 epsilon 0)."""
    current = tmp_path / "current"
    current.symlink_to(bundles["v1"])
    http_port = free_port()
    values = agent_config(
        tmp_path / "state", current, str(frames), broker.port, http_port, source={"loop": True, "fps_limit": 20.0}
    )
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    run = Running(agent, subscriber, broker, http_port)
    run.wait_inspections(3, timeout=60)
    yield run
    assert agent.stop() == 0
    subscriber.close()


def test_threshold_outside_the_configured_band_is_refused(running: Running) -> None:
    for change in (
        {"log10_epsilon": -1e300},
        {"log10_epsilon": 1e300},
        {"log10_epsilon": -2.5},
        {"min_region_area": 10**9},
    ):
        reply = running.command("threshold", {"request_id": "t", **change})
        assert reply["ok"] is False and reply["request_id"] == "t", reply
        assert "nfa.command_band" in reply["message"] or "nfa.command_max_region_area" in reply["message"]
    # The defects (every 10th frame) are still rejected: the refused values changed nothing.
    seen = len(running.inspections())
    after = running.wait_inspections(seen + 12)[seen:]
    assert all(m["log10_epsilon"] == 0.0 for m in after) and any(m["anomalous"] for m in after)
    # Inside the band is accepted as before.
    assert running.command("threshold", {"log10_epsilon": -1.5})["ok"] is True


def test_a_deeply_nested_command_is_answered_and_the_worker_lives_on(running: Running) -> None:
    reply = running.command("threshold", b'{"a":' * 1100 + b"1" + b"}" * 1100)
    assert reply["ok"] is False and "malformed payload: payload nests 1100 levels deep" in reply["message"]
    for index in range(20):  # more than the queue: a dead worker would answer "busy" from here on
        assert running.command("threshold", {"request_id": f"n{index}", "log10_epsilon": 0.0})["ok"] is True
    status, _, body = http_get(running.http_port, "/healthz")
    assert json.loads(body)["commands"] == {"alive": True, "restarts": 0, "last_crash": ""}, (status, body)


def test_unknown_command_names_share_one_metrics_series(running: Running) -> None:
    for index in range(5):
        running.command(f"made-up-{index}", {})
    _, _, text = http_get(running.http_port, "/metrics")
    assert "made-up" not in text and 'command="unknown"' in text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_command_worker_that_dies_is_restarted_and_counted(broker: MosquittoBroker) -> None:
    publisher = MqttPublisher(MqttConfig(port=broker.port, drain_timeout_s=2), "box1")
    replies = Subscriber(broker, "uflow/box1/cmd/+/result")
    processor = CommandProcessor(publisher.publish_result)
    killed = threading.Event()

    def reload(command: object):  # type: ignore[no-untyped-def]
        if not killed.is_set():
            killed.set()
            raise SystemExit("simulated crash of the worker thread")  # not an Exception: passes handle()
        from edge_agent.publish.commands import Done

        return Done("reloaded", {})

    processor.register("reload", reload)
    publisher.subscribe("cmd/+", processor.submit)
    publisher.start()
    processor.start()
    try:
        assert publisher.wait_connected(10)
        deadline = time.monotonic() + 15
        while not killed.is_set() and time.monotonic() < deadline:  # until the subscription is in place
            send_command_to(broker, "box1", "reload", {"request_id": "first"})
            killed.wait(1.0)
        while processor.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not processor.alive and "SystemExit" in processor.last_crash
        send_command_to(broker, "box1", "reload", {"request_id": "second"})  # submit() restarts the worker
        assert replies.wait_for(lambda ms: any(m.json().get("request_id") == "second" for m in ms), 10)
        assert processor.alive and processor.restarts == 1
    finally:
        processor.stop()
        publisher.stop()
        replies.close()


def send_command_to(mqtt: MosquittoBroker, device: str, name: str, payload: dict[str, object]) -> None:
    import paho.mqtt.publish as mqtt_publish

    mqtt_publish.single(f"uflow/{device}/cmd/{name}", json.dumps(payload), qos=1, hostname=mqtt.host, port=mqtt.port)


def test_command_results_parse_with_the_bounded_parser() -> None:
    result = CommandResult(command="x", ok=False, message="m")
    assert parse_json_object(result.model_dump_json().encode(), 1024)["command"] == "x"


# -- cmd/update: no source, group or force from the broker; versions only go up ------------------------------


@pytest.mark.slow
def test_update_command_cannot_choose_the_source_or_force_a_downgrade(
    tmp_path: Path,
    keys,  # type: ignore[no-untyped-def]
    frames: Path,
    broker: MosquittoBroker,
) -> None:
    (tmp_path / "fleet").mkdir()
    (tmp_path / "attacker").mkdir()
    v1 = make_bundle(tmp_path / "src-1.0.0", "1.0.0", keys.private_key)
    v2 = make_bundle(tmp_path / "src-2.0.0", "2.0.0", keys.private_key)
    publish(
        v1, tmp_path / "attacker", ["default", "*"], index_key=keys.private_key
    )  # an older release, genuinely signed
    with serving(tmp_path / "fleet") as fleet, serving(tmp_path / "attacker") as attacker:
        values = agent_config(
            tmp_path / "state",
            tmp_path / "state" / "models" / "current",
            str(frames),
            broker.port,
            None,
            source={"loop": True, "fps_limit": 10.0},
            update={"source": fleet.url, "public_key": str(keys.public_key), "health_timeout_s": 20.0},
        )
        settings = load_settings(None, **values)
        publish(v2, tmp_path / "fleet", ["default"], index_key=keys.private_key)
        assert apply_update(settings, reload=False).status == "updated"
        models = ModelsDir(settings.state_dir / "models")
        assert models.current_version() == "2.0.0"
        subscriber = Subscriber(broker, "uflow/cam1/#")
        agent = AgentThread(settings).start()
        run = Running(agent, subscriber, broker, 0)
        try:
            run.wait_inspections(2, timeout=90)
            reply = run.command("update", {"request_id": "evil", "source": attacker.url, "force": True})
            assert reply["ok"] is False and "unknown key 'source'" in reply["message"], reply
            assert "unknown key 'force'" in reply["message"]
            # The box's own (stale) fleet source now offers 1.0.0: a plain cmd/update must not go down.
            publish(v1, tmp_path / "fleet", ["default"], index_key=keys.private_key)
            reply = run.command("update", {"request_id": "plain"})
            assert reply["ok"] is True, reply
            assert subscriber.wait_for(
                lambda ms: any(m.topic == "uflow/cam1/update" and m.json()["step"] == "fetch_index" for m in ms), 60
            )
            time.sleep(0.5)
            steps = [m.json() for m in subscriber.messages if m.topic == "uflow/cam1/update"]
            refused = [s for s in steps if s["step"] == "fetch_index"]
            assert refused and refused[-1]["ok"] is False and "refusing the downgrade" in refused[-1]["message"]
            assert models.current_version() == "2.0.0"
            assert attacker.requests == []  # the box never even asked the attacker's server
        finally:
            assert agent.stop() == 0
            subscriber.close()


def test_the_operator_on_the_box_can_downgrade(tmp_path: Path, keys, broker: MosquittoBroker) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "fleet").mkdir()
    with serving(tmp_path / "fleet") as fleet:
        settings = load_settings(
            None,
            device_id="cam1",
            state_dir=str(tmp_path / "state"),
            log_format="text",
            mqtt={"host": broker.host, "port": broker.port},
            update={"source": fleet.url, "public_key": str(keys.public_key)},
        )
        publish(
            make_bundle(tmp_path / "b2", "2.0.0", keys.private_key),
            tmp_path / "fleet",
            ["default"],
            index_key=keys.private_key,
        )
        assert apply_update(settings, reload=False).status == "updated"
        publish(
            make_bundle(tmp_path / "b1", "1.0.0", keys.private_key),
            tmp_path / "fleet",
            ["default"],
            index_key=keys.private_key,
        )
        refused = apply_update(settings, reload=False)
        assert refused.status == "skipped" and "refusing the downgrade" in refused.message
        assert ModelsDir(settings.state_dir / "models").current_version() == "2.0.0"
        allowed = apply_update(settings, reload=False, allow_downgrade=True)
        assert allowed.status == "updated" and allowed.version == "1.0.0"


def test_version_order_is_numeric() -> None:
    assert version_key("1.10.0") > version_key("1.9.2") > version_key("1.9") > version_key("0.99")
    assert version_key("2.0.0") == version_key("2.0.0")


# -- cmd/snapshot: rate, count, size and free-space limits ---------------------------------------------------


def test_snapshots_are_limited_in_rate_and_count(
    tmp_path: Path,
    bundles: dict[str, Path],
    frames: Path,
    broker: MosquittoBroker,
) -> None:
    current = tmp_path / "current"
    current.symlink_to(bundles["v1"])
    values = agent_config(
        tmp_path / "state",
        current,
        str(frames),
        broker.port,
        None,
        source={"loop": True, "fps_limit": 20.0},
        snapshot_dir=str(tmp_path / "snaps"),
        snapshot={"min_interval_s": 1.0, "max_count": 2},
    )
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    run = Running(agent, subscriber, broker, 0)
    try:
        run.wait_inspections(3, timeout=60)
        assert run.command("snapshot", {"request_id": "1"})["ok"] is True
        flood = run.command("snapshot", {"request_id": "2"})
        assert flood["ok"] is False and "snapshot.min_interval_s" in flood["message"]
        time.sleep(1.1)
        assert run.command("snapshot", {"request_id": "3"})["ok"] is True
        time.sleep(1.1)
        full = run.command("snapshot", {"request_id": "4"})
        assert full["ok"] is False and "snapshot.max_count 2" in full["message"]
        assert len(list((tmp_path / "snaps").iterdir())) == 2
    finally:
        assert agent.stop() == 0
        subscriber.close()


def test_snapshot_budget_keeps_free_space_and_size(tmp_path: Path) -> None:
    from edge_agent.config import SnapshotConfig
    from edge_agent.service.snapshot import SnapshotBudget, SnapshotRefused

    with pytest.raises(SnapshotRefused, match=r"snapshot\.min_free_mb"):
        SnapshotBudget(SnapshotConfig(min_free_mb=1e12)).claim(tmp_path / "snaps")
    (tmp_path / "snaps" / "old").mkdir(parents=True)
    (tmp_path / "snaps" / "old" / "frame.png").write_bytes(b"\0" * 2_000_000)
    with pytest.raises(SnapshotRefused, match=r"snapshot\.max_total_mb"):
        SnapshotBudget(SnapshotConfig(max_total_mb=1.0, min_free_mb=0)).claim(tmp_path / "snaps")
    SnapshotBudget(SnapshotConfig(max_total_mb=3.0, min_free_mb=0)).claim(tmp_path / "snaps")


@pytest.mark.parametrize("device_id", ["a/b", "cam#1", "-x", "+", "x" * 65, ""])
def test_device_id_must_be_usable_in_topics(device_id: str) -> None:
    from edge_agent.config import ConfigError

    with pytest.raises(ConfigError, match="device_id: String should match pattern"):
        load_settings(None, device_id=device_id)


def test_allow_downgrade_is_a_command_line_flag_on_the_box(tmp_path: Path, keys, broker: MosquittoBroker) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from agent_harness import REPO

    fleet = tmp_path / "fleet"  # a directory source this time
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "cam1"\nstate_dir = "{tmp_path / "state"}"\nlog_format = "json"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'[update]\nsource = "{fleet}"\npublic_key = "{keys.public_key}"\n'
    )

    def update(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", "update", "--config", str(config), "--no-reload", *flags],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )

    publish(make_bundle(tmp_path / "b2", "2.0.0", keys.private_key), fleet, ["default"], index_key=keys.private_key)
    assert update().returncode == 0
    publish(make_bundle(tmp_path / "b1", "1.0.0", keys.private_key), fleet, ["default"], index_key=keys.private_key)
    refused = update()
    assert refused.returncode == 0 and "refusing the downgrade" in refused.stdout + refused.stderr
    models = ModelsDir(tmp_path / "state" / "models")
    assert models.current_version() == "2.0.0"
    assert update("--allow-downgrade").returncode == 0
    assert models.current_version() == "1.0.0"
