"""Fleet signing keys: ed25519 over a bundle's ``model.json``.

``model.json`` lists the sha256 of every other file in the bundle, so one signature over it covers the
whole bundle (the updater also refuses files the manifest does not list). The ``signature`` file holds
the 64-byte signature base64-encoded on one line. Keys are PEM (PKCS#8 private, SubjectPublicKeyInfo
public); a public key may also be given as its raw 32 bytes or their base64 (one line), which is how it
is easiest to paste into a provisioning script.
"""

from __future__ import annotations

import base64
import binascii
import logging
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.bundle import MANIFEST_NAME, SIGNATURE_NAME
from edge_agent.fileio import atomic_write, sha256_bytes

log = logging.getLogger(__name__)

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


class SigningError(ValueError):
    """A key or signature that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class KeyPairFiles:
    """Where ``generate_keypair`` wrote the two halves."""

    private_key: Path
    public_key: Path
    fingerprint: str


def generate_keypair(out_dir: Path, name: str = "fleet", overwrite: bool = False) -> KeyPairFiles:
    """Write ``<name>.key`` (mode 0600) and ``<name>.pub`` into out_dir; refuse to overwrite unless asked."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path = out_dir / f"{name}{PRIVATE_SUFFIX}"
    public_path = out_dir / f"{name}{PUBLIC_SUFFIX}"
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists():
                raise SigningError(
                    f"{path} already exists; a new fleet key would orphan every device that trusts the old one "
                    "(pass --force to replace it)"
                )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # The private key is 0600 from its first byte (no window where it is world-readable).
    atomic_write(private_path, private_pem, mode=0o600)
    atomic_write(public_path, public_pem, mode=0o644)
    public_path.chmod(0o644)  # whatever the umask
    return KeyPairFiles(private_path, public_path, fingerprint(key.public_key()))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The fleet private key from a PEM file; warns when group or others can read it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read private key {path}: {exc.strerror}") from exc
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "private key is readable by other users; chmod 600 it",
            extra={"event": "key_permissions", "path": str(path), "mode": oct(mode & 0o777)},
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} holds a {type(key).__name__}, not an ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The fleet public key from a PEM file, raw 32 bytes, or their base64 on one line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read fleet public key {path}: {exc.strerror}") from exc
    return parse_public_key(data, where=str(path))


def parse_public_key(data: bytes, where: str = "public key") -> Ed25519PublicKey:
    """An ed25519 public key from PEM, raw 32 bytes or base64 of them."""
    if data.lstrip().startswith(b"-----BEGIN"):
        if b"PRIVATE KEY" in data:
            raise SigningError(f"{where} is a PRIVATE key; devices need only the public half (the .pub file)")
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise SigningError(f"{where} is not a valid PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise SigningError(f"{where} holds a {type(key).__name__}, not an ed25519 key")
        return key
    raw = data if len(data) == 32 else _b64(data.strip(), where)
    if len(raw) != 32:
        raise SigningError(f"{where}: an ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """Short id of a public key for logs: sha256 of its raw bytes, 16 hex digits."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_bytes(raw)[:16]


def sign_bundle(bundle_dir: Path, private_key: Ed25519PrivateKey | Path) -> Path:
    """Sign ``model.json`` of a bundle directory; writes and returns its ``signature`` file."""
    key = private_key if isinstance(private_key, Ed25519PrivateKey) else load_private_key(private_key)
    manifest = Path(bundle_dir) / MANIFEST_NAME
    if not manifest.is_file():
        raise SigningError(f"{bundle_dir} is not a model bundle: {MANIFEST_NAME} is missing")
    signature = key.sign(manifest.read_bytes())
    path = Path(bundle_dir) / SIGNATURE_NAME
    path.write_text(base64.b64encode(signature).decode("ascii") + "\n", encoding="ascii")
    log.info(
        "bundle signed",
        extra={"event": "bundle_signed", "bundle": str(bundle_dir), "key": fingerprint(key.public_key())},
    )
    return path


def verify_bundle_signature(bundle_dir: Path, public_key: Ed25519PublicKey | Path) -> str:
    """Check ``signature`` against ``model.json``; return the key's fingerprint or raise SigningError."""
    key = public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)
    bundle_dir = Path(bundle_dir)
    signature_path = bundle_dir / SIGNATURE_NAME
    if not signature_path.is_file():
        raise SigningError(
            f"bundle {bundle_dir} is not signed ({SIGNATURE_NAME} is missing); sign it with `uflow export --sign KEY`"
        )
    signature = read_signature(signature_path)
    try:
        key.verify(signature, (bundle_dir / MANIFEST_NAME).read_bytes())
    except InvalidSignature as exc:
        raise SigningError(
            f"bundle {bundle_dir}: the signature does not match {MANIFEST_NAME} under the fleet key "
            f"{fingerprint(key)} (signed with another key, or model.json was changed after signing)"
        ) from exc
    except FileNotFoundError as exc:
        raise SigningError(f"bundle {bundle_dir}: {MANIFEST_NAME} is missing") from exc
    return fingerprint(key)


def sign_bytes(data: bytes, private_key: Ed25519PrivateKey | Path) -> str:
    """The base64 ed25519 signature of ``data`` (one line, as in a ``signature`` file)."""
    key = private_key if isinstance(private_key, Ed25519PrivateKey) else load_private_key(private_key)
    return base64.b64encode(key.sign(data)).decode("ascii") + "\n"


def verify_bytes(data: bytes, signature: bytes, public_key: Ed25519PublicKey, where: str) -> str:
    """Check a base64 (or raw 64-byte) signature over ``data``; the key's fingerprint or SigningError."""
    raw = signature if len(signature) == 64 else _b64(signature.strip(), where)
    if len(raw) != 64:
        raise SigningError(f"{where}: an ed25519 signature is 64 bytes, got {len(raw)}")
    try:
        public_key.verify(raw, data)
    except InvalidSignature as exc:
        raise SigningError(
            f"{where}: the signature does not match under the fleet key {fingerprint(public_key)}"
        ) from exc
    return fingerprint(public_key)


def verify_installed_bundle(bundle_dir: Path, public_key: Path | None) -> str | None:
    """At start and on reload: the bundle's signature under the fleet key, when one is configured.

    File hashes alone (checked when the bundle loads) only prove the files match model.json; someone who
    can write the models directory could replace both. Returns the fingerprint, None without a key
    (a box that takes no fleet updates), or raises SigningError.
    """
    if public_key is None:
        return None
    return verify_bundle_signature(Path(bundle_dir), public_key)


def read_signature(path: Path) -> bytes:
    """The 64 signature bytes from a ``signature`` file (base64 text, or the raw bytes)."""
    data = Path(path).read_bytes()
    raw = data if len(data) == 64 else _b64(data.strip(), str(path))
    if len(raw) != 64:
        raise SigningError(f"{path}: an ed25519 signature is 64 bytes, got {len(raw)}")
    return raw


def _b64(data: bytes, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SigningError(f"{where} is neither PEM nor base64 ({exc})") from exc
