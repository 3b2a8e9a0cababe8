"""UsageProducer against the real Tansu broker (and a dead port for failure paths)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from meterline.core.errors import BrokerUnavailable, DeliveryFailed, InvalidEvent
from meterline.stack.broker import free_port
from meterline.stack.producer import MAX_RECORD_BYTES, BatchResult, UsageProducer
from meterline.stack.schema_store import KafkaSchemaStore
from schemas.codec import decode_usage_batch, event_to_record, record_to_event
from schemas.models import UsageEvent
from schemas.registry import fingerprint

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def make_event(customer: str, i: int, **extra: Any) -> UsageEvent:
    fields: dict[str, Any] = {
        "event_id": f"{customer}-{i}-{uuid.uuid4().hex[:6]}",
        "occurred_at": T0 + timedelta(milliseconds=i),
        "customer_id": customer,
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input_tokens": 100 + i,
        "output_tokens": 7 * i,
        "cached_input_tokens": i % 3,
        "labels": {"i": str(i)},
    }
    fields.update(extra)
    return UsageEvent(**fields)


def consume(bootstrap: str, topic: str, n_events: int, timeout: float = 30.0) -> list[tuple[int, bytes, list[dict]]]:
    """(partition, key, decoded events) of every record until ``n_events`` events were read."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"g-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out: list[tuple[int, bytes, list[dict]]] = []
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < n_events and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            events = decode_usage_batch(msg.value())
            out.append((msg.partition(), msg.key(), events))
            seen += len(events)
        return out
    finally:
        consumer.close()


def dead_bootstrap() -> str:
    return f"127.0.0.1:{free_port()}"


# -- real broker ---------------------------------------------------------------------------------


def test_events_arrive_batched_per_customer_in_order(kafka_bootstrap, topics):
    topic = topics["usage-events"]
    customers = [f"cus_{k}" for k in range(5)]
    sent: dict[str, list[UsageEvent]] = defaultdict(list)
    results: list[BatchResult] = []
    lock = threading.Lock()

    def on_delivery(r: BatchResult) -> None:
        with lock:
            results.append(r)

    with UsageProducer(kafka_bootstrap, topic, linger_ms=50, max_batch_events=7, on_delivery=on_delivery) as p:
        for i in range(23):
            for c in customers:  # interleaved across customers
                ev = make_event(c, i)
                assert p.send(ev) == ev
                sent[c].append(ev)
        # also accepts a plain dict (validated through pydantic)
        d = event_to_record(make_event("cus_0", 23))
        d["occurred_at"] = T0 + timedelta(milliseconds=23)
        sent["cus_0"].append(p.send(d))
    total = sum(len(v) for v in sent.values())

    records = consume(kafka_bootstrap, topic, total)
    got: dict[str, list[UsageEvent]] = defaultdict(list)
    for _partition, key, events in records:
        assert 1 <= len(events) <= 7
        for rec in events:
            assert rec["customer_id"].encode() == key  # one customer per record, key = customer_id
            got[key.decode()].append(record_to_event(rec))
    assert got == sent  # same events, same per-customer order
    assert len(records) < total
    assert all(r.ok for r in results)
    assert sorted(e for r in results for e in r.event_ids) == sorted(e.event_id for v in sent.values() for e in v)


def test_concurrent_senders_keep_each_customers_order(kafka_bootstrap, topics):
    topic = topics["usage-events"]
    per_thread = {f"cus_t{k}": [make_event(f"cus_t{k}", i) for i in range(150)] for k in range(4)}
    with UsageProducer(kafka_bootstrap, topic, linger_ms=2, max_batch_events=16) as p:
        threads = [threading.Thread(target=lambda evs=evs: [p.send(e) for e in evs]) for evs in per_thread.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    records = consume(kafka_bootstrap, topic, 600)
    got: dict[str, list[str]] = defaultdict(list)
    for _partition, key, events in records:
        got[key.decode()].extend(e["event_id"] for e in events)
    assert got == {c: [e.event_id for e in evs] for c, evs in per_thread.items()}


def test_partition_agrees_with_aiokafka_murmur2(kafka_bootstrap, topics):
    topic = topics["usage-events"]
    customers = [f"customer-{k}-{uuid.uuid4().hex[:4]}" for k in range(150)] + ["x", "cus_0", "A.b:c@d+e=f-g_h"]
    results: list[BatchResult] = []
    with UsageProducer(kafka_bootstrap, topic, linger_ms=5, on_delivery=results.append) as p:
        for c in customers:
            p.send(make_event(c, 1))
    records = consume(kafka_bootstrap, topic, len(customers))
    assert len(records) == len(customers)
    partitions = [0, 1, 2, 3]
    landed = {key: partition for partition, key, _ in records}
    for key, partition in landed.items():
        assert partition == DefaultPartitioner()(key, partitions, partitions)
        assert partition == (murmur2(key) & 0x7FFFFFFF) % 4
    assert {r.customer_id.encode(): r.partition for r in results} == landed
    assert len(set(landed.values())) == 4  # the keys actually spread over every partition


def test_linger_emits_without_flush(kafka_bootstrap, topics):
    delivered = threading.Event()
    results: list[BatchResult] = []

    def on_delivery(r: BatchResult) -> None:
        results.append(r)
        delivered.set()

    p = UsageProducer(
        kafka_bootstrap, topics["usage-events"], linger_ms=20, max_batch_events=1000, on_delivery=on_delivery
    )
    try:
        events = [make_event("cus_linger", i) for i in range(3)]
        for ev in events:
            p.send(ev)
        assert delivered.wait(20), "linger expiry never emitted the buffer"
        assert results[0].ok and results[0].event_ids == tuple(e.event_id for e in events)
        assert p.buffered_events == 0
    finally:
        p.close()


def test_writer_schema_published_once_at_start(kafka_bootstrap, topics):
    with UsageProducer(kafka_bootstrap, topics["usage-events"], schema_store_topic=topics["schemas"]) as p:
        assert p.schema_fingerprint is not None
    found = KafkaSchemaStore(kafka_bootstrap, topics["schemas"]).lookup(p.schema_fingerprint)
    assert found is not None and fingerprint(found) == p.schema_fingerprint


def test_broker_rejection_surfaces_as_delivery_failed(kafka_bootstrap, topics):
    # Topic names over 249 characters are invalid on Kafka; Tansu rejects them too (and, unlike
    # Kafka with auto-create off, it auto-creates unknown-but-valid topics, so those would succeed).
    invalid = topics["usage-events"] + "." + "x" * 260
    results: list[BatchResult] = []
    p = UsageProducer(kafka_bootstrap, invalid, on_delivery=results.append, extra_config={"message.timeout.ms": 5000})
    ev = make_event("cus_1", 1)
    p.send(ev)
    with pytest.raises(DeliveryFailed) as exc:
        p.flush(timeout=15)
    assert exc.value.event_ids == (ev.event_id,)
    assert [r.ok for r in results] == [False]
    p.close(timeout=1)  # the failure was reported once; nothing left to raise


# -- no broker needed ----------------------------------------------------------------------------


def test_failed_delivery_raises_from_flush_and_next_send():
    results: list[BatchResult] = []
    failed = threading.Event()

    def on_delivery(r: BatchResult) -> None:
        results.append(r)
        if not r.ok:
            failed.set()

    p = UsageProducer(
        dead_bootstrap(), "usage-events", linger_ms=5, on_delivery=on_delivery, extra_config={"message.timeout.ms": 300}
    )
    ev = make_event("cus_1", 1)
    p.send(ev)
    assert failed.wait(20), "no delivery report for a record sent to a dead port"
    with pytest.raises(DeliveryFailed) as exc:
        p.send(make_event("cus_1", 2))
    assert exc.value.event_ids == (ev.event_id,)
    assert exc.value.key == b"cus_1"
    assert results[0].error and results[0].partition is None

    ev3 = make_event("cus_2", 3)
    p.send(ev3)
    with pytest.raises(DeliveryFailed) as exc:
        p.flush(timeout=20)
    assert exc.value.event_ids == (ev3.event_id,)
    p.close(timeout=1)  # nothing left: closes cleanly


def test_queue_full_backpressure_raises_and_keeps_events():
    p = UsageProducer(
        dead_bootstrap(),
        "usage-events",
        max_batch_events=1,
        max_pending_records=1,
        queue_full_timeout=0.2,
        extra_config={"message.timeout.ms": 60_000},
    )
    p.send(make_event("cus_1", 1))  # fills librdkafka's one-record queue
    with pytest.raises(BrokerUnavailable):
        p.send(make_event("cus_2", 1))
    assert p.buffered_events == 1  # accepted, not lost
    assert p.in_flight == 1
    with pytest.raises(BrokerUnavailable):
        p.close(timeout=0.5)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"customer_id": ""}, "missing_customer_id"),
        ({"input_tokens": -1}, "negative_count"),
        ({"output_tokens": "many"}, "invalid_type"),
        ({"occurred_at": "not a date"}, "invalid_timestamp"),
        ({"occurred_at": datetime.now(UTC) + timedelta(days=1)}, "timestamp_in_future"),
        ({"input_tokens": 0, "output_tokens": 0, "cached_input_tokens": 0, "requests": 0}, "empty_usage"),
        ({"labels": {str(k): "v" for k in range(65)}}, "too_many_labels"),
    ],
)
def test_invalid_events_never_reach_kafka(change, reason):
    p = UsageProducer(dead_bootstrap(), "usage-events", extra_config={"message.timeout.ms": 300})
    try:
        record = make_event("cus_1", 1).model_dump() | change
        with pytest.raises(InvalidEvent) as exc:
            p.send(record)
        assert exc.value.reason_code == reason
        with pytest.raises(InvalidEvent):
            p.send(["not", "a", "mapping"])  # type: ignore[arg-type]
        assert p.buffered_events == 0 and p.in_flight == 0
    finally:
        p.close(timeout=1)


def test_public_surface_is_pinned():
    import meterline.stack.producer

    assert sorted(meterline.stack.producer.__all__) == ["BatchResult", "UsageProducer"]


def test_oversized_batches_are_split_under_the_record_limit():
    big = {f"k{k:02d}": "v" * 256 for k in range(64)}
    records = [event_to_record(make_event("cus_big", i, labels=big)) for i in range(80)]
    chunks = UsageProducer._split(records)
    assert len(chunks) > 1
    assert all(len(value) <= MAX_RECORD_BYTES for _, value in chunks)
    assert [r["event_id"] for recs, _ in chunks for r in recs] == [r["event_id"] for r in records]
    assert [e["event_id"] for _, v in chunks for e in decode_usage_batch(v)] == [r["event_id"] for r in records]
