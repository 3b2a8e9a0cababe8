"""The gateway-side producer SDK: validated usage events → per-customer ``UsageBatch`` records.

Contract of :class:`UsageProducer`:

1. **Validate before Kafka.** :meth:`~UsageProducer.send` turns a dict into a
   :class:`~schemas.models.UsageEvent` (pydantic) and runs the pipeline's contract check
   (:func:`schemas.validation.validate_record`: future timestamps, all-zero usage, ...). A bad
   event raises :class:`~meterline.core.errors.InvalidEvent` and is never buffered.
2. **Batch per customer, keep order.** Events are appended to a buffer per ``customer_id``. A
   buffer becomes ONE Avro ``UsageBatch`` record (key = ``customer_id`` UTF-8) when it holds
   ``max_batch_events`` events or when its first event has waited ``linger_ms`` (a background
   thread checks every ``linger_ms / 2``, so a batch leaves within ~1.5 × ``linger_ms``).
   Records of one customer are produced in send order; the idempotent producer
   (``enable.idempotence``, ``acks=all``) keeps that order through retries. Per-event dedupe by
   ``event_id`` still happens downstream: a retried ``send`` of the same event is harmless.
3. **Route like faust.** ``partitioner=murmur2_random``: the Java-client murmur2 hash that
   aiokafka/faust use, so a customer's records land on the partition faust's tables expect.
4. **Never silent.** Every record's delivery report is collected. A failed delivery raises
   :class:`~meterline.core.errors.DeliveryFailed` (with ``event_ids`` of the lost events) from the
   next :meth:`send` / :meth:`flush` / :meth:`close`, and the optional ``on_delivery`` callback
   receives a :class:`BatchResult` for every record, ok or not.
5. **Bounded memory.** librdkafka's queue holds at most ``max_pending_records`` records. When it
   is full, ``send``/``flush`` poll and retry for up to ``queue_full_timeout`` seconds, then raise
   :class:`~meterline.core.errors.BrokerUnavailable`; the unsent batch stays buffered (nothing lost,
   order kept) and goes out on the next attempt.
6. **Flush / close.** :meth:`flush` emits every buffer and waits for all delivery reports
   (``BrokerUnavailable`` if some are still outstanding at the timeout). :meth:`close` flushes,
   then stops the background thread; the producer is also a context manager.

Thread-safety: every public method may be called from any thread. Buffers are guarded by one
lock; confluent-kafka's ``Producer`` is itself thread-safe. ``on_delivery`` runs on the
background thread or inside ``send``/``flush`` (wherever librdkafka's queue is polled): keep it
short; an exception it raises is logged, not propagated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message
from pydantic import ValidationError

from meterline.core.errors import BrokerUnavailable, ConfigError, DeliveryFailed, InvalidEvent
from meterline.stack.kafka import make_producer
from schemas.codec import AvroCodec, encode_usage_batch, event_to_record
from schemas.models import UsageEvent
from schemas.validation import invalid_event_from_pydantic, validate_record

__all__ = ["BatchResult", "UsageProducer"]

log = logging.getLogger(__name__)

#: Keep each record under Kafka's default 1 MB ``message.max.bytes`` with room for overhead.
MAX_RECORD_BYTES = 900_000


@dataclass(frozen=True)
class BatchResult:
    """The delivery report of one ``UsageBatch`` record."""

    topic: str
    customer_id: str
    event_ids: tuple[str, ...]
    partition: int | None
    offset: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Buffer:
    started: float
    records: list[dict[str, Any]] = field(default_factory=list)


class UsageProducer:
    """Batching, validating, never-silent producer of usage events (see the module docstring)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        linger_ms: int = 20,
        max_batch_events: int = 500,
        max_pending_records: int = 10_000,
        schema_store_topic: str | None = None,
        extra_config: Mapping[str, Any] | None = None,
        on_delivery: Callable[[BatchResult], None] | None = None,
        queue_full_timeout: float = 30.0,
        max_future_ms: int | None = None,
    ) -> None:
        if linger_ms < 0 or max_batch_events < 1 or max_pending_records < 1 or queue_full_timeout < 0:
            raise ConfigError(
                "linger_ms >= 0, max_batch_events >= 1, max_pending_records >= 1 and "
                "queue_full_timeout >= 0 are required"
            )
        self.topic = topic
        self.linger_s = linger_ms / 1000
        self.max_batch_events = max_batch_events
        self.queue_full_timeout = queue_full_timeout
        self._on_delivery = on_delivery
        self._max_future_ms = max_future_ms
        self._producer = make_producer(
            bootstrap,
            {
                "linger.ms": min(linger_ms, 5),
                "queue.buffering.max.messages": max_pending_records,
                "error_cb": self._on_error,
                "logger": log,  # librdkafka's own log lines go through Python logging, not raw stderr
                **(extra_config or {}),
            },
        )

        self._lock = threading.RLock()
        self._buffers: dict[str, _Buffer] = {}
        self._failures: deque[DeliveryFailed] = deque()
        self._fatal: KafkaError | None = None
        self._inflight = 0  # records produced whose delivery report has not arrived
        self._inflight_lock = threading.Lock()
        self._closed = False
        self.schema_fingerprint: bytes | None = None
        if schema_store_topic is not None:
            from meterline.stack.schema_store import KafkaSchemaStore

            self.schema_fingerprint = KafkaSchemaStore(bootstrap, schema_store_topic).publish(
                AvroCodec("UsageBatch").schema
            )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"usage-producer:{topic}", daemon=True)
        self._thread.start()

    # -- public API ----------------------------------------------------------------------------

    def send(self, event: UsageEvent | Mapping[str, Any]) -> UsageEvent:
        """Validate ``event`` and buffer it for its customer; returns the validated model.

        Raises InvalidEvent (bad event), DeliveryFailed (an EARLIER record was lost: its
        ``event_ids`` say which events to re-send), BrokerUnavailable (local queue full for
        ``queue_full_timeout``; everything accepted stays buffered). When InvalidEvent or
        DeliveryFailed is raised, THIS event was not accepted; with BrokerUnavailable it was.
        """
        self._check_open()
        ev = self._validate(event)
        record = event_to_record(ev)
        now_ms = time.time_ns() // 1_000_000
        if self._max_future_ms is None:
            validate_record(record, now_ms=now_ms)
        else:
            validate_record(record, now_ms=now_ms, max_future_ms=self._max_future_ms)
        self._raise_failures()
        with self._lock:
            buf = self._buffers.get(ev.customer_id)
            if buf is None:
                buf = self._buffers[ev.customer_id] = _Buffer(started=time.monotonic())
            buf.records.append(record)
            if len(buf.records) >= self.max_batch_events:
                self._emit(ev.customer_id)
        self._producer.poll(0)
        return ev

    def flush(self, timeout: float = 30.0) -> None:
        """Emit every buffer and wait up to ``timeout`` s for all delivery reports.

        Raises DeliveryFailed if any record failed, BrokerUnavailable if reports are still
        outstanding at the timeout (or the local queue stayed full).
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            for customer_id in list(self._buffers):
                self._emit(customer_id, deadline=deadline)
        self._producer.flush(max(0.0, deadline - time.monotonic()))
        self._raise_failures()
        remaining = self.in_flight  # our own count: librdkafka's queue length also counts non-message events
        if remaining:
            raise BrokerUnavailable(f"{remaining} usage record(s) to {self.topic!r} not acknowledged within {timeout}s")

    def close(self, timeout: float = 30.0) -> None:
        """Flush, stop the background thread, then destroy the librdkafka client. Idempotent;
        raises what :meth:`flush` raises.

        A flushed client left alive keeps its broker connections and, once the broker is gone,
        reconnects and logs ``Connect ... failed: Connection refused`` until the process exits:
        closing it here lets its owner stop the broker afterwards, quietly. When the flush failed,
        what librdkafka still holds is purged first (the raised error already reported it), so
        closing never waits for ``message.timeout.ms``.
        """
        if self._closed:
            return
        flushed = False
        try:
            self.flush(timeout)
            flushed = True
        finally:
            self._closed = True
            self._stop.set()
            self._thread.join(timeout=5)
            if not flushed:
                self._producer.purge()
            self._producer.close()

    @property
    def buffered_events(self) -> int:
        """Events accepted by :meth:`send` and not yet handed to librdkafka."""
        with self._lock:
            return sum(len(b.records) for b in self._buffers.values())

    @property
    def in_flight(self) -> int:
        """Records handed to librdkafka whose delivery report has not been served yet."""
        with self._inflight_lock:
            return self._inflight

    def __enter__(self) -> UsageProducer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # don't mask the original error; still try to deliver what was accepted
            try:
                self.close()
            except Exception:
                log.exception("UsageProducer.close() failed while handling another exception")

    # -- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("UsageProducer is closed")
        if self._fatal is not None:
            raise DeliveryFailed(f"producer hit a fatal error and cannot continue: {self._fatal}", topic=self.topic)

    @staticmethod
    def _validate(event: UsageEvent | Mapping[str, Any]) -> UsageEvent:
        if isinstance(event, UsageEvent):
            return event
        if not isinstance(event, Mapping):
            raise InvalidEvent(
                f"event must be a UsageEvent or a mapping, got {type(event).__name__}", reason_code="invalid_type"
            )
        try:
            return UsageEvent.model_validate(dict(event))
        except ValidationError as exc:
            raise invalid_event_from_pydantic(exc) from None

    def _raise_failures(self) -> None:
        if not self._failures:
            return
        failed: list[DeliveryFailed] = []
        while self._failures:
            try:
                failed.append(self._failures.popleft())
            except IndexError:
                break
        if not failed:
            return
        first = failed[0]
        event_ids = tuple(eid for f in failed for eid in getattr(f, "event_ids", ()))
        err = DeliveryFailed(
            f"{len(failed)} usage record(s) ({len(event_ids)} events) were not delivered to "
            f"{self.topic!r}; first: {first}",
            topic=self.topic,
            key=first.key,
        )
        err.event_ids = event_ids  # type: ignore[attr-defined]
        raise err

    def _emit(self, customer_id: str, *, deadline: float | None = None) -> None:
        """Produce the customer's buffer as record(s). Caller holds the lock."""
        buf = self._buffers.pop(customer_id, None)
        if buf is None or not buf.records:
            return
        chunks = self._split(buf.records)
        key = customer_id.encode()
        if deadline is None:
            deadline = time.monotonic() + self.queue_full_timeout
        for i, (records, value) in enumerate(chunks):
            event_ids = tuple(r["event_id"] for r in records)
            callback = self._delivery_callback(customer_id, event_ids)
            while True:
                try:
                    self._producer.produce(self.topic, key=key, value=value, on_delivery=callback)
                    with self._inflight_lock:
                        self._inflight += 1
                    break
                except BufferError:
                    if time.monotonic() >= deadline:
                        # Put back everything not yet handed over, ahead of newer events.
                        rest = [r for recs, _ in chunks[i:] for r in recs]
                        newer = self._buffers.pop(customer_id, None)
                        self._buffers[customer_id] = _Buffer(
                            started=buf.started, records=rest + (newer.records if newer else [])
                        )
                        raise BrokerUnavailable(
                            f"local producer queue full for {self.queue_full_timeout}s "
                            f"({len(self._producer)} records waiting for {self.topic!r}); "
                            f"{len(rest)} events of {customer_id!r} stay buffered"
                        ) from None
                    self._producer.poll(0.05)
                except KafkaException as exc:
                    # A synchronous produce error (e.g. unknown topic in a fixed config) is a
                    # delivery failure of this batch: report it, never drop silently.
                    self._record_failure(customer_id, key, event_ids, str(exc))
                    break

    @staticmethod
    def _split(records: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], bytes]]:
        """Encode ``records`` as one value, halving until every value is under MAX_RECORD_BYTES."""
        value = encode_usage_batch(records)
        if len(value) <= MAX_RECORD_BYTES or len(records) == 1:
            return [(records, value)]
        mid = len(records) // 2
        return UsageProducer._split(records[:mid]) + UsageProducer._split(records[mid:])

    def _delivery_callback(self, customer_id: str, event_ids: tuple[str, ...]) -> Callable[..., None]:
        key = customer_id.encode()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            with self._inflight_lock:
                self._inflight -= 1
            if err is not None:
                self._record_failure(customer_id, key, event_ids, str(err))
                if err.fatal():
                    self._fatal = err
                return
            self._notify(BatchResult(self.topic, customer_id, event_ids, msg.partition(), msg.offset()))

        return on_delivery

    def _record_failure(self, customer_id: str, key: bytes, event_ids: tuple[str, ...], error: str) -> None:
        failure = DeliveryFailed(
            f"UsageBatch of {len(event_ids)} events for customer {customer_id!r}: {error}", topic=self.topic, key=key
        )
        failure.event_ids = event_ids  # type: ignore[attr-defined]
        self._failures.append(failure)
        log.error("usage record not delivered: %s", failure)
        self._notify(BatchResult(self.topic, customer_id, event_ids, None, None, error))

    def _notify(self, result: BatchResult) -> None:
        if self._on_delivery is None:
            return
        try:
            self._on_delivery(result)
        except Exception:
            log.exception("on_delivery callback raised")

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
            log.error("producer fatal error: %s", err)
        else:
            log.warning("producer error (librdkafka retries): %s", err)

    def _run(self) -> None:
        """Background: emit buffers whose linger expired; serve delivery reports."""
        tick = max(self.linger_s / 2, 0.002)
        while not self._stop.wait(tick):
            now = time.monotonic()
            try:
                with self._lock:
                    for customer_id, buf in list(self._buffers.items()):
                        if now - buf.started >= self.linger_s:
                            self._emit(customer_id, deadline=now + tick)
            except BrokerUnavailable:
                pass  # queue full: the batch stayed buffered; retried on the next tick
            except Exception:
                log.exception("usage producer background emit failed")
            self._producer.poll(0)
