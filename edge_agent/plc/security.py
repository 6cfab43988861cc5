"""The OPC UA server's certificate, its users file and who may open a session (docs/plc.md, "Security").

- The certificate: an RSA-2048 key and a self-signed application-instance certificate (OPC 10000-6 6.2.2)
  whose URI is the server's application URI; ``edge-agent plc cert`` writes them. The PLC's engineering
  tool trusts this certificate once (TIA Portal: the certificate manager of the CPU).
- Users: ``name:scrypt$n$r$p$salt$hash`` lines (base64), written by ``edge-agent plc passwd``; the file is
  read at start. Passwords never appear in the config or the logs.
- Sessions: one per user at a time. A user logging in again (a PLC that restarted, whose old session
  still waits for its timeout) replaces its older session rather than being locked out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.fileio import atomic_write

USER_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MAX_PASSWORD_BYTES = 1024


class UsersFileError(ValueError):
    """A users file that cannot be used; the text names the line."""


def application_uri(device_id: str) -> str:
    """The OPC UA server's application URI (also in its certificate)."""
    return f"urn:uflow-edge:{device_id}:plc"


def hash_password(password: str, salt: bytes | None = None) -> str:
    """An scrypt hash in the users file's format."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a hash of :func:`hash_password` (constant-time compare)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode()[:MAX_PASSWORD_BYTES],
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def read_users(path: Path) -> dict[str, str]:
    """User name -> hash; UsersFileError for a malformed line (a typo must not lock out silently)."""
    users: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not USER_PATTERN.match(name) or not stored.startswith("scrypt$"):
            raise UsersFileError(f"{path} line {number}: expected name:scrypt$... (edge-agent plc passwd)")
        users[name] = stored
    return users


def set_user(path: Path, name: str, password: str) -> None:
    """Add or replace one user in the users file (written atomically, mode 0600)."""
    if not USER_PATTERN.match(name):
        raise UsersFileError(f"user name {name!r}: letters, digits, . _ - (1-64)")
    if not password or len(password.encode()) > MAX_PASSWORD_BYTES:
        raise UsersFileError(f"the password must be 1 to {MAX_PASSWORD_BYTES} bytes")
    users = read_users(path) if path.exists() else {}
    users[name] = hash_password(password)
    text = "".join(f"{user}:{stored}\n" for user, stored in sorted(users.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode(), mode=0o600)


def make_certificate(cert_path: Path, key_path: Path, device_id: str, hosts: list[str], days: int) -> None:
    """A new key and self-signed server certificate for the OPC UA server (overwrites both)."""
    import ipaddress

    from asyncua.crypto.cert_gen import (
        dump_private_key_as_pem,
        generate_private_key,
        generate_self_signed_app_certificate,
    )
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri(device_id))]
    for host in [socket.gethostname(), *hosts]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = generate_private_key()
    cert = generate_self_signed_app_certificate(
        key,
        f"uflow-edge {device_id}",
        {"organizationName": "uflow-edge"},
        names,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days=days,
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(key_path, dump_private_key_as_pem(key), mode=0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.DER), mode=0o644)


@dataclass
class SessionUsers:
    """asyncua's user manager: password check, anonymous switch, one session per user (newest wins)."""

    users: dict[str, str]
    anonymous: bool
    on_login: Callable[[str], None]  # schedules closing the user's older sessions (opcua.py)

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> Any:
        """The session's user, or None (asyncua answers BadUserAccessDenied)."""
        from asyncua.crypto.permission_rules import User, UserRole

        if username is None:
            return User(role=UserRole.User, name="anonymous") if self.anonymous else None
        stored = self.users.get(username)
        if stored is None or password is None or not check_password(password, stored):
            return None
        self.on_login(username)  # after this activation: close the user's older session, if any
        return User(role=UserRole.User, name=username)
