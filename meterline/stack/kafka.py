"""The one place meterline builds Kafka clients: producers, and the reader of a whole topic.

Co-partitioning is what makes the credit agent the single writer of a customer's balance: every
producer of a customer-keyed topic must route a key to the partition faust (aiokafka, Java murmur2)
expects, and must keep per-partition order through retries. So every producer meterline makes
comes from :func:`producer_config`, which pins:

* ``partitioner=murmur2_random``: librdkafka's default (CRC32) would send a customer's records to
  another partition than faust's table routing (``shared/notes/broker.md``, "Partitioner agreement");
* ``enable.idempotence=true`` and ``acks=all``: no duplicates and no reordering inside a partition
  when the client retries, and a record counts as sent only once every in-sync replica has it.

A caller may add settings (linger, queue sizes, callbacks) but cannot change a pinned one:
:func:`producer_config` raises :class:`~meterline.core.errors.ConfigError` instead.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from meterline.core.errors import ConfigError

PINNED_PRODUCER_SETTINGS: Mapping[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "partitioner": "murmur2_random",
}


def producer_config(bootstrap: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A confluent-kafka producer configuration with the pinned settings; ``extra`` adds the rest."""
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "log_level": 3}
    for key, value in (extra or {}).items():
        pinned = PINNED_PRODUCER_SETTINGS.get(key)
        if pinned is not None and str(value).lower() != str(pinned).lower():
            raise ConfigError(
                f"producer setting {key}={value!r} is pinned to {pinned!r} "
                "(co-partitioning and per-partition order depend on it)"
            )
        config[key] = value
    config.update(PINNED_PRODUCER_SETTINGS)
    return config


def make_producer(bootstrap: str, extra: Mapping[str, Any] | None = None) -> Any:
    """A confluent-kafka ``Producer`` built from :func:`producer_config`."""
    from confluent_kafka import KafkaException, Producer

    try:
        return Producer(producer_config(bootstrap, extra))
    except KafkaException as exc:
        raise ConfigError(f"invalid producer configuration: {exc}") from exc


def read_topic(bootstrap: str, topic: str, *, timeout: float = 30.0) -> list[Any]:
    """Every record of ``topic`` now, as confluent-kafka messages in per-partition offset order:
    each partition read from its beginning to its end (EOF) by a consumer that never joins a group
    or commits. For checks, reports and diagnostics, not for processing. Stops at ``timeout``."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"meterline-read-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "log_level": 3,
        }
    )
    try:
        md = c.list_topics(topic, timeout=10).topics.get(topic)
        parts = sorted(md.partitions) if md is not None and md.error is None else []
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out: list[Any] = []
        eof: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(eof) < len(parts) and time.monotonic() < deadline:
            for m in c.consume(1000, 0.5):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        eof.add(m.partition())
                    continue
                eof.discard(m.partition())
                out.append(m)
        return out
    finally:
        c.close()
