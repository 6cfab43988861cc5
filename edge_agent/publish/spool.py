"""The spool: a SQLite (WAL) outbox, so broker outages and agent restarts lose no QoS 1 message.

Every inspection message enters the spool when it is made and leaves it when the broker acknowledges
it (PUBACK). On start the spool loads what a previous run left: unexpired messages are sent again,
oldest first, with ``"replayed": true`` in their payload (same ``message_id``, so subscribers
deduplicate); expired ones are deleted and counted. Delivery is at-least-once: a message whose PUBACK
was lost with the connection or the process is sent again.

Writes never stall the pipeline: ``add`` and ``ack`` only touch memory; a writer thread commits
everything that accumulated every ``commit_interval_s`` in one transaction. A message the broker
acknowledges before its commit is never written at all, so with the broker up the disk sees almost
nothing. The price is the window: a SIGKILL or power cut loses the messages of the last commit
interval (50 ms by default), like the frames still in the pipeline's queues.

Bounded: beyond ``max_messages`` the oldest messages are dropped (counted and logged). The newest are
kept because they are the ones still worth acting on: an old reject order has expired, or soon will.

Memory: only sequence numbers are held for messages on disk (about 60 bytes each); payloads stay in
memory only until their commit. A spool that cannot write (disk full, I/O error) keeps its messages
in memory, counts the failures, logs them and retries; the agent keeps running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from edge_agent.publish.outbox import OutboxCounters, OutgoingMessage

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_LOG_EVERY_S = 60.0  # repeated warnings (drops, write failures) at most this often
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,   -- creation order
    key TEXT NOT NULL,         -- message id
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    expires_at REAL,           -- unix seconds; NULL = never
    created REAL NOT NULL
)
"""
_COLUMNS = "seq, key, topic, payload, qos, retain, expires_at"


class SpoolError(RuntimeError):
    """The spool cannot be used (e.g. another agent holds it); the message says why."""


@dataclass(frozen=True)
class SpoolRecovery:
    """What the spool found from a previous run when it opened."""

    replayed: int  # unexpired messages that will be sent again
    expired: int  # messages whose time to live passed while the agent was down: deleted
    corrupt_moved_to: Path | None = None  # an unreadable spool file was moved aside here


@dataclass
class SpoolCounters(OutboxCounters):
    """OutboxCounters plus the spool's own."""

    replayed: int = 0
    write_errors: int = 0
    commits: int = 0
    rows_written: int = 0
    last_error: str = ""


class Spool:
    """A SQLite outbox in WAL mode (see the module docstring for the guarantees)."""

    def __init__(
        self,
        path: Path | str,
        max_messages: int = 100_000,
        commit_interval_s: float = 0.05,
        synchronous: Literal["normal", "full"] = "normal",
    ) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        self.commit_interval_s = commit_interval_s
        self.synchronous = synchronous
        self.counters = SpoolCounters()
        self._lock = threading.Lock()  # in-memory state; never held during a disk write
        self._read_lock = threading.Lock()  # the read connection
        self._live: set[int] = set()  # pending sequence numbers
        self._order: deque[int] = deque()  # pending sequence numbers, oldest first (lazily cleaned)
        self._unflushed: dict[int, OutgoingMessage] = {}  # not yet committed, in sequence order
        self._writing: set[int] = set()  # in the transaction being written now
        self._to_delete: list[int] = []  # acknowledged or dropped, still on disk
        self._deleting = 0  # deletes in the transaction being written now (flush waits for them too)
        self._replayed: set[int] = set()  # loaded from a previous run
        self._max_on_disk = 0  # highest sequence number committed (reads above it skip the disk)
        self._next_seq = 1
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._last_warning: dict[str, float] = {}
        self._reader_closed = False
        self._lock_file = self._acquire_lock()
        try:
            self.recovery = self._open_database()
            self._writer = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._configure(self._writer)
            self._reader = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._configure(self._reader)
        except BaseException:
            self._lock_file.close()
            raise
        self._thread = threading.Thread(target=self._write_loop, name="spool-writer", daemon=True)
        self._thread.start()

    # -- opening ------------------------------------------------------------------------------------

    def _acquire_lock(self) -> TextIO:
        """One agent per spool file: a second one would send the same messages and delete the other's."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(f"{self.path}.lock", "a+")  # noqa: SIM115 (held for the spool's lifetime)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise SpoolError(
                f"spool {self.path} is in use by another edge-agent process (pid {holder}); "
                "two agents must not share spool.path (or state_dir)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def _open_database(self) -> SpoolRecovery:
        moved: Path | None = None
        try:
            replayed, expired = self._load_existing()
        except sqlite3.DatabaseError as exc:
            # A plant must never stop inspecting because a spool file was damaged (power cut on an SD card):
            # keep the evidence, start empty, say so loudly.
            moved = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}{suffix}", f"{moved}{suffix}")
            log.error(
                "spool file is unreadable; moved aside, starting with an empty spool",
                extra={"event": "spool_corrupt", "path": str(self.path), "moved_to": str(moved), "error": str(exc)},
            )
            replayed, expired = self._load_existing()
        self.counters.replayed = replayed
        self.counters.expired += expired
        recovery = SpoolRecovery(replayed=replayed, expired=expired, corrupt_moved_to=moved)
        log.info(
            "spool opened",
            extra={
                "event": "spool_opened",
                "path": str(self.path),
                "replayed": replayed,
                "expired_dropped": expired,
                "max_messages": self.max_messages,
            },
        )
        return recovery

    def _configure(self, connection: sqlite3.Connection) -> None:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        connection.execute("PRAGMA busy_timeout=5000")

    def _load_existing(self) -> tuple[int, int]:
        """Create the schema or load a previous run's messages: (kept for replay, expired and deleted)."""
        connection = sqlite3.connect(str(self.path), isolation_level=None)
        try:
            self._configure(connection)
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"spool schema version {version}, this agent reads {SCHEMA_VERSION}")
            connection.execute(_SCHEMA)
            connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            now = time.time()
            cursor = connection.execute("DELETE FROM messages WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
            expired = max(0, cursor.rowcount)
            rows = connection.execute("SELECT seq FROM messages ORDER BY seq").fetchall()
            overflow = max(0, len(rows) - self.max_messages)
            if overflow:
                connection.execute("DELETE FROM messages WHERE seq <= ?", (rows[overflow - 1][0],))
                self.counters.dropped += overflow
                rows = rows[overflow:]
            seqs = [int(r[0]) for r in rows]
            self._live = set(seqs)
            self._order = deque(seqs)
            self._replayed = set(seqs)
            top = connection.execute("SELECT MAX(seq) FROM messages").fetchone()[0]
            self._max_on_disk = int(top or 0)
            self._next_seq = self._max_on_disk + 1
            return len(seqs), expired
        finally:
            connection.close()

    # -- the Outbox interface -----------------------------------------------------------------------

    def add(self, message: OutgoingMessage) -> int:
        """Keep a message until ``ack``; returns its sequence number. Never touches the disk."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            self._unflushed[seq] = dataclasses.replace(message, seq=seq)
            self._live.add(seq)
            self._order.append(seq)
            if len(self._live) > self.max_messages:
                self._drop_oldest(len(self._live) - self.max_messages)
        self._wake.set()
        return seq

    def ack(self, seq: int) -> None:
        """The broker has it: forget it (deleted from disk at the next commit, if it was ever written)."""
        with self._lock:
            self._forget(seq)

    def after(self, seq: int, limit: int) -> list[OutgoingMessage]:
        """Up to ``limit`` pending unexpired messages above ``seq``, oldest first; expired ones are dropped."""
        found: list[OutgoingMessage] = []
        cursor = seq
        with self._lock:
            first_unflushed = next(iter(self._unflushed), self._next_seq)
            on_disk_above = self._max_on_disk > cursor
        if on_disk_above:
            # Committed rows are below every unflushed one (commits go in sequence order).
            while len(found) < limit and cursor < first_unflushed - 1:
                rows = self._read_rows(cursor, first_unflushed, limit - len(found))
                if not rows:
                    break
                cursor = rows[-1].seq
                found += self._still_pending(rows)
        if len(found) < limit:
            with self._lock:
                for number, message in self._unflushed.items():
                    if number > cursor and number in self._live:
                        found.append(message)
                        if len(found) >= limit:
                            break
        return self._drop_expired(found)

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def close(self) -> None:
        """Commit what is pending (unacknowledged messages stay on disk for the next start) and close."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._commit_once()
        with contextlib.suppress(sqlite3.Error):
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._writer.close()
        with self._read_lock:
            self._reader.close()
            self._reader_closed = True
        log.info("spool closed", extra={"event": "spool_closed", "path": str(self.path), "pending": len(self)})
        self._lock_file.close()

    # -- status -------------------------------------------------------------------------------------

    @property
    def writing_ok(self) -> bool:
        """False while commits fail (disk full, I/O error); messages are then held in memory."""
        with self._lock:
            return not self.counters.last_error

    def unflushed(self) -> int:
        """Messages not yet on disk."""
        with self._lock:
            return len(self._unflushed)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything added so far is committed (tests, clean stop); True when it is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._unflushed and not self._to_delete and not self._deleting:
                    return True
            self._wake.set()
            time.sleep(0.01)
        return False

    # -- internals ----------------------------------------------------------------------------------

    def _forget(self, seq: int) -> bool:
        """Remove a pending message (called with self._lock held); False when it was not pending."""
        if seq not in self._live:
            return False
        self._live.discard(seq)
        if seq in self._unflushed and seq not in self._writing:
            del self._unflushed[seq]  # acknowledged before it reached the disk: nothing to write
        else:
            self._to_delete.append(seq)
        while self._order and self._order[0] not in self._live:
            self._order.popleft()
        return True

    def _drop_oldest(self, count: int) -> None:
        """The spool is full: drop the ``count`` oldest pending messages (self._lock held)."""
        dropped = 0
        while dropped < count and self._order:
            if self._forget(self._order[0]):
                dropped += 1
        self.counters.dropped += dropped
        self._warn(
            "dropped",
            "spool full: dropped the oldest messages",
            {"event": "spool_full", "max_messages": self.max_messages, "dropped_total": self.counters.dropped},
        )

    def _read_rows(self, above: int, below: int, limit: int) -> list[OutgoingMessage]:
        with self._read_lock:
            if self._reader_closed:
                return []
            rows = self._reader.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE seq > ? AND seq < ? ORDER BY seq LIMIT ?",
                (above, below, limit),
            ).fetchall()
        return [self._message_from_row(row) for row in rows]

    def _message_from_row(self, row: tuple[Any, ...]) -> OutgoingMessage:
        seq, key, topic, payload, qos, retain, expires_at = row
        payload = bytes(payload)
        replayed = seq in self._replayed
        if replayed:
            payload = mark_replayed(payload)
        return OutgoingMessage(
            key=key,
            topic=topic,
            payload=payload,
            qos=int(qos),
            retain=bool(retain),
            expires_at=expires_at,
            seq=int(seq),
            replayed=replayed,
        )

    def _still_pending(self, messages: list[OutgoingMessage]) -> list[OutgoingMessage]:
        with self._lock:
            return [m for m in messages if m.seq in self._live]

    def _drop_expired(self, messages: list[OutgoingMessage]) -> list[OutgoingMessage]:
        now = time.time()
        expired = [m for m in messages if m.expired(now)]
        if not expired:
            return messages
        with self._lock:
            gone = sum(self._forget(m.seq) for m in expired)
            self.counters.expired += gone
        self._warn(
            "expired",
            "expired messages dropped instead of sent (time to live passed)",
            {"event": "spool_expired", "dropped": len(expired), "expired_total": self.counters.expired},
            level=logging.WARNING,
        )
        return [m for m in messages if not m.expired(now)]

    def _write_loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait()
            if self._closing.is_set():
                return
            # Let a commit interval's worth accumulate: most messages are acknowledged by then and never
            # reach the disk; the rest go in one transaction.
            self._closing.wait(self.commit_interval_s)
            self._wake.clear()
            self._commit_once()

    def _commit_once(self) -> None:
        with self._lock:
            batch = list(self._unflushed.values())
            self._writing = {m.seq for m in batch}
            deletes, self._to_delete = self._to_delete, []
            self._deleting = len(deletes)
        if not batch and not deletes:
            return
        rows = [(m.seq, m.key, m.topic, m.payload, m.qos, int(m.retain), m.expires_at, time.time()) for m in batch]
        try:
            self._writer.execute("BEGIN")
            if rows:
                self._writer.executemany(
                    f"INSERT OR REPLACE INTO messages ({_COLUMNS}, created) VALUES (?,?,?,?,?,?,?,?)", rows
                )
            if deletes:
                self._writer.executemany("DELETE FROM messages WHERE seq = ?", [(s,) for s in deletes])
            self._writer.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._writer.execute("ROLLBACK")
            with self._lock:
                self._writing = set()
                self._to_delete = deletes + self._to_delete
                self._deleting = 0
                self.counters.write_errors += 1
                self.counters.last_error = str(exc)
            self._warn(
                "write",
                "spool cannot write; messages are held in memory and retried",
                {
                    "event": "spool_write_failed",
                    "path": str(self.path),
                    "error": str(exc),
                    "held_in_memory": len(batch),
                    "failures": self.counters.write_errors,
                },
            )
            self._closing.wait(min(1.0, 10 * self.commit_interval_s))
            self._wake.set()
            return
        with self._lock:
            for message in batch:
                # One acknowledged while it was being written is already queued for deletion (_forget).
                self._unflushed.pop(message.seq, None)
            if batch:
                self._max_on_disk = max(self._max_on_disk, batch[-1].seq)
            self._writing = set()
            self._deleting = 0
            self.counters.commits += 1
            self.counters.rows_written += len(rows)
            if self.counters.last_error:
                log.info("spool writes work again", extra={"event": "spool_write_recovered", "path": str(self.path)})
                self.counters.last_error = ""
            if self._to_delete:
                self._wake.set()

    def _warn(self, kind: str, message: str, extra: dict[str, object], level: int = logging.ERROR) -> None:
        """Log a repeating problem at most every _LOG_EVERY_S seconds (the counters have the totals)."""
        now = time.monotonic()
        if now - self._last_warning.get(kind, float("-inf")) >= _LOG_EVERY_S:
            self._last_warning[kind] = now
            log.log(level, message, extra=extra)


def mark_replayed(payload: bytes) -> bytes:
    """An inspection payload with ``"replayed": true``; other payloads unchanged."""
    try:
        document = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(document, dict) or "replayed" not in document:
        return payload
    document["replayed"] = True
    return json.dumps(document, separators=(",", ":")).encode("utf-8")
