"""The ClickHouse sink: priced usage and dead letters from Kafka into ``usage_priced`` / ``usage_rejected``.

A plain confluent-kafka consumer loop (not faust): it does blocking I/O and owns the embedded chDB
engine inside the ``meterline up`` process. One :class:`ClickHouseSink` consumes both the
priced-usage topic (``PricedBatch`` records, many events each) and the dead-letter topic.

Flush contract (``flush()``; the order is what makes it crash-safe without Kafka transactions):

1. **Dedupe.** Drop buffered events whose ``(customer_id, event_id)`` already exists in
   ``usage_priced`` (one parameterised query per flush, bounded by the batch's customer set and
   ``occurred_at`` range) and duplicates inside the buffer (first one wins). Same for dead letters
   against ``usage_rejected`` on their replay key. This is what keeps the materialized-view rollups
   exact: faust's pricing dedupe is not crash-exact, so upstream replays can re-emit an event, and a
   crash of this sink between (2) and (3) replays whole batches.
2. **Insert** what is left: one insert per table per flush. Money goes in as
   ``Decimal(picos).scaleb(-12)`` into ``Decimal(38, 12)``: exact.
3. **Commit** the consumed offsets synchronously (explicit offsets, last consumed + 1 per partition).

Failure paths:

* ClickHouse down (any error in 1–2, or the client factory fails): nothing is committed, the buffer
  is kept, ``flush()`` raises :class:`~meterline.core.errors.ClickHouseUnavailable`. ``run()`` then pauses
  every assigned partition, retries the whole flush (from step 1) with capped exponential backoff while
  still polling (heartbeats, rebalances), and resumes consumption once it succeeds.
* Crash between (2) and (3): the records are consumed again from the committed offsets; step (1)
  drops every event that is already stored. Nothing is lost, nothing is counted twice.
* Commit fails (broker trouble, rebalance): the rows are stored, offsets stay pending and are
  committed with the next flush; a replay is again collapsed by step (1).
* Rebalance: ``on_revoke`` flushes first. If that flush cannot reach ClickHouse, the whole buffer is
  dropped uncommitted (eager assignment revokes every partition): the next owner re-reads it.
* A record that cannot be decoded is not dropped: it becomes a ``usage_rejected`` row
  (``reason_code='undecodable'``) with its original bytes.

Known limit: two sink instances racing on the same partition during a rebalance (the old owner still
inserting while the new owner already re-reads) can both pass step (1) and insert the same event.
``usage_priced`` is a ReplacingMergeTree, so ``FINAL`` reads stay exact, but the SummingMergeTree
rollups would count it twice: :func:`rebuild_rollups` recomputes them from ``usage_priced FINAL``
(run it with the sink stopped).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from meterline.core.errors import ClickHouseUnavailable, InputError
from meterline.core.money import to_decimal
from meterline.stack import metrics

__all__ = [
    "PRICED_COLUMNS",
    "REJECTED_COLUMNS",
    "ClickHouseSink",
    "priced_row",
    "rebuild_rollups",
    "rejected_row",
]

log = logging.getLogger(__name__)

PRICED_COLUMNS: tuple[str, ...] = (
    "event_id",
    "occurred_at",
    "customer_id",
    "api_key_id",
    "project",
    "feature",
    "user_id",
    "session_id",
    "gateway",
    "provider",
    "model",
    "model_version",
    "request_id",
    "labels",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "requests",
    "cost",
    "charge",
    "currency",
    "price_version",
    "rate_card",
    "priced_at",
    "source_partition",
    "source_offset",
    # UsageEvent v2 (migration 0009)
    "cache_write_long_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "input_image_tokens",
    "output_image_tokens",
    "web_search_requests",
    "service_tier",
)
REJECTED_COLUMNS: tuple[str, ...] = (
    "reason_code",
    "reason",
    "field",
    "source_topic",
    "source_partition",
    "source_offset",
    "customer_id",
    "event_id",
    "occurred_at",
    "payload",
    "payload_format",
    "failed_at",
)

_OPTIONAL_STR = (
    "api_key_id",
    "project",
    "feature",
    "user_id",
    "session_id",
    "gateway",
    "model_version",
    "request_id",
    "price_version",
    "rate_card",
    "service_tier",
)
_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cache_write_long_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "input_image_tokens",
    "output_image_tokens",
    "web_search_requests",
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_P_CUSTOMER, _P_EVENT, _P_OCCURRED = 2, 0, 1  # positions in PRICED_COLUMNS
_P_SPART, _P_SOFFSET = PRICED_COLUMNS.index("source_partition"), PRICED_COLUMNS.index("source_offset")
_P_PRICED_AT = PRICED_COLUMNS.index("priced_at")
_R_KEY = (3, 4, 5, 7)  # (source_topic, source_partition, source_offset, event_id) in REJECTED_COLUMNS

ClientLike = Any  # a clickhouse_connect Client (kept loose: tests wrap it)
Decoder = Callable[[bytes], Any]


# --------------------------------------------------------------------------- row mapping


def _utc(value: Any) -> datetime:
    """Epoch milliseconds (the codec's form) or a datetime -> aware UTC datetime, exactly."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return _EPOCH + timedelta(milliseconds=int(value))


def _money(item: Mapping[str, Any], name: str) -> Decimal:
    """``<name>_picos`` (int, 10^-12 units) or an exact ``<name>`` Decimal/str -> Decimal; never float."""
    picos = item.get(f"{name}_picos")
    if picos is not None:
        return to_decimal(int(picos))
    value = item.get(name)
    if value is None or isinstance(value, float):
        raise InputError(
            f"{name} is missing or not exact ({type(value).__name__})", reason_code="invalid_money", field=name
        )
    return Decimal(value)


def priced_row(item: Mapping[str, Any], *, partition: int, offset: int) -> tuple[Any, ...]:
    """One decoded priced event -> a ``usage_priced`` row in :data:`PRICED_COLUMNS` order.

    Optional strings become ``''``; ``source_partition``/``source_offset`` are the event's position on
    the raw usage topic when the record carries it, else the priced record's own position.
    """
    out: dict[str, Any] = {
        "event_id": str(item["event_id"]),
        "occurred_at": _utc(item["occurred_at"]),
        "customer_id": str(item["customer_id"]),
        "provider": str(item["provider"]),
        "model": str(item["model"]),
        "requests": int(item["requests"]) if item.get("requests") is not None else 1,
        "cost": _money(item, "cost"),
        "charge": _money(item, "charge"),
        "currency": str(item.get("currency") or ""),
        "priced_at": _utc(item["priced_at"]) if item.get("priced_at") is not None else _utc(item["occurred_at"]),
        "source_partition": int(item["source_partition"]) if item.get("source_partition") is not None else partition,
        "source_offset": int(item["source_offset"]) if item.get("source_offset") is not None else offset,
    }
    for name in _OPTIONAL_STR:
        out[name] = str(item.get(name) or "")
    for name in _COUNTS:
        out[name] = int(item.get(name) or 0)
    out["labels"] = {str(k): str(v) for k, v in (item.get("labels") or {}).items()}
    return tuple(out[c] for c in PRICED_COLUMNS)


def rejected_row(item: Mapping[str, Any]) -> tuple[Any, ...]:
    """One decoded dead letter -> a ``usage_rejected`` row in :data:`REJECTED_COLUMNS` order."""
    payload = item.get("payload") or b""
    occurred = item.get("occurred_at")
    out = {
        "reason_code": str(item.get("reason_code") or "unknown"),
        "reason": str(item.get("reason") or item.get("message") or ""),
        "field": str(item.get("field") or ""),
        "source_topic": str(item.get("source_topic") or ""),
        "source_partition": int(item.get("source_partition") or 0),
        "source_offset": int(item.get("source_offset") or 0),
        "customer_id": str(item.get("customer_id") or ""),
        "event_id": str(item.get("event_id") or ""),
        "occurred_at": None if occurred is None else _utc(occurred),
        "payload": payload if isinstance(payload, bytes) else str(payload).encode(),
        "payload_format": str(item.get("payload_format") or ""),
        "failed_at": _utc(item["failed_at"]) if item.get("failed_at") is not None else datetime.now(UTC),
    }
    return tuple(out[c] for c in REJECTED_COLUMNS)


def _undecodable_row(msg: Message, exc: Exception) -> tuple[Any, ...]:
    """A record this sink cannot decode: keep it, with its bytes, instead of dropping it."""
    return rejected_row(
        {
            "reason_code": getattr(exc, "reason_code", "undecodable") or "undecodable",
            "reason": f"sink could not decode the record: {exc}",
            "field": getattr(exc, "field", None),
            "source_topic": msg.topic(),
            "source_partition": msg.partition(),
            "source_offset": msg.offset(),
            "payload": msg.value() or b"",
            "payload_format": "raw",
        }
    )


def _default_decoders() -> tuple[Decoder, Decoder]:
    from schemas import codec  # late import: the sink module stays importable without the codec

    return codec.decode_priced_batch, codec.decode_dead_letter


# --------------------------------------------------------------------------- the sink


class ClickHouseSink:
    """Consume priced usage + dead letters and write them to ClickHouse, exactly once in effect.

    ``clickhouse`` is a clickhouse-connect client, or a zero-argument factory returning one (then a
    client that failed is discarded and a new one is built on the next attempt). Counters are plain
    attributes, readable from other threads: ``rows_inserted``, ``rejected_inserted``,
    ``duplicates_dropped``, ``flushes``, ``retries``, ``commit_failures``, ``messages_consumed``.
    """

    #: where the main stream's rows go; a subclass for another stream overrides these (see
    #: pipeline/credits/sink.py) and its row mapping / dedupe; the flush contract stays this class's.
    main_table: str = "usage_priced"
    main_columns: tuple[str, ...] = PRICED_COLUMNS

    def __init__(
        self,
        bootstrap: str,
        group_id: str,
        priced_topic: str,
        dead_letter_topic: str | None,
        clickhouse: ClientLike | Callable[[], ClientLike],
        *,
        max_rows: int = 20_000,
        max_interval_ms: int = 500,
        backoff_initial_ms: int = 100,
        backoff_max_ms: int = 5_000,
        consumer_config: Mapping[str, Any] | None = None,
        decode_priced: Decoder | None = None,
        decode_dead_letter: Decoder | None = None,
    ) -> None:
        if max_rows < 1 or max_interval_ms < 0:
            raise ValueError("max_rows must be >= 1 and max_interval_ms >= 0")
        self.group_id = group_id
        self.priced_topic = priced_topic
        self.dead_letter_topic = dead_letter_topic
        self.max_rows = max_rows
        self.max_interval = max_interval_ms / 1000
        self.backoff_initial = backoff_initial_ms / 1000
        self.backoff_max = backoff_max_ms / 1000
        if hasattr(clickhouse, "insert") and hasattr(clickhouse, "query"):
            self._client: ClientLike | None = clickhouse
            self._factory: Callable[[], ClientLike] | None = None
        else:
            self._client, self._factory = None, clickhouse
        if decode_priced is None or decode_dead_letter is None:
            default_priced, default_dead = _default_decoders()
            decode_priced = decode_priced or default_priced
            decode_dead_letter = decode_dead_letter or default_dead
        self._decode_priced, self._decode_dead = decode_priced, decode_dead_letter

        self._priced: list[tuple[Any, ...]] = []
        self._rejected: list[tuple[Any, ...]] = []
        self._offsets: dict[tuple[str, int], int] = {}  # last consumed offset per (topic, partition)
        self._first_buffered: float | None = None
        self._source_high: dict[int, int] | None = None  # see _drop_stored_priced
        self._all_suspects = False  # more than one broker epoch: high marks say nothing (see _broker_changed)
        self._degraded = False  # ClickHouse unreachable: partitions paused, flush being retried
        self._lock = threading.RLock()

        self.rows_inserted = 0
        self.rejected_inserted = 0
        self.duplicates_dropped = 0
        self.flushes = 0
        self.retries = 0
        self.commit_failures = 0
        self.messages_consumed = 0
        self.last_error: str | None = None

        config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "range",  # eager: on_revoke always revokes everything
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        }
        config.update(consumer_config or {})
        self._consumer = Consumer(config)
        topics = [priced_topic] + ([dead_letter_topic] if dead_letter_topic else [])
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)

    # ------------------------------------------------------------------ public surface

    @property
    def buffered(self) -> int:
        """Rows waiting for the next flush (priced + rejected)."""
        return len(self._priced) + len(self._rejected)

    @property
    def degraded(self) -> bool:
        """True while ClickHouse is unreachable and consumption is paused."""
        return self._degraded

    def stats(self) -> dict[str, Any]:
        """The counters as a dict (for the API / demo)."""
        return {
            "rows_inserted": self.rows_inserted,
            "rejected_inserted": self.rejected_inserted,
            "duplicates_dropped": self.duplicates_dropped,
            "flushes": self.flushes,
            "retries": self.retries,
            "commit_failures": self.commit_failures,
            "messages_consumed": self.messages_consumed,
            "buffered": self.buffered,
            "degraded": self._degraded,
            "last_error": self.last_error,
        }

    def poll_once(self, timeout: float = 0.1, max_messages: int = 500) -> int:
        """Consume up to ``max_messages`` records into the buffer; return how many were consumed.

        Does not flush. Broker-level errors are logged (librdkafka retries them itself); a fatal
        consumer error raises :class:`KafkaException`.
        """
        messages = self._consumer.consume(num_messages=max_messages, timeout=timeout)
        with self._lock:
            for msg in messages:
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise KafkaException(err)
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", err)
                    continue
                self._buffer(msg)
        return len(messages)

    def should_flush(self) -> bool:
        """True when the buffer is full or its oldest record waited ``max_interval_ms``."""
        if self.buffered >= self.max_rows:
            return True
        return self._first_buffered is not None and time.monotonic() - self._first_buffered >= self.max_interval

    def flush(self) -> int:
        """Dedupe, insert, commit (see the module docstring). Return the number of rows inserted.

        Raises :class:`ClickHouseUnavailable` when ClickHouse cannot be reached; the buffer is then
        kept intact and nothing is committed, so calling ``flush()`` again is always safe.
        """
        with self._lock:
            if not self._offsets and not self._priced and not self._rejected:
                return 0
            started = time.monotonic()
            priced, rejected = self._priced, self._rejected
            try:
                client = self._get_client()
                # (1) dedupe against what is stored and inside the buffer. Failure: nothing was
                # written, the buffer is intact -> ClickHouseUnavailable, retry later.
                new_priced = self._drop_stored_priced(client, _unique(priced, (_P_CUSTOMER, _P_EVENT)))
                new_rejected = self._drop_stored_rejected(client, _unique(rejected, _R_KEY))
                # (2) one insert per table. Failure after the first insert succeeded: nothing is
                # committed, and the retry's step (1) drops the rows that did land -> no duplicates.
                if new_priced:
                    client.insert(self.main_table, new_priced, column_names=self.main_columns)
                if new_rejected:
                    client.insert("usage_rejected", new_rejected, column_names=REJECTED_COLUMNS)
            except ClickHouseUnavailable:
                raise
            except Exception as exc:  # every ClickHouse error is retried: the buffer is valid data
                self._drop_client()
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise ClickHouseUnavailable(f"ClickHouse flush failed: {exc}") from exc
            self.duplicates_dropped += len(priced) - len(new_priced) + len(rejected) - len(new_rejected)
            self.rows_inserted += len(new_priced)
            self.rejected_inserted += len(new_rejected)
            self.flushes += 1
            self._priced, self._rejected, self._first_buffered = [], [], None
            # (3) commit last consumed + 1 per partition, synchronously. Failure: the rows are stored;
            # the offsets stay pending for the next flush, and a replay meanwhile is dropped by (1).
            self._commit()
            self._observe_flush(new_priced, len(new_priced) + len(new_rejected), time.monotonic() - started)
            return len(new_priced) + len(new_rejected)

    def _observe_flush(self, new_priced: list[tuple[Any, ...]], rows: int, seconds: float) -> None:
        """meterline_sink_flush_rows/_seconds, and priced -> row per inserted usage row."""
        name = self.main_table
        metrics.SINK_FLUSH_ROWS.labels(name).observe(rows)
        metrics.SINK_FLUSH_SECONDS.labels(name).observe(seconds)
        if name == "usage_priced" and new_priced:
            now_ms = time.time_ns() // 1_000_000
            for row in new_priced:
                metrics.observe_stage_ms("row", _epoch_ms(row[_P_PRICED_AT]), now_ms)

    def run(self, stop_event: threading.Event) -> None:
        """Consume and flush until ``stop_event`` is set, then flush once more and close.

        While ClickHouse is down: pause all assigned partitions, keep polling (heartbeats and
        rebalances are served), retry the flush with capped exponential backoff, resume on success.
        """
        backoff = self.backoff_initial
        try:
            while not stop_event.is_set():
                if self._degraded:
                    self._pause_assigned()
                    self._poll_for(backoff, stop_event)
                    if stop_event.is_set():
                        break
                    try:
                        self.flush()
                    except ClickHouseUnavailable as exc:
                        self.retries += 1
                        backoff = min(backoff * 2, self.backoff_max)
                        log.warning(
                            "ClickHouse still unavailable (retry %d, next in %.2fs): %s", self.retries, backoff, exc
                        )
                        continue
                    self._resume_assigned()
                    backoff = self.backoff_initial
                    continue
                self.poll_once(timeout=min(0.1, max(self.max_interval, 0.005)))
                if self.should_flush():
                    try:
                        self.flush()
                    except ClickHouseUnavailable as exc:
                        log.warning("ClickHouse unavailable, pausing consumption: %s", exc)
                        self._degraded = True
                        self._pause_assigned()
            if not self._degraded:
                try:  # best effort: anything not flushed is simply re-read by the next owner
                    self.flush()
                except ClickHouseUnavailable as exc:
                    log.warning("final flush failed, records will be replayed: %s", exc)
        finally:
            self.close()

    def close(self) -> None:
        """Leave the group and close the consumer (idempotent). Does not flush."""
        with self._lock:
            if self._consumer is None:
                return
            consumer, self._consumer = self._consumer, None
            self._priced, self._rejected, self._offsets = [], [], {}
        try:
            consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close failed: %s", exc)

    # ------------------------------------------------------------------ internals

    def _buffer(self, msg: Message) -> None:
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        value = msg.value() or b""
        try:
            if topic == self.dead_letter_topic:
                rows_rej = [rejected_row(self._decode_dead(value))]
                rows_priced: list[tuple[Any, ...]] = []
            else:
                rows_priced = [priced_row(i, partition=partition, offset=offset) for i in self._decode_priced(value)]
                rows_rej = []
        except (InputError, KeyError, TypeError, ValueError, ArithmeticError) as exc:
            rows_priced, rows_rej = [], [_undecodable_row(msg, exc)]
        self._priced.extend(rows_priced)
        self._rejected.extend(rows_rej)
        self._offsets[(topic, partition)] = offset
        self.messages_consumed += 1
        if self._first_buffered is None:
            self._first_buffered = time.monotonic()

    def _get_client(self) -> ClientLike:
        if self._client is None:
            assert self._factory is not None
            try:
                self._client = self._factory()
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise ClickHouseUnavailable(f"cannot connect to ClickHouse: {exc}") from exc
        return self._client

    def _drop_client(self) -> None:
        if self._factory is None:
            return  # a fixed client is kept: nothing else to retry with
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def _drop_stored_priced(self, client: ClientLike, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Drop rows already in usage_priced. Only *suspects* are looked up: the pricing agent
        handles each usage-events partition in order, so an event whose source offset is above the
        highest one stored for its source partition cannot be stored yet (replays — a sink restart
        or a re-emitting pricing agent — always carry an offset at or below it). The high marks are
        re-read from ClickHouse on every assignment (another sink may have written meanwhile) and
        raised as rows are accepted; a mark that runs ahead of a failed insert only makes more rows
        suspects, never fewer."""
        if not rows:
            return rows
        if self._source_high is None:
            result = client.query(
                "SELECT source_partition, max(source_offset) FROM usage_priced GROUP BY source_partition"
            )
            self._source_high = {int(p): int(o) for p, o in result.result_rows}
            self._all_suspects = _broker_changed(client)
        high = self._source_high
        if self._all_suspects:  # offsets restarted on a new broker: any row may be stored already
            suspects = rows
        else:
            suspects = [r for r in rows if r[_P_SOFFSET] <= high.get(r[_P_SPART], -1)]
        stored = self._stored_priced(client, suspects) if suspects else set()
        fresh = [r for r in rows if (r[_P_CUSTOMER], r[_P_EVENT]) not in stored]
        for r in fresh:
            if r[_P_SOFFSET] > high.get(r[_P_SPART], -1):
                high[r[_P_SPART]] = r[_P_SOFFSET]
        return fresh

    def _stored_priced(self, client: ClientLike, rows: list[tuple[Any, ...]]) -> set[tuple[str, str]]:
        keys = [(r[_P_CUSTOMER], r[_P_EVENT]) for r in rows]
        times = [r[_P_OCCURRED] for r in rows]
        # A replayed event has the same occurred_at, so the range prunes partitions without missing it.
        result = client.query(
            "SELECT customer_id, event_id FROM usage_priced"
            " WHERE customer_id IN {customers:Array(String)}"
            " AND occurred_at BETWEEN fromUnixTimestamp64Milli({lo:Int64}, 'UTC')"
            " AND fromUnixTimestamp64Milli({hi:Int64}, 'UTC')"
            " AND (customer_id, event_id) IN {keys:Array(Tuple(String, String))}",
            parameters={
                "customers": sorted({k[0] for k in keys}),
                "keys": keys,
                "lo": _epoch_ms(min(times)),
                "hi": _epoch_ms(max(times)),
            },
        )
        return {(str(c), str(e)) for c, e in result.result_rows}

    def _drop_stored_rejected(self, client: ClientLike, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        if not rows:
            return rows
        keys = [tuple(r[i] for i in _R_KEY) for r in rows]
        result = client.query(
            "SELECT source_topic, source_partition, source_offset, event_id FROM usage_rejected"
            " WHERE (source_topic, source_partition, source_offset, event_id)"
            " IN {keys:Array(Tuple(String, UInt32, UInt64, String))}",
            parameters={"keys": keys},
        )
        stored = {(str(t), int(p), int(o), str(e)) for t, p, o, e in result.result_rows}
        return [r for r, k in zip(rows, keys) if k not in stored]

    def _commit(self) -> None:
        if not self._offsets or self._consumer is None:
            return
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in sorted(self._offsets.items())]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            self.commit_failures += 1
            self.last_error = f"commit failed: {exc}"
            log.warning("offset commit failed, will retry with the next flush: %s", exc)
            return
        self._offsets = {}

    def _poll_for(self, seconds: float, stop_event: threading.Event) -> None:
        """Keep serving the consumer (paused partitions return nothing) for ``seconds``."""
        deadline = time.monotonic() + seconds
        while not stop_event.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.poll_once(timeout=min(remaining, 0.1))

    def _pause_assigned(self) -> None:
        if self._consumer is None:
            return
        assigned = self._consumer.assignment()
        if assigned:
            self._consumer.pause(assigned)

    def _resume_assigned(self) -> None:
        self._degraded = False
        if self._consumer is None:
            return
        assigned = self._consumer.assignment()
        if assigned:
            self._consumer.resume(assigned)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("sink assigned %s", [(p.topic, p.partition) for p in partitions])
        self._source_high = None  # re-read at the next flush: another sink may have written

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Flush before giving partitions away; if ClickHouse is down, drop the uncommitted buffer."""
        with self._lock:
            try:
                self.flush()
            except ClickHouseUnavailable as exc:
                # Failure path: nothing of the buffer was committed; the next owner of these partitions
                # starts from the committed offsets and re-reads it. Keeping it here would duplicate.
                log.warning("flush on revoke failed, dropping %d buffered rows for replay: %s", self.buffered, exc)
                self._priced, self._rejected, self._offsets, self._first_buffered = [], [], {}, None
            # Offsets that could not be committed belong to partitions we no longer own.
            self._offsets = {}


def _broker_changed(client: ClientLike) -> bool:
    """True when ClickHouse has seen more than one broker epoch (``broker_epochs``, written at
    every start by pipeline.restore): source offsets restarted from 0 on a new broker, so a row
    above the stored high mark may still be an event stored under the old broker (a gateway retry
    after a one-box restart). The sink then looks every row up (docs/restore.md)."""
    try:
        return int(client.query("SELECT uniqExact(epoch) FROM broker_epochs").result_rows[0][0]) > 1
    except Exception:
        return False


def _unique(rows: Sequence[tuple[Any, ...]], key: tuple[int, ...]) -> list[tuple[Any, ...]]:
    """Rows with duplicate keys removed, first occurrence kept, order preserved."""
    seen: set[tuple[Any, ...]] = set()
    out: list[tuple[Any, ...]] = []
    for row in rows:
        k = tuple(row[i] for i in key)
        if k not in seen:
            seen.add(k)
            out.append(row)
    return out


def _epoch_ms(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(milliseconds=1)


# --------------------------------------------------------------------------- repair


_ROLLUP_SELECT = """
SELECT
    {bucket} AS {name}, customer_id, provider, model, project, feature, currency,
    count() AS events, sum(requests) AS requests, sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens, sum(cached_input_tokens) AS cached_input_tokens,
    sum(cache_write_tokens) AS cache_write_tokens, sum(reasoning_tokens) AS reasoning_tokens,
    sum(cost) AS cost, sum(charge) AS charge
FROM usage_priced FINAL
GROUP BY {name}, customer_id, provider, model, project, feature, currency
"""
# The re-rating corrections' share (0008_corrections.sql's views): money only, events and tokens 0.
_CORRECTIONS_SELECT = """
SELECT
    {bucket} AS {name}, customer_id, provider, model, project, feature, currency,
    0 AS events, 0 AS requests, 0 AS input_tokens, 0 AS output_tokens, 0 AS cached_input_tokens,
    0 AS cache_write_tokens, 0 AS reasoning_tokens, sum(cost) AS cost, sum(charge) AS charge
FROM usage_corrections FINAL
GROUP BY {name}, customer_id, provider, model, project, feature, currency
"""
_ROLLUPS: tuple[tuple[str, str, str], ...] = (
    ("usage_hourly", "hour", "toStartOfHour(toDateTime(occurred_at, 'UTC'))"),
    ("usage_daily", "day", "toDate(occurred_at, 'UTC')"),
)


def rebuild_rollups(client: ClientLike, tables: Iterable[str] = ("usage_hourly", "usage_daily")) -> None:
    """Recompute ``usage_hourly`` / ``usage_daily`` from ``usage_priced FINAL`` plus the re-rating
    corrections (``usage_corrections FINAL``, docs/corrections.md) (repairs double counts).

    Run it with the sink stopped: rows inserted while it runs reach the rollup through the
    materialized view *and* through this rebuild. The SELECT mirrors ``0002_rollups.sql`` (a test
    keeps them equal).
    """
    wanted = set(tables)
    for table, name, bucket in _ROLLUPS:
        if table not in wanted:
            continue
        client.command(f"TRUNCATE TABLE {table}")
        client.command(f"INSERT INTO {table} {_ROLLUP_SELECT.format(bucket=bucket, name=name)}")
        client.command(f"INSERT INTO {table} {_CORRECTIONS_SELECT.format(bucket=bucket, name=name)}")
