"""Helpers for the ClickHouse sink tests: event generators, producers, a drain loop, offset probes.

Money in generated events is integer picos; expectations are computed from them with
exact Decimal arithmetic.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.sink import ClickHouseSink
from schemas.codec import encode_dead_letter, encode_priced_batch

DAY_MS = 86_400_000
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MODELS = (("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4"))
PROJECTS = ("search", "chat", None)


def make_events(
    n: int, *, seed: int = 7, customers: int = 5, days: int = 3, prefix: str = "ev"
) -> list[dict[str, Any]]:
    """``n`` PricedUsage records with awkward exact prices (odd picos, 12 significant decimals)."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        provider, model = MODELS[rnd.randrange(len(MODELS))]
        cost = rnd.randrange(1, 10**13)  # up to 10 currency units, every pico digit used
        out.append(
            {
                "event_id": f"{prefix}-{i:06d}",
                "occurred_at": BASE_MS + rnd.randrange(days * DAY_MS),
                "customer_id": f"cust-{rnd.randrange(customers)}",
                "api_key_id": None if i % 3 else f"key-{i % 7}",
                "project": PROJECTS[i % len(PROJECTS)],
                "feature": "summarize" if i % 2 else None,
                "user_id": None,
                "session_id": None,
                "gateway": "litellm",
                "provider": provider,
                "model": model,
                "model_version": None,
                "request_id": None,
                "input_tokens": rnd.randrange(0, 100_000),
                "output_tokens": rnd.randrange(0, 10_000),
                "cached_input_tokens": rnd.randrange(0, 50_000),
                "cache_write_tokens": rnd.randrange(0, 1_000),
                "reasoning_tokens": rnd.randrange(0, 5_000),
                "requests": 1,
                "labels": {},
                "cost_picos": cost,
                "charge_picos": cost + cost // 5 + rnd.randrange(0, 7),  # ~20 % markup, not a round number
                "currency": "usd",
                "price_version": "pv-2026-01",
                "rate_card": "default",
                "priced_at": BASE_MS + days * DAY_MS + i,
                "source_partition": i % 4,
                "source_offset": i,
            }
        )
    return out


def picos(value: int) -> Decimal:
    return Decimal(value).scaleb(-12)


def produce_priced(bootstrap: str, topic: str, events: list[dict[str, Any]], per_record: int = 25) -> int:
    """Produce ``events`` as PricedBatch records (one customer per record, keyed by customer_id)."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "acks": "all"})
    by_customer: dict[str, list[dict[str, Any]]] = {}
    for ev in events:
        by_customer.setdefault(ev["customer_id"], []).append(ev)
    records = 0
    for customer, evs in sorted(by_customer.items()):
        for i in range(0, len(evs), per_record):
            producer.produce(topic, key=customer.encode(), value=encode_priced_batch(evs[i : i + per_record]))
            records += 1
    assert producer.flush(30) == 0
    return records


def produce_raw(bootstrap: str, topic: str, values: list[bytes], key: bytes | None = None) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "acks": "all"})
    for v in values:
        producer.produce(topic, key=key, value=v)
    assert producer.flush(30) == 0


def dead_letter(i: int, **overrides: Any) -> dict[str, Any]:
    rec = {
        "reason_code": "no_price" if i % 2 else "invalid_event",
        "reason": f"rejected #{i}",
        "field": "model" if i % 2 else None,
        "source_topic": "t.usage-events",
        "source_partition": i % 4,
        "source_offset": 1000 + i,
        "customer_id": f"cust-{i % 3}" if i % 5 else None,
        "event_id": f"bad-{i}" if i % 5 else None,
        "occurred_at": BASE_MS + i * 1000 if i % 5 else None,
        "payload": bytes([0xC3, 0x01, i % 256, 0x00, 0xFF]) + f"payload-{i}".encode(),
        "payload_format": "usage_batch" if i % 5 else "raw",
        "failed_at": BASE_MS + DAY_MS + i,
    }
    rec.update(overrides)
    return rec


def produce_dead_letters(bootstrap: str, topic: str, records: list[dict[str, Any]]) -> None:
    produce_raw(bootstrap, topic, [encode_dead_letter(r) for r in records], key=b"k")


def drain(sink: ClickHouseSink, until: Callable[[], bool], timeout: float = 60.0) -> None:
    """poll_once + flush until ``until()`` holds (``timeout`` is only a hang guard)."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached; sink stats: {sink.stats()}")
        sink.poll_once(timeout=0.2)
        sink.flush()


def committed(bootstrap: str, group_id: str, topic: str, partitions: int = 4) -> dict[int, int]:
    """Committed offsets of ``group_id`` on ``topic`` (partition -> offset; absent = none committed)."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False})
    try:
        tps = probe.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        probe.close()
    return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}


def scalar(client: Any, sql: str) -> Any:
    return client.query(sql).result_rows[0][0]
