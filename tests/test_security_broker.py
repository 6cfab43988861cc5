"""The shipped broker example (systemd/mosquitto/) with its identities: agent, relay, updater and operator work;
nobody else can command a box or speak for a camera (issue 13).

mosquitto runs the example mosquitto.conf and uflow.acl as shipped; only file paths, the listener port and
(as root) the user line are changed for the test. Real TLS (a throw-away CA), real password file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from agent_harness import REPO, AgentThread, agent_config
from fleet_helpers import make_bundle, serving
from mqtt_broker import Subscriber
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from relay_helpers import RecordingHttpServer, inspection
from tls_certs import Pki, make_pki

from edge_agent.config import load_settings
from edge_agent.demo.local_broker import find_mosquitto, free_port, wait_for_port
from edge_agent.fleet.models_dir import ModelsDir
from edge_agent.fleet.publish import publish
from edge_agent.fleet.signing import generate_keypair
from edge_agent.fleet.update import apply_update
from edge_agent.relay.config import load_relay_settings
from edge_agent.relay.relay import RejectRelay

EXAMPLE = REPO / "systemd" / "mosquitto"
USERS = {
    "cam1": "pw-cam1",
    "cam1-updater": "pw-cam1",  # a box's updater: its own user name, the box's password (mqtt.updater_username)
    "cam2": "pw-cam2",
    "relay1": "pw-relay1",
    "plc-gateway": "pw-plc-gateway",
    "operator": "pw-operator",
}

pytestmark = pytest.mark.skipif(
    find_mosquitto() is None or shutil.which("mosquitto_passwd") is None, reason="mosquitto is not installed"
)


@dataclass
class Broker:
    """The example broker as the clients see it."""

    host: str
    port: int
    pki: Pki


def render_example(workdir: Path, port: int, pki: Pki) -> Path:
    """The shipped mosquitto.conf with test paths; fails when a line the test relies on has changed."""
    passwd = workdir / "uflow.passwd"
    for index, (user, password) in enumerate(USERS.items()):
        subprocess.run(
            ["mosquitto_passwd", "-b", *([] if index else ["-c"]), str(passwd), user, password],
            check=True,
            capture_output=True,
        )
    shutil.copy(EXAMPLE / "uflow.acl", workdir / "uflow.acl")
    (workdir / "store").mkdir()
    text = (EXAMPLE / "mosquitto.conf").read_text()
    replacements = {
        "listener 8883": f"listener {port} 127.0.0.1",
        "persistence_location /var/lib/mosquitto/": f"persistence_location {workdir / 'store'}/",
        "password_file /etc/mosquitto/uflow.passwd": f"password_file {passwd}",
        "acl_file /etc/mosquitto/uflow.acl": f"acl_file {workdir / 'uflow.acl'}",
        "cafile /etc/mosquitto/certs/ca.crt": f"cafile {pki.ca_cert}",
        "certfile /etc/mosquitto/certs/server.crt": f"certfile {pki.server_cert}",
        "keyfile /etc/mosquitto/certs/server.key": f"keyfile {pki.server_key}",
    }
    for old, new in replacements.items():
        assert re.search(rf"^{re.escape(old)}$", text, re.M), f"the example no longer has {old!r}"
        text = re.sub(rf"^{re.escape(old)}$", new, text, flags=re.M)
    for required in ("persistence true", "allow_anonymous false"):
        assert re.search(rf"^{required}$", text, re.M), required
    # A listener setting: before the `listener` line it would apply to a default listener on 1883 instead.
    assert text.index("\nuse_username_as_clientid true\n") > text.index("\nlistener "), "use_username_as_clientid"
    assert int(re.search(r"^autosave_interval (\d+)$", text, re.M).group(1)) <= 5  # type: ignore[union-attr]
    if os.geteuid() == 0:  # as root mosquitto would switch to its own user, which cannot read the test files
        text += "user root\n"
    text += f"log_dest file {workdir / 'mosquitto.log'}\n"
    config = workdir / "mosquitto.conf"
    config.write_text(text)
    return config


@pytest.fixture
def example_broker(tmp_path: Path) -> Iterator[Broker]:
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    (tmp_path / "broker").mkdir()
    config = render_example(tmp_path / "broker", port, pki)
    process = subprocess.Popen(
        [str(find_mosquitto()), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert wait_for_port(port, 10), (tmp_path / "broker" / "mosquitto.log").read_text()[-2000:]
        yield Broker("127.0.0.1", port, pki)
    finally:
        process.terminate()
        process.wait(10)


def login(broker: Broker, user: str | None) -> Callable[[paho.Client], None]:
    def setup(client: paho.Client) -> None:
        client.tls_set(ca_certs=str(broker.pki.ca_cert))
        if user is not None:
            client.username_pw_set(user, USERS[user])

    return setup


def publish_as(broker: Broker, user: str | None, topic: str, payload: str, client_id: str = "") -> int:
    """Publish at QoS 1 as ``user``; the PUBACK's reason code (0x87 = not authorized), or -1 if refused."""
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5, client_id=client_id
    )
    login(broker, user)(client)
    codes: list[int] = []
    client.on_publish = lambda c, u, mid, reason, props: codes.append(int(reason.value))
    try:
        client.connect(broker.host, broker.port)
    except OSError:
        return -1
    client.loop_start()
    try:
        deadline = time.monotonic() + 5
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not client.is_connected():
            return -1
        client.publish(topic, payload, qos=1).wait_for_publish(5)
        while not codes and time.monotonic() < deadline:
            time.sleep(0.02)
        return codes[0] if codes else -1
    finally:
        client.disconnect()
        client.loop_stop()


def mqtt_section(broker: Broker, user: str) -> dict[str, object]:
    return {
        "host": broker.host,
        "port": broker.port,
        "username": user,
        "password": USERS[user],
        "tls": {"ca_file": str(broker.pki.ca_cert)},
        "reconnect_initial_s": 1,
        "reconnect_max_s": 1,
        "stats_interval_s": 1.0,
        "message_expiry_s": 300,
        "drain_timeout_s": 10,
    }


@pytest.mark.slow
def test_only_the_operator_commands_a_box_and_every_identity_does_its_job(
    tmp_path: Path,
    example_broker: Broker,
    frames: Path,
) -> None:
    broker = example_broker
    keys = generate_keypair(tmp_path / "keys")
    (tmp_path / "fleet").mkdir()
    actuator = RecordingHttpServer()
    with serving(tmp_path / "fleet") as fleet:
        values = agent_config(
            tmp_path / "state",
            tmp_path / "state" / "models" / "current",
            str(frames),
            broker.port,
            None,
            source={"loop": True, "fps_limit": 10.0},
            mqtt=mqtt_section(broker, "cam1"),
            update={"source": fleet.url, "public_key": str(keys.public_key), "health_timeout_s": 30.0},
        )
        settings = load_settings(None, **values)
        publish(
            make_bundle(tmp_path / "b1", "1.0.0", keys.private_key),
            tmp_path / "fleet",
            ["default"],
            index_key=keys.private_key,
        )
        assert apply_update(settings, reload=False).status == "updated"  # the updater as cam1, agent stopped

        relay_config = write_relay_config(tmp_path / "relay.toml", broker, tmp_path / "relay", actuator.url, 0.3)
        relay = RejectRelay(load_relay_settings(relay_config))
        operator = Subscriber(broker, "uflow/#", setup=login(broker, "operator"))  # type: ignore[arg-type]
        agent = AgentThread(settings).start()
        relay.start()
        try:
            assert relay.wait_subscribed(20)
            # The agent (cam1) publishes; the relay (relay1) reads inspections and fires for the defects.
            assert actuator.wait_for(lambda arrivals: len(arrivals) >= 1, timeout=120), relay.stats()
            assert {a.body["device_id"] for a in actuator.arrivals} == {"cam1"}

            def replies(request_id: str) -> list[dict]:
                return [m.json() for m in operator.on("/cmd/threshold/result") if m.json()["request_id"] == request_id]

            # Not the operator: another box, a relay, an anonymous client. Refused by the broker.
            evil = json.dumps({"request_id": "evil", "log10_epsilon": 1.0})
            assert publish_as(broker, "cam2", "uflow/cam1/cmd/threshold", evil) == 0x87
            # The box's updater may send only its reload. (Not tried as cam1, relay1 or operator, which are connected:
            # a user name is one client id, so a second connection would take over the first, by design; see
            # test_no_identity_but_a_camera_can_publish_as_a_camera.)
            assert publish_as(broker, "cam1-updater", "uflow/cam1/cmd/threshold", evil) == 0x87
            assert publish_as(broker, None, "uflow/cam1/cmd/threshold", evil) == -1  # no anonymous connection
            # Another box cannot speak for cam1 towards the relay either.
            forged = json.dumps({"device_id": "cam1"})
            assert publish_as(broker, "cam2", "uflow/cam1/inspection", forged) == 0x87
            # Another box's password under the agent's client id (issue 24 finding 3) does not throw the agent
            # off: it stays connected (no "offline" Will) and still takes the operator's command below.
            impostor = publish_as(broker, "cam2", "uflow/cam2/status", "online", client_id="edge-agent-cam1")
            assert impostor in (0, 0x10)
            # The operator can.
            ok = json.dumps({"request_id": "op", "log10_epsilon": 0.5})
            operator.client.publish("uflow/cam1/cmd/threshold", ok, qos=1).wait_for_publish(5)
            assert operator.wait_for(lambda ms: bool(replies("op")), 30)
            assert replies("op")[0]["ok"] is True and replies("evil") == []
            assert [m.payload for m in operator.on("uflow/cam1/status")][-1] == b"online"
            assert b"offline" not in [m.payload for m in operator.on("uflow/cam1/status")]
            # The updater (as cam1) asks its own agent to reload and sees it confirmed.
            publish(
                make_bundle(tmp_path / "b2", "2.0.0", keys.private_key),
                tmp_path / "fleet",
                ["default"],
                index_key=keys.private_key,
            )
            result = apply_update(settings)
            assert result.status == "updated", result.message
            assert ModelsDir(settings.state_dir / "models").current_version() == "2.0.0"
            assert relay.stats().malformed == 0
        finally:
            assert agent.stop() == 0
            relay.stop(drain_s=0)
            operator.close()
            actuator.close()


def write_relay_config(path: Path, broker: Broker, state_dir: Path, actuator_url: str, delay_s: float) -> Path:
    """relay1's config against the example broker, an HTTP actuator, frame mode with ``delay_s``."""
    path.write_text(
        f'relay_id = "relay1"\nstate_dir = "{state_dir}"\ncameras = ["cam1"]\n[mqtt]\nhost = "{broker.host}"\n'
        f'port = {broker.port}\nusername = "relay1"\npassword = "{USERS["relay1"]}"\n'
        f'topics = ["uflow/+/inspection"]\nreconnect_initial_s = 1\nreconnect_max_s = 1\n'
        f'[mqtt.tls]\nca_file = "{broker.pki.ca_cert}"\n'
        f'[timing]\ndelay_s = {delay_s}\ntolerance_s = 1.0\n[actuator]\nkind = "http"\nurl = "{actuator_url}"\n'
    )
    return path


def test_no_identity_but_a_camera_can_publish_as_a_camera(example_broker: Broker) -> None:
    """Issue 24 finding 6: cameras are a role of their own in the ACL, not a pattern every user matches."""
    forged = inspection("x", 1).model_dump_json()
    for user in ("plc-gateway", "relay1", "operator", "cam1-updater"):
        for leaf in ("part", "inspection"):
            assert publish_as(example_broker, user, f"uflow/{user}/{leaf}", forged) == 0x87, (user, leaf)
            assert publish_as(example_broker, user, f"uflow/cam1/{leaf}", forged) == 0x87, (user, leaf)
    # The camera itself still can, on its own branch only.
    assert publish_as(example_broker, "cam1", "uflow/cam1/part", forged) in (0, 0x10)  # 0x10: nobody subscribed
    assert publish_as(example_broker, "cam1", "uflow/cam1/inspection", forged) in (0, 0x10)
    assert publish_as(example_broker, "cam1", "uflow/cam2/part", forged) == 0x87
    assert publish_as(example_broker, "cam1", "uflow/cam1/cmd/threshold", "{}") == 0x87  # commands: the operator
    assert publish_as(example_broker, "relay1", "uflow/cam1/cmd/threshold", "{}") == 0x87
    assert publish_as(example_broker, "plc-gateway", "uflow/cam1/cmd/threshold", "{}") == 0x87
    assert publish_as(example_broker, "cam1", "uflow/cam1/cmd/reload", "{}") == 0x87  # reload: its updater


def test_a_cameras_credentials_cannot_take_over_the_relays_client_id(
    tmp_path: Path, example_broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 24 finding 3: client ids are bound to user names at the broker (use_username_as_clientid).

    A client with cam2's password and the relay's client id connects, with a clean session, while a reject
    order waits in the stopped relay's persistent session: the order still fires when the relay comes back,
    and the impostor does not disconnect the running relay either.
    """
    broker = example_broker
    actuator = RecordingHttpServer()
    # The reject is due 8 s after capture: enough for the relay's restart, so it is fired, not missed.
    config = write_relay_config(tmp_path / "relay.toml", broker, tmp_path / "relay", actuator.url, delay_s=8.0)
    settings = load_relay_settings(config)
    relay = RejectRelay(settings)
    relay.start()
    assert relay.wait_subscribed(20)
    relay.stop(drain_s=0)  # its session (and what is queued in it) stays on the broker
    try:
        order = inspection("cam1", 1).model_dump_json()
        assert publish_as(broker, "cam1", "uflow/cam1/inspection", order) == 0
        # The impostor: clean start under the relay's client id, which (on a broker that lets it) ends the
        # relay's session and drops the queued order.
        accepted = publish_as(broker, "cam2", "uflow/cam2/status", "online", client_id=settings.client_id)
        assert accepted in (0, 0x10)  # 0x10: accepted, nobody subscribed

        relay = RejectRelay(settings)
        relay.start()
        assert relay.wait_subscribed(20)
        assert actuator.wait_for(lambda arrivals: len(arrivals) >= 1, timeout=20), relay.stats()
        assert [a.body["device_id"] for a in actuator.arrivals] == ["cam1"]

        caplog.clear()
        impostor = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            protocol=MQTTProtocolVersion.MQTTv5,
            client_id=settings.client_id,
        )
        login(broker, "cam2")(impostor)
        impostor.connect(broker.host, broker.port)
        impostor.loop_start()
        try:
            deadline = time.monotonic() + 10
            while not impostor.is_connected() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert impostor.is_connected()
            # A second order while the impostor is connected fires too.
            assert publish_as(broker, "cam1", "uflow/cam1/inspection", inspection("cam1", 2).model_dump_json()) == 0
            assert actuator.wait_for(lambda arrivals: len(arrivals) >= 2, timeout=20), relay.stats()
            assert relay.connection.connected
            assert not [r for r in caplog.records if getattr(r, "event", "") == "relay_mqtt_disconnected"]
        finally:
            impostor.disconnect()
            impostor.loop_stop()
    finally:
        if not relay.stopped:
            relay.stop(drain_s=0)
        actuator.close()
