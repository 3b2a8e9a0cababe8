"""The Stripe webhook endpoint: a paid top-up becomes one ``top_up`` command on ``ledger-commands``.

Mount it with ``create_api(..., extra_routes=[webhook_route(...)])``. Contract of the handler:

1. the ``Stripe-Signature`` header is verified against the endpoint secret with Stripe's scheme
   (``t=<ts>,v1=<hmac-sha256("<ts>.<body>")>``, timestamp tolerance 300 s by default) using
   ``stripe.WebhookSignature``; a missing/bad/stale signature -> 400, nothing published;
2. ``checkout.session.completed`` (``payment_status == "paid"``) and ``invoice.paid`` whose object
   carries meterline metadata ``customer_id`` + ``amount`` (+ ``currency``, default the object's)
   become ``{"type": "top_up", "command_id": <Stripe event id>, "grant_id": "topup:<event id>",
   ...}`` (the schemas.credits contract); any other event -> 200 ``{"ignored": type}``;
3. exactly once: an event id already recorded (``stripe_webhook_events``) is answered 200 without
   publishing; otherwise the command is published (acks=all, waited for) and THEN the event id is
   recorded. A crash between the two makes Stripe redeliver and the command is published again
   with the SAME command_id, which the credit agent applies once (command_id idempotency);
4. a broker failure -> 503, so Stripe retries later.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

import stripe
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meterline.errors import MeterlineError, TransientError

TOP_UP_EVENTS = ("checkout.session.completed", "invoice.paid")
DEFAULT_PATH = "/v1/stripe/webhook"
Publisher = Callable[[str, bytes], None]  # (key = customer_id, JSON value); raises on failure


class SeenEvents(Protocol):
    def seen(self, event_id: str) -> bool: ...
    def record(self, event_id: str, event_type: str, command_id: str) -> None: ...


class ClickHouseSeen:
    """Processed webhook events in ClickHouse ``stripe_webhook_events`` (one client, thread-safe)."""

    def __init__(self, ch: Any) -> None:
        self.ch = ch

    def seen(self, event_id: str) -> bool:
        from jobs.stripe._store import webhook_seen

        return webhook_seen(self.ch, event_id)

    def record(self, event_id: str, event_type: str, command_id: str) -> None:
        from jobs.stripe._store import record_webhook

        record_webhook(self.ch, event_id, event_type, command_id)


def kafka_publisher(bootstrap: str, topic: str, *, producer: Any = None) -> Publisher:
    """Publish to ``topic`` durably (idempotent producer, acks=all, waits for the ack).

    Pass ``producer`` (a :func:`pipeline.publish.control_producer`) to own its lifetime: a service
    closes it before stopping its broker, so it does not reconnect to a broker that is gone."""
    from pipeline.publish import control_producer, publish_records

    if producer is None:
        producer = control_producer(bootstrap)

    def publish(key: str, value: bytes) -> None:
        publish_records(bootstrap, topic, [(key, value)], producer=producer)

    return publish


def top_up_command(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ledger ``top_up`` command for a paid top-up event, or None when the event is not one."""
    etype = str(event.get("type", ""))
    if etype not in TOP_UP_EVENTS:
        return None
    obj = (event.get("data") or {}).get("object") or {}
    meta = obj.get("metadata") or {}
    customer = meta.get("customer_id") or meta.get("meterline_customer_id")
    amount = meta.get("amount")
    if not customer or amount is None:
        return None
    if etype == "checkout.session.completed" and obj.get("payment_status", "paid") != "paid":
        return None
    try:
        value = Decimal(str(amount))
    except InvalidOperation:
        return None
    if not value.is_finite() or value <= 0:
        return None
    at_ms = int(event.get("created") or 0) * 1000
    event_id = str(event["id"])
    return {
        "type": "top_up", "command_id": event_id, "customer_id": str(customer), "at_ms": at_ms,
        "grant_id": f"topup:{event_id}", "amount": format(value, "f"),
        "currency": str(meta.get("currency") or obj.get("currency") or "usd").lower(),
        "effective_at_ms": at_ms, "expires_at_ms": None, "priority": int(meta.get("priority", 10)),
        "category": "paid", "scope": None,
    }  # fmt: skip


def webhook_route(*, endpoint_secret: str, publish: Publisher, seen: SeenEvents | None = None,
                  path: str = DEFAULT_PATH, tolerance: int = 300) -> Route:  # fmt: skip
    """A starlette ``Route`` (POST ``path``) implementing the contract in the module docstring."""

    async def handler(request: Request) -> JSONResponse:
        body = (await request.body()).decode("utf-8", errors="replace")
        try:
            stripe.WebhookSignature.verify_header(body, request.headers.get("stripe-signature"), endpoint_secret,
                                                  tolerance)  # fmt: skip
        except stripe.SignatureVerificationError as exc:
            return JSONResponse({"error": "invalid_signature", "message": str(exc.user_message or exc)}, 400)
        try:
            event = json.loads(body)
            event_id = str(event["id"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "invalid_event", "message": "not a Stripe event"}, 400)
        cmd = top_up_command(event)
        if cmd is None:
            return JSONResponse({"received": True, "ignored": event.get("type")})
        try:
            duplicate = await run_in_threadpool(_deliver, cmd, str(event.get("type")), publish, seen)
        except (TransientError, MeterlineError) as exc:
            return JSONResponse({"error": "unavailable", "message": str(exc)}, 503)
        return JSONResponse({"received": True, "command_id": event_id, "duplicate": duplicate})

    return Route(path, handler, methods=["POST"])


def _deliver(cmd: dict[str, Any], event_type: str, publish: Publisher, seen: SeenEvents | None) -> bool:
    if seen is not None and seen.seen(cmd["command_id"]):
        return True
    publish(cmd["customer_id"], json.dumps(cmd, sort_keys=True).encode())  # 1. publish (waits for the ack)
    if seen is not None:
        seen.record(cmd["command_id"], event_type, cmd["command_id"])  # 2. then remember
    return False
