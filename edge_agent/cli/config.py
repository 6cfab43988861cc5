"""``edge-agent config``: check a config file, show the settings the agent would use, or print the reference.

The reference (docs/configuration.md) is generated from the pydantic models, so it cannot drift from
what the agent actually accepts.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from edge_agent.cli.common import EXIT_CONFIG, EXIT_OK
from edge_agent.config import ENV_PREFIX, AgentSettings, ConfigError, load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent config``."""
    parser.add_argument("--config", type=Path, default=None, help="agent TOML file to check")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--reference", action="store_true", help="print every key, its default and meaning (Markdown)")
    mode.add_argument(
        "--show", action="store_true", help="print the effective settings as JSON (passwords as **********)"
    )
    mode.add_argument(
        "--ip-allow",
        action="store_true",
        help="print a systemd drop-in allowing only the addresses this config talks to (broker, fleet, camera)",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edge-agent config``: exit 0 when the configuration is valid, 2 when not."""
    if args.reference:
        print(reference_markdown(), end="")
        return EXIT_OK
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}")
        return EXIT_CONFIG
    if args.show:
        print(settings.model_dump_json(indent=2))
    elif args.ip_allow:
        try:
            print(ip_allow_dropin(settings, str(args.config or "defaults + environment")), end="")
        except ConfigError as exc:
            print(f"error: {exc}")
            return EXIT_CONFIG
    else:
        where = args.config or "defaults + environment"
        missing = missing_files(settings)
        if missing:
            for key, path in missing:
                print(f"error: {key} = {path} does not exist (`edge-agent run` would stop on it)")
            return EXIT_CONFIG
        if settings.recipes:
            names = ", ".join(r.name for r in settings.recipes)
            print(f"{where}: valid (device_id={settings.device_id}, recipes {names})")
            return EXIT_OK
        print(f"{where}: valid (device_id={settings.device_id}, bundle={settings.bundle_dir})")
        if not settings.bundle_dir.exists():
            print(
                f"note: no model is installed at {settings.bundle_dir} yet: `run` needs one (a fleet update installs it)"
            )
    return EXIT_OK


def missing_files(settings: AgentSettings) -> list[tuple[str, Path]]:
    """(key, path) of every file or folder the config names explicitly that does not exist.

    Only explicit settings: a default location (the installed model, the state dir) may legitimately
    be empty before the first update, and the check is run before installing too.
    """
    default_bundle = settings.state_dir / "models" / "current"  # filled in by the settings when unset
    named: list[tuple[str, Path | None]] = [
        ("model.bundle", None if settings.model.bundle == default_bundle else settings.model.bundle),
        ("model.shadow", settings.model.shadow),
        ("update.public_key", settings.update.public_key),
        ("update.ca_file", settings.update.ca_file),
    ]
    if settings.mqtt.tls is not None:
        tls = settings.mqtt.tls
        named += [
            ("mqtt.tls.ca_file", tls.ca_file),
            ("mqtt.tls.cert_file", tls.cert_file),
            ("mqtt.tls.key_file", tls.key_file),
        ]
    for recipe in settings.recipes:  # its fleet location may be empty before the first update, as models/current
        if Path(recipe.bundle) != settings.state_dir / "recipes" / recipe.name / "current":
            named.append((f"recipes[{recipe.name}].bundle", recipe.bundle))
    source = settings.update.source
    if source and "://" not in source:
        named.append(("update.source", Path(source)))  # a directory holding latest.json
    return [(key, path) for key, path in named if path is not None and not path.exists()]


def ip_allow_dropin(settings: AgentSettings, where: str) -> str:
    """A drop-in for edge-agent.service: IPAddressAllow= reset to localhost plus the resolved hosts of
    mqtt.host, update.source and source.uri (those that are network addresses)."""
    import socket
    import urllib.parse

    hosts: dict[str, str] = {"mqtt.host": settings.mqtt.host}
    for key, value in (("update.source", settings.update.source or ""), ("source.uri", settings.source.uri)):
        host = urllib.parse.urlsplit(value).hostname if "://" in value else None
        if host:
            hosts[key] = host
    lines = [
        f"# Generated by `edge-agent config --ip-allow` from {where}; install as",
        "# /etc/systemd/system/edge-agent.service.d/ip-allow.conf (and edge-agent-update.service.d/), then",
        "# `systemctl daemon-reload`. Run it again when the broker, fleet or camera address changes.",
        "[Service]",
        "IPAddressAllow=",
        "IPAddressAllow=localhost",
    ]
    for key, host in hosts.items():
        try:
            addresses = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
        except OSError as exc:
            raise ConfigError(f"{key}: cannot resolve {host!r} ({exc.strerror or exc})") from exc
        lines.append(f"# {key} = {host}")
        lines.append("IPAddressAllow=" + " ".join(addresses))
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """The configuration reference: one table per section, generated from AgentSettings."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `edge-agent config --reference` from `edge_agent/config.py` (the agent) and",
        "`edge_agent/relay/config.py` ([the reject relay](#reject-relay-reference)); do not edit by hand.",
        "",
        f"Keys go in the TOML file given to `edge-agent run --config`, or in `{ENV_PREFIX}*` environment",
        f"variables, which win (`[mqtt] host` is `{ENV_PREFIX}MQTT__HOST`). Unknown keys are errors.",
        "",
    ]
    lines += _settings_tables(AgentSettings, "")
    lines += _relay_reference()
    return "\n".join(lines)


def _relay_reference() -> list[str]:
    """The reject relay's part of the reference, generated from RelaySettings."""
    from edge_agent.relay.config import ENV_PREFIX as RELAY_PREFIX
    from edge_agent.relay.config import RelaySettings

    lines = [
        "# Reject relay reference",
        "",
        "Generated from `edge_agent/relay/config.py`. Keys go in the TOML file given to `edge-agent reject-relay",
        f"--config`, or in `{RELAY_PREFIX}*` environment variables, which win (`[mqtt] host` is",
        f"`{RELAY_PREFIX}MQTT__HOST`). Unknown keys are errors. Every key with comments: `systemd/reject-relay.toml`;",
        "what the relay does with them: [reject_relay.md](reject_relay.md).",
        "",
    ]
    return lines + _settings_tables(RelaySettings, "relay ")


def _settings_tables(settings: type[BaseModel], label: str) -> list[str]:
    top_level = {n: f for n, f in settings.model_fields.items() if _section_model(f) is None}
    lines = _table(f"{label}top level".capitalize(), "", top_level)
    for name, field in settings.model_fields.items():
        model = _section_model(field)
        if model is not None:
            lines += _section(_keyed(name, field), model, label)
    return lines


def _keyed(name: str, field: FieldInfo) -> str:
    """A section's name; a table of tables (``devices: dict[str, DeviceConfig]``) is ``devices.<key>``, an array
    of tables (``recipes: list[RecipeConfig]``) ``[recipes]`` (its title: ``[[recipes]]``)."""
    origin = typing.get_origin(field.annotation)
    if origin is list:
        return f"[{name}]"
    return f"{name}.<device_id>" if origin is dict else name


def _section(prefix: str, model: type[BaseModel], label: str = "") -> list[str]:
    plain = {n: f for n, f in model.model_fields.items() if _section_model(f) is None}
    # A table under an array of tables is written [recipes.parts] (it belongs to the [[recipes]] entry above it).
    title = f"[{prefix[1:].replace(']', '', 1)}]" if prefix.startswith("[") and "]." in prefix else f"[{prefix}]"
    lines = _table(f"{label}{title}", model.__doc__ or "", plain)
    for name, field in model.model_fields.items():
        nested = _section_model(field)
        if nested is not None:
            lines += _section(f"{prefix}.{_keyed(name, field)}", nested, label)
    return lines


def _table(title: str, doc: str, fields: dict[str, FieldInfo]) -> list[str]:
    lines = [f"## {title}", ""]
    if doc.strip():
        lines += [" ".join(doc.split()), ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {meaning} |")
    return [*lines, ""]


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    """The nested model of a section field (``tls: TlsConfig | None`` counts), else None."""
    candidates = [field.annotation, *typing.get_args(field.annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_name(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is list:
        return "list of " + (_type_name(args[0]) if args else "values")
    if origin is dict:
        return "table of " + (_type_name(args[1]) if len(args) == 2 else "values")
    if annotation is type(None):
        return "none"
    if isinstance(annotation, type):
        return {"Path": "path", "str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if "doc_default" in extra:  # a default that depends on the machine (the host name)
            return str(extra["doc_default"])
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{json.dumps(value, default=str)}`"
    if field.default is None:
        return "unset"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{json.dumps(field.default, default=str)}`"
