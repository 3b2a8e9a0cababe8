"""The credit agent's read cursors (pure) and its gap reader (on the real broker)."""

from __future__ import annotations

import threading

import pytest
from confluent_kafka import Producer

from pipeline.credits.gaps import Cursors, GapReader

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
        assert [(r.offset, r.key, r.value) for r in got] == [(i, f"k{i}".encode(), f"v{i}".encode()) for i in range(3, 9)]
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
