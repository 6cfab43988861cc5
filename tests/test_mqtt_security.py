"""MQTT over TLS with a client certificate and a password, against a real mosquitto configured for it.

The PKI is made per module (tests/tls_certs.py); the password file by mosquitto_passwd. Every refusal
must be logged with what is wrong, never crash the agent, and keep the messages for later.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from mqtt_broker import MosquittoBroker, Subscriber
from tls_certs import Pki, make_pki

from edge_agent.config import ConfigError, MqttConfig, TlsConfig
from edge_agent.messages import InspectionMessage, ModelRef
from edge_agent.publish.mqtt import MqttPublisher

USER, PASSWORD = "camera-1", "s3cret-line-4"
MODEL = ModelRef(name="m", version="1", sha256="0" * 64, backend="onnxruntime", precision="fp32")

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def secure_broker(tmp_path: Path, pki: Pki, broker_factory) -> MosquittoBroker:
    """mosquitto with only a TLS listener that requires a client certificate AND a user name/password."""
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), USER, PASSWORD], check=True, capture_output=True)
    return broker_factory(
        listener_options=(
            f"cafile {pki.ca_cert}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
            "require_certificate true\ntls_version tlsv1.2\n"
        ),
        options=f"allow_anonymous false\npassword_file {passwords}\n",
    )


def tls_client(pki: Pki, password: str = PASSWORD) -> Callable[[paho.Client], None]:
    def setup(client: paho.Client) -> None:
        client.tls_set(ca_certs=str(pki.ca_cert), certfile=str(pki.client_cert), keyfile=str(pki.client_key))
        client.username_pw_set(USER, password)

    return setup


def config_for(broker: MosquittoBroker, tls: TlsConfig | None, password: str = PASSWORD) -> MqttConfig:
    return MqttConfig(
        host=broker.host,
        port=broker.port,
        username=USER,
        password=password,
        tls=tls,
        reconnect_initial_s=1,
        reconnect_max_s=1,
        drain_timeout_s=10,
    )


def full_tls(pki: Pki) -> TlsConfig:
    return TlsConfig(ca_file=pki.ca_cert, cert_file=pki.client_cert, key_file=pki.client_key)


def inspection(sequence: int) -> InspectionMessage:
    return InspectionMessage(
        device_id="cam1",
        sequence=sequence,
        capture_time=time.time(),
        model=MODEL,
        image_score=0.1,
        anomalous=False,
        log10_epsilon=0.0,
        frame_size=(64, 64),
    )


def events_of(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(str(getattr(r, "event", "")), str(getattr(r, "error", getattr(r, "reason", "")))) for r in caplog.records]


def test_tls_client_certificate_and_password_deliver(secure_broker: MosquittoBroker, pki: Pki) -> None:
    subscriber = Subscriber(secure_broker, "uflow/cam1/#", setup=tls_client(pki))
    publisher = MqttPublisher(config_for(secure_broker, full_tls(pki)), "cam1")
    publisher.start()
    assert publisher.wait_connected(15)
    for sequence in range(3):
        publisher.publish_inspection(inspection(sequence))
    assert publisher.stop() is True
    assert subscriber.wait_for(lambda ms: any(m.payload == b"stopped" for m in ms), timeout=10)
    subscriber.close()
    assert [m.json()["sequence"] for m in subscriber.on("/inspection")] == [0, 1, 2]
    assert [m.payload for m in subscriber.on("/status")] == [b"online", b"stopped"]


def test_wrong_password_is_refused_logged_and_messages_are_kept(
    secure_broker: MosquittoBroker, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = MqttPublisher(config_for(secure_broker, full_tls(pki), password="wrong"), "cam1")
    with caplog.at_level("INFO", logger="edge_agent.publish.mqtt"):
        publisher.start()
        publisher.publish_inspection(inspection(0))
        deadline = time.monotonic() + 10
        while not any(e == "mqtt_refused" for e, _ in events_of(caplog)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not publisher.connected
        publisher.stop(timeout=0.5)
    refused = [detail for event, detail in events_of(caplog) if event == "mqtt_refused"]
    assert refused and ("password" in refused[0].lower() or "authori" in refused[0].lower()), refused
    assert len(publisher.outbox) == 1  # nothing was lost while refused


def test_missing_client_certificate_is_reported(
    secure_broker: MosquittoBroker, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = MqttPublisher(config_for(secure_broker, TlsConfig(ca_file=pki.ca_cert)), "cam1")
    with caplog.at_level("INFO", logger="edge_agent.publish.mqtt"):
        publisher.start()
        publisher.publish_inspection(inspection(0))
        # Wait for the report itself, not a fixed time: a loaded machine may take seconds per handshake.
        deadline = time.monotonic() + 60
        while not any(e == "mqtt_unreachable" for e, _ in events_of(caplog)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not publisher.connected
        publisher.stop(timeout=0.2)
    failures = [detail for event, detail in events_of(caplog) if event == "mqtt_unreachable"]
    assert failures, events_of(caplog)
    # The broker refuses during the TLS handshake (TLS 1.2) or with an alert after it (TLS 1.3); either way
    # the agent's own hint names the setting to check. OpenSSL's and paho's wording is not asserted.
    assert any("mqtt.tls.cert_file" in f for f in failures), failures
    assert publisher.counters.connects == 0
    assert len(publisher.outbox) == 1  # nothing lost: sent once a certificate is configured


def test_broker_certificate_from_another_ca_is_rejected(
    secure_broker: MosquittoBroker, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = make_pki(tmp_path / "other", ca_name="some other CA")
    tls = TlsConfig(ca_file=stranger.ca_cert, cert_file=pki.client_cert, key_file=pki.client_key)
    publisher = MqttPublisher(config_for(secure_broker, tls), "cam1")
    with caplog.at_level("INFO", logger="edge_agent.publish.mqtt"):
        publisher.start()
        assert not publisher.wait_connected(3)
        publisher.stop(timeout=0.2)
    failures = [detail for event, detail in events_of(caplog) if event == "mqtt_unreachable"]
    assert failures and "certificate" in failures[0] and "mqtt.tls.ca_file" in failures[0], failures


def test_plain_client_cannot_use_the_tls_listener(secure_broker: MosquittoBroker, caplog) -> None:
    publisher = MqttPublisher(config_for(secure_broker, None), "cam1")
    with caplog.at_level("INFO", logger="edge_agent.publish.mqtt"):
        publisher.start()
        assert not publisher.wait_connected(3)
        publisher.stop(timeout=0.2)
    assert any(e in ("mqtt_unreachable", "mqtt_refused") for e, _ in events_of(caplog))


def test_missing_tls_files_are_a_config_error_naming_the_key(tmp_path: Path, pki: Pki) -> None:
    config = MqttConfig(tls=TlsConfig(ca_file=tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match=r"mqtt\.tls\.ca_file .*nope\.pem does not exist"):
        MqttPublisher(config, "cam1").start()
    config = MqttConfig(tls=TlsConfig(ca_file=pki.ca_cert, key_file=pki.client_key))
    with pytest.raises(ConfigError, match=r"key_file is set but mqtt\.tls\.cert_file is not"):
        MqttPublisher(config, "cam1").start()
