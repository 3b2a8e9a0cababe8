"""The webhook: a signed paid top-up -> exactly one top_up command on ledger-commands (real broker)."""

from __future__ import annotations

import json
import time
from typing import Any

import stripe
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from starlette.applications import Starlette
from starlette.testclient import TestClient

from jobs.stripe.webhooks import ClickHouseSeen, kafka_publisher
from meterline.shell.api.stripe_webhook import webhook_route

SECRET = "whsec_test_meterline"


def signed(payload: str, secret: str = SECRET, ts: int | None = None) -> dict[str, str]:
    return {
        "Stripe-Signature": stripe.WebhookSignature.generate_signature_header(payload, secret, ts),
        "Content-Type": "application/json",
    }


def drain(bootstrap: str, topic: str, seconds: float = 3.0) -> list[dict[str, Any]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"probe-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.25)
            if msg is not None and not msg.error():
                out.append(json.loads(msg.value()))
    finally:
        consumer.close()
    return out


def test_signed_paid_top_up_becomes_exactly_one_command(
    kafka_bootstrap: str, topics: dict[str, str], clickhouse: Any
) -> None:
    topic = topics["ledger-commands"]
    route = webhook_route(
        endpoint_secret=SECRET, publish=kafka_publisher(kafka_bootstrap, topic), seen=ClickHouseSeen(clickhouse)
    )
    http = TestClient(Starlette(routes=[route]))
    event = {
        "id": "evt_1TopUp",
        "object": "event",
        "type": "checkout.session.completed",
        "created": 1_767_225_600,
        "data": {
            "object": {
                "object": "checkout.session",
                "payment_status": "paid",
                "currency": "usd",
                "amount_total": 2500,
                "metadata": {"customer_id": "acme", "amount": "25.00", "currency": "usd"},
            }
        },
    }
    body = json.dumps(event)
    first = http.post("/v1/stripe/webhook", content=body, headers=signed(body))
    assert first.status_code == 200 and first.json()["duplicate"] is False
    again = http.post("/v1/stripe/webhook", content=body, headers=signed(body))  # Stripe redelivers
    assert again.status_code == 200 and again.json()["duplicate"] is True

    bad = http.post("/v1/stripe/webhook", content=body, headers=signed(body, secret="whsec_wrong"))
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_signature"
    stale = http.post("/v1/stripe/webhook", content=body, headers=signed(body, ts=int(time.time()) - 3600))
    assert stale.status_code == 400
    tampered = body.replace("25.00", "2500.00")
    assert http.post("/v1/stripe/webhook", content=tampered, headers=signed(body)).status_code == 400
    assert http.post("/v1/stripe/webhook", content=body).status_code == 400  # no header
    other = json.dumps({"id": "evt_other", "type": "customer.created", "data": {"object": {}}})
    assert http.post("/v1/stripe/webhook", content=other, headers=signed(other)).json()["ignored"] == "customer.created"

    commands = drain(kafka_bootstrap, topic)
    assert commands == [
        {
            "type": "top_up",
            "command_id": "evt_1TopUp",
            "customer_id": "acme",
            "at_ms": 1_767_225_600_000,
            "grant_id": "topup:evt_1TopUp",
            "amount": "25.00",
            "currency": "usd",
            "effective_at_ms": 1_767_225_600_000,
            "expires_at_ms": None,
            "priority": 10,
            "category": "paid",
            "scope": None,
        }
    ]
