"""Settings from a TOML file and the environment, for the agent (edge_agent/config.py) and the relay
(edge_agent/relay/config.py): the file is read, explicit overrides merged in, the environment wins, and every
problem is a ``ConfigError`` that names the key or the variable (never the bad value: it may be a secret).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - JetPack 6 ships Python 3.10
    import tomli as tomllib

S = TypeVar("S", bound=BaseSettings)


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the problem."""


class FileAndEnvSettings(BaseSettings):
    """Settings read from a TOML file (passed as init kwargs) that the environment overrides."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment overrides it (systemd drop-ins, containers).
        return (env_settings, init_settings)


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML config file; errors name the file and line."""
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def build_settings(
    settings_cls: type[S],
    path: Path | str | None,
    overrides: dict[str, Any] | None = None,
    ignore_env_prefixes: tuple[str, ...] = (),
) -> S:
    """``settings_cls`` from an optional TOML file, its environment variables and overrides (highest).

    Every problem is a ConfigError naming the key (or the environment variable) and what is wrong.
    Variables under ``ignore_env_prefixes`` belong to another program sharing the prefix.
    """
    values: dict[str, Any] = read_toml(Path(path)) if path is not None else {}
    deep_update(values, overrides or {})
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    where = f"config {path} or {prefix}* environment" if path is not None else f"{prefix}* environment"
    # First, so that a typo in a variable is reported with the variable's name.
    reject_unknown_env(os.environ, settings_cls, ignore_env_prefixes)
    try:
        return settings_cls(**values)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe_validation_error(exc)}") from exc


def deep_update(base: dict[str, Any], extra: dict[str, Any]) -> None:
    """Merge ``extra`` into ``base`` in place, table by table (``extra`` wins)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming every bad key: ``unknown key 'mqtt.prot'``, ``mqtt.port: <problem>``.

    The bad value itself is never echoed: it may be a password, or a URI with credentials, and this text
    goes to logs and to MQTT command replies. pydantic's message says what was expected; the key says where.
    """
    parts = []
    for err in exc.errors(include_input=False):
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}")
        else:
            parts.append(f"{key}: {err['msg']}")
    return "; ".join(parts)


def reject_unknown_env(
    environ: Mapping[str, str], settings_cls: type[BaseSettings], ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """pydantic-settings ignores prefixed variables that match no field; a typo there must fail too."""
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    fields = settings_cls.model_fields
    known = sorted(fields)
    for name in environ:
        if not name.startswith(prefix) or name.startswith(ignore_prefixes):
            continue
        rest = name[len(prefix) :]
        head, _, tail = rest.partition("__")
        if head.lower() not in fields:
            raise ConfigError(f"environment variable {name}: unknown key {head.lower()!r} (known: {known})")
        section = fields[head.lower()].annotation
        if tail and isinstance(section, type) and issubclass(section, BaseModel):
            field = tail.split("__", 1)[0].lower()
            if field not in section.model_fields:
                raise ConfigError(
                    f"environment variable {name}: unknown key '{head.lower()}.{field}' "
                    f"(known: {sorted(section.model_fields)})"
                )
