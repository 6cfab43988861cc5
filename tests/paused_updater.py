"""``edge-agent update`` that stops for good at one step: the crash tests' entry point (test_update.py).

    python tests/paused_updater.py STEP update --config agent.toml --no-reload

Sets ``edge_agent.fleet.update.on_checkpoint`` so that the updater, on reaching STEP, logs an ``update_paused``
event and sleeps until the test SIGKILLs it there; then runs the normal command line. The production
updater has no such hook switched on: this wrapper is the only thing that sets it.
"""

from __future__ import annotations

import logging
import sys
import time

from edge_agent import cli
from edge_agent.fleet import update

log = logging.getLogger("edge_agent.fleet.update")


def pause_at(step: str) -> None:
    """Install the checkpoint that blocks forever at ``step``."""

    def checkpoint(reached: str) -> None:
        if reached == step:
            log.warning("paused before %s", step, extra={"event": "update_paused", "step": step})
            while True:
                time.sleep(3600)

    update.on_checkpoint = checkpoint


if __name__ == "__main__":
    pause_at(sys.argv[1])
    sys.exit(cli.main(sys.argv[2:]))
