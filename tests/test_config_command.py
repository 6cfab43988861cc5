"""edge-agent config: the reference matches docs/configuration.md; check and show on real files."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from edge_agent.cli.config import reference_markdown
from edge_agent.config import AgentSettings
from edge_agent.exit_codes import EXIT_BROKEN_PIPE
from edge_agent.relay.config import RelaySettings

REPO = Path(__file__).resolve().parents[1]


def _config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "config", *args], capture_output=True, text=True, timeout=60
    )


def test_docs_configuration_is_the_generated_reference() -> None:
    expected = reference_markdown()
    actual = (REPO / "docs" / "configuration.md").read_text()
    assert actual == expected, "docs/configuration.md is stale: edge-agent config --reference > docs/configuration.md"


def test_reference_lists_every_key_of_every_section() -> None:
    text = reference_markdown()
    for name, field in AgentSettings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            assert f"## [{name}]" in text
            for key, sub in annotation.model_fields.items():
                nested = f"## [{name}.{key}]" in text and sub.annotation is not None
                assert f"| `{key}` |" in text or nested, f"{name}.{key} missing from the reference"
        elif typing.get_origin(annotation) is list and _is_model(typing.get_args(annotation)[0]):
            assert f"## [[{name}]]" in text  # an array of tables ([[recipes]])
        else:
            assert f"| `{name}` |" in text


def _is_model(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def leaf_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, description) of every key that is not a section, sections (and dicts of them) walked."""
    for name, field in model.model_fields.items():
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        candidates += [arg for c in candidates for arg in typing.get_args(c)]  # dict[str, DeviceConfig]
        section = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if section is None:
            yield prefix + name, (field.description or "").strip()
        else:
            yield from leaf_fields(section, f"{prefix}{name}.")


@pytest.mark.parametrize("settings", [AgentSettings, RelaySettings], ids=["agent", "relay"])
def test_every_key_says_what_it_means(settings: type[BaseModel]) -> None:
    # The reference's "meaning" column is the field's description: an empty one is a key nobody can set well.
    empty = [key for key, description in leaf_fields(settings) if not description]
    assert not empty, f"give these fields a Field(description=...) in {settings.__module__}: {empty}"


def test_the_reference_has_no_empty_meaning() -> None:
    rows = [line for line in reference_markdown().splitlines() if line.startswith("| `")]
    assert rows
    empty = [row for row in rows if row.rstrip().endswith("|  |")]
    assert not empty, "\n".join(empty)


def test_the_reference_speaks_plainly() -> None:
    # issue 21: raw typing.Literal[...] types and "(computed)" defaults in the reference
    text = reference_markdown()
    assert "typing." not in text and "(computed)" not in text
    row = next(line for line in text.splitlines() if line.startswith("| `triggers` |"))
    assert '"mqtt"' in row and '`["mqtt", "http"]`' in row


def test_check_accepts_a_valid_file_and_names_a_bad_key(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('device_id = "line3-cam1"\n[mqtt]\nhost = "broker.plant"\nport = 8883\n')
    ok = _config("--config", str(good))
    assert ok.returncode == 0 and "valid" in ok.stdout
    shown = _config("--config", str(good), "--show")
    settings = json.loads(shown.stdout)
    assert settings["mqtt"]["host"] == "broker.plant" and settings["mqtt"]["port"] == 8883
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nport = 'eighty'\n")
    refused = _config("--config", str(bad))
    assert refused.returncode == 2 and "mqtt.port" in refused.stdout


def test_check_names_files_the_config_sets_that_do_not_exist(tmp_path: Path) -> None:
    # issue 21: "valid" for a bundle path that does not exist, or a missing fleet key, that `run` then fails on
    bundle = tmp_path / "bundle"
    key = tmp_path / "fleet.pub"
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "cam1"\n[model]\nbundle = "{bundle}"\n[update]\npublic_key = "{key}"\n')
    refused = _config("--config", str(config))
    assert refused.returncode == 2
    assert f"model.bundle = {bundle}" in refused.stdout and f"update.public_key = {key}" in refused.stdout
    bundle.mkdir()
    key.write_text("key")
    accepted = _config("--config", str(config))
    assert accepted.returncode == 0 and "valid" in accepted.stdout


@pytest.mark.parametrize(
    "command", [["edge_agent.cli", "config", "--show"], ["edge_agent.cli", "config", "--reference"]]
)
def test_a_reader_that_closes_the_pipe_gets_no_traceback(command: list[str]) -> None:
    # issue 21: `edge-agent config --show | head` printed a BrokenPipeError traceback. The read end is
    # closed before the command writes anything, so every write meets a broken pipe.
    proc = subprocess.Popen(
        [sys.executable, "-m", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err
    assert code == EXIT_BROKEN_PIPE
