"""sqlite-backed state of the local Stripe server (one file, or in memory when no path is given).

Contract:
- One ``Store`` per server; the server serialises all access under one lock and calls
  ``commit()`` after a request succeeded or ``rollback()`` when it raised, so a request's writes
  land together or not at all.
- Stripe objects are JSON documents in ``objects(kind, id)``; ``list_objects`` returns newest first.
- Meter events live in their own table (they are many and are aggregated by SQL range scans).
- ``now()`` is the store's clock: wall time plus a persisted offset that ``/_test/clock`` moves, so
  every time-based rule (24 h idempotency keys, 35-day event window, session expiry, billing
  periods) follows the test clock.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ALPHABET = string.ascii_letters + string.digits

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE INDEX IF NOT EXISTS objects_kind_seq ON objects (kind, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_name TEXT NOT NULL,
    identifier TEXT NOT NULL,
    customer TEXT,
    value TEXT,
    timestamp INTEGER NOT NULL,
    received INTEGER NOT NULL,
    status TEXT NOT NULL,
    error_code TEXT,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_identifier ON events (identifier);
CREATE INDEX IF NOT EXISTS events_agg ON events (event_name, customer, timestamp);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    status INTEGER NOT NULL,
    body TEXT NOT NULL,
    created INTEGER NOT NULL
);
"""

IDEMPOTENCY_TTL = 24 * 3600


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    event_name: str
    identifier: str
    customer: str | None
    value: str | None
    timestamp: int
    received: int
    status: str
    error_code: str | None
    payload: dict[str, Any]


def new_id(prefix: str) -> str:
    return prefix + "_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


class Store:
    """State file access. Not thread-safe on its own: callers hold the server lock."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        target = ":memory:" if path is None else str(path)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(target, check_same_thread=False, isolation_level="DEFERRED")
        self._db.execute("PRAGMA journal_mode=WAL" if path is not None else "PRAGMA journal_mode=MEMORY")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db.commit()

    # ------------------------------------------------------------------ transactions
    def commit(self) -> None:
        self._db.commit()

    def rollback(self) -> None:
        self._db.rollback()

    def close(self) -> None:
        self._db.commit()
        self._db.close()

    def reset(self) -> None:
        for table in ("meta", "objects", "events", "idempotency"):
            self._db.execute(f"DELETE FROM {table}")
        self._db.commit()

    # ------------------------------------------------------------------ clock
    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (key, value))

    @property
    def clock_offset(self) -> int:
        return int(self._meta("clock_offset") or 0)

    def now(self) -> int:
        """Store clock, integer unix seconds."""
        return int(time.time()) + self.clock_offset

    def advance_clock(self, seconds: int) -> int:
        self._set_meta("clock_offset", str(self.clock_offset + seconds))
        return self.now()

    def set_clock(self, ts: int) -> int:
        self._set_meta("clock_offset", str(ts - int(time.time())))
        return self.now()

    def next_number(self, name: str) -> int:
        n = int(self._meta(f"counter:{name}") or 0) + 1
        self._set_meta(f"counter:{name}", str(n))
        return n

    # ------------------------------------------------------------------ objects
    def put(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Insert or replace ``obj`` (keyed by ``obj['id']``); insertion order is kept on update."""
        row = self._db.execute("SELECT seq FROM objects WHERE kind = ? AND id = ?", (kind, obj["id"])).fetchone()
        if row is None:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM objects").fetchone()[0]
        else:
            seq = row[0]
        self._db.execute(
            "INSERT OR REPLACE INTO objects (kind, id, seq, data) VALUES (?, ?, ?, ?)",
            (kind, obj["id"], seq, json.dumps(obj)),
        )
        return obj

    def get(self, kind: str, ident: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT data FROM objects WHERE kind = ? AND id = ?", (kind, ident)).fetchone()
        return None if row is None else json.loads(row[0])

    def list_objects(self, kind: str, where: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """All objects of ``kind`` matching ``where``, newest first."""
        rows = self._db.execute("SELECT data FROM objects WHERE kind = ? ORDER BY seq DESC", (kind,))
        out = [json.loads(r[0]) for r in rows]
        return [o for o in out if where is None or where(o)]

    # ------------------------------------------------------------------ meter events
    def insert_event(
        self,
        *,
        event_name: str,
        identifier: str,
        customer: str | None,
        value: str | None,
        timestamp: int,
        received: int,
        status: str,
        error_code: str | None,
        payload: dict[str, Any],
    ) -> int:
        cur = self._db.execute(
            "INSERT INTO events (event_name, identifier, customer, value, timestamp, received, status,"
            " error_code, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (event_name, identifier, customer, value, timestamp, received, status, error_code, json.dumps(payload)),
        )
        return int(cur.lastrowid or 0)

    def _rows(self, sql: str, args: tuple[Any, ...]) -> Iterator[StoredEvent]:
        for r in self._db.execute(sql, args):
            yield StoredEvent(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], json.loads(r[9]))

    _COLS = "seq, event_name, identifier, customer, value, timestamp, received, status, error_code, payload"

    def recent_event(self, identifier: str, received_since: int) -> StoredEvent | None:
        """The newest non-deleted event with ``identifier`` received at or after ``received_since``."""
        rows = list(
            self._rows(
                f"SELECT {self._COLS} FROM events WHERE identifier = ? AND received >= ? AND status != 'deleted'"
                " ORDER BY seq DESC LIMIT 1",
                (identifier, received_since),
            )
        )
        return rows[0] if rows else None

    def set_event_status(self, seq: int, status: str) -> None:
        self._db.execute("UPDATE events SET status = ? WHERE seq = ?", (status, seq))

    def delete_event(self, identifier: str) -> int:
        cur = self._db.execute("DELETE FROM events WHERE identifier = ?", (identifier,))
        return cur.rowcount

    def valid_events(self, event_name: str, customer: str, start: int, end: int) -> list[StoredEvent]:
        """Counted events of a meter/customer with ``start <= timestamp < end``, oldest first."""
        return list(
            self._rows(
                f"SELECT {self._COLS} FROM events WHERE event_name = ? AND customer = ? AND status = 'valid'"
                " AND timestamp >= ? AND timestamp < ? ORDER BY timestamp, seq",
                (event_name, customer, start, end),
            )
        )

    def all_events(self, event_name: str | None = None) -> list[StoredEvent]:
        if event_name is None:
            return list(self._rows(f"SELECT {self._COLS} FROM events ORDER BY seq", ()))
        return list(self._rows(f"SELECT {self._COLS} FROM events WHERE event_name = ? ORDER BY seq", (event_name,)))

    # ------------------------------------------------------------------ idempotency
    def idem_get(self, key: str) -> tuple[str, int, str] | None:
        """``(fingerprint, status, body)`` of a stored response younger than 24 h (store clock)."""
        self._db.execute("DELETE FROM idempotency WHERE created < ?", (self.now() - IDEMPOTENCY_TTL,))
        row = self._db.execute("SELECT fingerprint, status, body FROM idempotency WHERE key = ?", (key,)).fetchone()
        return None if row is None else (str(row[0]), int(row[1]), str(row[2]))

    def idem_put(self, key: str, fingerprint: str, status: int, body: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO idempotency (key, fingerprint, status, body, created) VALUES (?, ?, ?, ?, ?)",
            (key, fingerprint, status, body, self.now()),
        )
