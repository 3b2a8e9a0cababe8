"""Scenario 4: ClickHouse unreachable for a while, and the sink killed between insert and commit.

The sink's flush contract (pipeline/sink.py): dedupe → insert → commit. An outage must pause
consumption and retry without committing; a crash after the insert must be collapsed by the next
sink's dedupe step. Either way: nothing lost, nothing stored twice, rollups exact.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from devtools.verify import ChaosStack, Expected, hostile_records, make_events
from pipeline.sink import ClickHouseSink
from tests.invariants.helpers import assert_invariant


class SinkKilled(BaseException):
    """Raised by the hook: the sink thread dies on the spot (not an Exception: nothing may catch it)."""


class CrashAfterInsertSink(ClickHouseSink):
    """A sink that dies after its first insert that landed rows, before committing the offsets."""

    def _commit(self) -> None:
        if self.rows_inserted > 0:
            raise SinkKilled("killed between insert and commit")
        super()._commit()


def committed(chaos: ChaosStack) -> dict[tuple[str, int], int]:
    """The sink group's committed offsets (read without joining the group)."""
    c = Consumer(
        {
            "bootstrap.servers": chaos.bootstrap,
            "group.id": f"{chaos.settings.topic_prefix}sink",
            "enable.auto.commit": False,
        }
    )
    try:
        tps = [
            TopicPartition(chaos.settings.topic(t), p) for t in ("usage-priced", "usage-dead-letter") for p in range(4)
        ]
        return {(tp.topic, tp.partition): tp.offset for tp in c.committed(tps, timeout=10)}
    finally:
        c.close()


def wait(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_clickhouse_outage_pauses_retries_and_loses_nothing(chaos: ChaosStack, rng: random.Random, seed: int) -> None:
    expected = Expected()
    sink = chaos.start_sink()
    chaos.start_worker()
    first = make_events(rng, 500)
    chaos.produce(first)
    expected.add_priced(first)
    assert_invariant(chaos, expected, seed)
    rows_before, offsets_before, flushes_before = chaos.counts(), committed(chaos), sink.flushes

    chaos.ch.go_down()
    during = make_events(rng, 800)
    chaos.produce(during + rng.sample(first, 50))  # with some resends
    expected.add_priced(during)
    bad = hostile_records(rng, time.time_ns() // 1_000_000)
    chaos.produce_raw((k, v) for k, v, _, _ in bad)
    for _, _, reason, n in bad:
        expected.add_rejected(reason, n)
    wait(lambda: sink.degraded and sink.retries >= 3, "the sink to notice the outage and retry")
    # while down: nothing inserted, nothing committed, no flush completed
    assert chaos.counts() == rows_before
    assert committed(chaos) == offsets_before
    assert sink.flushes == flushes_before
    assert chaos.sink_alive()

    chaos.ch.restore()
    assert_invariant(chaos, expected, seed)
    assert not sink.degraded and chaos.ch.refused > 0
    assert committed(chaos) != offsets_before


def test_sink_killed_between_insert_and_commit_then_replaced(chaos: ChaosStack, rng: random.Random, seed: int) -> None:
    expected = Expected()
    crashing = chaos.start_sink(CrashAfterInsertSink)
    chaos.start_worker()
    events = make_events(rng, 1200, prefix=f"{uuid.uuid4().hex[:4]}-")
    chaos.produce(events)
    expected.add_priced(events)
    wait(lambda: not chaos.sink_alive(), "the sink to die after its insert")
    assert [type(e) for e in chaos.sink_errors] == [SinkKilled]
    landed = chaos.counts()[0]
    assert landed == crashing.rows_inserted > 0
    assert all(offset < 0 for offset in committed(chaos).values()), "the killed sink committed"

    replacement = chaos.start_sink()  # same group: re-reads everything the dead one left uncommitted
    wait(
        lambda: (
            replacement.messages_consumed >= crashing.messages_consumed
            and replacement.flushes > 0
            and replacement.buffered == 0
        ),
        "the replacement sink to replay the uncommitted records",
    )
    assert_invariant(chaos, expected, seed)
    assert replacement.duplicates_dropped >= landed  # the replayed, already-stored rows were collapsed
    assert any(offset >= 0 for offset in committed(chaos).values()), "the replacement never committed"
