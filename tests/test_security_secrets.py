"""Secrets never leave the box in clear (issue 13): source credentials, the MQTT password, bad config values.

The agent runs against a real MJPEG camera on loopback (ffmpeg) reached through a URL with credentials,
a real mosquitto and real HTTP; every place the review found the password is read back.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from agent_harness import REPO, AgentThread, agent_config, http_get
from contract_bundle import build_contract_bundle
from mqtt_broker import MosquittoBroker, Subscriber, free_port
from stream_server import MjpegServer, camera_video, needs_ffmpeg

from edge_agent.config import ConfigError, load_settings
from edge_agent.redact import redact_uri

SECRET = "s3cretPW"


def test_redact_uri_covers_urls_and_pipeline_properties() -> None:
    assert redact_uri(f"rtsp://admin:{SECRET}@10.0.0.5:554/s1") == "rtsp://***@10.0.0.5:554/s1"
    assert SECRET not in redact_uri(f"rtspsrc location=rtsp://cam/s1 user-id=admin user-pw={SECRET} ! fakesink")
    assert SECRET not in redact_uri(f"http://cam/snap.jpg?user=admin&password={SECRET}")
    assert redact_uri("/dev/video0") == "/dev/video0" and redact_uri("rtsp://cam/s1") == "rtsp://cam/s1"


@needs_ffmpeg
@pytest.mark.slow
def test_source_credentials_appear_nowhere(
    tmp_path: Path,
    broker: MosquittoBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    bundle = build_contract_bundle(tmp_path / "bundle", version="1.0.0")
    camera = MjpegServer(camera_video(tmp_path / "cam.mp4", frames=50)).start()
    uri = camera.url.replace("http://", f"http://viewer:{SECRET}@")
    http_port = free_port()
    values = agent_config(
        tmp_path / "state",
        bundle,
        uri,
        broker.port,
        http_port,
        source={"open_timeout_s": 20.0, "read_timeout_s": 3.0, "stall_timeout_s": 4.0, "reconnect_max_s": 1.0},
        http={"preview": True},
    )
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    try:
        assert subscriber.wait_for(lambda ms: sum(m.topic.endswith("/inspection") for m in ms) >= 3, 90)
        inspection = subscriber.on("/inspection")[0].json()
        assert inspection["source"] == camera.url.replace("http://", "http://***@")
        bodies = [http_get(http_port, path)[2] for path in ("/healthz", "/preview.json", "/metrics")]
        camera.kill()  # the source fails: its error names the URL, now on /healthz and in stats
        assert subscriber.wait_for(
            lambda ms: any(m.topic.endswith("/stats") and m.json()["source_error"] for m in ms), 60
        )
        bodies += [http_get(http_port, "/healthz")[2], http_get(http_port, "/preview.json")[2]]
        assert any("***@" in body for body in bodies)  # the URL is still reported, without credentials
    finally:
        assert agent.stop() == 0
        camera.kill()
        subscriber.close()
    everything = [m.payload.decode("utf-8", "replace") for m in subscriber.messages] + bodies
    everything += [record.getMessage() + json.dumps(record.__dict__, default=str) for record in caplog.records]
    # The spool file's raw bytes, free pages and WAL included (acknowledged rows are deleted, not wiped).
    everything += [path.read_bytes().decode("latin-1") for path in (tmp_path / "state").glob("spool.sqlite*")]
    leaks = [text[:200] for text in everything if SECRET in text]
    assert leaks == []


def test_config_show_never_prints_the_mqtt_password(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "cam1"\n[mqtt]\nusername = "cam1"\npassword = "{SECRET}"\n')
    shown = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "config", "--config", str(config), "--show"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert shown.returncode == 0, shown.stderr
    assert SECRET not in shown.stdout + shown.stderr
    assert json.loads(shown.stdout)["mqtt"]["password"] == "**********"
    # The agent still uses the real value.
    assert load_settings(config).mqtt.password.get_secret_value() == SECRET  # type: ignore[union-attr]


def test_validation_errors_name_the_key_never_the_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[mqtt]\nport = "{SECRET}"\n[source]\nfps_limit = "{SECRET}"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "mqtt.port" in str(caught.value) and "source.fps_limit" in str(caught.value)
    assert SECRET not in str(caught.value)
    monkeypatch.setenv("EDGE_AGENT_MQTT__KEEPALIVE_S", SECRET)
    with pytest.raises(ConfigError) as caught:
        load_settings(None)
    assert "mqtt.keepalive_s" in str(caught.value) and SECRET not in str(caught.value)


def test_relay_password_is_a_secret(tmp_path: Path) -> None:
    from relay_helpers import relay_toml

    from edge_agent.relay.config import load_relay_settings

    config = relay_toml(tmp_path / "r.toml", 1883, tmp_path, 'kind = "http"\nurl = "http://127.0.0.1:9/"')
    config.write_text(config.read_text().replace("[mqtt]\n", f'[mqtt]\nusername = "relay"\npassword = "{SECRET}"\n'))
    settings = load_relay_settings(config)
    assert SECRET not in settings.model_dump_json() and SECRET not in repr(settings)
    checked = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "reject-relay", "--config", str(config), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ},
    )
    assert checked.returncode == 0 and SECRET not in checked.stdout + checked.stderr


def test_fleet_credentials_stay_out_of_update_events_and_logs(
    tmp_path: Path,
    broker: MosquittoBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from edge_agent.fleet.signing import generate_keypair
    from edge_agent.fleet.update import apply_update

    caplog.set_level(logging.DEBUG)
    keys = generate_keypair(tmp_path / "keys")
    events = Subscriber(broker, "uflow/cam1/update")
    try:
        # The fleet URL carries credentials and cannot be fetched: every step message names the URL.
        source = f"http://fleet:{SECRET}@127.0.0.1:{free_port()}/fleet/"
        settings = load_settings(
            None,
            device_id="cam1",
            state_dir=str(tmp_path / "state"),
            mqtt={"host": broker.host, "port": broker.port},
            update={"source": source, "public_key": str(keys.public_key)},
        )
        assert apply_update(settings, reload=False).status == "failed"
        assert events.wait_for(lambda ms: any(not m.json()["ok"] for m in ms), 20)
    finally:
        events.close()
    texts = [m.payload.decode() for m in events.messages]
    assert any("http://***@127.0.0.1" in text for text in texts)  # still says where, without the credentials
    texts += [record.getMessage() + json.dumps(record.__dict__, default=str) for record in caplog.records]
    assert [text[:200] for text in texts if SECRET in text] == []
