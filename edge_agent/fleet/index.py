"""The fleet source: ``latest.json`` and the bundle tars it points at, over HTTP(S) or in a directory.

``latest.json`` (written by ``edge-agent fleet-publish``)::

    {
      "schema": "uflow.fleet/1",
      "updated": "2025-01-31T12:00:00+00:00",
      "groups": {"canary": "1.3.0", "default": "1.2.0"},
      "recipes": {"canary": {"bottle-500": "1.3.0", "cap-38": "2.0.1"}},
      "releases": [
        {"version": "1.3.0", "name": "magnetic-tile", "url": "bundles/magnetic-tile-1.3.0.tar",
         "sha256": "…", "size": 1234567, "created": "…"},
        …
      ]
    }

A device in rollout group ``g`` takes ``groups[g]``, else ``groups["*"]``; a group with no entry gets no
update. A box with ``[[recipes]]`` (docs/recipes.md) updates each recipe on its own, one by one: recipe ``r``
takes ``recipes[g][r]``, else ``recipes["*"][r]``; older agents ignore ``recipes``. ``url`` is relative to latest.json (or absolute). The ed25519 signature over model.json (which
lists the sha256 of every file) is what makes a bundle acceptable, and its version must equal the release's.

latest.json itself is signed too (``latest.json.sig``: the base64 ed25519 signature of its exact bytes
under the fleet key), carries a ``serial`` that every publish raises and an ``expires`` time. A device
refuses an index without a valid signature, an expired one, and one whose serial is lower than the
highest it has accepted (kept in ``models/.fleet-index.json``), so neither a man in the middle nor a
stale mirror can freeze a fleet on an old index or roll it back. A redirect from https to anything
else is refused, and bundle tars are read as plain (uncompressed) tar with the entries counted while
streaming.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import ssl
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_agent.bundle import MANIFEST_NAME, SIGNATURE_NAME
from edge_agent.fleet.models_dir import ModelsDirError, check_version_name

log = logging.getLogger(__name__)

FLEET_SCHEMA = "uflow.fleet/1"
LATEST_NAME = "latest.json"
INDEX_SIGNATURE_SUFFIX = ".sig"
DEFAULT_VALID_DAYS = 30.0
MAX_SIGNATURE_BYTES = 4096
ANY_GROUP = "*"
_CHUNK = 1 << 20
MAX_LATEST_BYTES = 1 << 20
MAX_MEMBERS = 10_000


class FleetError(RuntimeError):
    """The fleet source or a download cannot be used; the message says what and where."""


class Release(BaseModel):
    """One published bundle."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: str
    name: str = ""
    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0)
    created: str = ""

    @field_validator("version")
    @classmethod
    def _safe_version(cls, value: str) -> str:
        try:
            return check_version_name(value)
        except ModelsDirError as exc:  # pydantic reports ValueErrors only
            raise ValueError(str(exc)) from exc


class ShadowGate(BaseModel):
    """A group's requirement before a device installs a new version: it ran as the shadow model that long.

    The device checks its own ``<state_dir>/shadow.json`` (edge_agent/inspection/shadow.py): the version
    must have been its ``[model] shadow`` for ``hours`` of active time, compared at least ``min_compared``
    frames and agreed with the live model on at least ``min_agreement`` of them; the shadow's model sha256
    must be the release's. Older agents ignore this field.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    hours: float = Field(gt=0, allow_inf_nan=False, description="active shadow hours (agent downtime not counted)")
    min_agreement: float = Field(default=0.99, ge=0, le=1)
    min_compared: int = Field(default=1000, ge=1, description="frames the shadow must have compared")


class FleetIndex(BaseModel):
    """``latest.json``."""

    model_config = ConfigDict(extra="ignore")

    schema_: str = Field(alias="schema")
    updated: str = ""
    serial: int = Field(default=0, ge=0, description="raised by every publish; devices refuse a lower one")
    expires: str = Field(default="", description="ISO time after which devices refuse this index")
    groups: dict[str, str] = Field(default_factory=dict)
    releases: list[Release] = Field(default_factory=list)
    shadow_gate: dict[str, ShadowGate] = Field(
        default_factory=dict, description="per group (or '*'): shadow agreement required before installing"
    )
    recipes: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="per group (or '*'): recipe name -> version, for boxes with [[recipes]]"
    )

    @field_validator("schema_")
    @classmethod
    def _known_schema(cls, value: str) -> str:
        if value != FLEET_SCHEMA:
            raise ValueError(f"schema {value!r} is not supported (this agent reads {FLEET_SCHEMA!r})")
        return value

    def release_for_group(self, group: str) -> Release | None:
        """The release this rollout group should run, or None when the group is not rolled out to."""
        version = self.groups.get(group, self.groups.get(ANY_GROUP))
        if version is None:
            return None
        release = self.release(version)
        if release is None:
            raise FleetError(f"{LATEST_NAME} maps group {group!r} to version {version!r}, which has no release entry")
        return release

    def release_for_recipe(self, group: str, recipe: str) -> Release | None:
        """The release recipe ``recipe`` of this rollout group should run (the group's table, else '*'), or None."""
        table = self.recipes.get(group)
        version = table.get(recipe) if table is not None else None
        if version is None:
            version = self.recipes.get(ANY_GROUP, {}).get(recipe)
        if version is None:
            return None
        release = self.release(version)
        if release is None:
            raise FleetError(
                f"{LATEST_NAME} maps recipe {recipe!r} of group {group!r} to version {version!r}, which has no "
                "release entry"
            )
        return release

    def shadow_gate_for(self, group: str) -> ShadowGate | None:
        """The group's shadow requirement (its own entry, else the '*' one), or None."""
        return self.shadow_gate.get(group, self.shadow_gate.get(ANY_GROUP))

    def release(self, version: str) -> Release | None:
        return next((r for r in self.releases if r.version == version), None)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2) + "\n"


# -- reading the source -------------------------------------------------------------------------------


def is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme in ("http", "https", "file")


def latest_location(source: str) -> str:
    """Where latest.json is for a source given as a directory, a URL of a directory, or latest.json itself."""
    if source.endswith(".json"):
        return source
    if is_url(source):
        return _join_url(source, LATEST_NAME)
    return str(Path(source) / LATEST_NAME)


def _join_url(base: str, name: str) -> str:
    return urllib.parse.urljoin(base if base.endswith("/") else base + "/", name)


def resolve(location: str, ref: str) -> str:
    """A release url relative to latest.json's location (URL or path)."""
    if is_url(ref) or (not is_url(location) and Path(ref).is_absolute()):
        return ref
    if is_url(location):
        return urllib.parse.urljoin(location, ref)
    return str(Path(location).parent / ref)


def read_index(source: str, timeout_s: float, context: ssl.SSLContext | None = None) -> tuple[FleetIndex, str]:
    """Fetch and parse latest.json; returns the index and its location (for resolving relative urls)."""
    location = latest_location(source)
    return _parse_index(_read_capped(location, timeout_s, context, MAX_LATEST_BYTES), location), location


def read_signed_index(
    source: str,
    timeout_s: float,
    public_key: Ed25519PublicKey,
    min_serial: int,
    context: ssl.SSLContext | None = None,
    now: float | None = None,
) -> tuple[FleetIndex, str]:
    """latest.json after checking its signature (latest.json.sig), expiry and serial (>= ``min_serial``)."""
    from edge_agent.fleet.signing import SigningError, verify_bytes

    location = latest_location(source)
    raw = _read_capped(location, timeout_s, context, MAX_LATEST_BYTES)
    signature_location = location + INDEX_SIGNATURE_SUFFIX
    try:
        signature = _read_capped(signature_location, timeout_s, context, MAX_SIGNATURE_BYTES)
    except FleetError as exc:
        raise FleetError(f"{location} is not signed by the fleet key ({exc}); refusing it") from exc
    try:
        verify_bytes(raw, signature, public_key, signature_location)
    except SigningError as exc:
        raise FleetError(f"{location} is not signed by the fleet key: {exc}; refusing it") from exc
    index = _parse_index(raw, location)
    if not index.expires:
        raise FleetError(f"{location} has no expiry; refusing it (publish it again with edge-agent fleet-publish)")
    try:
        expires = datetime.fromisoformat(index.expires)
    except ValueError as exc:
        raise FleetError(f"{location}: expires {index.expires[:40]!r} is not an ISO time") from exc
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=timezone.utc)
    if (time.time() if now is None else now) > expires.timestamp():
        raise FleetError(
            f"{location} expired at {index.expires}; refusing it (a stale mirror or a replay; publish again)"
        )
    if index.serial < min_serial:
        raise FleetError(
            f"{location} has serial {index.serial}, lower than the {min_serial} this box already accepted; "
            "refusing the older index (a stale mirror or a replay)"
        )
    return index, location


def _read_capped(location: str, timeout_s: float, context: ssl.SSLContext | None, limit: int) -> bytes:
    with _open(location, timeout_s, context) as handle:
        raw = handle.read(limit + 1)
    if len(raw) > limit:
        raise FleetError(f"{location} is larger than {limit} bytes; refusing to parse it")
    return raw


def _parse_index(raw: bytes, location: str) -> FleetIndex:
    try:
        return FleetIndex.model_validate(json.loads(raw))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FleetError(f"{location} is not valid JSON: {type(exc).__name__}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise FleetError(f"{location} is not a fleet index: {problems}") from exc


class _NoDowngradeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, except from https to anything else (TLS must not be dropped on the way)."""

    def redirect_request(  # the signature of urllib's HTTPRedirectHandler
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if req.full_url.startswith("https:") and not newurl.startswith("https:"):
            raise FleetError(f"{req.full_url} redirects to {newurl}, which is not https; refusing it")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Certificate-verifying TLS context, trusting ``ca_file`` instead of the system CAs when given."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def _open(location: str, timeout_s: float, context: ssl.SSLContext | None = None) -> BinaryIO:
    if is_url(location) and not location.startswith("file:"):
        request = urllib.request.Request(location, headers={"User-Agent": "edge-agent-update"})
        opener = urllib.request.build_opener(
            _NoDowngradeRedirects(), urllib.request.HTTPSHandler(context=context or ssl.create_default_context())
        )
        try:
            response: BinaryIO = opener.open(request, timeout=timeout_s)
            return response
        except urllib.error.HTTPError as exc:
            raise FleetError(f"{location}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FleetError(f"cannot reach {location}: {reason}") from exc
    path = urllib.parse.urlsplit(location).path if location.startswith("file:") else location
    try:
        return open(path, "rb")
    except OSError as exc:
        raise FleetError(f"cannot read {path}: {exc.strerror}") from exc


def download(
    url: str,
    dest: Path,
    expected_size: int,
    expected_sha256: str,
    timeout_s: float,
    max_bytes: int,
    progress: Callable[[int, int], None] | None = None,
    context: ssl.SSLContext | None = None,
) -> None:
    """Stream url to dest, refusing more than ``expected_size`` bytes, then check size and sha256."""
    if expected_size > max_bytes:
        raise FleetError(f"release size {expected_size} bytes is over the limit of {max_bytes} (update.max_bundle_mb)")
    digest = hashlib.sha256()
    received = 0
    with _open(url, timeout_s, context) as source, open(dest, "wb") as out:
        while block := _read_block(source, url, timeout_s):
            received += len(block)
            if received > expected_size:
                raise FleetError(
                    f"{url} is larger than the {expected_size} bytes latest.json announces; download stopped"
                )
            digest.update(block)
            out.write(block)
            if progress is not None:
                progress(received, expected_size)
        out.flush()
        os.fsync(out.fileno())
    if received != expected_size:
        raise FleetError(f"{url}: got {received} bytes, latest.json announces {expected_size} (truncated download)")
    actual = digest.hexdigest()
    if actual != expected_sha256:
        raise FleetError(
            f"{url}: sha256 mismatch (got {actual[:12]}…, latest.json says {expected_sha256[:12]}…); "
            "the file was corrupted or tampered with"
        )


def _read_block(source: BinaryIO, url: str, timeout_s: float) -> bytes:
    try:
        return source.read(_CHUNK)
    except TimeoutError as exc:
        raise FleetError(f"{url}: no data for {timeout_s:g} s; download stopped (update.timeout_s)") from exc
    except OSError as exc:
        raise FleetError(f"{url}: download interrupted: {exc}") from exc


# -- unpacking ----------------------------------------------------------------------------------------


def safe_extract(tar_path: Path, dest: Path, max_bytes: int) -> None:
    """Unpack a bundle tar into the empty directory ``dest``, refusing anything that could escape it.

    Only regular files and directories are accepted (no links, devices or FIFOs); names must be relative
    without ``..``; total size and member count are capped. Members may sit at the top level or all
    under one directory (``name-version/``), which is stripped.
    """
    try:
        # "r:": plain tar only; a compressed archive (a small download that inflates) is refused.
        archive = tarfile.open(tar_path, "r:")  # noqa: SIM115 - closed by the with-block below
    except (tarfile.TarError, OSError) as exc:
        raise FleetError(f"{tar_path.name} is not a readable tar archive (plain, uncompressed): {exc}") from exc
    with archive:
        members: list[tarfile.TarInfo] = []
        try:
            # Counted while reading the headers (getmembers() would read them all first, without a limit).
            while (member := archive.next()) is not None:
                members.append(member)
                if len(members) > MAX_MEMBERS:
                    raise FleetError(f"{tar_path.name} has more than {MAX_MEMBERS} entries; refusing it")
        except tarfile.TarError as exc:
            raise FleetError(f"{tar_path.name} is not a readable tar archive: {exc}") from exc
        names = [_member_path(m) for m in members]
        strip = _common_top_dir(members, names)
        total = 0
        for member, name in zip(members, names, strict=True):
            relative = PurePosixPath(*name.parts[strip:]) if strip else name
            if not relative.parts:
                continue
            target = dest.joinpath(*relative.parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            total += member.size
            if total > max_bytes:
                raise FleetError(f"{tar_path.name} unpacks to more than {max_bytes} bytes; refusing it")
            target.parent.mkdir(parents=True, exist_ok=True)
            _extract_file(archive, member, target)


def _member_path(member: tarfile.TarInfo) -> PurePosixPath:
    name = member.name
    path = PurePosixPath(name)
    if name.startswith("/") or ".." in path.parts or "\\" in name or "\0" in name:
        raise FleetError(f"bundle tar entry {name!r} points outside the bundle; refusing the whole archive")
    if not (member.isfile() or member.isdir()):
        kind = "link" if member.issym() or member.islnk() else "special file"
        raise FleetError(f"bundle tar entry {name!r} is a {kind}; bundles hold only regular files")
    return PurePosixPath(*[p for p in path.parts if p != "."])


def _common_top_dir(members: list[tarfile.TarInfo], names: list[PurePosixPath]) -> int:
    """1 when every entry sits under one top-level directory that is not itself the bundle, else 0."""
    tops = {n.parts[0] for n in names if n.parts}
    if len(tops) != 1:
        return 0
    top = next(iter(tops))
    at_top = [m for m, n in zip(members, names, strict=True) if n.parts == (top,)]
    return 1 if all(m.isdir() for m in at_top) and any(len(n.parts) > 1 for n in names) else 0


def _extract_file(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = archive.extractfile(member)
    if source is None:
        raise FleetError(f"bundle tar entry {member.name!r} has no data")
    # O_EXCL|O_NOFOLLOW: a duplicate entry or a planted symlink cannot redirect the write.
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError as exc:
        raise FleetError(f"bundle tar has {member.name!r} twice; refusing it") from exc
    with source, os.fdopen(fd, "wb") as out:
        written = 0
        while block := source.read(_CHUNK):
            written += len(block)
            out.write(block)
        if written != member.size:
            raise FleetError(f"bundle tar entry {member.name!r} is truncated")


def check_only_listed_files(root: Path, listed: Iterable[str]) -> None:
    """Refuse files the (signed) manifest does not cover: the signature would not vouch for them."""
    allowed = {*listed, MANIFEST_NAME, SIGNATURE_NAME}
    for path in sorted(root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        relative = path.relative_to(root).as_posix()
        if relative not in allowed:
            raise FleetError(f"bundle holds {relative!r}, which model.json does not list; refusing it")


# -- publishing ---------------------------------------------------------------------------------------


def progress_logger(what: str, every_s: float = 2.0) -> Callable[[int, int], None]:
    """A download progress callback that logs at most every ``every_s`` seconds and at the end."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < every_s:
            return
        last[0] = now
        log.info(
            "downloading %s: %d%%",
            what,
            100 * done // max(total, 1),
            extra={"event": "update_download_progress", "bytes": done, "total": total},
        )

    return report
