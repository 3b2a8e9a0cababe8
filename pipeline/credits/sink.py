"""Ledger entries from the ``ledger-entries`` topic into ClickHouse ``ledger_entries``.

:class:`LedgerEntrySink` IS a :class:`pipeline.sink.ClickHouseSink` — same consumer loop, same
flush contract (dedupe against what is stored → one insert → synchronous commit), same failure
paths (ClickHouse down: pause, retry with backoff; crash between insert and commit: replay, and
step 1 drops what is stored). Only the row mapping and the dedupe/insert target differ:

* ``_buffer`` maps a ``ledger-entries`` JSON value to a :data:`LEDGER_COLUMNS` row; a value that
  cannot be decoded is sent, with its bytes and source position, as a dead letter to
  ``usage-dead-letter`` (``dead_letters``), whose one writer -- the usage sink -- lands it in
  ``usage_rejected``. This sink never writes ``usage_rejected`` itself;
* the dedupe query looks for ``(customer_id, entry_id)`` in ``ledger_entries``;
* the parent's flush inserts into ``main_table`` / ``main_columns``: here ``ledger_entries`` with
  :data:`LEDGER_COLUMNS`.

``LEDGER_COLUMNS`` keeps the parent's key positions (entry_id at 0 like event_id, customer_id at 2),
so the parent's in-buffer dedupe (``_unique`` on those positions) dedupes by entry id.
Entry ids are deterministic (``{customer}:{seq}``), and ``ledger_entries`` is a ReplacingMergeTree
on ``(customer_id, entry_id)``: ``FINAL`` reads stay exact even in the parent's known rebalance race.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Message

from meterline.core.errors import InputError
from meterline.core.ledger import LedgerCommandError, parse_amount, to_decimal
from pipeline import sink as _sink
from pipeline.sink import ClickHouseSink, ClickHouseUnavailable
from schemas.credits import decode_json

__all__ = ["LEDGER_COLUMNS", "SNAPSHOT_COLUMNS", "LedgerEntrySink", "ledger_row", "snapshot_row"]

LEDGER_COLUMNS: tuple[str, ...] = (
    "entry_id",
    "at",
    "customer_id",
    "seq",
    "kind",
    "amount",
    "currency",
    "grant_id",
    "event_id",
    "reason",
)
assert (LEDGER_COLUMNS.index("customer_id"), LEDGER_COLUMNS.index("entry_id")) == (_sink._P_CUSTOMER, _sink._P_EVENT)


def ledger_row(d: Mapping[str, Any]) -> tuple[Any, ...]:
    """One ``ledger-entries`` value (dict) -> a ``ledger_entries`` row; exact Decimal amount."""
    try:
        amount = to_decimal(parse_amount(str(d["amount"])))
        return (
            str(d["entry_id"]),
            _sink._utc(int(d["at_ms"])),
            str(d["customer_id"]),
            int(d["seq"]),
            str(d["kind"]),
            amount,
            str(d["currency"]),
            str(d.get("grant_id") or ""),
            str(d.get("event_id") or ""),
            str(d.get("reason") or ""),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LedgerCommandError(f"not a ledger entry: {exc!r}", reason_code="undecodable") from exc


SNAPSHOT_COLUMNS: tuple[str, ...] = ("customer_id", "version", "seq", "state", "at")


def snapshot_row(snap: Mapping[str, Any]) -> tuple[Any, ...]:
    """A ``snapshot`` (pipeline.credits.processor.snapshot_of) -> a ``ledger_snapshots`` row."""
    try:
        return (
            str(snap["customer"]),
            int((snap.get("x") or {}).get("ver") or 0),
            int(snap["seq"]),
            json.dumps(snap, separators=(",", ":")),
            _sink._utc(int(snap.get("clock") or 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LedgerCommandError(f"not a ledger snapshot: {exc!r}", reason_code="undecodable") from exc


class LedgerEntrySink(ClickHouseSink):
    """``ClickHouseSink`` for ``ledger-entries`` (undecodable values go to the dead-letter topic)."""

    main_table = "ledger_entries"
    main_columns = LEDGER_COLUMNS

    def __init__(
        self,
        bootstrap: str,
        group_id: str,
        entries_topic: str,
        clickhouse: Any | Callable[[], Any],
        *,
        dead_letter_topic_out: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            bootstrap,
            group_id,
            entries_topic,
            None,
            clickhouse,
            decode_priced=decode_json,
            decode_dead_letter=decode_json,
            **kwargs,
        )
        self._snapshots: list[tuple[Any, ...]] = []
        self.snapshots_inserted = 0
        self._bootstrap = bootstrap
        self._dead_out = dead_letter_topic_out
        self._dead_producer: Any = None
        self.dead_lettered = 0

    def flush(self) -> int:
        """The parent's flush (entries, then commit), THEN the state snapshots of those messages:
        a crash in between leaves a snapshot behind its entries, which a restore rolls forward
        with the entries' fold (never a snapshot ahead of entries that are not stored).
        Snapshots are versioned (ReplacingMergeTree): re-inserting one is harmless."""
        with self._lock:
            snaps = self._snapshots
            n = super().flush()
            if snaps:
                try:
                    client = self._get_client()
                    client.insert("ledger_snapshots", snaps, column_names=SNAPSHOT_COLUMNS)
                except ClickHouseUnavailable:
                    raise
                except Exception as exc:  # kept for the next flush, like the parent's buffer
                    self._drop_client()
                    raise ClickHouseUnavailable(f"ClickHouse snapshot insert failed: {exc}") from exc
                self._snapshots = self._snapshots[len(snaps) :]
                self.snapshots_inserted += len(snaps)
            return n

    def _buffer(self, msg: Message) -> None:
        snap: tuple[Any, ...] | None = None
        try:
            doc = decode_json(msg.value() or b"")
            batch = doc.get("entries") if isinstance(doc, dict) else None
            rows_entries = [ledger_row(e) for e in batch] if isinstance(batch, list) else [ledger_row(doc)]
            if isinstance(doc, dict) and isinstance(doc.get("snapshot"), dict):
                snap = snapshot_row(doc["snapshot"])
            rows_rej: list[tuple[Any, ...]] = []
        except InputError as exc:
            rows_entries, rows_rej = [], []
            self._dead_letter(msg, exc)
        if snap is not None:
            self._snapshots.append(snap)
        self._priced.extend(rows_entries)
        self._rejected.extend(rows_rej)
        self._offsets[(msg.topic(), msg.partition())] = msg.offset()
        self.messages_consumed += 1
        if self._first_buffered is None:
            self._first_buffered = time.monotonic()

    def _dead_letter(self, msg: Message, exc: InputError) -> None:
        """Send an undecodable entry to the dead-letter topic and wait for the broker's ack, so its
        offset is committed (with the next flush) only once the dead letter is safe."""
        from meterline.stack.kafka import make_producer
        from pipeline.processor import undecodable_dead_letter

        if self._dead_producer is None:
            self._dead_producer = make_producer(self._bootstrap)
        value = undecodable_dead_letter(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), exc,
                                        time.time_ns() // 1_000_000)  # fmt: skip
        self._dead_producer.produce(self._dead_out, key=msg.key() or b"", value=value)
        if self._dead_producer.flush(30) > 0:
            raise ClickHouseUnavailable(
                f"dead letter of {msg.topic()}[{msg.partition()}]@{msg.offset()} not acknowledged"
            )
        self.dead_lettered += 1

    def _drop_stored_priced(self, client: Any, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        if not rows:
            return rows
        keys = [(r[2], r[0]) for r in rows]
        result = client.query(
            "SELECT customer_id, entry_id FROM ledger_entries WHERE customer_id IN {customers:Array(String)}"
            " AND (customer_id, entry_id) IN {keys:Array(Tuple(String, String))}",
            parameters={"customers": sorted({k[0] for k in keys}), "keys": keys},
        )
        stored = {(str(c), str(e)) for c, e in result.result_rows}
        return [r for r, k in zip(rows, keys) if k not in stored]
