"""Writer schemas on a compacted Kafka topic, so a reader can learn a writer's schema.

The registry itself (:mod:`schemas.registry`) is pure: it maps fingerprints to schemas and asks a
resolver for the ones it does not know. This module is that resolver's Kafka side.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from typing import Any

from meterline.core.errors import BrokerUnavailable, DeliveryFailed
from meterline.stack.kafka import make_producer, read_topic
from schemas.registry import canonical_json, fingerprint

__all__ = ["KafkaSchemaStore"]


class KafkaSchemaStore:
    """Writer schemas on a compacted Kafka topic: key = fingerprint hex, value = canonical JSON.

    ``publish`` is idempotent (same key, same value; compaction keeps one). ``lookup`` reads the
    whole topic from the beginning with a short-lived assign-only consumer (no group offsets are
    committed), caches every valid entry, and caches misses for ``miss_ttl`` seconds so a stream
    of garbage fingerprints cannot turn every decode into a topic scan. The topic itself (1+
    partitions, ``cleanup.policy=compact``) is created by whoever provisions topics.

    The scan is :func:`meterline.stack.kafka.read_topic`: end of topic is detected by partition EOF
    events, never by high watermarks (Tansu reports them wrong, see shared/notes/broker.md).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        timeout: float = 10.0,
        miss_ttl: float = 5.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout = timeout
        self.miss_ttl = miss_ttl
        self._cache: dict[bytes, dict[str, Any]] = {}
        self._misses: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def publish(self, schema: Mapping[str, Any]) -> bytes:
        """Write ``schema`` (self-contained) to the topic, wait for acks=all; return its fingerprint.

        Raises DeliveryFailed if the broker rejects the record, BrokerUnavailable on timeout.
        """
        from confluent_kafka import KafkaError

        fp = fingerprint(schema)
        producer = make_producer(self.bootstrap, {"message.timeout.ms": int(self.timeout * 1000)})
        errors: list[KafkaError] = []

        def _on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                errors.append(err)

        producer.produce(
            self.topic, key=fp.hex().encode(), value=canonical_json(schema).encode(), on_delivery=_on_delivery
        )
        if producer.flush(self.timeout + 1.0) > 0:
            raise BrokerUnavailable(f"schema {fp.hex()} not acknowledged by {self.bootstrap} in {self.timeout}s")
        if errors:
            raise DeliveryFailed(
                f"publishing schema {fp.hex()} failed: {errors[0]}", topic=self.topic, key=fp.hex().encode()
            )
        with self._lock:
            self._cache[fp] = dict(schema)
            self._misses.pop(fp, None)
        return fp

    def lookup(self, fp: bytes) -> dict[str, Any] | None:
        """The schema with fingerprint ``fp`` from the topic, or None. Usable as a registry resolver."""
        fp = bytes(fp)
        with self._lock:
            if fp in self._cache:
                return self._cache[fp]
            missed = self._misses.get(fp)
            if missed is not None and time.monotonic() - missed < self.miss_ttl:
                return None
        found = self._scan()
        with self._lock:
            self._cache.update(found)
            if fp in self._cache:
                return self._cache[fp]
            self._misses[fp] = time.monotonic()
            return None

    def _scan(self) -> dict[bytes, dict[str, Any]]:
        from confluent_kafka import KafkaException

        try:
            messages = read_topic(self.bootstrap, self.topic, timeout=self.timeout)
        except KafkaException as exc:
            raise BrokerUnavailable(f"cannot read {self.topic}: {exc}") from exc
        found: dict[bytes, dict[str, Any]] = {}
        for msg in messages:
            entry = self._parse_entry(msg.key(), msg.value())
            if entry is not None:
                found[entry[0]] = entry[1]
        return found

    @staticmethod
    def _parse_entry(key: bytes | None, value: bytes | None) -> tuple[bytes, dict[str, Any]] | None:
        """Accept an entry only if the value's fingerprint equals its key (ignore tombstones/garbage)."""
        if not key or not value:
            return None
        try:
            fp = bytes.fromhex(key.decode("ascii"))
            schema = json.loads(value)
            if fingerprint(schema) != fp:
                return None
        except Exception:
            return None
        return fp, schema
