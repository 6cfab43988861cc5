"""Reject relay configuration: errors name the key, per-camera timing resolves as documented, --check works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import ConfigError, load_settings
from edge_agent.relay.config import load_relay_settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "systemd" / "reject-relay.toml"
ACTUATOR = '[actuator]\nkind = "command"\ncommand = ["true", "{message_id}"]\n'

pytestmark = pytest.mark.usefixtures("clean_env")  # no EDGE_AGENT_* variables leak in


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'mqtt\.topic'"):
        load_relay_settings(write(tmp_path, '[mqtt]\ntopic = "uflow/+/inspection"\n' + ACTUATOR))
    with pytest.raises(ConfigError, match=r"unknown key 'devices\.cam1\.delay'"):
        load_relay_settings(write(tmp_path, "[devices.cam1]\ndelay = 1.0\n" + ACTUATOR))
    with pytest.raises(ConfigError, match=r"unknown key 'actuator\.comand'"):
        load_relay_settings(write(tmp_path, '[actuator]\nkind = "command"\ncomand = ["true"]\n'))


def test_unknown_environment_variable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, ACTUATOR)
    monkeypatch.setenv("EDGE_AGENT_RELAY_MQTT__HOTS", "broker")
    with pytest.raises(ConfigError, match=r"EDGE_AGENT_RELAY_MQTT__HOTS: unknown key 'mqtt\.hots'"):
        load_relay_settings(path)
    monkeypatch.delenv("EDGE_AGENT_RELAY_MQTT__HOTS")
    monkeypatch.setenv("EDGE_AGENT_RELAY_TIMNG__DELAY_S", "1")
    with pytest.raises(ConfigError, match=r"EDGE_AGENT_RELAY_TIMNG__DELAY_S: unknown key 'timng'"):
        load_relay_settings(path)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[mqtt]\nhost = "file"\n[timing]\ndelay_s = 1.0\n' + ACTUATOR)
    monkeypatch.setenv("EDGE_AGENT_RELAY_MQTT__HOST", "env-broker")
    monkeypatch.setenv("EDGE_AGENT_RELAY_DEVICES__CAM7__DELAY_S", "2.5")
    settings = load_relay_settings(path)
    assert settings.mqtt.host == "env-broker"
    timing = settings.timing_for("cam7")
    assert timing is not None and timing.travel_s == 2.5


def test_agent_and_relay_variables_share_a_prefix_without_tripping_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One shell or container may set both programs' variables; neither may call the other's a typo.
    monkeypatch.setenv("EDGE_AGENT_RELAY_MQTT__HOST", "relay-broker")
    monkeypatch.setenv("EDGE_AGENT_MQTT__HOST", "agent-broker")
    assert load_settings(None).mqtt.host == "agent-broker"
    assert load_relay_settings(write(tmp_path, ACTUATOR)).mqtt.host == "relay-broker"


def test_device_timing_resolves_over_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[timing]\nspeed_m_s = 0.5\ntolerance_s = 0.02\nclock_offset_s = 0.1\n"
        "[devices.cam1]\ndistance_m = 0.75\n"
        "[devices.cam2]\ndelay_s = 1.25\ntolerance_s = 0.2\n"
        "[devices.cam3]\ndistance_m = 2.0\nspeed_m_s = 1.0\nclock_offset_s = -0.5\n" + ACTUATOR,
    )
    settings = load_relay_settings(path)
    cam1, cam2, cam3 = (settings.timing_for(d) for d in ("cam1", "cam2", "cam3"))
    assert cam1 is not None and cam1.travel_s == pytest.approx(1.5) and cam1.tolerance_s == 0.02
    assert cam1.clock_offset_s == 0.1 and cam1.how == "0.75 m / 0.5 m/s"
    assert cam2 is not None and cam2.travel_s == 1.25 and cam2.tolerance_s == 0.2
    assert cam3 is not None and cam3.travel_s == 2.0 and cam3.clock_offset_s == -0.5
    # [timing] holds only the belt speed: a camera nobody listed has no travel time.
    assert settings.timing_for("cam9") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[devices.cam1]\ndelay_s = 1\ndistance_m = 2\n" + ACTUATOR, r"devices\.cam1.*either delay_s or distance_m"),
        ("[devices.cam1]\ndistance_m = 2\n" + ACTUATOR, r"devices\.cam1: speed_m_s is missing"),
        ("[devices.cam1]\ntolerance_s = 0.1\n" + ACTUATOR, r"devices\.cam1: no travel time"),
        ("[timing]\ndelay_s = -1\n" + ACTUATOR, r"timing\.delay_s"),
        ("[timing]\ndelay_s = 1\n", r"no actuator"),
        ('[timing]\ndelay_s = 1\n[actuator]\nkind = "http"\n', r"kind = 'http' needs 'url'"),
        ('[actuator]\nkind = "http"\nurl = "ftp://x"\n', r"url must start with http"),
        ('[actuator]\nkind = "mqtt"\ntopic = "plc/{line}"\n', r"unknown placeholder\(s\) \['line'\]"),
        ('[actuator]\nkind = "mqtt"\ntopic = "plc/+/{part_id}"\n', r"wildcard"),
        ('[actuator]\nkind = "command"\ncommand = ["echo", "{}"]\n', r"unknown placeholder\(s\) \['\{\}'\]"),
        ('[actuator]\nkind = "command"\ncommand = ["echo", "{oops"]\n', r"literal braces"),
        ('[actuator]\nkind = "command"\ncommand = ["true"]\nurl = "http://x"\n', r"'url' does not apply"),
        ('[mqtt]\ntopics = ["uflow/#/inspection"]\n' + ACTUATOR, r"not a valid MQTT topic filter"),
        ("[mqtt]\ntopics = []\n" + ACTUATOR, r"mqtt\.topics"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_relay_settings(write(tmp_path, text))


def test_example_config_loads() -> None:
    settings = load_relay_settings(EXAMPLE)
    assert settings.journal == Path("/var/lib/edge-reject-relay/relay.sqlite")
    assert settings.mqtt.session_expiry_s >= 600 and settings.mqtt.topics
    assert settings.actuator is not None
    for device_id in settings.devices:
        assert settings.timing_for(device_id) is not None


def test_check_prints_the_resolved_plan_and_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'cameras = ["cam1"]\n[timing]\ndelay_s = 0.8\n[devices.cam2]\ndistance_m = 1.2\nspeed_m_s = 0.4\n' + ACTUATOR,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    command = [sys.executable, "-m", "edge_agent.cli", "reject-relay", "--config", str(path)]
    result = subprocess.run([*command, "--check"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["devices"]["cam2"]["travel_s"] == pytest.approx(3.0)
    assert plan["devices"]["cam1"]["travel_s"] == 0.8
    assert sorted(plan["devices"]) == ["cam1", "cam2"]  # no "any other camera": those are never fired
    result = subprocess.run(
        [*command, "--set", "timing.delay_s=soon"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )
    assert result.returncode == 2 and "timing.delay_s" in result.stderr


def test_a_relay_with_no_camera_does_not_start(tmp_path: Path) -> None:
    """Issue 24, finding 6: the relay acts only for the cameras it knows; with none it would fire for nobody."""
    path = write(tmp_path, "[timing]\ndelay_s = 0.8\n" + ACTUATOR)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    command = [sys.executable, "-m", "edge_agent.cli", "reject-relay", "--config", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 2 and "cameras" in result.stderr
    with pytest.raises(ConfigError, match="start with a letter or digit"):
        load_relay_settings(write(tmp_path, 'cameras = [".."]\n' + ACTUATOR))
