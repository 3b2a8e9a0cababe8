"""KafkaSchemaStore against the real Tansu broker: a v1 reader learns a v2 writer's schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from meterline.stack.schema_store import KafkaSchemaStore
from schemas.codec import AvroCodec, event_to_record
from schemas.models import UsageEvent
from schemas.registry import SchemaRegistry, canonical_json, default_registry, fingerprint, load_schemas

FIXTURES = Path(__file__).parent / "fixtures"

pytestmark = pytest.mark.broker


def _raw_records(bootstrap: str, topic: str, expected: int) -> list[tuple[bytes, bytes]]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-raw-read", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    out: list[tuple[bytes, bytes]] = []
    try:
        for _ in range(100):
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                out.append((msg.key(), msg.value()))
            if len(out) >= expected:
                break
    finally:
        consumer.close()
    return out


def test_v1_reader_learns_v2_writer_from_the_schemas_topic(kafka_bootstrap: str, topics: dict[str, str]) -> None:
    v2_batch = load_schemas(FIXTURES)["meterline.v1.UsageBatch"]
    writer_store = KafkaSchemaStore(kafka_bootstrap, topics["schemas"])
    fp = writer_store.publish(v2_batch)
    assert fp == fingerprint(v2_batch)
    assert writer_store.publish(v2_batch) == fp  # idempotent: same key, same value

    ev = UsageEvent(
        event_id="evt-kafka-1",
        occurred_at="2025-05-05T05:05:05.005Z",  # type: ignore[arg-type]
        customer_id="cus_k",
        provider="anthropic",
        model="claude-sonnet-4",
        input_tokens=12,
        cache_write_tokens=3,
    )
    data = AvroCodec(v2_batch, registry=SchemaRegistry()).encode({"events": [{**event_to_record(ev), "region": "eu"}]})

    # A fresh reader process: only the bundled v1 schemas plus the topic as its resolver.
    reader_store = KafkaSchemaStore(kafka_bootstrap, topics["schemas"])
    reader = AvroCodec("UsageBatch", registry=default_registry(reader_store.lookup))
    (rec,) = reader.decode(data)["events"]
    assert rec["event_id"] == "evt-kafka-1" and "region" not in rec
    assert rec["cache_write_tokens"] == 3

    # On the wire: key = fingerprint hex, value = canonical JSON of the full schema.
    raw = _raw_records(kafka_bootstrap, topics["schemas"], 2)
    assert {k for k, _ in raw} == {fp.hex().encode()}
    assert all(json.loads(v) == v2_batch and v.decode() == canonical_json(v2_batch) for _, v in raw)


def test_lookup_of_unknown_fingerprint_is_none_and_cached(
    kafka_bootstrap: str, topics: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = KafkaSchemaStore(kafka_bootstrap, topics["schemas"], miss_ttl=3600)
    assert store.lookup(b"\x00" * 8) is None

    def _no_scan() -> None:
        raise AssertionError("a cached miss must not scan the topic again")

    monkeypatch.setattr(store, "_scan", _no_scan)
    assert store.lookup(b"\x00" * 8) is None
    event_schema = load_schemas(FIXTURES)["meterline.v1.UsageEvent"]
    fp = store.publish(event_schema)
    assert KafkaSchemaStore(kafka_bootstrap, topics["schemas"]).lookup(fp) == event_schema
