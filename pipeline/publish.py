"""Publish keyed control records (price versions, rate cards, ledger commands) to Kafka, durably.

Control records are few and must never be lost silently: the producer is idempotent with
``acks=all``, every delivery report is checked, and :func:`publish_records` returns only once
the broker acknowledged every record (or raises :class:`~meterline.core.errors.DeliveryFailed`).
Keys go through the murmur2 partitioner so they land where faust's routing expects them.
"""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import KafkaException, Producer

from meterline.core.errors import DeliveryFailed
from meterline.stack.kafka import make_producer


def control_producer(bootstrap: str) -> Producer:
    producer: Producer = make_producer(bootstrap, {"linger.ms": 5})
    return producer


def publish_records(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[str | bytes, bytes | None]],
    *,
    timeout: float = 30.0,
    producer: Producer | None = None,
) -> int:
    """Send ``(key, value)`` pairs (``None`` value = tombstone) and wait for every acknowledgement."""
    own = producer is None
    prod = producer if producer is not None else control_producer(bootstrap)
    failures: list[str] = []

    def on_delivery(err: object, msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    sent = 0
    try:
        for key, value in records:
            k = key.encode() if isinstance(key, str) else key
            while True:
                try:
                    prod.produce(topic, key=k, value=value, on_delivery=on_delivery)
                    break
                except BufferError:
                    prod.poll(0.1)
            sent += 1
            prod.poll(0)
        remaining = prod.flush(timeout)
    except KafkaException as exc:
        raise DeliveryFailed(f"cannot publish to {topic}: {exc}", topic=topic) from exc
    if remaining:
        raise DeliveryFailed(f"{remaining} record(s) to {topic} not acknowledged within {timeout}s", topic=topic)
    if failures:
        raise DeliveryFailed(f"{len(failures)} record(s) to {topic} failed: {failures[0]}", topic=topic)
    if own:
        del prod
    return sent
