"""``edge-agent keygen``: make the fleet's ed25519 key pair.

The private key (``fleet.key``, mode 0600) stays with whoever exports models (``uflow export --sign``);
the public key (``fleet.pub``) goes to every device as ``update.public_key``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_agent.cli.common import EXIT_FAILURE, EXIT_OK
from edge_agent.fleet.signing import SigningError, generate_keypair


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent keygen``."""
    parser.add_argument("--out", type=Path, required=True, help="directory for <name>.key and <name>.pub")
    parser.add_argument("--name", default="fleet", help="file name stem (default: fleet)")
    parser.add_argument("--force", action="store_true", help="replace an existing key pair")


def run(args: argparse.Namespace) -> int:
    """Write the key pair and say where it went; 1 when it would overwrite a key."""
    try:
        pair = generate_keypair(args.out, args.name, overwrite=args.force)
    except (SigningError, OSError) as exc:
        print(f"edge-agent keygen: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"private key: {pair.private_key} (mode 0600; keep it off the devices, sign with `uflow export --sign`)")
    print(f"public key:  {pair.public_key} (copy to each device, set update.public_key)")
    print(f"fingerprint: {pair.fingerprint}")
    return EXIT_OK
