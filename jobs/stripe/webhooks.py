"""Paid Stripe top-ups become ledger commands: the logic behind ``POST /v1/stripe/webhook``.

The HTTP route itself is ``meterline.shell.api.stripe_webhook.webhook_route``; this module is what
it calls: :func:`top_up_command` (which events count and what was paid), :func:`deliver` (publish
exactly once) and the stores it uses. The route's contract:
0. the body is read as a stream, at most ``max_body_bytes`` (512 KiB): larger -> 413 before
   anything else (the route is reachable without a key);
1. the ``Stripe-Signature`` header is verified against the endpoint secret with Stripe's scheme
   (``t=<ts>,v1=<hmac-sha256("<ts>.<body>")>``) using ``stripe.WebhookSignature``; the timestamp
   must be within ``tolerance`` (300 s) on BOTH sides of now (the SDK only bounds the past); a
   missing/bad/stale/future signature -> 400, nothing published;
2. ``checkout.session.completed`` (``payment_status == "paid"``) and ``invoice.paid`` whose object
   carries meterline metadata ``customer_id`` become ``{"type": "top_up", "command_id": <Stripe
   event id>, "grant_id": "topup:<event id>", "amount": <what was PAID>, "currency": <the paid
   currency>, ...}`` (the schemas.credits contract). The amount is Stripe's ``amount_total`` (checkout) /
   ``amount_paid`` (invoice) in the currency's minor unit, never the metadata; a
   ``metadata.amount`` / ``metadata.currency`` that disagrees with it, a customer id not of the
   contract's form (``schemas.models.CUSTOMER_ID_PATTERN``) or a ``metadata.priority`` that is not
   an integer 0..100 -> 400 with a code (``amount_mismatch``, ``currency_mismatch``,
   ``invalid_customer_id``, ``invalid_priority``), nothing published; any other event -> 200
   ``{"ignored": type}``;
3. exactly once: an event id already recorded (``stripe_webhook_events``) is answered 200 without
   publishing; otherwise the command is published (acks=all, waited for) and THEN the event id is
   recorded. A crash between the two makes Stripe redeliver and the command is published again
   with the SAME command_id, which the credit agent applies once (command_id idempotency);
4. a broker failure -> 503, so Stripe retries later.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from schemas.credits import encode_message
from schemas.models import CUSTOMER_ID_RULE, is_customer_id

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 512 * 1024  # Stripe events are a few KiB; the route is unauthenticated until verified
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


class Rejected(Exception):
    """A signed event that must not become a command: answered 400 ``{"error": code, "message"}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ISO 4217 currencies whose Stripe amounts are not in hundredths (Stripe's "zero-decimal" and
# "three-decimal" lists); every other currency: the amount is in 1/100 of the unit.
_ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)
_THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})
# What Stripe says was paid, per event type (an integer in the currency's smallest unit).
_PAID_FIELD = {"checkout.session.completed": "amount_total", "invoice.paid": "amount_paid"}


def paid_amount(minor_units: int, currency: str) -> Decimal:
    """``minor_units`` of ``currency`` (as Stripe reports amounts) as an exact decimal amount."""
    exponent = 0 if currency in _ZERO_DECIMAL else 3 if currency in _THREE_DECIMAL else 2
    return Decimal(minor_units).scaleb(-exponent)


def top_up_command(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ledger ``top_up`` command for a paid top-up event, or None when the event is not one.

    The amount credited is what Stripe says was PAID (``amount_total`` of a checkout session,
    ``amount_paid`` of an invoice), in the paid ``currency``; ``metadata.amount`` /
    ``metadata.currency``, when present, must agree with it exactly. Raises :class:`Rejected` for
    a top-up that cannot be credited as sent (customer id not of the contract's form, amounts or
    currencies that disagree, a bad priority)."""
    etype = str(event.get("type", ""))
    if etype not in TOP_UP_EVENTS:
        return None
    data = event.get("data") or {}
    obj = (data.get("object") if isinstance(data, Mapping) else None) or {}
    meta = (obj.get("metadata") if isinstance(obj, Mapping) else None) or {}
    if not isinstance(obj, Mapping) or not isinstance(meta, Mapping):
        raise Rejected("invalid_event", "data.object and its metadata must be objects")
    customer = meta.get("customer_id") or meta.get("meterline_customer_id")
    if not customer:
        return None  # not a meterline top-up
    if etype == "checkout.session.completed" and obj.get("payment_status", "paid") != "paid":
        return None
    if not is_customer_id(customer):
        raise Rejected("invalid_customer_id", f"metadata.customer_id: {CUSTOMER_ID_RULE}")
    minor = obj.get(_PAID_FIELD[etype])
    currency = obj.get("currency")
    if isinstance(minor, bool) or not isinstance(minor, int) or minor < 0:
        raise Rejected("invalid_amount", f"{_PAID_FIELD[etype]} must be a non-negative integer (what was paid)")
    if not isinstance(currency, str) or not re.fullmatch(r"[A-Za-z]{3}", currency):
        raise Rejected("invalid_currency", "currency must be a 3-letter ISO code")
    currency = currency.lower()
    paid = paid_amount(minor, currency)
    if meta.get("currency") is not None and str(meta["currency"]).lower() != currency:
        raise Rejected("currency_mismatch", f"metadata.currency {str(meta['currency'])[:8]!r} but {currency} was paid")
    if meta.get("amount") is not None:
        try:
            asked = Decimal(str(meta["amount"]))
        except InvalidOperation:
            raise Rejected("amount_mismatch", "metadata.amount is not a decimal amount") from None
        if not asked.is_finite() or asked != paid:
            raise Rejected(
                "amount_mismatch",
                f"metadata.amount {str(meta['amount'])[:32]} but {paid} {currency} was paid; nothing credited",
            )
    if paid <= 0:
        return None  # nothing was paid: nothing to credit
    priority = meta.get("priority", 10)
    try:
        priority = int(str(priority))
    except ValueError:
        raise Rejected("invalid_priority", "metadata.priority must be an integer from 0 to 100") from None
    if not 0 <= priority <= 100:
        raise Rejected("invalid_priority", "metadata.priority must be an integer from 0 to 100")
    at_ms = int(event.get("created") or 0) * 1000
    event_id = str(event["id"])
    return {
        "type": "top_up",
        "command_id": event_id,
        "customer_id": str(customer),
        "at_ms": at_ms,
        "grant_id": f"topup:{event_id}",
        "amount": format(paid, "f"),
        "currency": currency,
        "effective_at_ms": at_ms,
        "expires_at_ms": None,
        "priority": priority,
        "category": "paid",
        "scope": None,
    }


def deliver(cmd: dict[str, Any], event_type: str, publish: Publisher, seen: SeenEvents | None) -> bool:
    """Publish a top-up command once per Stripe event (step 3 of the contract); True if it was a duplicate."""
    if seen is not None and seen.seen(cmd["command_id"]):
        return True
    publish(cmd["customer_id"], encode_message(cmd))  # 1. publish (waits for the ack)
    if seen is not None:
        seen.record(cmd["command_id"], event_type, cmd["command_id"])  # 2. then remember
    return False
