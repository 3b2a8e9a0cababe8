"""``LocalStripe``: the local Stripe server in a background thread, with SDK clients and test controls.

    with LocalStripe() as ls:
        client = ls.client()                       # stripe.StripeClient pointed at ls.url
        ls.faults.drop_response(path_prefix="/v1/billing/meter_events")
        ls.advance_clock(86400)

Test controls go over HTTP to the ``/_test/...`` endpoints, so they behave exactly as they do
against a standalone ``python -m devtools.stripe_local`` process (pass ``url=`` to attach to one).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import stripe

from devtools.stripe_local._server import StripeServer


class Faults:
    """Arm faults on the next N Stripe requests (optionally only those under ``path_prefix``)."""

    def __init__(self, http: httpx.Client) -> None:
        self._http = http

    def _arm(self, kind: str, count: int, path_prefix: str | None, **extra: Any) -> None:
        body = {"kind": kind, "count": count, "path_prefix": path_prefix or "/v", **extra}
        if body.get("method") is None:
            body.pop("method", None)
        self._http.post("/_test/faults", json=body).raise_for_status()

    def rate_limit(
        self, count: int = 1, *, path_prefix: str | None = None, retry_after: int = 1, should_retry: bool = True
    ) -> None:
        """429 with ``Retry-After``; ``Stripe-Should-Retry: true`` unless ``should_retry=False``
        (stripe-python only retries a 429 when that header says so)."""
        self._arm("rate_limit", count, path_prefix, retry_after=retry_after, should_retry=should_retry)

    def server_error(self, count: int = 1, *, status: int = 500, path_prefix: str | None = None) -> None:
        """Answer ``status`` (500, 502, 503, ...) without processing the request."""
        self._arm("status", count, path_prefix, status=status)

    def hang(self, seconds: float, count: int = 1, *, path_prefix: str | None = None) -> None:
        """Hold the connection ``seconds``, then close it; the request is NOT processed."""
        self._arm("hang", count, path_prefix, seconds=seconds)

    def drop_response(self, count: int = 1, *, path_prefix: str | None = None, method: str | None = None) -> None:
        """Process and commit the request, then close the connection without answering (only
        ``method`` requests, e.g. ``"POST"``, when given)."""
        self._arm("drop", count, path_prefix, method=method)

    def clear(self) -> None:
        self._http.delete("/_test/faults").raise_for_status()

    def armed(self) -> list[dict[str, Any]]:
        return list(self._http.get("/_test/faults").json()["faults"])


class LocalStripe:
    """Run (or attach to) a local Stripe server; state in ``state_path`` (sqlite) or in memory."""

    def __init__(self, state_path: Path | None = None, *, url: str | None = None) -> None:
        self._server: StripeServer | None = None
        if url is None:
            self._server = StripeServer(state_path).start()
            url = self._server.url
        self.url = url
        self._http = httpx.Client(base_url=url, timeout=30)
        self.faults = Faults(self._http)

    def __enter__(self) -> LocalStripe:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._http.close()
        if self._server is not None:
            self._server.stop()
            self._server = None

    # ------------------------------------------------------------------ SDK clients
    @property
    def base_addresses(self) -> dict[str, str]:
        return {"api": self.url, "meter_events": self.url}

    def client(
        self, api_key: str = "sk_test_123", *, max_network_retries: int = 2, timeout: float | None = None
    ) -> stripe.StripeClient:
        """A real ``stripe.StripeClient`` for this server (``timeout`` in seconds, default SDK's 80)."""
        http_client = stripe.RequestsClient(timeout=timeout) if timeout is not None else None
        return stripe.StripeClient(
            api_key,
            base_addresses=self.base_addresses,  # type: ignore[arg-type]
            max_network_retries=max_network_retries,
            http_client=http_client,
        )

    def stream_client(self, authentication_token: str, *, max_network_retries: int = 2) -> stripe.StripeClient:
        """Client for ``v2.billing.meter_event_stream`` authenticated by a meter event session token."""
        return self.client(authentication_token, max_network_retries=max_network_retries)

    # ------------------------------------------------------------------ test controls
    def now(self) -> int:
        """The server's clock (unix seconds); send meter event timestamps relative to it."""
        return int(self._http.get("/_test/clock").json()["now"])

    def advance_clock(self, seconds: int) -> int:
        """Move the server clock forward; ended periods are invoiced, due drafts finalized."""
        resp = self._http.post("/_test/clock", json={"advance": int(seconds)})
        resp.raise_for_status()
        return int(resp.json()["now"])

    def set_clock(self, ts: int) -> int:
        resp = self._http.post("/_test/clock", json={"set": int(ts)})
        resp.raise_for_status()
        return int(resp.json()["now"])

    def close_periods(self, *, finalize: bool = True) -> list[str]:
        """Invoice every ended period now; ``finalize`` skips the 1 h draft grace period. Returns ids."""
        resp = self._http.post("/_test/close_periods", json={"finalize": finalize})
        resp.raise_for_status()
        return list(resp.json()["invoices"])

    def delete_meter_event(self, identifier: str) -> None:
        """Remove a stored meter event behind the client's back (reconcile-drift tests)."""
        self._http.post("/_test/delete_meter_event", json={"identifier": identifier}).raise_for_status()

    def error_reports(self, code: str | None = None) -> list[dict[str, Any]]:
        """Async validation failures (Stripe's ``v1.billing.meter.error_report_triggered``), newest first."""
        params = {"code": code} if code else {}
        return list(self._http.get("/_test/error_reports", params=params).json()["data"])

    def meter_events(self, event_name: str | None = None) -> list[dict[str, Any]]:
        params = {"event_name": event_name} if event_name else {}
        return list(self._http.get("/_test/meter_events", params=params).json()["data"])

    def reset(self) -> None:
        self._http.post("/_test/reset", json={}).raise_for_status()
