"""Per-partition read cursors of the credit agent, and the reader that fills a gap in its input.

The credit agent must apply each source partition's records in offset order, starting exactly at
the table's resume offset (docs/credits.md). faust does not promise that after a restart: it may
hand over records it fetched from its own committed offset, which can be ahead of the table,
before it seeks to the offset the agent committed. An earlier design seeked the faust consumer
back from inside the agent; that raced faust's fetch loop (records fetched before the seek moved
faust's read offset past the re-read, which faust then dropped: a stalled partition, seen in the
chaos suite). So the agent never seeks any more:

* :class:`Cursors` knows the next offset due per source partition (from the table at recovery,
  then one past every record applied);
* a record below it was applied already (a re-delivery): dropped;
* a record above it means records are missing in between: :class:`GapReader` reads exactly that
  range from the broker with its own consumer (assign, no group, no commit), and the agent applies
  those records before the one in hand. Gaps in the offsets themselves (transaction markers,
  compaction on real Kafka) are fine: the reader stops at the offset in hand, not at a count.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

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
        """After a recovery: the table's resume offset of every assigned source partition."""
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

    def __init__(self, bootstrap: str, *, name: str, config: dict[str, Any] | None = None,
                 warn_every_s: float = 10.0, consumer_factory: Callable[[dict[str, Any]], Any] | None = None) -> None:  # fmt: skip
        self._config = {
            "bootstrap.servers": bootstrap,
            "group.id": f"{name}-gaps",  # never joined, never committed: assign() only
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 10,
            "log_level": 3,
            **(config or {}),
        }
        self._factory = consumer_factory
        self._consumer: Any = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.warn_every_s = warn_every_s
        self.records_read = 0

    def _client(self) -> Any:
        if self._consumer is None:
            if self._factory is not None:
                self._consumer = self._factory(self._config)
            else:
                from confluent_kafka import Consumer

                self._consumer = Consumer(self._config)
        return self._consumer

    def read(self, topic: str, partition: int, start: int, stop: int) -> list[SourceRecord]:
        """Every record with ``start <= offset < stop``, in offset order."""
        from confluent_kafka import KafkaError, TopicPartition

        if stop <= start:
            return []
        with self._lock:
            consumer = self._client()
            consumer.assign([TopicPartition(topic, partition, start)])
            out: list[SourceRecord] = []
            began = time.monotonic()
            next_warning = self.warn_every_s
            try:
                while True:
                    if self._closing.is_set():
                        raise RuntimeError(f"gap reader closed while reading {topic}:{partition} [{start}, {stop})")
                    msg = consumer.poll(0.5)
                    if msg is not None and msg.error() is None:
                        offset = msg.offset()
                        if offset >= stop:
                            break
                        if offset >= start:
                            out.append(SourceRecord(topic, partition, offset, msg.timestamp()[1], msg.key(), msg.value()))
                            if offset == stop - 1:
                                break
                        continue
                    if msg is not None and msg.error().code() == KafkaError._PARTITION_EOF:
                        # The end of the log before ``stop``: only possible when the offsets
                        # between the last record and ``stop`` hold no record (markers).
                        if msg.offset() >= stop:
                            break
                        continue
                    waited = time.monotonic() - began
                    if msg is not None:
                        log.warning("gap reader %s:%d: %s", topic, partition, msg.error())
                    if waited >= next_warning:
                        next_warning += self.warn_every_s
                        log.warning("gap reader %s:%d: still reading [%d, %d) after %.0fs, %d record(s) so far",
                                    topic, partition, start, stop, waited, len(out))  # fmt: skip
            finally:
                consumer.unassign()
            self.records_read += len(out)
            return out

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
