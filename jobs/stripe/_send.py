"""Sending meter events to Stripe: one at a time (v1) or in batches on the v2 meter event stream.

Outcome of one push, decided here and nowhere else:

=========================================  ==========  ==========================================
Stripe's answer                            status      why
=========================================  ==========  ==========================================
200                                        acked
400 ``duplicate_meter_event`` / "already   acked       a resend of an event Stripe has: delivered
exists"
400 ``timestamp_too_far_in_past``          too_old     reported, never silently dropped
other 400 / 404 / idempotency_error        failed      reported; reconcile shows the drift
429, 5xx, connection error, timeout        (retry)     exponential back-off with the SAME
                                                       Idempotency-Key and identifier, then
                                                       :class:`~meterline.core.errors.TransientError`
401 on the stream (session expired)        (retry)     a new session, then the same batch again
=========================================  ==========  ==========================================

stripe-python retries 5xx / 409 / connection errors itself (``max_network_retries``) but a 429 only
when Stripe says ``Stripe-Should-Retry: true``; plain rate limits arrive as ``RateLimitError`` and
are backed off here.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import stripe

from jobs.stripe._config import StripeTarget
from jobs.stripe._store import ACKED, CANCELED, FAILED, TOO_OLD, Push
from meterline.core.errors import ConfigError, TransientError

STREAM_BATCH = 100
MAX_BACKOFF = 30.0
_RETRYABLE = (stripe.RateLimitError, stripe.APIError, stripe.APIConnectionError)


def classify_invalid(exc: stripe.InvalidRequestError) -> tuple[str, str]:
    code = exc.code or ""
    msg = str(exc.user_message or exc)
    if code == "duplicate_meter_event" or "already exists" in msg:
        return ACKED, ""
    if code == "timestamp_too_far_in_past":
        return TOO_OLD, msg
    return FAILED, f"{code}: {msg}"


class MeterEventSender:
    """Pushes planned meter events; counts retries. ``sleep`` is injectable for tests."""

    def __init__(
        self,
        target: StripeTarget,
        *,
        max_attempts: int = 6,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.target = target
        self.client = target.client()
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.sleep = sleep
        self.retries = 0
        self._stream: stripe.StripeClient | None = None

    # ------------------------------------------------------------------ retry loop
    def retrying(self, what: str, call: Callable[[], Any]) -> Any:
        for attempt in range(self.max_attempts):
            try:
                return call()
            except stripe.TemporarySessionExpiredError:
                self._stream = None  # the next call opens a new session
                self.retries += 1
                continue
            except stripe.AuthenticationError as exc:
                raise ConfigError(f"Stripe refused the API key: {exc}") from exc
            except _RETRYABLE as exc:
                if attempt + 1 >= self.max_attempts:
                    raise TransientError(
                        f"{what}: Stripe still failing after {self.max_attempts} attempts: {exc}"
                    ) from exc
                self.retries += 1
                delay = min(MAX_BACKOFF, self.backoff * (2**attempt))
                retry_after = (exc.headers or {}).get("Retry-After") if isinstance(exc, stripe.RateLimitError) else None
                if retry_after and str(retry_after).isdigit():
                    delay = max(delay, min(MAX_BACKOFF, float(retry_after)))
                self.sleep(delay)
        raise TransientError(f"{what}: no answer after {self.max_attempts} attempts")

    # ------------------------------------------------------------------ v1: one event per request
    def send_one(self, push: Push, stripe_customer: str) -> tuple[str, str]:
        params = {
            "event_name": push.meter,
            "identifier": push.identifier,
            "timestamp": push.window_start,
            "payload": {"stripe_customer_id": stripe_customer, "value": str(push.value)},
        }
        key = (
            push.identifier if push.identifier.isascii() else "h" + hashlib.sha256(push.identifier.encode()).hexdigest()
        )
        options = {"idempotency_key": f"ml-me-{key}"}  # an HTTP header: latin-1 only

        def call() -> tuple[str, str]:
            try:
                self.client.v1.billing.meter_events.create(params, options)  # type: ignore[arg-type]
            except stripe.InvalidRequestError as exc:
                return classify_invalid(exc)
            except stripe.IdempotencyError as exc:
                return FAILED, f"idempotency_error: {exc}"
            return ACKED, ""

        return self.retrying(push.identifier, call)  # type: ignore[no-any-return]

    def cancel_one(self, push: Push) -> tuple[str, str]:
        """Cancel an acked meter event (a meter event adjustment; Stripe allows it within 24 h of
        receipt). CANCELED when Stripe dropped it (or had already), else FAILED with the reason."""
        params = {"event_name": push.meter, "type": "cancel", "cancel": {"identifier": push.identifier}}

        def call() -> tuple[str, str]:
            try:
                self.client.v1.billing.meter_event_adjustments.create(params)  # type: ignore[arg-type]
            except stripe.InvalidRequestError as exc:
                msg = str(exc.user_message or exc)
                if "already canceled" in msg:
                    return CANCELED, ""
                return FAILED, f"{exc.code or ''}: {msg}"
            return CANCELED, ""

        return self.retrying(f"cancel {push.identifier}", call)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ v2: ≤100 events per request
    def _stream_client(self) -> stripe.StripeClient:
        if self._stream is None:
            session = self.client.v2.billing.meter_event_session.create()
            self._stream = self.target.client(session.authentication_token)
        return self._stream

    def send_stream(self, batch: list[tuple[Push, str]]) -> list[tuple[str, str]]:
        """Send ≤100 events in one stream request. Validation is asynchronous: a 200 acks them all
        (duplicates by identifier are dropped by Stripe; too-old windows are filtered by the planner)."""
        assert len(batch) <= STREAM_BATCH
        events = [
            {
                "event_name": p.meter,
                "identifier": p.identifier,
                "timestamp": datetime.fromtimestamp(p.window_start, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "payload": {"stripe_customer_id": sc, "value": str(p.value)},
            }
            for p, sc in batch
        ]

        def call() -> list[tuple[str, str]]:
            try:
                self._stream_client().v2.billing.meter_event_stream.create({"events": events})  # type: ignore[typeddict-item]
            except stripe.InvalidRequestError as exc:
                status, err = classify_invalid(exc)
                return [(status, err)] * len(batch)
            return [(ACKED, "")] * len(batch)

        return self.retrying(f"stream batch of {len(batch)}", call)  # type: ignore[no-any-return]
