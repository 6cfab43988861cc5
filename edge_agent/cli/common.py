"""What the commands share: one command-line pattern, exit statuses, ``--set KEY=VALUE`` overrides, signals.

The pattern, for ``edge-agent`` (edge_agent/cli/__init__.py) and ``uflow`` (training/cli.py) alike: a table
``name -> (module, one-line help)``; each module exposes ``add_arguments(parser)`` and
``run(args) -> int``; ``parse_command`` imports only the chosen module, so ``--help`` and start-up stay
light. Command modules import shared things from here, never from another command, so no command depends
on another one (docs/design.md section 8).

Exit statuses are ``edge_agent.exit_codes`` (one spelling for every command, and for the agent's process).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from edge_agent.config import ConfigError
from edge_agent.exit_codes import (
    EXIT_BROKEN_PIPE,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_LOCKED,
    EXIT_NO_GPU,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_UNAVAILABLE,
)

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_LOCKED",
    "EXIT_NO_GPU",
    "EXIT_OK",
    "EXIT_STOPPED",
    "EXIT_UNAVAILABLE",
    "CommandTable",
    "add_config_arguments",
    "build_command_parser",
    "install_signal_handlers",
    "parse_command",
    "parse_overrides",
    "train_hint",
]

log = logging.getLogger(__name__)


CommandTable = dict[str, tuple[str, str]]  # name -> (module, one-line help)


def run_quietly_on_broken_pipe(run: Callable[[], int]) -> int:
    """``run()``, but a reader that closes stdout early (``edge-agent config --show | head``) ends the
    command with EXIT_BROKEN_PIPE instead of a BrokenPipeError traceback."""
    try:
        code = run()
        sys.stdout.flush()  # inside the try: the last buffered write is where a closed pipe shows
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit and would print the error then: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def build_command_parser(
    prog: str, description: str, commands: CommandTable, chosen: str | None = None
) -> argparse.ArgumentParser:
    """The top-level parser; the ``chosen`` command's module is imported and its arguments filled in."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in commands.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(child)
    return parser


def parse_command(
    prog: str, description: str, commands: CommandTable, argv: Sequence[str]
) -> tuple[argparse.Namespace, ModuleType] | None:
    """Parse ``argv`` for one of ``commands``: the arguments and the command's module, or None (help printed)
    when no command was named. Bad arguments exit with argparse's status 2 (EXIT_CONFIG)."""
    args_list = list(argv)
    chosen = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_command_parser(prog, description, commands, chosen if chosen in commands else None)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return None
    return args, importlib.import_module(commands[args.command][0])


def add_config_arguments(parser: argparse.ArgumentParser, what: str, env_prefix: str, example: str) -> None:
    """``--config FILE`` and repeatable ``--set KEY=VALUE`` (read back with ``parse_overrides(args.overrides)``)."""
    parser.add_argument(
        "--config", type=Path, default=None, help=f"{what} TOML file ({env_prefix}* variables override it)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one setting, e.g. --set mqtt.port=1884 --set {example} (values parse as JSON when they "
        "can: --set source.roi=[0,0,640,480])",
    )


def train_hint(data: Path) -> str:
    """The ``uflow train`` line that trains on ``data`` as written (record and review export print it)."""
    name = data.parent.name if data.name == "split.json" else data.name
    return f"uflow train --data {data} --out runs/{name or 'line'}"


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["mqtt.port=1884", ...]`` -> ``{"mqtt": {"port": 1884}}``; a malformed pair is a ConfigError."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. mqtt.port=1884")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return result


def install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM/SIGINT set ``stop``; returns a function restoring the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: object) -> None:
        log.info("signal received", extra={"event": "signal", "signal": signal.Signals(signum).name})
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
