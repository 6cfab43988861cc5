"""Trust boundaries of the fleet source (issue 13): a signed latest.json with serial and expiry, no
https -> http redirect, plain tars counted while streaming. Real HTTP(S) servers on loopback, real files.
"""

from __future__ import annotations

import http.server
import io
import json
import ssl
import tarfile
import threading
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fleet_helpers import make_bundle, serving
from tls_certs import make_pki

from edge_agent.fleet.index import MAX_MEMBERS, FleetError, read_signed_index, safe_extract, tls_context
from edge_agent.fleet.publish import publish
from edge_agent.fleet.signing import generate_keypair, load_public_key, sign_bytes


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, keys) -> Path:  # type: ignore[no-untyped-def]
    return make_bundle(tmp_path_factory.mktemp("b") / "tile-1.0.0", "1.0.0", keys.private_key)


def test_unsigned_or_foreign_index_is_refused(tmp_path: Path, keys, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    public = load_public_key(keys.public_key)
    publish(bundle, tmp_path / "unsigned", ["default"])  # no index key: devices must refuse it
    with pytest.raises(FleetError, match="not signed by the fleet key"):
        read_signed_index(str(tmp_path / "unsigned"), 5, public, 0)
    other = generate_keypair(tmp_path / "other")
    publish(bundle, tmp_path / "foreign", ["default"], index_key=other.private_key)
    with pytest.raises(FleetError, match="not signed by the fleet key"):
        read_signed_index(str(tmp_path / "foreign"), 5, public, 0)
    publish(bundle, tmp_path / "good", ["default"], index_key=keys.private_key)
    index, _ = read_signed_index(str(tmp_path / "good"), 5, public, 0)
    assert index.serial == 1 and index.release_for_group("default").version == "1.0.0"  # type: ignore[union-attr]
    # One changed byte (a man in the middle moving a group) breaks the signature.
    latest = tmp_path / "good" / "latest.json"
    latest.write_text(latest.read_text().replace('"default": "1.0.0"', '"default": "0.0.1"'))
    with pytest.raises(FleetError, match="not signed by the fleet key"):
        read_signed_index(str(tmp_path / "good"), 5, public, 0)


def test_expired_index_is_refused(tmp_path: Path, keys, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    public = load_public_key(keys.public_key)
    publish(bundle, tmp_path / "fleet", ["default"], index_key=keys.private_key, valid_days=1)
    index, _ = read_signed_index(str(tmp_path / "fleet"), 5, public, 0)
    from datetime import datetime

    expiry = datetime.fromisoformat(index.expires).timestamp()
    with pytest.raises(FleetError, match="expired"):
        read_signed_index(str(tmp_path / "fleet"), 5, public, 0, now=expiry + 1)


def test_older_serial_is_refused_over_http(tmp_path: Path, keys, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    public = load_public_key(keys.public_key)
    fleet = tmp_path / "fleet"
    publish(bundle, fleet, ["canary"], index_key=keys.private_key)
    old_index, old_sig = (fleet / "latest.json").read_bytes(), (fleet / "latest.json.sig").read_bytes()
    publish(bundle, fleet, ["canary", "default"], index_key=keys.private_key)
    with serving(fleet) as server:
        newest, _ = read_signed_index(server.url, 5, public, 0)
        assert newest.serial == 2
        # A stale mirror (or a replay) serves the older, genuinely signed index.
        (fleet / "latest.json").write_bytes(old_index)
        (fleet / "latest.json.sig").write_bytes(old_sig)
        with pytest.raises(FleetError, match="serial 1, lower than the 2"):
            read_signed_index(server.url, 5, public, newest.serial)


@contextmanager
def https_redirector(tmp_path: Path, target: str) -> Iterator[tuple[str, Path]]:
    """An https server on loopback that answers every GET with a 302 to ``target``; yields (url, ca file)."""
    pki = make_pki(tmp_path / "pki")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", target + self.path.lstrip("/"))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/", pki.ca_cert
    finally:
        server.shutdown()
        server.server_close()


def test_https_to_http_redirect_is_refused(tmp_path: Path, keys, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    public = load_public_key(keys.public_key)
    publish(bundle, tmp_path / "fleet", ["default"], index_key=keys.private_key)
    with serving(tmp_path / "fleet") as plain, https_redirector(tmp_path, plain.url) as (url, ca_file):
        with pytest.raises(FleetError, match="which is not https"):
            read_signed_index(url, 5, public, 0, tls_context(ca_file))
        assert plain.requests == []  # nothing was fetched in clear text


def _many_empty_entries(count: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for index in range(count):
            archive.addfile(tarfile.TarInfo(f"e{index}"), io.BytesIO(b""))
    return buffer.getvalue()


def test_compressed_archives_are_refused(tmp_path: Path) -> None:
    import gzip

    # A small gzip download that inflates to many entries (the review measured 131 MB for 1.9 MB).
    tar_gz = tmp_path / "bundle.tar"
    tar_gz.write_bytes(gzip.compress(_many_empty_entries(2000)))
    (tmp_path / "out").mkdir()
    with pytest.raises(FleetError, match="plain, uncompressed"):
        safe_extract(tar_gz, tmp_path / "out", max_bytes=1 << 30)


def test_entries_are_counted_while_streaming(tmp_path: Path) -> None:
    tar = tmp_path / "bundle.tar"
    tar.write_bytes(_many_empty_entries(MAX_MEMBERS * 3))
    (tmp_path / "out").mkdir()
    tracemalloc.start()
    try:
        with pytest.raises(FleetError, match=f"more than {MAX_MEMBERS} entries"):
            safe_extract(tar, tmp_path / "out", max_bytes=1 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Reading all 30,000 headers first (getmembers) holds three times the members the cap allows.
    per_member = peak / MAX_MEMBERS
    assert per_member < 2000, f"{peak} bytes peak"
    assert list((tmp_path / "out").iterdir()) == []  # refused before anything was written


def test_index_signature_is_over_the_exact_bytes(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    public = load_public_key(keys.public_key)
    body = json.dumps({"schema": "uflow.fleet/1", "serial": 5, "expires": "2999-01-01T00:00:00+00:00"}).encode()
    (tmp_path / "latest.json").write_bytes(body)
    (tmp_path / "latest.json.sig").write_text(sign_bytes(body, keys.private_key))
    index, _ = read_signed_index(str(tmp_path), 5, public, 5)
    assert index.serial == 5
    (tmp_path / "latest.json").write_bytes(body + b" ")
    with pytest.raises(FleetError, match="not signed"):
        read_signed_index(str(tmp_path), 5, public, 0)
