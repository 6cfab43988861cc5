"""The relay's journal: one row per anomalous message id, so a reject is never fired twice, even across restarts.

A row is written (committed) before the MQTT acknowledgement leaves (paho acknowledges a QoS 1 message
after the message callback returns), so a message is either in the journal or still queued in the broker:

- ``scheduled``: planned, not yet due. A restart resumes these: fired if still before their deadline,
  else counted missed.
- ``firing``: the actuator was being called when the relay stopped; the outcome is unknown, so it is
  never called again for this id (a second reject is worse than none).
- ``fired`` / ``missed`` / ``failed`` / ``unconfigured``: final.

SQLite in WAL mode with ``synchronous=NORMAL``: every commit survives the relay being killed; after a
power cut the last commits may be lost, which can only matter for a message the broker redelivers and
whose deadline has not passed by the time the box is back up. Rows older than the retention are
pruned (a duplicate cannot arrive later than the broker's session and message expiry allow).

A journal that cannot be written (disk full, read-only file system) must not stall the relay: the
decision is then kept in memory (bounded, oldest forgotten first), the message is still decided,
fired and acknowledged, and the failure is counted (``errors``), flagged (``failing``, in the relay's
stats as ``journal_ok``) and logged once per outage. What is lost meanwhile is only the restart
protection: a reject scheduled but not yet fired when the relay stops is not resumed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    message_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    state TEXT NOT NULL,
    received REAL NOT NULL,
    planned REAL,
    deadline REAL,
    fired REAL,
    message TEXT,
    plan TEXT,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_received ON decisions (received);
CREATE INDEX IF NOT EXISTS decisions_state ON decisions (state);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

FINAL_STATES = ("fired", "missed", "failed", "unconfigured", "interrupted")
STATES = ("scheduled", "firing", *FINAL_STATES)
MEMORY_ROWS = 100_000  # decisions kept in memory while the file cannot be written


class JournalError(RuntimeError):
    """The journal file cannot be opened or written; the message names the file."""


@dataclass(frozen=True)
class JournalEntry:
    """One remembered message."""

    message_id: str
    device_id: str
    sequence: int
    state: str
    received: float
    planned: float | None
    deadline: float | None
    message: str | None  # the inspection message JSON (kept while scheduled, to resume it)
    plan: dict[str, Any] | None


class DecisionJournal:
    """SQLite file of message ids and what was decided; thread-safe."""

    def __init__(self, path: Path, retention_s: float) -> None:
        self.path = Path(path)
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, str] = OrderedDict()  # message id -> state, while writes fail
        self.errors = 0
        self.failing = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot open the relay journal {self.path}: {exc}") from exc

    def claim(
        self,
        message_id: str,
        device_id: str,
        sequence: int,
        state: str,
        planned: float | None = None,
        deadline: float | None = None,
        message: str | None = None,
        plan: dict[str, Any] | None = None,
    ) -> bool:
        """Remember a message id with its first decision; False when the id was already there (a duplicate)."""
        if state not in STATES:
            raise ValueError(f"unknown journal state {state!r} (known: {STATES})")
        now = time.time()
        with self._lock:
            if message_id in self._memory:
                return False
            try:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO decisions (message_id, device_id, sequence, state, received, planned,"
                    " deadline, message, plan, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        message_id,
                        device_id,
                        sequence,
                        state,
                        now,
                        planned,
                        deadline,
                        message,
                        json.dumps(plan) if plan is not None else None,
                        now,
                    ),
                )
            except sqlite3.Error as exc:
                self._write_failed(exc)
                if self._read_state(message_id) is not None:
                    return False
                self._remember(message_id, state)
                return True
            self._write_ok()
            return cursor.rowcount == 1

    def begin_firing(self, message_id: str) -> bool:
        """``scheduled`` -> ``firing``; False when the row is not scheduled (already decided elsewhere)."""
        with self._lock:
            if message_id in self._memory:
                if self._memory[message_id] != "scheduled":
                    return False
                self._memory[message_id] = "firing"
                return True
            try:
                cursor = self._db.execute(
                    "UPDATE decisions SET state = 'firing', updated = ? WHERE message_id = ? AND state = 'scheduled'",
                    (time.time(), message_id),
                )
            except sqlite3.Error as exc:
                # Cannot mark it: fire all the same (a missed reject is the worse outcome), remember in memory.
                self._write_failed(exc)
                if self._read_state(message_id) not in (None, "scheduled"):
                    return False
                self._remember(message_id, "firing")
                return True
            self._write_ok()
            return cursor.rowcount == 1

    def finish(self, message_id: str, state: str, fired: float | None = None) -> None:
        """Record the final decision (the message JSON is no longer needed and is dropped)."""
        if state not in FINAL_STATES:
            raise ValueError(f"{state!r} is not a final journal state (known: {FINAL_STATES})")
        with self._lock:
            if message_id in self._memory:
                self._memory[message_id] = state
                return
            try:
                self._db.execute(
                    "UPDATE decisions SET state = ?, fired = ?, message = NULL, updated = ? WHERE message_id = ?",
                    (state, fired, time.time(), message_id),
                )
            except sqlite3.Error as exc:
                self._write_failed(exc)
                self._remember(message_id, state)
                return
            self._write_ok()

    def state_of(self, message_id: str) -> str | None:
        """The recorded state of a message id, or None when it was never seen (or pruned)."""
        with self._lock:
            if message_id in self._memory:
                return self._memory[message_id]
            return self._read_state(message_id)

    def _read_state(self, message_id: str) -> str | None:
        try:
            row = self._db.execute("SELECT state FROM decisions WHERE message_id = ?", (message_id,)).fetchone()
        except sqlite3.Error:
            return None
        return None if row is None else str(row[0])

    def _remember(self, message_id: str, state: str) -> None:
        self._memory[message_id] = state
        while len(self._memory) > MEMORY_ROWS:
            self._memory.popitem(last=False)

    def _write_failed(self, exc: sqlite3.Error) -> None:
        self.errors += 1
        if not self.failing:
            self.failing = True
            log.error(
                "the relay journal cannot be written; deciding from memory (rejects still fire, but are not "
                "resumed after a restart)",
                extra={"event": "relay_journal_failing", "path": str(self.path), "error": str(exc)},
            )

    def _write_ok(self) -> None:
        if self.failing:
            self.failing = False
            log.warning(
                "the relay journal can be written again",
                extra={"event": "relay_journal_recovered", "path": str(self.path), "errors": self.errors},
            )

    def entries(self, state: str) -> list[JournalEntry]:
        """Rows in one state, oldest planned first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT message_id, device_id, sequence, state, received, planned, deadline, message, plan"
                " FROM decisions WHERE state = ? ORDER BY planned",
                (state,),
            ).fetchall()
        return [
            JournalEntry(r[0], r[1], int(r[2]), r[3], r[4], r[5], r[6], r[7], json.loads(r[8]) if r[8] else None)
            for r in rows
        ]

    def prune(self, now: float | None = None) -> int:
        """Forget decided messages older than the retention; returns how many rows went."""
        horizon = (time.time() if now is None else now) - self.retention_s
        with self._lock:
            try:
                cursor = self._db.execute(
                    "DELETE FROM decisions WHERE received < ? AND state NOT IN ('scheduled', 'firing')", (horizon,)
                )
            except sqlite3.Error as exc:
                self._write_failed(exc)
                return 0
            return cursor.rowcount

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0])

    def get_meta(self, key: str) -> Any:
        """A JSON value stored under ``key``, or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON value under ``key``."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, json.dumps(value)),
                )
            except sqlite3.Error as exc:
                self._write_failed(exc)

    def close(self) -> None:
        with self._lock:
            self._db.close()
