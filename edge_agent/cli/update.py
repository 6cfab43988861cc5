"""``edge-agent update``: install the fleet's signed model for this device (``edge_agent.fleet.update``
does the work: fetch, verify, self-test, switch, health check, rollback); with ``[[recipes]]`` every recipe's,
one by one."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_LOCKED, EXIT_OK
from edge_agent.config import ConfigError, load_settings
from edge_agent.fleet.update import UpdateResult, apply_recipe_updates, apply_update

log = logging.getLogger("edge_agent.fleet.update")  # the updater's events, one logger


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent update``."""
    parser.add_argument(
        "--config", type=Path, default=None, help="agent TOML file (EDGE_AGENT_* variables override it)"
    )
    parser.add_argument(
        "--source", default=None, help="fleet source: https URL or directory with latest.json (default update.source)"
    )
    parser.add_argument("--group", default=None, help="rollout group (default update.group)")
    parser.add_argument("--force", action="store_true", help="retry a version that failed on this device before")
    parser.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="accept a release older than the current model (never possible through cmd/update)",
    )
    parser.add_argument(
        "--no-reload",
        dest="reload",
        action="store_false",
        help="switch models/current without asking the running agent (first install, agent stopped)",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edge-agent update``; exit 0 done or nothing to do, 1 failed, 2 config, 75 locked."""
    from edge_agent.logs import setup_logging

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        setup_logging()
        log.error("%s", exc, extra={"event": "config_error"})
        return EXIT_CONFIG
    setup_logging(settings.log_level, settings.log_format)
    options = {"source": args.source, "group": args.group, "force": args.force, "reload": args.reload}
    try:
        if settings.recipes:  # each recipe on its own, one by one (docs/recipes.md)
            results = apply_recipe_updates(settings, allow_downgrade=args.allow_downgrade, **options)
            return max(_exit_status(result) for _, result in results)
        result = apply_update(settings, allow_downgrade=args.allow_downgrade, **options)
    except ConfigError as exc:
        log.error("%s", exc, extra={"event": "config_error"})
        return EXIT_CONFIG
    log.info(
        "update finished: %s",
        result.status,
        extra={
            "event": "update_finished",
            "status": result.status,
            "version": result.version,
            "previous": result.previous,
            "step": result.step,
            "detail": result.message,
        },
    )
    return _exit_status(result)


def _exit_status(result: UpdateResult) -> int:
    if result.status == "locked":
        return EXIT_LOCKED
    return EXIT_OK if result.ok else EXIT_FAILURE
