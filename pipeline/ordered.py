"""Exactly-ordered delivery of source partitions to an agent, whatever faust hands over.

faust does not guarantee an agent sees every record of a partition once, in order, after a
restart or a rebalance. Measured here (docs/invariants.md, "Finding: liveness"):

* it hands over records fetched from its own committed offset before it seeks to the offset the
  credit agent committed (so the first record may be later than due);
* records that reach a stream queue between ``perform_seek`` and ``flow_control.resume()`` (which
  clears the queues) are dropped while faust's read offset moves past them: they never arrive,
  and faust's gap bookkeeping may later commit past them;
* a seek from inside an agent races faust's fetch loop (the rest of a batch fetched before the
  seek moves the read offset past the re-read, which faust then drops).

So neither agent trusts the stream for position. :class:`OrderedSource` keeps a cursor per
source partition (:class:`Cursors`: the next offset due, from a start offset the agent knows is
safe) and hands ``apply`` every record exactly once, in offset order:

* a record below the cursor was applied already (a re-delivery): dropped;
* a record above it means records are missing in between: :class:`GapReader` reads exactly that
  range with a consumer of its own (assign, no group membership, no commit) and they are applied
  first;
* a partition with no delivery for a while although faust read past the cursor (or the highwater
  is above it) is swept: the reader reads from the cursor to the end of the log.

The stream still drives the normal path (one hand-over per record); the reader costs nothing
until faust misbehaves. Offset gaps in the log itself (transaction markers, compaction on real
Kafka) are fine: ranges end at an offset or at the end of the log, never at a count.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True, slots=True)
class SourceRecord:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None


class Cursors:
    """The next offset due per source partition. Pure bookkeeping: no Kafka."""

    def __init__(self) -> None:
        self._next: dict[Key, int] = {}

    def reset(self, offsets: dict[Key, int]) -> None:
        """The start offset of every assigned source partition (replaces all cursors)."""
        self._next = dict(offsets)

    def forget(self, key: Key) -> None:
        self._next.pop(key, None)

    def known(self, key: Key) -> bool:
        return key in self._next

    def set(self, key: Key, offset: int) -> None:
        self._next[key] = offset

    def due(self, key: Key) -> int:
        return self._next[key]

    def classify(self, key: Key, offset: int) -> str:
        """``"next"`` (apply it), ``"seen"`` (already applied: drop) or ``"gap"`` (read
        ``due(key)..offset-1`` first)."""
        due = self._next[key]
        if offset == due:
            return "next"
        return "seen" if offset < due else "gap"

    def applied(self, key: Key, offset: int) -> None:
        self._next[key] = offset + 1


class GapReader:
    """Reads ``[start, stop)`` of one partition with a consumer of its own (blocking; call it from
    an executor thread). Never gives up: a broker that is slow to answer is retried, with a warning
    every ``warn_every_s``, because the partition cannot move on without these records."""

    def __init__(self, bootstrap: str, *, name: str, warn_every_s: float = 10.0) -> None:
        self._config = {
            "bootstrap.servers": bootstrap,
            "group.id": f"{name}-gaps",  # never joined, never committed: assign() only
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 10,
            "log_level": 3,
        }
        self._consumer: Any = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.warn_every_s = warn_every_s
        self.records_read = 0

    def _client(self) -> Any:
        if self._consumer is None:
            from confluent_kafka import Consumer

            self._consumer = Consumer(self._config)
        return self._consumer

    def read(
        self, topic: str, partition: int, start: int, stop: int | None, *, limit: int = 100_000
    ) -> list[SourceRecord]:
        """Every record with ``start <= offset < stop`` in offset order; with ``stop=None``, from
        ``start`` to the end of the log (at most ``limit`` records)."""
        from confluent_kafka import KafkaError, TopicPartition

        if stop is not None and stop <= start:
            return []
        with self._lock:
            consumer = self._client()
            consumer.assign([TopicPartition(topic, partition, start)])
            out: list[SourceRecord] = []
            began = time.monotonic()
            next_warning = self.warn_every_s
            try:
                while len(out) < limit:
                    if self._closing.is_set():
                        raise RuntimeError(f"gap reader closed while reading {topic}:{partition} from {start}")
                    msg = consumer.poll(0.5)
                    if msg is not None and msg.error() is None:
                        offset = msg.offset()
                        if stop is not None and offset >= stop:
                            break
                        if offset >= start:
                            out.append(
                                SourceRecord(topic, partition, offset, msg.timestamp()[1], msg.key(), msg.value())
                            )
                            if stop is not None and offset == stop - 1:
                                break
                        continue
                    if msg is not None and msg.error().code() == KafkaError._PARTITION_EOF:
                        # The end of the log. Before ``stop`` only when the offsets between the
                        # last record and ``stop`` hold no record (markers): keep waiting then.
                        if stop is None or msg.offset() >= stop:
                            break
                        continue
                    waited = time.monotonic() - began
                    if msg is not None:
                        log.warning("gap reader %s:%d: %s", topic, partition, msg.error())
                    if waited >= next_warning:
                        next_warning += self.warn_every_s
                        log.warning(
                            "gap reader %s:%d: still reading from %d (to %s) after %.0fs, %d record(s) so far",
                            topic,
                            partition,
                            start,
                            stop,
                            waited,
                            len(out),
                        )
            finally:
                consumer.unassign()
            self.records_read += len(out)
            return out

    def committed_or_earliest(self, group: str, topic: str, partition: int) -> int:
        """The group's committed offset of the partition, or (none committed) the log start offset:
        where a consumer of ``group`` with ``auto.offset.reset=earliest`` starts."""
        from confluent_kafka import Consumer, TopicPartition

        probe = Consumer({**self._config, "group.id": group})  # never subscribes: no group membership
        try:
            while True:
                try:
                    (tp,) = probe.committed([TopicPartition(topic, partition)], timeout=10)
                    if tp.error is None and tp.offset >= 0:
                        return int(tp.offset)
                    low, _high = probe.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                    return int(low)
                except Exception as exc:
                    if self._closing.is_set():
                        raise
                    log.warning("gap reader: no committed offset for %s:%d yet (%s); retrying", topic, partition, exc)
        finally:
            probe.close()

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None


class OrderedSource:
    """Hands ``apply`` every record of each source partition once, in offset order (module doc).

    ``start_offset(topic, partition)`` (awaited) gives the first offset due for a partition the
    source has no cursor for (after an assignment). ``apply`` is awaited
    per record, one at a time (an asyncio lock serialises stream deliveries and sweeps).
    """

    def __init__(
        self,
        name: str,
        reader: GapReader,
        start_offset: Callable[[str, int], Awaitable[int]],
        apply: Callable[[SourceRecord], Awaitable[None]],
        *,
        idle_s: float = 10.0,
    ) -> None:
        self.name = name
        self.reader = reader
        self.start_offset = start_offset
        self.apply = apply
        self.idle_s = idle_s
        self.cursors = Cursors()
        self.lock = asyncio.Lock()
        self._last_delivery: dict[Key, float] = {}
        self.gap_fills = 0  # ranges read because a later record arrived first
        self.sweeps = 0  # partitions read to the end because records stopped arriving
        self.filled = 0  # records applied from the reader (gaps and sweeps)
        self.redelivered = 0  # records dropped as already applied
        self.applied = 0  # records applied, from either path

    def reset(self, offsets: dict[Key, int]) -> None:
        """After a recovery: the start offset of every assigned partition (those not listed are
        asked of ``start_offset`` when first needed)."""
        self.cursors.reset(offsets)
        now = time.monotonic()
        self._last_delivery = {k: now for k in offsets}

    def assigned(self, keys: Iterable[Key]) -> None:
        """Partitions just assigned: their idle clock starts now (see :meth:`stalled`)."""
        now = time.monotonic()
        for k in keys:
            self._last_delivery.setdefault(k, now)

    def forget(self, keys: Iterable[Key]) -> None:
        for k in keys:
            self.cursors.forget(k)
            self._last_delivery.pop(k, None)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _ensure(self, key: Key) -> None:
        if not self.cursors.known(key):
            self.cursors.set(key, int(await self.start_offset(*key)))

    async def _apply(self, rec: SourceRecord) -> None:
        key = (rec.topic, rec.partition)
        await self.apply(rec)
        # A reset (recovery) or forget (revocation) while ``apply`` awaited wins over this advance.
        if self.cursors.known(key) and self.cursors.due(key) == rec.offset:
            self.cursors.applied(key, rec.offset)
        self.applied += 1

    async def deliver(self, rec: SourceRecord) -> None:
        """A record the stream handed over."""
        key = (rec.topic, rec.partition)
        async with self.lock:
            self._last_delivery[key] = time.monotonic()
            await self._ensure(key)
            verdict = self.cursors.classify(key, rec.offset)
            if verdict == "seen":
                self.redelivered += 1
                return
            if verdict == "gap":
                due = self.cursors.due(key)
                self.gap_fills += 1
                log.warning(
                    "%s: %s:%d delivered %d while %d is due: reading [%d, %d) first",
                    self.name,
                    rec.topic,
                    rec.partition,
                    rec.offset,
                    due,
                    due,
                    rec.offset,
                )
                for missing in await self._run(self.reader.read, rec.topic, rec.partition, due, rec.offset):
                    await self._apply(missing)
                    self.filled += 1
            await self._apply(rec)

    def stalled(self, key: Key, read_offset: int | None, highwater: int | None, now: float | None = None) -> bool:
        """True when ``key`` had no delivery for ``idle_s`` although records past its cursor exist:
        the highwater (next offset to be written) is above the cursor, or faust's read offset (the
        last offset it handed over or dropped; right after a seek, the next one to read) is past
        it. On real Kafka the highwater alone decides; the read offset also catches records faust
        dropped inside the dev broker's last batch, whose highwater is the batch's base + 1.
        A partition never delivered since its assignment counts once it is idle."""
        now = time.monotonic() if now is None else now
        if now - self._last_delivery.get(key, now) < self.idle_s:
            return False
        if not self.cursors.known(key):
            return True  # assigned, idle, never delivered: look once (the sweep learns the cursor)
        due = self.cursors.due(key)
        return (highwater is not None and highwater > due) or (read_offset is not None and read_offset > due)

    async def sweep(self, key: Key, *, limit: int = 10_000) -> int:
        """Read ``key`` from its cursor to the end of the log and apply what is there."""
        async with self.lock:
            self._last_delivery[key] = time.monotonic()
            await self._ensure(key)
            due = self.cursors.due(key)
            records = await self._run(lambda: self.reader.read(key[0], key[1], due, None, limit=limit))
            for rec in records:
                if self.cursors.classify(key, rec.offset) == "seen":
                    continue
                await self._apply(rec)
                self.filled += 1
            if records:
                self.sweeps += 1
                log.warning(
                    "%s: %s:%d had no delivery for %.0fs with records due from %d: applied %d from the log",
                    self.name,
                    key[0],
                    key[1],
                    self.idle_s,
                    due,
                    len(records),
                )
            return len(records)
