"""A thin synchronous client of the meterline HTTP API (used by the CLI).

Errors map onto :mod:`meterline.core.errors` by what the caller does about them:

- 400 / 413 / 422 → :class:`InputError` (``reason_code`` = the API's error code, ``field``);
- 401 / 403 → :class:`ConfigError` (wrong or insufficient key: an operator problem);
- 5xx, timeouts, connection refused → :class:`TransientError` (retry later).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from meterline.core.errors import ConfigError, InputError, MeterlineError, TransientError

__all__ = ["ApiClient", "call_json"]


def call_json(
    url: str,
    key: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    timeout: httpx.Timeout | float = 30.0,
    wait_unavailable_s: float = 0.0,
) -> tuple[int, dict[str, Any]]:
    """One JSON request with the key; returns (HTTP status, body as a dict). A body that is not
    JSON becomes ``{"error": {"code": "http_error", "message": <text>}}``. An unreachable API
    raises :class:`~meterline.core.errors.MeterlineError`.

    ``wait_unavailable_s`` > 0 (only for idempotent reads): a 503 that carries ``Retry-After`` (the
    API is still loading, e.g. ``status_catching_up`` right after a restart) is retried, honouring
    the header, until that many seconds have passed; then the last answer is returned."""
    deadline = time.monotonic() + wait_unavailable_s
    while True:
        try:
            resp = httpx.request(
                method, url.rstrip("/") + path, json=body, timeout=timeout, headers={"Authorization": f"Bearer {key}"}
            )
        except httpx.TransportError as exc:
            raise MeterlineError(f"meterline API at {url} unreachable: {exc}") from exc
        pause = _retry_after(resp)
        if pause is None or time.monotonic() + pause > deadline:
            break
        time.sleep(pause)
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        doc = {"error": {"code": "http_error", "message": resp.text[:500]}}
    return resp.status_code, doc


def _retry_after(resp: httpx.Response) -> float | None:
    """Seconds to wait before retrying a 503 that says when to retry; None otherwise."""
    if resp.status_code != 503:
        return None
    try:
        return min(max(float(resp.headers["Retry-After"]), 0.1), 5.0)
    except (KeyError, ValueError):
        return None


class ApiClient:
    def __init__(self, url: str, key: str, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()

    def sql(self, query: str, fmt: str = "json", parameters: Mapping[str, Any] | None = None) -> Any:
        """``fmt="json"``: ``{"columns", "rows"}`` (Decimals as strings); csv/table: the text."""
        body: dict[str, Any] = {"query": query, "format": fmt}
        if parameters:
            body["parameters"] = dict(parameters)
        resp = self._request("POST", "/v1/sql", json=body)
        return resp.json() if fmt == "json" else resp.text

    def send_events(self, events: Iterable[Any]) -> dict[str, Any]:
        """POST events (dicts in the canonical JSON form, or UsageEvent); the API's per-event report.

        Send at most 1000 events / 1 MiB per call; the caller batches.
        """
        from schemas.jsonio import event_to_json
        from schemas.models import UsageEvent

        payload = [event_to_json(e) if isinstance(e, UsageEvent) else e for e in events]
        return self._request("POST", "/v1/events", json={"events": payload}).json()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise TransientError(f"meterline API at {self.url} unreachable: {exc}") from exc
        if resp.status_code < 400:
            return resp
        code, message, field = "http_error", resp.text[:500], None
        try:
            err = resp.json()["error"]
            code, message, field = err["code"], err["message"], err.get("field")
        except (ValueError, KeyError, TypeError):
            pass
        text = f"{method} {path}: HTTP {resp.status_code} {code}: {message}"
        if resp.status_code in (401, 403):
            raise ConfigError(text)
        if resp.status_code >= 500:
            raise TransientError(text)
        raise InputError(message, reason_code=code, field=field)
