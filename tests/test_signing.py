"""Fleet keys and bundle signatures: key files, formats, and every way a signature must fail."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleet_helpers import make_bundle

from edge_agent.fleet.signing import (
    SigningError,
    generate_keypair,
    load_private_key,
    load_public_key,
    verify_bundle_signature,
)


@pytest.fixture
def keys(tmp_path: Path):  # type: ignore[no-untyped-def]
    return generate_keypair(tmp_path / "keys")


def test_keygen_writes_private_key_0600_and_public_key(keys) -> None:  # type: ignore[no-untyped-def]
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.public_key.stat().st_mode) == 0o644
    assert keys.private_key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert keys.public_key.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    private = load_private_key(keys.private_key)
    public = load_public_key(keys.public_key)
    assert private.public_key().public_bytes_raw() == public.public_bytes_raw()
    assert len(keys.fingerprint) == 16


def test_keygen_refuses_to_overwrite(keys) -> None:  # type: ignore[no-untyped-def]
    before = keys.private_key.read_bytes()
    with pytest.raises(SigningError, match="already exists"):
        generate_keypair(keys.private_key.parent)
    assert keys.private_key.read_bytes() == before
    replaced = generate_keypair(keys.private_key.parent, overwrite=True)
    assert replaced.private_key.read_bytes() != before


def test_keygen_command(tmp_path: Path) -> None:
    out = tmp_path / "fleet-keys"
    cmd = [sys.executable, "-m", "edge_agent.cli", "keygen", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "fingerprint:" in first.stdout
    assert stat.S_IMODE((out / "fleet.key").stat().st_mode) == 0o600
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "already exists" in second.stderr


def test_public_key_formats(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    raw = load_public_key(keys.public_key).public_bytes_raw()
    (tmp_path / "raw.pub").write_bytes(raw)
    (tmp_path / "b64.pub").write_text(base64.b64encode(raw).decode() + "\n")
    assert load_public_key(tmp_path / "raw.pub").public_bytes_raw() == raw
    assert load_public_key(tmp_path / "b64.pub").public_bytes_raw() == raw
    (tmp_path / "short.pub").write_text(base64.b64encode(raw[:20]).decode())
    with pytest.raises(SigningError, match="32 bytes, got 20"):
        load_public_key(tmp_path / "short.pub")
    with pytest.raises(SigningError, match="PRIVATE key"):
        load_public_key(keys.private_key)
    with pytest.raises(SigningError, match="cannot read fleet public key"):
        load_public_key(tmp_path / "missing.pub")


def test_rsa_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "rsa.pub").write_bytes(pem)
    with pytest.raises(SigningError, match="not an ed25519 key"):
        load_public_key(tmp_path / "rsa.pub")


def test_sign_and_verify_a_bundle(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    bundle = make_bundle(tmp_path / "b", "1.0.0", keys.private_key)
    signature = (bundle / "signature").read_text().strip()
    assert len(base64.b64decode(signature)) == 64
    assert verify_bundle_signature(bundle, keys.public_key) == keys.fingerprint


def test_changed_manifest_fails_verification(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    bundle = make_bundle(tmp_path / "b", "1.0.0", keys.private_key)
    manifest = json.loads((bundle / "model.json").read_text())
    manifest["nfa"]["log10_epsilon"] = 5.0  # an attacker loosening the decision
    (bundle / "model.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(SigningError, match=r"does not match model\.json"):
        verify_bundle_signature(bundle, keys.public_key)


def test_other_key_fails_verification(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    other = generate_keypair(tmp_path / "other")
    bundle = make_bundle(tmp_path / "b", "1.0.0", other.private_key)
    with pytest.raises(SigningError, match=f"fleet key {keys.fingerprint}"):
        verify_bundle_signature(bundle, keys.public_key)


def test_unsigned_and_garbled_signatures(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    bundle = make_bundle(tmp_path / "b", "1.0.0", None)
    with pytest.raises(SigningError, match="not signed"):
        verify_bundle_signature(bundle, keys.public_key)
    (bundle / "signature").write_text("not base64 at all!\n")
    with pytest.raises(SigningError, match="neither PEM nor base64"):
        verify_bundle_signature(bundle, keys.public_key)
    # Raw 64 bytes are accepted as well as base64.
    key = load_private_key(keys.private_key)
    (bundle / "signature").write_bytes(key.sign((bundle / "model.json").read_bytes()))
    assert verify_bundle_signature(bundle, keys.public_key) == keys.fingerprint


def test_private_key_readable_by_others_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "loose.key"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o644)
    with caplog.at_level("WARNING"):
        load_private_key(path)
    assert any(getattr(r, "event", "") == "key_permissions" for r in caplog.records)
