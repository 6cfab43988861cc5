"""The publisher's side of the fleet (``edge-agent fleet-publish``): add a signed bundle as a tar and write a
new signed ``latest.json`` with a higher serial (the format is ``edge_agent.fleet.index``'s docstring).
"""

from __future__ import annotations

import logging
import stat
import tarfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.bundle import SIGNATURE_NAME, load_bundle
from edge_agent.fileio import atomic_write, atomic_writer, replace_durably, sha256_file
from edge_agent.fleet.index import (
    DEFAULT_VALID_DAYS,
    FLEET_SCHEMA,
    INDEX_SIGNATURE_SUFFIX,
    LATEST_NAME,
    FleetError,
    FleetIndex,
    Release,
    ShadowGate,
    check_only_listed_files,
    read_index,
)
from edge_agent.fleet.models_dir import check_version_name

log = logging.getLogger(__name__)


def write_bundle_tar(bundle_dir: Path, dest: Path) -> None:
    """A deterministic, uncompressed tar of a bundle directory (sorted, owner 0, fixed times)."""
    bundle_dir = Path(bundle_dir)
    entries = sorted(p for p in bundle_dir.rglob("*") if not p.is_symlink())
    created = load_bundle(bundle_dir).manifest.created.timestamp()
    with atomic_writer(dest) as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in entries:
            info = tarfile.TarInfo(path.relative_to(bundle_dir).as_posix())
            info.mtime = int(created)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path.is_dir():
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                archive.addfile(info)
            elif stat.S_ISREG(path.stat().st_mode):
                info.size = path.stat().st_size
                info.mode = 0o644
                with open(path, "rb") as content:
                    archive.addfile(info, content)


def publish(
    bundle_dir: Path,
    fleet_dir: Path,
    groups: Iterable[str],
    base_url: str = "",
    public_key: Path | None = None,
    index_key: Path | Ed25519PrivateKey | None = None,
    valid_days: float = DEFAULT_VALID_DAYS,
    shadow_gate: ShadowGate | None = None,
    clear_shadow_gate: bool = False,
    recipe: str | None = None,
) -> tuple[Release, Path]:
    """Add a signed bundle to a fleet directory and point ``groups`` at it in latest.json (atomically).

    ``index_key`` (the fleet private key) signs latest.json, with the serial raised and ``expires``
    ``valid_days`` from now; without it latest.json is written unsigned and devices refuse it.
    ``shadow_gate`` sets the shadow requirement of ``groups`` (devices install only after the version ran as
    their shadow model long enough, with enough agreement); ``clear_shadow_gate`` removes theirs.
    ``recipe``: point only that recipe of ``groups`` at it (``recipes`` in latest.json), not the groups' bundle.
    """
    from edge_agent.fleet.signing import verify_bundle_signature

    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    check_version_name(manifest.version)
    if not (Path(bundle_dir) / SIGNATURE_NAME).is_file():
        raise FleetError(f"bundle {bundle_dir} is not signed; devices would refuse it (use `uflow export --sign KEY`)")
    if public_key is not None:
        verify_bundle_signature(Path(bundle_dir), public_key)
    check_only_listed_files(Path(bundle_dir), manifest.files)
    fleet_dir = Path(fleet_dir)
    (fleet_dir / "bundles").mkdir(parents=True, exist_ok=True)
    rel = f"bundles/{manifest.name}-{manifest.version}.tar"
    tar_path = fleet_dir / rel
    buffer = tar_path.with_name(tar_path.name + ".new")
    write_bundle_tar(Path(bundle_dir), buffer)
    index_path = fleet_dir / LATEST_NAME
    index = _read_local_index(index_path)
    existing = index.release(manifest.version)
    sha = sha256_file(buffer)
    if existing is not None and existing.sha256 != sha and tar_path.exists():
        buffer.unlink()
        raise FleetError(
            f"version {manifest.version} is already published with different content (sha256 {existing.sha256[:12]}…); "
            "give the new bundle a new version"
        )
    replace_durably(buffer, tar_path)  # write_bundle_tar fsynced it
    release = Release(
        version=manifest.version,
        name=manifest.name,
        url=(base_url.rstrip("/") + "/" + rel) if base_url else rel,
        sha256=sha,
        size=tar_path.stat().st_size,
        created=manifest.created.isoformat(),
    )
    index.releases = [release, *(r for r in index.releases if r.version != release.version)]
    for group in groups:
        if recipe is not None:
            index.recipes.setdefault(group, {})[recipe] = release.version
            continue  # the shadow gate is the groups' bundle's (the shadow model is not per recipe)
        index.groups[group] = release.version
        if shadow_gate is not None:
            index.shadow_gate[group] = shadow_gate
        elif clear_shadow_gate:
            index.shadow_gate.pop(group, None)
    write_index(fleet_dir, index, index_key, valid_days)
    log.info(
        "bundle published",
        extra={
            "event": "bundle_published",
            "version": release.version,
            "groups": sorted(groups),
            "recipe": recipe,
            "tar": str(tar_path),
        },
    )
    return release, tar_path


def write_index(
    fleet_dir: Path, index: FleetIndex, index_key: Path | Ed25519PrivateKey | None, valid_days: float
) -> None:
    """Write latest.json with the next serial and a new expiry, and its signature when a key is given."""
    from edge_agent.fleet.signing import sign_bytes

    now = datetime.now(timezone.utc)
    index.updated = now.isoformat(timespec="seconds")
    index.serial += 1
    index.expires = datetime.fromtimestamp(now.timestamp() + valid_days * 86400.0, timezone.utc).isoformat(
        timespec="seconds"
    )
    body = index.to_json().encode("utf-8")
    index_path = Path(fleet_dir) / LATEST_NAME
    signature_path = index_path.with_name(LATEST_NAME + INDEX_SIGNATURE_SUFFIX)
    if index_key is None:
        log.warning(
            "latest.json written unsigned; devices refuse it until it is signed (--sign or --index-key)",
            extra={"event": "fleet_index_unsigned", "path": str(index_path)},
        )
        signature_path.unlink(missing_ok=True)
    # The signature goes first: a device that reads between the two writes sees a mismatch and retries later,
    # never a new index under an old signature that happens to verify.
    if index_key is not None:
        atomic_write(signature_path, sign_bytes(body, index_key).encode("ascii"))
    atomic_write(index_path, body)


def _read_local_index(path: Path) -> FleetIndex:
    if not path.exists():
        return FleetIndex.model_validate({"schema": FLEET_SCHEMA})
    index, _ = read_index(str(path), timeout_s=10)
    return index
