"""``edge-agent fleet-publish``: put a signed bundle into a fleet directory and roll it out to groups.

The fleet directory is what devices read (``update.source``): serve it over HTTPS or share it as a
directory. Publishing to ``canary`` first and later to ``default`` is a staged rollout; ``*`` is every
group without an entry of its own. ``--recipe NAME`` rolls a version out to one recipe of the groups' boxes
with ``[[recipes]]`` (docs/recipes.md).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from edge_agent.bundle import BundleError
from edge_agent.cli.common import EXIT_FAILURE, EXIT_OK
from edge_agent.config_recipes import RECIPE_NAME_PATTERN
from edge_agent.fleet.index import DEFAULT_VALID_DAYS, LATEST_NAME, FleetError, ShadowGate
from edge_agent.fleet.models_dir import ModelsDirError
from edge_agent.fleet.publish import publish
from edge_agent.fleet.signing import SigningError, sign_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent fleet-publish``."""
    parser.add_argument("--bundle", type=Path, required=True, help="signed bundle directory (uflow export --sign)")
    parser.add_argument("--fleet", type=Path, required=True, help="fleet directory holding latest.json and bundles/")
    parser.add_argument(
        "--group",
        dest="groups",
        action="append",
        default=[],
        metavar="GROUP",
        help="rollout group to point at this version (repeatable; '*' = every group without its own entry); "
        "without --group the bundle is only added, not rolled out",
    )
    parser.add_argument(
        "--recipe",
        default=None,
        metavar="NAME",
        help="roll the version out to this recipe of the --group devices only (boxes with [[recipes]]; "
        "docs/recipes.md), not as the groups' bundle",
    )
    parser.add_argument(
        "--base-url", default="", help="absolute URL prefix for the tar (default: relative to latest.json)"
    )
    parser.add_argument(
        "--public-key", type=Path, default=None, help="check the signature against this fleet key first"
    )
    parser.add_argument(
        "--sign",
        type=Path,
        default=None,
        metavar="KEY_FILE",
        help="(re)sign the bundle with this fleet private key first, e.g. after `uflow calibrate` changed model.json; "
        "also signs latest.json",
    )
    parser.add_argument(
        "--index-key",
        type=Path,
        default=None,
        metavar="KEY_FILE",
        help="fleet private key that signs latest.json (default: the --sign key); devices refuse an unsigned index",
    )
    parser.add_argument(
        "--valid-days",
        type=float,
        default=DEFAULT_VALID_DAYS,
        help=f"devices refuse latest.json this many days after publishing (default {DEFAULT_VALID_DAYS:g}); "
        "publish again before then",
    )
    parser.add_argument(
        "--shadow-hours",
        type=float,
        default=None,
        metavar="H",
        help="the --group devices install this version only after it ran as their [model] shadow for H hours "
        "(docs/operations.md); 0 removes the groups' requirement",
    )
    parser.add_argument(
        "--shadow-agreement",
        type=float,
        default=0.99,
        metavar="SHARE",
        help="with --shadow-hours: the share of compared frames with the live model's verdict (default 0.99)",
    )
    parser.add_argument(
        "--shadow-min-frames",
        type=int,
        default=1000,
        metavar="N",
        help="with --shadow-hours: the frames the shadow must have compared (default 1000)",
    )


def run(args: argparse.Namespace) -> int:
    """Publish; print the release entry. 1 when the bundle is unsigned, invalid or clashes with a published one."""
    index_key = args.index_key or args.sign
    if index_key is None:
        print(
            "edge-agent fleet-publish: latest.json must be signed: pass --index-key KEY (or --sign KEY)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if not args.valid_days > 0:
        print("edge-agent fleet-publish: --valid-days must be positive", file=sys.stderr)
        return EXIT_FAILURE
    if args.recipe is not None and (
        not re.fullmatch(RECIPE_NAME_PATTERN, args.recipe) or args.shadow_hours is not None
    ):
        print(
            "edge-agent fleet-publish: --recipe takes a recipe name (letters, digits, . _ -), without --shadow-hours "
            "(the shadow gate is the groups' bundle's)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    gate = None
    if args.shadow_hours is not None:
        if args.shadow_hours < 0 or not 0 <= args.shadow_agreement <= 1 or args.shadow_min_frames < 1:
            print(
                "edge-agent fleet-publish: --shadow-hours >= 0, --shadow-agreement in [0, 1], --shadow-min-frames >= 1",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        gate = (
            ShadowGate(
                hours=args.shadow_hours, min_agreement=args.shadow_agreement, min_compared=args.shadow_min_frames
            )
            if args.shadow_hours
            else None
        )
    try:
        if args.sign is not None:
            sign_bundle(args.bundle, args.sign)
        release, tar_path = publish(
            args.bundle,
            args.fleet,
            args.groups,
            args.base_url,
            args.public_key,
            index_key,
            args.valid_days,
            gate,
            clear_shadow_gate=args.shadow_hours == 0,
            recipe=args.recipe,
        )
    except (FleetError, BundleError, SigningError, ModelsDirError, OSError) as exc:
        print(f"edge-agent fleet-publish: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"published {release.name} {release.version}: {tar_path} ({release.size} bytes, sha256 {release.sha256})")
    groups = ", ".join(args.groups) if args.groups else "no group (use --group to roll it out)"
    what = f" (recipe {args.recipe})" if args.recipe else ""
    print(f"{args.fleet / LATEST_NAME}: {groups}{what} -> {release.version}")
    return EXIT_OK
