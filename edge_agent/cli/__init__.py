"""``edge-agent``: the device's command line. Works without torch.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
only the chosen one is imported, so start-up stays fast and light.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edge_agent.cli.common import (
    EXIT_CONFIG,
    CommandTable,
    build_command_parser,
    parse_command,
    run_quietly_on_broken_pipe,
)

# name -> (module, one-line help). Add a command by adding a line.
COMMANDS: CommandTable = {
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
    "record": (
        "edge_agent.cli.record",
        "record good images for training from the configured camera (near-duplicates skipped)",
    ),
    "review": (
        "edge_agent.cli.review",
        "kept frames: list, mark good / confirmed defect, export a split.json for uflow train and evaluate",
    ),
    "recipe": (
        "edge_agent.cli.recipe",
        "list this box's recipes, or switch the running agent to one (cmd/recipe; docs/recipes.md)",
    ),
    "plc": ("edge_agent.cli.plc", "the OPC UA server's certificate and users (the PLC interface, docs/plc.md)"),
    "reject-relay": (
        "edge_agent.cli.reject_relay",
        "fire a reject actuator for anomalous parts at the right moment (subscribes to the cameras' inspections)",
    ),
}


DESCRIPTION = "U-Flow edge inspection agent"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; with ``command``, that subcommand's arguments are filled in."""
    return build_command_parser("edge-agent", DESCRIPTION, COMMANDS, command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-agent`` console script."""
    parsed = parse_command("edge-agent", DESCRIPTION, COMMANDS, sys.argv[1:] if argv is None else argv)
    if parsed is None:
        return EXIT_CONFIG
    args, module = parsed
    return run_quietly_on_broken_pipe(lambda: int(module.run(args) or 0))
