"""Fixtures for the HTTP API tests: a key store, keys, and a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from meterline.shell.api.app import create_api
from meterline.shell.api.keys import KeyStore
from meterline.shell.api.server import ApiServer
from meterline.stack.producer import UsageProducer
from schemas.codec import decode_usage_batch


@dataclass
class Keys:
    store: KeyStore
    admin: str
    cust_a: str
    cust_a_id: str
    cust_b: str


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    store = KeyStore.for_data_dir(tmp_path)
    _, admin = store.create(None, role="admin")
    kid_a, cust_a = store.create("cust-a")
    _, cust_b = store.create("cust-b")
    return Keys(store, admin, cust_a, kid_a, cust_b)


@dataclass
class Api:
    url: str
    server: ApiServer
    topic: str | None

    def post(self, path: str, key: str | None, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.post(self.url + path, headers=headers, timeout=30, **kw)


@pytest.fixture
def api_factory(settings_factory: Callable[..., Any], keys: Keys) -> Iterator[Callable[..., Api]]:
    """``make(producer=..., clickhouse=..., topic=...)`` -> a started server (stopped after the test)."""
    servers: list[ApiServer] = []

    def make(*, producer: Any, clickhouse: Any = None, topic: str | None = None, **kw: Any) -> Api:
        settings = settings_factory(kafka_bootstrap="127.0.0.1:1", clickhouse_dsn="chdb:///unused")
        app = create_api(settings, producer=producer, clickhouse=clickhouse, key_store=keys.store, **kw)
        server = ApiServer(app, "127.0.0.1", 0, access_log=True).start()
        servers.append(server)
        return Api(server.url, server, topic)

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def usage_producer(kafka_bootstrap: str, topics: dict[str, str]) -> Iterator[UsageProducer]:
    producer = UsageProducer(kafka_bootstrap, topics["usage-events"], linger_ms=5)
    yield producer
    producer.close(10)


def _event(event_id: str, customer_id: str = "cust-a", **over: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "event_id": event_id,
        "occurred_at": "2025-03-01T12:00:00Z",
        "customer_id": customer_id,
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 100,
        "output_tokens": 20,
    }
    ev.update(over)
    return ev


def _consume_usage(bootstrap: str, topic: str, expect: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Every event decoded from ``topic`` (all partitions, from the start) once ``expect`` are seen."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"api-test-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10)
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions])
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                if len(out) >= expect:
                    # one more quiet poll round passed: nothing else is coming
                    break
                continue
            if msg.error():
                continue
            out.extend(decode_usage_batch(msg.value()))
        return out
    finally:
        consumer.close()


@pytest.fixture
def make_event() -> Callable[..., dict[str, Any]]:
    """``make_event(event_id, customer_id="cust-a", **overrides)`` -> a valid JSON usage event."""
    return _event


@pytest.fixture
def consume_usage(kafka_bootstrap: str) -> Callable[..., list[dict[str, Any]]]:
    """``consume_usage(topic, expect)`` -> decoded UsageEvent dicts found in the topic."""
    return lambda topic, expect, timeout=20.0: _consume_usage(kafka_bootstrap, topic, expect, timeout)
