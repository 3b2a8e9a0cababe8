"""Follow the compacted ``prices`` topic so a price change takes effect without a restart.

Every worker reads *all* partitions of the prices topic from the beginning (no consumer group:
each worker needs the whole catalog) in a background thread, and hands the records to the
single thread that owns the pricing engine through a queue — the engine is only ever mutated by
the agent that reads it (:meth:`PriceFeed.drain_into`), so the hot path takes no lock.

"Caught up" does not trust the broker's high watermark (the dev broker reports it wrong, see
``shared/notes/broker.md``): the initial load is done when every partition has reported EOF at
least once *and* a further quiet period passed with no record.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

log = logging.getLogger(__name__)


class RecordSink(Protocol):
    def apply_record(self, key: str, value: bytes | None) -> None: ...


class PriceFeed:
    def __init__(
        self, bootstrap: str, topic: str, *, quiet_ms: int = 300, extra_config: dict[str, Any] | None = None
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.quiet_ms = quiet_ms
        self._config = {
            "bootstrap.servers": bootstrap,
            "group.id": f"meterline-pricefeed-{uuid.uuid4().hex[:8]}",  # never committed: assign() only
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            **(extra_config or {}),
        }
        self._queue: queue.SimpleQueue[tuple[str, bytes | None]] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.records_seen = 0
        self.error: BaseException | None = None
        self._partitions: list[int] = []  # for diagnostics
        self._eof: set[int] = set()

    def start(self) -> PriceFeed:
        self._thread = threading.Thread(target=self._run, name="meterline-pricefeed", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def until_ready(self, who: str, *, warn_every_s: float = 10.0) -> None:
        """Wait (on the event loop) until the initial catch-up is done; raise if the feed died.
        Agents price nothing before this, so a feed that never becomes ready is said out loud."""
        waited = 0.0
        next_warning = warn_every_s
        while not self.ready:
            if self.error is not None:
                raise RuntimeError(f"price feed failed: {self.error}")
            await asyncio.sleep(0.05)
            waited += 0.05
            if waited >= next_warning:
                next_warning += warn_every_s
                log.warning(
                    "%s still waiting for the price feed after %.0fs: %d record(s) read, EOF on %s of %s",
                    who,
                    waited,
                    self.records_seen,
                    sorted(self._eof),
                    self._partitions,
                )

    def drain_into(self, sink: RecordSink) -> int:
        """Apply every record received so far to ``sink``; call from the engine's owner thread."""
        n = 0
        while True:
            try:
                key, value = self._queue.get_nowait()
            except queue.Empty:
                return n
            try:
                sink.apply_record(key, value)
            except Exception:
                log.exception("ignoring unusable record %r on %s", key, self.topic)
            n += 1

    def _run(self) -> None:
        consumer = Consumer(self._config)
        try:
            # Metadata can be slow right after another client died (seen: > 10 s on the dev broker
            # after a SIGKILL). A timeout here is transient: keep asking, never give up the feed
            # (the agents wait for it; a failed feed would stall them for good).
            metadata = None
            while metadata is None and not self._stop.is_set():
                try:
                    metadata = consumer.list_topics(self.topic, timeout=5)
                except KafkaException as exc:
                    log.warning("price feed: no metadata for %s yet (%s); retrying", self.topic, exc)
            if metadata is None:
                return
            partitions = sorted(metadata.topics[self.topic].partitions) if self.topic in metadata.topics else []
            self._partitions = partitions
            consumer.assign([TopicPartition(self.topic, p, 0) for p in partitions])
            at_eof = self._eof
            last_record = time.monotonic()
            while not self._stop.is_set():
                msg = consumer.poll(0.1)
                now = time.monotonic()
                if msg is None:
                    if (
                        not self._ready.is_set()
                        and at_eof >= set(partitions)
                        and (now - last_record) * 1000 >= self.quiet_ms
                    ):
                        self._ready.set()
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        at_eof.add(msg.partition())
                    else:
                        log.warning("price feed: %s", err)
                    continue
                last_record = now
                key = (msg.key() or b"").decode()
                self._queue.put((key, msg.value()))
                self.records_seen += 1
        except BaseException as exc:
            self.error = exc
            log.exception("price feed stopped")
        finally:
            consumer.close()
