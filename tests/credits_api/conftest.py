"""Fixtures for the credits API tests: credit topics, a stand-in for the credit agent, and a real
API server on 127.0.0.1 wired with the real Kafka client pieces (CommandPublisher, ReplyWaiter,
StatusView) against the real Tansu broker.

``StandInCreditAgent`` is NOT the credit agent (pipeline/credits/): it is a tiny responder that
speaks the message contract (ledger-commands in, ledger-replies / customer-status out) so the API
side can be tested on its own. The end-to-end test with the real agent lives elsewhere.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from meterline.core.ledger import format_picos, parse_amount
from meterline.shell.api.app import create_api
from meterline.shell.api.credits import credit_routes
from meterline.shell.api.keys import KeyStore
from meterline.shell.api.server import ApiServer
from meterline.stack.topics import TopicSpec, ensure_topics
from pipeline.credits.client import CommandPublisher, ReplyWaiter, StatusView

PICOS_PER_TOKEN = 10**6  # the stand-in's flat price: 0.000001 per token


@pytest.fixture
def credit_topics(kafka_bootstrap: str, topics: dict[str, str], topic_prefix: str) -> dict[str, str]:
    """infra/topics.yaml topics plus ``ledger-replies`` (created here if the yaml lacks it)."""
    names = dict(topics)
    if "ledger-replies" not in names:
        spec = TopicSpec("ledger-replies", None, 86_400_000, "delete", "request_id", "JSON reply", "json")
        names.update(ensure_topics(kafka_bootstrap, topic_prefix, 4, [spec]))
    return names


def producer(bootstrap: str) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
            "linger.ms": 1,
            "log_level": 3,
        }
    )


def publish_json(p: Producer, topic: str, key: str, value: dict[str, Any] | None) -> None:
    p.produce(topic, key=key.encode(), value=None if value is None else json.dumps(value).encode())
    assert p.flush(10) == 0


def read_all(bootstrap: str, topic: str, expect: int, timeout: float = 15.0) -> list[tuple[bytes, int, dict[str, Any]]]:
    """``(key, partition, value)`` of the first ``expect`` records of every partition of ``topic``."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{time.time_ns()}",
            "log_level": 3,
            "enable.auto.commit": False,
        }
    )
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out: list[tuple[bytes, int, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    while len(out) < expect and time.monotonic() < deadline:
        m = c.poll(0.1)
        if m is not None and m.error() is None:
            out.append((m.key(), m.partition(), json.loads(m.value())))
    c.close()
    return out


@dataclass
class StandInCreditAgent:
    """Stand-in for the credit agent (contract only): answers ``authorize`` commands from a flat
    per-customer balance, stays silent for customers in ``silent``, records every command."""

    bootstrap: str
    commands_topic: str
    replies_topic: str
    status_topic: str
    balances: dict[str, int] = field(default_factory=dict)  # customer -> available picos
    silent: set[str] = field(default_factory=set)
    received: list[tuple[bytes, int, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._producer = producer(self.bootstrap)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StandInCreditAgent:
        self._consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"standin-{time.time_ns()}",
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )
        parts = self._consumer.list_topics(self.commands_topic, timeout=10).topics[self.commands_topic].partitions
        self._consumer.assign([TopicPartition(self.commands_topic, p, OFFSET_BEGINNING) for p in parts])
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()

    def commands(self) -> list[dict[str, Any]]:
        with self._lock:
            return [v for _, _, v in self.received]

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> tuple[bytes, int, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for rec in self.received:
                    if pred(rec[2]):
                        return rec
            time.sleep(0.02)
        raise AssertionError("the stand-in agent did not receive the expected command")

    def publish_status(self, customer_id: str, *, blocked: bool = False) -> dict[str, Any]:
        available = format_picos(self.balances.get(customer_id, 0))
        value = {
            "customer_id": customer_id,
            "status": "blocked" if blocked else "active",
            "reason": "credit_exhausted" if blocked else None,
            "since_ms": 1 if blocked else None,
            "balance": {
                "customer_id": customer_id,
                "currency": "usd",
                "available": available,
                "overage": "0.00",
                "grants": [{"grant_id": "g1", "remaining": available}],
            },
            "updated_at_ms": int(time.time() * 1000),
        }
        publish_json(self._producer, self.status_topic, customer_id, value)
        return value

    def _run(self) -> None:
        while not self._stop.is_set():
            m = self._consumer.poll(0.05)
            if m is None or m.error() is not None:
                continue
            cmd = json.loads(m.value())
            with self._lock:
                self.received.append((m.key(), m.partition(), cmd))
            if cmd["type"] != "authorize" or cmd["customer_id"] in self.silent:
                continue
            cust = cmd["customer_id"]
            estimate = (cmd["input_tokens_estimate"] + cmd["max_output_tokens"]) * PICOS_PER_TOKEN
            available = self.balances.get(cust, 0)
            allow = estimate <= available
            if allow:
                self.balances[cust] = available - estimate
            reply = {
                "request_id": cmd["request_id"],
                "customer_id": cust,
                "decision": "allow" if allow else "deny",
                "reason": None if allow else "credit_exhausted",
                "hold_id": cmd["request_id"] if allow else None,
                "estimate": format_picos(estimate),
                "available": format_picos(self.balances[cust] if allow else available),
                "expires_at_ms": cmd["at_ms"] + 300_000 if allow else None,
            }
            self._producer.produce(self.replies_topic, key=cmd["request_id"].encode(), value=json.dumps(reply).encode())
            self._producer.flush(10)


@dataclass
class Keys:
    store: KeyStore
    admin: str
    cust_a: str
    cust_b: str


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    store = KeyStore.for_data_dir(tmp_path)
    _, admin = store.create(None, role="admin")
    _, cust_a = store.create("cust-a")
    _, cust_b = store.create("cust-b")
    return Keys(store, admin, cust_a, cust_b)


@dataclass
class CreditsApi:
    url: str
    agent: StandInCreditAgent
    status: StatusView
    topics: dict[str, str]

    def call(self, method: str, path: str, key: str | None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kw)


@pytest.fixture
def credits_api(
    kafka_bootstrap: str, credit_topics: dict[str, str], settings_factory: Callable[..., Any], keys: Keys
) -> Iterator[CreditsApi]:
    agent = StandInCreditAgent(
        kafka_bootstrap,
        credit_topics["ledger-commands"],
        credit_topics["ledger-replies"],
        credit_topics["customer-status"],
        balances={"cust-a": parse_amount("1.00"), "cust-b": parse_amount("1.00")},
        silent={"cust-silent"},
    ).start()
    publisher = CommandPublisher(kafka_bootstrap, credit_topics["ledger-commands"])
    replies = ReplyWaiter(kafka_bootstrap, credit_topics["ledger-replies"]).start()
    status = StatusView(kafka_bootstrap, credit_topics["customer-status"], quiet_s=0.2).start()
    settings = settings_factory(clickhouse_dsn="chdb:///unused")
    app = create_api(
        settings,
        producer=object(),
        clickhouse=None,
        key_store=keys.store,
        extra_routes=credit_routes(publisher, replies, status, authorize_timeout_s=1.5),
    )
    server = ApiServer(app, "127.0.0.1", 0).start()
    try:
        yield CreditsApi(server.url, agent, status, credit_topics)
    finally:
        server.stop()
        replies.close()
        status.close()
        publisher.close()
        agent.stop()
