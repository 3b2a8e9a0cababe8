"""Medium/low (issue #20): the Stripe top-up webhook of the real `up` stack credits what was paid,
checks the customer id, bounds its body and both sides of the signature timestamp, and answers 400
(never 500) to a bad priority. Alerts whose id could never be sent do not hold up the queue."""

from __future__ import annotations

import json
import time
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest
import stripe

from pipeline.publish import publish_records
from tests.security.conftest import STRIPE_SECRET, Stack, wait_for

pytestmark = pytest.mark.broker

PATH = "/v1/stripe/webhook"


def _checkout(
    customer: str, *, paid_cents: int, metadata: dict[str, Any] | None = None, currency: str = "usd"
) -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex[:16]}",
        "object": "event",
        "type": "checkout.session.completed",
        "created": int(time.time()),
        "data": {
            "object": {
                "object": "checkout.session",
                "payment_status": "paid",
                "currency": currency,
                "amount_total": paid_cents,
                "metadata": {"customer_id": customer, **(metadata or {})},
            }
        },
    }


def _post(stack: Stack, event: dict[str, Any], ts: int | None = None) -> httpx.Response:
    body = json.dumps(event)
    header = stripe.WebhookSignature.generate_signature_header(body, STRIPE_SECRET, ts)
    return stack.http.post(PATH, content=body, headers={"Stripe-Signature": header, "Content-Type": "application/json"})


def _available(stack: Stack, customer: str) -> Decimal | None:
    r = stack.http.get(f"/v1/customers/{customer}/balance", headers=stack.admin)
    return Decimal(r.json()["available"]) if r.status_code == 200 else None


def test_top_up_credits_what_was_paid_and_refuses_a_mismatch(stack: Stack) -> None:
    cust = f"sec-pay-{uuid.uuid4().hex[:6]}"
    # The probe: $0.01 paid, metadata claims $1,000,000. Refused, nothing credited.
    r = _post(stack, _checkout(cust, paid_cents=1, metadata={"amount": "1000000"}))
    assert r.status_code == 400 and r.json()["error"] == "amount_mismatch", r.text
    r = _post(stack, _checkout(cust, paid_cents=2500, metadata={"amount": "25.00", "currency": "eur"}))
    assert r.status_code == 400 and r.json()["error"] == "currency_mismatch", r.text

    # A consistent top-up, and one without metadata.amount: both credit exactly what was paid.
    r = _post(stack, _checkout(cust, paid_cents=2500, metadata={"amount": "25.00", "currency": "usd"}))
    assert r.status_code == 200 and r.json()["duplicate"] is False, r.text
    r = _post(stack, _checkout(cust, paid_cents=1234))
    assert r.status_code == 200, r.text
    assert wait_for("the paid top-ups in the balance", lambda: _available(stack, cust) == Decimal("37.34"))


def test_webhook_input_checks(stack: Stack) -> None:
    # The customer id of the probe, and friends: refused with a code, never a customer.
    for bad in ("acme\r\nX-Injected: 1", "../acme", "\u202eacme"):
        r = _post(stack, _checkout(bad, paid_cents=100))
        assert r.status_code == 400 and r.json()["error"] == "invalid_customer_id", r.text
    # metadata.priority "abc": a 400 the sender can read, not a 500 Stripe would retry.
    r = _post(stack, _checkout(f"sec-prio-{uuid.uuid4().hex[:6]}", paid_cents=100, metadata={"priority": "abc"}))
    assert r.status_code == 400 and r.json()["error"] == "invalid_priority", r.text
    # Timestamps: bounded in the past (the SDK) AND in the future (10 years ahead was accepted).
    event = _checkout(f"sec-ts-{uuid.uuid4().hex[:6]}", paid_cents=100)
    for ts in (int(time.time()) + 10 * 365 * 86_400, int(time.time()) + 3600, int(time.time()) - 3600):
        r = _post(stack, event, ts=ts)
        assert r.status_code == 400 and r.json()["error"] == "invalid_signature", (ts, r.text)


def test_webhook_body_is_bounded_before_it_is_read_whole(stack: Stack) -> None:
    big = b"x" * (8 * 1024 * 1024)
    r = stack.http.post(PATH, content=big, headers={"Stripe-Signature": "t=1,v1=00"})
    assert r.status_code == 413, r.text

    def chunks() -> Any:  # no Content-Length: the stream itself is counted
        for _ in range(64):
            yield b"y" * (128 * 1024)

    r = stack.http.post(PATH, content=chunks(), headers={"Stripe-Signature": "t=1,v1=00"})
    assert r.status_code == 413, r.text


def test_an_alert_whose_id_cannot_be_sent_does_not_hold_up_the_others(stack: Stack) -> None:
    tag = uuid.uuid4().hex[:6]
    now = int(time.time() * 1000)
    bad = {
        "alert_id": f"evil-{tag}\r\nX-Injected: 1",
        "customer_id": "acme",
        "kind": "credit_used",
        "message": "bad",
        "at_ms": now,
    }
    good = {"alert_id": f"good-{tag}", "customer_id": "acme", "kind": "credit_used", "message": "ok", "at_ms": now}
    # Same key, so the same partition: the good alert is behind the bad one.
    publish_records(
        stack.settings.kafka_bootstrap or "",
        stack.settings.topic("alerts"),
        [("acme", json.dumps(bad).encode()), ("acme", json.dumps(good).encode())],
    )
    delivered = wait_for(
        "the good alert at the receiver",
        lambda: [h for h, body in stack.receiver.deliveries if body.get("alert_id") == good["alert_id"]],
        timeout=60,
    )
    assert delivered[0]["meterline-alert-id"] == good["alert_id"]
    assert not [b for _, b in stack.receiver.deliveries if str(b.get("alert_id", "")).startswith(f"evil-{tag}")]
    assert all("x-injected" not in h for h, _ in stack.receiver.deliveries)
