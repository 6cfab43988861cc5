"""``edge-agent recipe``: list this box's recipes, or switch the running agent to one (docs/recipes.md).

A switch is the ``cmd/recipe`` command sent over the box's broker, the way any operator's tool would send
it: the command is validated and answered by the agent, and this waits for the answer. With the shipped
broker ACL only the operator may publish commands, so name that user (``--username operator``) and give
its password on standard input (``--password-stdin``); by default the config's own user and password
are used (a broker without an ACL, a bench).

Exit status: 0 when the agent switched (or already ran that recipe), 1 when it refused or did not answer
in time, 2 for a configuration or argument error.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import uuid
from typing import Any

from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, add_config_arguments, parse_overrides
from edge_agent.config import AgentSettings, ConfigError, load_settings
from edge_agent.messages import CommandResult, PayloadError, RecipeCommand, parse_json_object, topic

MAX_ANSWER_BYTES = 64 * 1024  # a command result is a short message and a little data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent recipe``."""
    add_config_arguments(parser, "agent", "EDGE_AGENT_", "mqtt.host=broker")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", default=None, help="switch to the recipe with this name")
    which.add_argument("--index", type=int, default=None, help="switch to the recipe at this index (from 0)")
    which.add_argument("--list", action="store_true", help="list the configured recipes (no broker needed)")
    parser.add_argument("--username", default=None, help="broker user to send as (default: mqtt.username)")
    parser.add_argument(
        "--password-stdin", action="store_true", help="read that user's password from the first line of stdin"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="wait this long for the agent's answer (s)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edge-agent recipe``."""
    try:
        settings = load_settings(args.config, **parse_overrides(args.overrides))
        if args.list:
            return list_recipes(settings)
        command = RecipeCommand(name=args.name, index=args.index, request_id=uuid.uuid4().hex)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    try:
        result = send_recipe_command(settings, command, args.username, password, args.timeout)
    except (ConfigError, OSError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(result.model_dump(mode="json")))
    return EXIT_OK if result.ok else EXIT_FAILURE


def list_recipes(settings: AgentSettings) -> int:
    """One line per recipe: index, name, bundle, and which one the agent starts with."""
    if not settings.recipes:
        print(f"no [[recipes]]: this box runs its one bundle, {settings.bundle_dir}")
        return EXIT_OK
    first = settings.recipe or settings.recipes[0].name
    for index, recipe in enumerate(settings.recipes):
        mark = " (at start)" if recipe.name == first else ""
        print(f"{index}\t{recipe.name}\t{recipe.bundle}{mark}")
    return EXIT_OK


def send_recipe_command(
    settings: AgentSettings, command: RecipeCommand, username: str | None, password: str | None, timeout_s: float
) -> CommandResult:
    """Publish ``command`` on the box's ``cmd/recipe`` and return the agent's answer to it (TimeoutError if none)."""
    from paho.mqtt.enums import MQTTProtocolVersion
    from pydantic import SecretStr

    from edge_agent.publish.client import describe_connect_error, new_client, reason_code

    mqtt = settings.mqtt
    changes: dict[str, Any] = {}
    if username is not None:
        changes["username"] = username
    if password is not None:
        changes["password"] = SecretStr(password)
    config = mqtt.model_copy(update=changes)
    base = topic(mqtt.prefix, settings.device_id, "cmd/recipe")
    answer: list[CommandResult] = []
    subscribed, answered = threading.Event(), threading.Event()
    client = new_client(config, f"edge-agent-recipe-{uuid.uuid4().hex[:8]}", MQTTProtocolVersion.MQTTv311)

    def on_connect(client: Any, userdata: object, flags: object, reason: object, properties: object) -> None:
        if reason_code(reason) == 0:
            client.subscribe(base + "/result", qos=1)

    def on_message(client: Any, userdata: object, message: Any) -> None:
        try:
            result = CommandResult.model_validate(parse_json_object(message.payload, MAX_ANSWER_BYTES))
        except (PayloadError, ValueError):
            return  # not an answer this tool can read: someone else's
        if result.request_id == command.request_id:
            answer.append(result)
            answered.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_message
    try:
        client.connect(config.host, config.port, keepalive=30)
    except OSError as exc:
        raise OSError(describe_connect_error(exc, config)) from exc
    client.loop_start()
    try:
        if not subscribed.wait(timeout_s):
            raise TimeoutError(f"could not subscribe to {base}/result on {config.host}:{config.port} in {timeout_s} s")
        client.publish(base, command.model_dump_json(exclude_none=True), qos=1).wait_for_publish(timeout_s)
        if not answered.wait(timeout_s):
            raise TimeoutError(
                f"no answer on {base}/result within {timeout_s} s: is the agent running, and may "
                f"{config.username or 'this client'} publish {base} (the broker ACL: only the operator may)?"
            )
    finally:
        client.loop_stop()
        client.disconnect()
    return answer[0]
