"""``edge-agent review``: kept frames and the training folder from the command line (the page's twin).

- ``edge-agent review list``: the kept frames waiting for review, newest first;
- ``edge-agent review good ID...`` / ``edge-agent review defect ID...``: the page's two buttons (a defect
  keeps the model's mask: ``mask_source: model``; the page's mask editor corrects it);
- ``edge-agent review undo ID...``: take a decision back;
- ``edge-agent review export DIR``: ``DIR/split.json`` with the images beside it, for
  ``uflow train --data DIR/split.json --out RUN`` and ``uflow evaluate`` (edge_agent/service/review.py).

``--config``/``--set`` go before or after the action. Folders come from the config's ``[keep]`` (``dir``, ``training_dir``). Exit status: 0 done; 1 a frame or
image could not be used; 2 a configuration or argument error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edge_agent.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    add_config_arguments,
    parse_overrides,
    train_hint,
)
from edge_agent.config import ConfigError, load_settings
from edge_agent.service.disk_budget import training_budget
from edge_agent.service.review import EXPORT_VAL_FRACTION, ReviewError, ReviewStore, export_split


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent review``."""
    add_config_arguments(parser, "agent", "EDGE_AGENT_", "keep.training_dir=/data/line1")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    _config_after(actions.add_parser("list", help="kept frames waiting for review, newest first"))
    for name, text in (
        ("good", "mark kept frames as good (training images)"),
        ("defect", "confirm kept frames as defects (test examples with their masks)"),
        ("undo", "take back the decision on kept frames (the last 50 decisions can be)"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("ids", nargs="+", metavar="ID", help="kept frame ids (see review list)")
        _config_after(action)
    export = actions.add_parser("export", help="write DIR/split.json for uflow train / uflow evaluate")
    _config_after(export)
    export.add_argument("out", type=Path, metavar="DIR", help="output folder (created)")
    export.add_argument(
        "--val-fraction",
        type=float,
        default=EXPORT_VAL_FRACTION,
        help="good images held out for validation (they calibrate the NFA)",
    )
    export.add_argument("--test-fraction", type=float, default=0.1, help="good images held out as test_good")


def _config_after(action: argparse.ArgumentParser) -> None:
    """``--config``/``--set`` after the action too (``review export DIR --config agent.toml``, as the docs write it)."""
    action.add_argument("--config", dest="action_config", type=Path, default=None, help="agent TOML file")
    action.add_argument(
        "--set", dest="action_overrides", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edge-agent review``."""
    config = args.action_config or args.config
    try:
        settings = load_settings(config, **parse_overrides([*args.overrides, *args.action_overrides]))
    except ConfigError as exc:
        print(f"edge-agent review: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    keep = settings.keep
    assert keep.dir is not None and keep.training_dir is not None
    store = ReviewStore(keep.dir, keep.training_dir, training_budget(keep))
    try:
        if args.action == "list":
            for frame in store.frames(limit=10_000):
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(frame.capture_time))
                verdict = "ANOMALOUS" if frame.anomalous else "good"
                print(f"{frame.id}  {stamp}  {verdict}  score {frame.image_score:.3f}  {frame.regions} region(s)")
        elif args.action in ("good", "defect"):
            for frame_id in args.ids:
                moved = store.mark_good(frame_id) if args.action == "good" else store.confirm_defect(frame_id)
                print(f"{frame_id} -> {moved}")
        elif args.action == "undo":
            for frame_id in args.ids:
                print(f"{frame_id}: decision undone, back in {store.undo(frame_id)}")
        else:
            if not (0 <= args.val_fraction < 1 and 0 <= args.test_fraction < 1):
                print("edge-agent review export: fractions must be in [0, 1)", file=sys.stderr)
                return EXIT_CONFIG
            split = export_split(keep.training_dir, args.out, args.val_fraction, args.test_fraction)
            defects = sum(len(v) for v in split["test_defect"].values())
            print(
                f"{args.out / 'split.json'}: {len(split['train'])} train, {len(split['val'])} val, "
                f"{len(split['test_good'])} test good, {defects} test defect; "
                f"train with: {train_hint(args.out / 'split.json')}"
            )
    except (ReviewError, OSError) as exc:
        print(f"edge-agent review: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
