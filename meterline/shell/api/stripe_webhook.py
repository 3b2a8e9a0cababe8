"""``POST /v1/stripe/webhook``: Stripe's signed events in, paid top-ups out as ledger commands.

The contract (body limit, signature, which events, exactly once) is in :mod:`jobs.stripe.webhooks`,
which holds the logic; this module is its HTTP face.
"""

from __future__ import annotations

import json
import logging
import time

import stripe
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from jobs.stripe.webhooks import (
    DEFAULT_PATH,
    MAX_BODY_BYTES,
    Publisher,
    Rejected,
    SeenEvents,
    deliver,
    top_up_command,
)
from meterline.core.errors import MeterlineError, TransientError
from meterline.shell.api.auth import ApiError
from meterline.shell.api.body import read_body

__all__ = ["webhook_route"]

log = logging.getLogger(__name__)


def _signed_at(header: str | None) -> int | None:
    """The ``t=`` timestamp of a ``Stripe-Signature`` header (None if absent or not an integer)."""
    for item in (header or "").split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def webhook_route(
    *,
    endpoint_secret: str,
    publish: Publisher,
    seen: SeenEvents | None = None,
    path: str = DEFAULT_PATH,
    tolerance: int = 300,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Route:
    """A starlette ``Route`` (POST ``path``) implementing the contract in the module docstring."""

    async def handler(request: Request) -> JSONResponse:
        try:
            raw = await read_body(request, max_body_bytes)
        except ApiError as exc:
            return JSONResponse({"error": exc.code, "message": exc.message}, exc.status)
        body = raw.decode("utf-8", errors="replace")
        header = request.headers.get("stripe-signature")
        try:
            stripe.WebhookSignature.verify_header(body, header, endpoint_secret, tolerance)
        except stripe.SignatureVerificationError as exc:
            return JSONResponse({"error": "invalid_signature", "message": str(exc.user_message or exc)}, 400)
        signed_at = _signed_at(header)
        if signed_at is None or signed_at > time.time() + tolerance:  # the SDK only bounds the past
            return JSONResponse(
                {"error": "invalid_signature", "message": "the signature timestamp is in the future"}, 400
            )
        try:
            event = json.loads(body)
            event_id = str(event["id"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "invalid_event", "message": "not a Stripe event"}, 400)
        try:
            cmd = top_up_command(event)
        except Rejected as exc:
            log.warning("stripe webhook: event %s refused: %s: %s", event_id[:64], exc.code, exc.message)
            return JSONResponse({"error": exc.code, "message": exc.message}, 400)
        if cmd is None:
            return JSONResponse({"received": True, "ignored": event.get("type")})
        try:
            duplicate = await run_in_threadpool(deliver, cmd, str(event.get("type")), publish, seen)
        except (TransientError, MeterlineError) as exc:
            return JSONResponse({"error": "unavailable", "message": str(exc)}, 503)
        return JSONResponse({"received": True, "command_id": event_id, "duplicate": duplicate})

    return Route(path, handler, methods=["POST"])
