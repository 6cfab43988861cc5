"""``edge-agent``: the device's command line. Works without torch.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
only the chosen one is imported, so start-up stays fast and light.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from edge_agent.cli.common import EXIT_CONFIG

# name -> (module, one-line help). Add a command by adding a line.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("edge_agent.cli.run", "run the agent: camera -> model -> NFA -> MQTT, until stopped"),
    "segment": ("edge_agent.cli.segment", "score and segment image files offline (JSON, maps, overlays)"),
    "demo": (
        "edge_agent.cli.demo",
        "train a small model, make a conveyor video and run the agent on it with a local broker",
    ),
    "update": (
        "edge_agent.cli.update",
        "install the fleet's signed model for this device, with self-test and rollback",
    ),
    "keygen": ("edge_agent.cli.keygen", "make the fleet's ed25519 signing key pair"),
    "fleet-publish": (
        "edge_agent.cli.fleet_publish",
        "add a signed bundle to a fleet directory and roll it out to groups",
    ),
    "config": ("edge_agent.cli.config", "check a config file, show the effective settings, or print the reference"),
    "doctor": ("edge_agent.cli.doctor", "check this box: libraries, config, bundle, engine, NFA JIT, camera, broker"),
    "build-engine": ("edge_agent.cli.build_engine", "compile the bundle to a TensorRT plan for this GPU (cached)"),
    "reject-relay": (
        "edge_agent.cli.reject_relay",
        "fire a reject actuator for anomalous parts at the right moment (subscribes to the cameras' inspections)",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; with ``command``, that subcommand's arguments are filled in."""
    parser = argparse.ArgumentParser(prog="edge-agent", description="U-Flow edge inspection agent")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(child)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-agent`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)
