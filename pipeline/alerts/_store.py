"""The delivered-alerts store: one SQLite file (under data_dir) of ``(alert_id, url) -> outcome``.

An alert is delivered to a URL at most once *per store*: the dispatcher checks it before sending
and records ``delivered`` right after a 2xx (or ``dead`` when it gave up). A crash between the 2xx
and the record sends that one alert again: receivers dedupe on ``Meterline-Alert-Id``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Literal

Outcome = Literal["delivered", "dead"]


class DeliveredStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS deliveries (alert_id TEXT NOT NULL, url TEXT NOT NULL, "
            "outcome TEXT NOT NULL, at_s INTEGER NOT NULL, attempts INTEGER NOT NULL, "
            "PRIMARY KEY (alert_id, url))"
        )

    def outcome(self, alert_id: str, url: str) -> Outcome | None:
        with self._lock:
            row = self._db.execute(
                "SELECT outcome FROM deliveries WHERE alert_id = ? AND url = ?", (alert_id, url)
            ).fetchone()
        return row[0] if row else None

    def record(self, alert_id: str, url: str, outcome: Outcome, attempts: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO deliveries (alert_id, url, outcome, at_s, attempts) VALUES (?, ?, ?, ?, ?)",
                (alert_id, url, outcome, int(time.time()), attempts),
            )

    def prune(self, older_than_s: int) -> int:
        """Forget outcomes older than ``older_than_s`` (keep it longer than the alerts topic retention)."""
        with self._lock:
            cur = self._db.execute("DELETE FROM deliveries WHERE at_s < ?", (int(time.time()) - older_than_s,))
            return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
