"""Configuration errors name the key and the problem; overrides and defaults behave as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.cli.common import parse_overrides
from edge_agent.config import ConfigError, load_settings

pytestmark = pytest.mark.usefixtures("clean_env")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt]\nhost = "broker"\nprot = 1884\n')
    with pytest.raises(ConfigError, match=r"unknown key 'mqtt\.prot'"):
        load_settings(path)


def test_unknown_top_level_key_in_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, 'devise_id = "cam1"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'devise_id'"):
        load_settings(path)


def test_wrong_type_names_key_but_not_value(tmp_path: Path) -> None:
    # The value is not echoed: it may be a password or a URI with credentials (docs/security.md).
    path = write(tmp_path, '[mqtt]\nport = "eighteen"\n')
    with pytest.raises(ConfigError, match=r"mqtt\.port: .*integer") as caught:
        load_settings(path)
    assert "eighteen" not in str(caught.value)


def test_out_of_range_value_names_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[source]\nrotate = 45\n")
    with pytest.raises(ConfigError, match=r"source\.rotate"):
        load_settings(path)


def test_unknown_env_section_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_MQQT__HOST", "broker")
    with pytest.raises(ConfigError, match=r"EDGE_AGENT_MQQT__HOST: unknown key 'mqqt'"):
        load_settings(None)


def test_unknown_env_field_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_MQTT__HOTS", "broker")
    with pytest.raises(ConfigError, match=r"EDGE_AGENT_MQTT__HOTS: unknown key 'mqtt\.hots'"):
        load_settings(None)


def test_env_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[mqtt]\nhost = "file-broker"\nport = 1884\n')
    monkeypatch.setenv("EDGE_AGENT_MQTT__HOST", "env-broker")
    settings = load_settings(path)
    assert settings.mqtt.host == "env-broker"
    assert settings.mqtt.port == 1884


def test_bad_toml_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt\nport = 1\n")
    with pytest.raises(ConfigError, match=r"agent\.toml is not valid TOML"):
        load_settings(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_state_paths_default_under_state_dir(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, f'state_dir = "{tmp_path}"\n'))
    assert settings.model.bundle == tmp_path / "models" / "current"
    assert settings.spool.path == tmp_path / "spool.sqlite"


def test_set_overrides_parse_json_and_nest() -> None:
    overrides = parse_overrides(
        ["mqtt.port=1884", "source.roi=[1,2,3,4]", "source.uri=line 1.mp4", "nfa.log10_epsilon=-2"]
    )
    assert overrides == {
        "mqtt": {"port": 1884},
        "source": {"roi": [1, 2, 3, 4], "uri": "line 1.mp4"},
        "nfa": {"log10_epsilon": -2},
    }


def test_set_override_applies_and_unknown_override_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nport = 1884\n")
    assert load_settings(path, **parse_overrides(["mqtt.port=1999"])).mqtt.port == 1999
    with pytest.raises(ConfigError, match=r"unknown key 'mqtt\.porrt'"):
        load_settings(path, **parse_overrides(["mqtt.porrt=1999"]))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["mqtt.port"])


def test_run_command_reports_config_error_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, '[source]\nuri = "0"\nfsp_limit = 5\n')
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown key 'source.fsp_limit'" in result.stderr
