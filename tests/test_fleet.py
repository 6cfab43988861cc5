"""Fleet source: publishing, latest.json and rollout groups, HTTP download limits, and safe unpacking."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from fleet_helpers import make_bundle, serving

from edge_agent.bundle import load_bundle
from edge_agent.fleet.index import FleetError, check_only_listed_files, download, read_index, resolve, safe_extract
from edge_agent.fleet.publish import publish, write_bundle_tar
from edge_agent.fleet.signing import generate_keypair


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory: pytest.TempPathFactory, keys) -> Path:  # type: ignore[no-untyped-def]
    return make_bundle(tmp_path_factory.mktemp("bundle") / "tile-1.0.0", "1.0.0", keys.private_key)


def test_publish_writes_tar_and_index(tmp_path: Path, signed_bundle: Path, keys) -> None:  # type: ignore[no-untyped-def]
    fleet = tmp_path / "fleet"
    release, tar_path = publish(signed_bundle, fleet, ["canary"], public_key=keys.public_key)
    assert tar_path == fleet / "bundles/tile-1.0.0.tar" and release.size == tar_path.stat().st_size
    index, _ = read_index(str(fleet), timeout_s=5)
    assert index.groups == {"canary": "1.0.0"}
    assert index.release_for_group("canary") == release
    assert index.release_for_group("default") is None
    # The tar is deterministic: publishing again gives the same bytes and sha.
    again, _ = publish(signed_bundle, fleet, ["default"])
    assert again.sha256 == release.sha256
    index, _ = read_index(str(fleet), timeout_s=5)
    assert index.groups == {"canary": "1.0.0", "default": "1.0.0"} and len(index.releases) == 1


def test_publish_refuses_unsigned_and_reused_versions(tmp_path: Path, signed_bundle: Path, keys) -> None:  # type: ignore[no-untyped-def]
    unsigned = make_bundle(tmp_path / "unsigned", "2.0.0", None)
    with pytest.raises(FleetError, match="not signed"):
        publish(unsigned, tmp_path / "fleet", ["default"])
    publish(signed_bundle, tmp_path / "fleet", ["default"])
    different = make_bundle(tmp_path / "different", "1.0.0", keys.private_key, seed=5)
    with pytest.raises(FleetError, match="already published with different content"):
        publish(different, tmp_path / "fleet", ["default"])
    index, _ = read_index(str(tmp_path / "fleet"), timeout_s=5)
    assert index.release("1.0.0").sha256 == publish(signed_bundle, tmp_path / "fleet", [])[0].sha256  # type: ignore[union-attr]


def test_fleet_publish_command(tmp_path: Path, signed_bundle: Path, keys) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "fleet-publish",
            "--bundle",
            str(signed_bundle),
            "--fleet",
            str(tmp_path / "fleet"),
            "--group",
            "canary",
            "--group",
            "*",
            "--public-key",
            str(keys.public_key),
            "--index-key",
            str(keys.private_key),
            "--shadow-hours",
            "24",
            "--shadow-min-frames",
            "5000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "fleet/latest.json").read_text())
    assert index["schema"] == "uflow.fleet/1" and index["groups"] == {"canary": "1.0.0", "*": "1.0.0"}
    # Issue 24 finding 13: the gate needs a number of compared frames too.
    assert index["shadow_gate"]["canary"] == {"hours": 24.0, "min_agreement": 0.99, "min_compared": 5000}
    other = generate_keypair(tmp_path / "other")
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "fleet-publish",
            "--bundle",
            str(signed_bundle),
            "--fleet",
            str(tmp_path / "fleet2"),
            "--public-key",
            str(other.public_key),
            "--index-key",
            str(keys.private_key),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "does not match" in refused.stderr


def test_star_group_and_missing_release(tmp_path: Path) -> None:
    (tmp_path / "latest.json").write_text(
        json.dumps(
            {
                "schema": "uflow.fleet/1",
                "groups": {"*": "1.0.0", "canary": "9.9.9"},
                "releases": [{"version": "1.0.0", "url": "a.tar", "sha256": "0" * 64, "size": 10}],
            }
        )
    )
    index, location = read_index(str(tmp_path), timeout_s=5)
    assert index.release_for_group("line7").version == "1.0.0"  # type: ignore[union-attr]
    with pytest.raises(FleetError, match=r"'9\.9\.9', which has no release entry"):
        index.release_for_group("canary")
    assert resolve(location, "a.tar") == str(tmp_path / "a.tar")
    assert resolve("http://h/fleet/latest.json", "bundles/a.tar") == "http://h/fleet/bundles/a.tar"
    assert resolve("http://h/fleet/latest.json", "https://cdn/a.tar") == "https://cdn/a.tar"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        (json.dumps({"schema": "other/1"}), "not supported"),
        (
            json.dumps(
                {
                    "schema": "uflow.fleet/1",
                    "releases": [{"version": "../x", "url": "a", "sha256": "0" * 64, "size": 1}],
                }
            ),
            "cannot name a directory",
        ),
        (
            json.dumps(
                {"schema": "uflow.fleet/1", "releases": [{"version": "1", "url": "a", "sha256": "xyz", "size": 1}]}
            ),
            "sha256",
        ),
    ],
)
def test_bad_index_is_named(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "latest.json").write_text(content)
    with pytest.raises(FleetError, match=message):
        read_index(str(tmp_path), timeout_s=5)


def test_http_index_errors(tmp_path: Path) -> None:
    with serving(tmp_path) as server, pytest.raises(FleetError, match="HTTP 404"):
        read_index(server.url, timeout_s=5)
    with pytest.raises(FleetError, match="cannot reach"):
        read_index(server.url, timeout_s=2)


def test_download_limits_over_http(tmp_path: Path) -> None:
    payload = b"x" * 5000
    (tmp_path / "blob").write_bytes(payload)
    import hashlib

    sha = hashlib.sha256(payload).hexdigest()
    with serving(tmp_path) as server:
        url = server.url + "blob"
        seen: list[int] = []
        download(url, tmp_path / "ok", 5000, sha, 5, 10_000, lambda done, total: seen.append(done))
        assert (tmp_path / "ok").read_bytes() == payload and seen[-1] == 5000
        with pytest.raises(FleetError, match="larger than the 4000 bytes"):
            download(url, tmp_path / "big", 4000, sha, 5, 10_000)
        with pytest.raises(FleetError, match=r"got 5000 bytes, latest\.json announces 6000"):
            download(url, tmp_path / "short", 6000, sha, 5, 10_000)
        with pytest.raises(FleetError, match="sha256 mismatch"):
            download(url, tmp_path / "bad", 5000, "0" * 64, 5, 10_000)
        with pytest.raises(FleetError, match="over the limit"):
            download(url, tmp_path / "cap", 5000, sha, 5, 1000)


def _tar(entries: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info in entries:
            content = (data or {}).get(info.name)
            archive.addfile(info, io.BytesIO(content) if content is not None else None)
    return buffer.getvalue()


def _file(name: str, size: int = 3) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (_file("../escape.txt"), "outside the bundle"),
        (_file("/etc/evil"), "outside the bundle"),
        (_file("selftest/../../x"), "outside the bundle"),
        (_special("model.onnx", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
        (_special("model.onnx", tarfile.LNKTYPE, "../../etc/passwd"), "is a link"),
        (_special("dev", tarfile.CHRTYPE), "special file"),
        (_special("fifo", tarfile.FIFOTYPE), "special file"),
    ],
)
def test_unsafe_tar_entries_are_refused(tmp_path: Path, entry: tarfile.TarInfo, message: str) -> None:
    tar = tmp_path / "evil.tar"
    tar.write_bytes(_tar([_file("model.json"), entry], {"model.json": b"{}\n"[:3], entry.name: b"abc"}))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(FleetError, match=message):
        safe_extract(tar, dest, max_bytes=10_000)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "x").exists()


def test_size_cap_duplicates_and_garbage(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    big = tmp_path / "big.tar"
    big.write_bytes(_tar([_file("a", 600), _file("b", 600)], {"a": b"a" * 600, "b": b"b" * 600}))
    with pytest.raises(FleetError, match="more than 1000 bytes"):
        safe_extract(big, dest, max_bytes=1000)
    twice = tmp_path / "twice.tar"
    twice.write_bytes(_tar([_file("a"), _file("a")], {"a": b"abc"}))
    dest2 = tmp_path / "out2"
    dest2.mkdir()
    with pytest.raises(FleetError, match="twice"):
        safe_extract(twice, dest2, max_bytes=1000)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(FleetError, match="not a readable tar"):
        safe_extract(garbage, tmp_path / "out3", max_bytes=1000)


def test_roundtrip_and_top_directory_is_stripped(tmp_path: Path, signed_bundle: Path) -> None:
    flat = tmp_path / "flat.tar"
    write_bundle_tar(signed_bundle, flat)
    out = tmp_path / "flat"
    out.mkdir()
    safe_extract(flat, out, max_bytes=50_000_000)
    assert load_bundle(out).manifest.version == "1.0.0"
    # The same bundle packed by hand under one top-level directory (tar -C parent -cf x.tar tile-1.0.0).
    nested = tmp_path / "nested.tar"
    with tarfile.open(nested, "w") as archive:
        archive.add(signed_bundle, arcname="tile-1.0.0")
    out2 = tmp_path / "nested"
    out2.mkdir()
    safe_extract(nested, out2, max_bytes=50_000_000)
    assert load_bundle(out2).manifest.files == load_bundle(out).manifest.files


def test_unlisted_file_is_refused(tmp_path: Path, signed_bundle: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(signed_bundle, copy)
    check_only_listed_files(copy, load_bundle(copy).manifest.files)
    (copy / "selftest" / "extra.py").write_text("print('not covered by the signature')")
    with pytest.raises(FleetError, match=r"selftest/extra\.py"):
        check_only_listed_files(copy, load_bundle(copy).manifest.files)


def test_fleet_publish_can_sign_first(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    # e.g. `uflow calibrate int8` added a variant to model.json after export, so the bundle is re-signed.
    bundle = make_bundle(tmp_path / "calibrated", "3.0.0", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "fleet-publish",
            "--bundle",
            str(bundle),
            "--fleet",
            str(tmp_path / "fleet"),
            "--group",
            "default",
            "--sign",
            str(keys.private_key),
            "--public-key",
            str(keys.public_key),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    from edge_agent.fleet.signing import verify_bundle_signature

    assert verify_bundle_signature(bundle, keys.public_key) == keys.fingerprint
