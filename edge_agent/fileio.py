"""Durable file writes and sha256, one implementation for every module that needs them.

``atomic_write`` (and ``atomic_writer`` for streamed content) gives readers the old content or the new,
never a torn file, and survives a power cut once it returns: the content goes to a temporary file in
the same directory (created exclusively, with its final permissions from the first byte), is fsynced,
renamed over the target, and the directory is fsynced so the rename itself is on disk. Used by the
engine cache, the signing keys, the models directory's state files and the fleet publisher.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_writer", "fsync_dir", "replace_durably", "sha256_bytes", "sha256_file"]

_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(source: Path, target: Path) -> None:
    """``os.replace(source, target)`` and fsync the directory; ``source`` must already be fsynced."""
    os.replace(source, target)
    fsync_dir(Path(target).parent)


@contextmanager
def atomic_writer(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file to write; on a clean exit it replaces ``path`` durably, on an exception it is removed.

    ``mode`` applies from creation (a private key is never readable by others, not even briefly).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A random name, created exclusively: no clash between writers, and never through a planted symlink.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` atomically and durably (see the module docstring)."""
    with atomic_writer(path, mode) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes in memory."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = _CHUNK) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
