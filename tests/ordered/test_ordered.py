"""pipeline/ordered.py: cursors (pure), the gap reader and OrderedSource (on the real broker)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from confluent_kafka import Producer

from pipeline.ordered import Cursors, GapReader, OrderedSource, SourceRecord

KEY = ("t.usage-priced", 2)


def test_cursor_classifies_next_seen_and_gap() -> None:
    cursors = Cursors()
    cursors.reset({KEY: 5})
    assert cursors.classify(KEY, 5) == "next"
    assert cursors.classify(KEY, 4) == "seen"
    assert cursors.classify(KEY, 0) == "seen"
    assert cursors.classify(KEY, 9) == "gap" and cursors.due(KEY) == 5
    cursors.applied(KEY, 5)
    assert cursors.classify(KEY, 5) == "seen" and cursors.classify(KEY, 6) == "next"
    cursors.forget(KEY)
    assert not cursors.known(KEY)


def test_reset_replaces_every_cursor() -> None:
    cursors = Cursors()
    cursors.reset({KEY: 5, ("t.ledger-commands", 0): 1})
    cursors.reset({KEY: 2})
    assert cursors.due(KEY) == 2 and not cursors.known(("t.ledger-commands", 0))


@pytest.fixture
def filled_partition(kafka_bootstrap: str, topics: dict[str, str]) -> tuple[str, int]:
    """Partition 1 of ``ledger-commands`` with 12 records (key ``k<i>``, value ``v<i>``), produced
    in batches of several records each (the reader must not assume one record per batch)."""
    topic = topics["ledger-commands"]
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 50, "enable.idempotence": True})
    for i in range(12):
        producer.produce(topic, key=f"k{i}".encode(), value=f"v{i}".encode(), partition=1)
        if i % 4 == 3:
            producer.flush(10)
    assert producer.flush(10) == 0
    return topic, 1


def test_gap_reader_reads_exactly_the_range(kafka_bootstrap: str, filled_partition: tuple[str, int]) -> None:
    topic, partition = filled_partition
    reader = GapReader(kafka_bootstrap, name="test")
    try:
        got = reader.read(topic, partition, 3, 9)
        assert [(r.offset, r.key, r.value) for r in got] == [
            (i, f"k{i}".encode(), f"v{i}".encode()) for i in range(3, 9)
        ]
        assert all(r.topic == topic and r.partition == partition and r.timestamp_ms > 0 for r in got)
        assert reader.read(topic, partition, 5, 5) == []
        # the same consumer again, for a range that starts at 0 and one that ends at the last record
        assert [r.offset for r in reader.read(topic, partition, 0, 2)] == [0, 1]
        assert [r.offset for r in reader.read(topic, partition, 10, 12)] == [10, 11]
        assert reader.records_read == 10
    finally:
        reader.close()


def test_closing_stops_a_read_that_cannot_finish(kafka_bootstrap: str, filled_partition: tuple[str, int]) -> None:
    topic, partition = filled_partition
    reader = GapReader(kafka_bootstrap, name="test", warn_every_s=0.2)
    errors: list[BaseException] = []

    def read_past_the_end() -> None:
        try:
            reader.read(topic, partition, 10, 50)  # offsets 12..49 do not exist (yet)
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=read_past_the_end)
    t.start()
    t.join(1.5)
    assert t.is_alive(), "the reader must keep waiting for records that are due"
    reader.close()
    t.join(10)
    assert not t.is_alive() and errors and "closed" in str(errors[0])


def _source(kafka_bootstrap: str, start: int, applied: list[int]) -> OrderedSource:
    async def start_offset(topic: str, partition: int) -> int:
        return start

    async def apply(rec: SourceRecord) -> None:
        assert rec.value == f"v{rec.offset}".encode()  # the record itself, not just its offset
        applied.append(rec.offset)

    return OrderedSource("test", GapReader(kafka_bootstrap, name="test"), start_offset, apply, idle_s=0.0)


def _rec(topic: str, partition: int, offset: int) -> SourceRecord:
    return SourceRecord(topic, partition, offset, 0, f"k{offset}".encode(), f"v{offset}".encode())


def test_ordered_source_fills_gaps_and_drops_redeliveries(
    kafka_bootstrap: str, filled_partition: tuple[str, int]
) -> None:
    topic, partition = filled_partition
    applied: list[int] = []
    source = _source(kafka_bootstrap, 2, applied)

    async def run() -> None:
        await source.deliver(_rec(topic, partition, 1))  # below the start offset: applied before
        await source.deliver(_rec(topic, partition, 2))
        await source.deliver(_rec(topic, partition, 6))  # 3, 4, 5 never handed over: read first
        await source.deliver(_rec(topic, partition, 4))  # a late re-delivery
        await source.deliver(_rec(topic, partition, 7))

    try:
        asyncio.run(run())
    finally:
        source.reader.close()
    assert applied == [2, 3, 4, 5, 6, 7]
    assert (source.gap_fills, source.filled, source.redelivered) == (1, 3, 2)


def test_ordered_source_sweeps_a_partition_whose_records_stopped(
    kafka_bootstrap: str, filled_partition: tuple[str, int]
) -> None:
    topic, partition = filled_partition
    key = (topic, partition)
    applied: list[int] = []
    source = _source(kafka_bootstrap, 0, applied)

    async def run() -> None:
        source.assigned([key])
        assert source.stalled(key, read_offset=None, highwater=12)  # never delivered, idle: look
        await source.deliver(_rec(topic, partition, 0))
        await source.deliver(_rec(topic, partition, 1))
        # faust handed over 0 and 1, read (and lost) up to 8; the log ends at 12
        assert not source.stalled(key, read_offset=1, highwater=2)  # nothing past the cursor
        assert source.stalled(key, read_offset=8, highwater=None)
        assert source.stalled(key, read_offset=None, highwater=12)
        assert await source.sweep(key) == 10
        assert not source.stalled(key, read_offset=8, highwater=12)

    try:
        asyncio.run(run())
    finally:
        source.reader.close()
    assert applied == list(range(12)) and source.sweeps == 1


def test_committed_or_earliest(kafka_bootstrap: str, filled_partition: tuple[str, int]) -> None:
    from confluent_kafka import Consumer, TopicPartition

    topic, partition = filled_partition
    reader = GapReader(kafka_bootstrap, name="test")
    group = f"g-{topic}"
    try:
        assert reader.committed_or_earliest(group, topic, partition) == 0  # nothing committed
        c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
        c.commit(offsets=[TopicPartition(topic, partition, 7)], asynchronous=False)
        c.close()
        assert reader.committed_or_earliest(group, topic, partition) == 7
    finally:
        reader.close()
