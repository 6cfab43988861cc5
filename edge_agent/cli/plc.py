"""``edge-agent plc``: the OPC UA server's certificate and users (docs/plc.md, "Security").

- ``edge-agent plc cert``: a new RSA-2048 key (0600) and self-signed certificate at ``plc.opcua_key`` /
  ``plc.opcua_cert`` (default <state_dir>/plc/); the PLC's engineering tool trusts that certificate;
- ``edge-agent plc passwd --user NAME``: add or replace a user in ``plc.opcua_users_file``; the password is
  read from stdin (one line) or asked for on a terminal, never taken from the command line.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, add_config_arguments, parse_overrides
from edge_agent.config import ConfigError, load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent plc``."""
    add_config_arguments(parser, "agent", "EDGE_AGENT_", "plc.opcua_host=192.168.0.10")
    sub = parser.add_subparsers(dest="action", required=True)
    cert = sub.add_parser("cert", help="make the OPC UA server's key and self-signed certificate")
    cert.add_argument(
        "--host",
        action="append",
        default=[],
        help="a host name or address the PLC uses to reach this box (repeatable; the host name is always in)",
    )
    cert.add_argument("--days", type=int, default=3650, help="validity (default 3650: a line runs for years)")
    cert.add_argument("--force", action="store_true", help="replace an existing certificate and key")
    passwd = sub.add_parser("passwd", help="add or replace an OPC UA user (password from stdin or the terminal)")
    passwd.add_argument("--user", required=True, help="user name: letters, digits, . _ - (1-64)")


def run(args: argparse.Namespace) -> int:
    """Do the action; 0 on success, 2 for a config error, 1 otherwise."""
    try:
        settings = load_settings(args.config, **parse_overrides(args.overrides))
    except ConfigError as exc:
        print(f"edge-agent plc: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    plc = settings.plc
    try:
        from edge_agent.plc.security import UsersFileError, make_certificate, set_user
    except ImportError as exc:
        print(f"edge-agent plc: {exc}: pip install 'uflow-edge[plc]'", file=sys.stderr)
        return EXIT_FAILURE
    if args.action == "cert":
        assert plc.opcua_cert is not None and plc.opcua_key is not None
        if (plc.opcua_cert.exists() or plc.opcua_key.exists()) and not args.force:
            print(
                f"edge-agent plc cert: {plc.opcua_cert} or {plc.opcua_key} exists (--force replaces it)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        if not 1 <= args.days <= 36500:
            print("edge-agent plc cert: --days must be 1 to 36500", file=sys.stderr)
            return EXIT_FAILURE
        hosts = [*args.host, plc.opcua_host]
        make_certificate(plc.opcua_cert, plc.opcua_key, settings.device_id, hosts, args.days)
        print(f"certificate: {plc.opcua_cert} (give it to the PLC to trust)")
        print(f"private key: {plc.opcua_key} (mode 0600)")
        return EXIT_OK
    password = getpass.getpass(f"password for {args.user}: ") if sys.stdin.isatty() else sys.stdin.readline()
    password = password.rstrip("\r\n")
    assert plc.opcua_users_file is not None
    try:
        set_user(plc.opcua_users_file, args.user, password)
    except (UsersFileError, OSError) as exc:
        print(f"edge-agent plc passwd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"user {args.user} set in {plc.opcua_users_file}")
    return EXIT_OK
