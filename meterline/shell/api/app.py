"""The meterline HTTP API (a Starlette app): event ingest and read-only SQL.

Routes
------
``GET /healthz``      no auth; ``{"status": "ok", "service": "meterline-api", "version": ...}``.
``POST /v1/events``   customer or admin key. Body ``{"events": [...]}`` or a bare JSON list.
``POST /v1/sql``      admin key. Body ``{"query", "parameters"?, "format"?: json|csv|table}``.

Ingest contract (``POST /v1/events``)
-------------------------------------
1. The body is at most :data:`MAX_BODY_BYTES` (1 MiB): a larger ``Content-Length`` is refused
   with 413 before any byte is read, and the stream is counted while reading (413 as soon as it
   passes the limit, for chunked bodies). At most :data:`MAX_EVENTS` (1000) events (else 413).
2. Every event of the request is checked before any is published. Each event is parsed with
   :func:`schemas.jsonio.parse_json_event` (a string that is not valid Unicode, e.g. a lone
   surrogate ``\\ud800``, is ``invalid_encoding``; the answer shows it escaped) and checked with the
   pipeline's own gate :func:`schemas.validation.validate_record` (so events the pipeline would
   dead-letter — future timestamps, empty usage — are refused at the edge with the same
   ``reason_code``). A customer key may only send its own customer's events (else that event is
   ``rejected`` with ``customer_mismatch``). A repeated ``event_id`` among this request's valid
   events is reported as ``duplicate_id_in_batch`` and not sent again.
3. The valid events are sent through the shared producer and ``flush()`` is awaited (in a worker
   thread, never on the event loop) before answering: ``"accepted"`` means acknowledged by Kafka.
   Sends + flush of one request are serialised with the other requests' (one lock), so a delivery
   failure is attributed to the request whose events failed. If delivery fails the answer is 503
   ``broker_unavailable`` and nothing is reported accepted; the client retries the whole request
   (safe: event ids dedupe downstream).
4. 200 ``{"accepted", "rejected", "duplicates", "results": [...]}``, one result per input event
   in input order: ``{"index", "event_id", "status": "accepted"|"duplicate_id_in_batch"|"rejected",
   "reason_code"?, "message"?, "field"?}``.

SQL contract (``POST /v1/sql``)
-------------------------------
:func:`meterline.stack.analytics.run_readonly` on a ClickHouse client obtained through ``clickhouse``:

- a zero-argument callable returning a context manager that yields a client (e.g. a pool or a
  "lock + shared client" helper), or
- a client object (anything with ``.query``), in which case every use is serialised by a lock of
  this app — the embedded chDB engine is owned by the ``meterline up`` process and one client must
  not be driven from several threads at once.

JSON results are ``{"columns": [...], "rows": [[...]]}`` with Decimals as strings (exact),
datetimes as ISO 8601 (naive values from chDB are UTC and get ``+00:00``), UUIDs/IPs as strings.
``csv`` and ``table`` return ``text/csv`` / ``text/plain`` from :func:`format_result`.
Writes, ``INTO OUTFILE``, multi-statements and SQL errors are 400 with the error
(``sql_not_readonly`` / ``sql_error``); a query stopped by one of the ``METERLINE_SQL_*`` limits
(time, memory, result rows/bytes) is 400 ``sql_limit_exceeded``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, date, datetime
from datetime import time as dtime
from decimal import Decimal
from ipaddress import IPv4Address, IPv6Address
from typing import Any
from uuid import UUID

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

import meterline
from meterline.core.config import Settings
from meterline.core.errors import ClickHouseUnavailable, InputError, InvalidEvent, TransientError
from meterline.shell.api.auth import ApiError, error_response, require_admin, require_key
from meterline.shell.api.body import parse_json, read_body
from meterline.shell.api.console import console_routes
from meterline.shell.api.keys import KeyRecord, KeyStore
from meterline.stack.analytics import SqlLimits
from meterline.stack.metrics import INGEST_EVENTS, metrics_endpoint

__all__ = ["MAX_BODY_BYTES", "MAX_EVENTS", "MAX_SQL_BODY_BYTES", "ClickHouseAccess", "create_api"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
MAX_EVENTS = 1000
MAX_SQL_BODY_BYTES = 256 * 1024
SQL_FORMATS = ("json", "csv", "table")
FLUSH_TIMEOUT_S = 30.0

# A zero-arg callable giving a context manager that yields a ClickHouse client, or a client itself.
ClickHouseAccess = Callable[[], AbstractContextManager[Any]] | Any


class _Publisher:
    """The shared producer, one request's send+flush at a time.

    Because requests are serialised and each one ends with a successful ``flush()`` or an error
    answer, a delivery failure reported while this request runs belongs either to this request or
    to an earlier one that was already answered 503. Stale failures are drained first (logged,
    not attributed to this request); anything failing after that fails this request.
    """

    def __init__(self, producer: Any, flush_timeout: float) -> None:
        self._producer = producer
        self._timeout = flush_timeout
        self._lock = threading.Lock()

    def publish(self, events: Sequence[Any]) -> dict[int, InvalidEvent]:
        """Send and flush ``events``; return the ones the producer itself refused (by position).

        Raises TransientError (DeliveryFailed, BrokerUnavailable) unless every other event was
        acknowledged by the broker.
        """
        refused: dict[int, InvalidEvent] = {}
        with self._lock:
            self._drain_stale()
            for i, ev in enumerate(events):
                try:
                    self._producer.send(ev)
                except InvalidEvent as exc:  # the producer's own gate (e.g. a stricter clock skew)
                    refused[i] = exc
            remaining = self._producer.flush(self._timeout)
            if isinstance(remaining, int) and not isinstance(remaining, bool) and remaining > 0:
                raise TransientError(f"{remaining} record(s) not acknowledged by the broker in {self._timeout}s")
        return refused

    def _drain_stale(self) -> None:
        try:
            self._producer.flush(0)
        except TransientError as exc:
            log.warning("ingest: failure of an earlier (already refused) request surfaced: %s", exc)


def _clickhouse_access(clickhouse: ClickHouseAccess | None) -> Callable[[], AbstractContextManager[Any]] | None:
    if clickhouse is None or callable(clickhouse):
        return clickhouse
    lock = threading.RLock()
    client = clickhouse

    @contextmanager
    def locked() -> Iterator[Any]:
        with lock:
            yield client

    return locked


# ------------------------------------------------------------------------------- helpers


def _event_id_of(obj: Any) -> str | None:
    """The (rejected) event's id as the client sent it, made printable: a lone surrogate (which
    JSON can carry) is shown escaped, so the answer always encodes."""
    if isinstance(obj, dict):
        v = obj.get("event_id")
        if isinstance(v, str):
            return v[:256].encode("utf-8", "backslashreplace").decode("utf-8")
    return None


class _Utf8JSON(JSONResponse):
    """JSONResponse whose encoding cannot fail: any lone surrogate left in a message is escaped."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace"
        )


def _check_events(
    raw: list[Any], key: KeyRecord, max_future_ms: int
) -> tuple[list[dict[str, Any]], list[tuple[int, Any]]]:
    """Per-event results (input order) and the ``(index, UsageEvent)`` pairs to publish."""
    from schemas.codec import event_to_record
    from schemas.jsonio import parse_json_event
    from schemas.validation import validate_record

    now_ms = time.time_ns() // 1_000_000
    results: list[dict[str, Any]] = []
    to_send: list[tuple[int, Any]] = []
    seen: set[str] = set()
    for index, obj in enumerate(raw):
        try:
            ev = parse_json_event(obj)
            validate_record(event_to_record(ev), now_ms=now_ms, max_future_ms=max_future_ms)
        except InvalidEvent as exc:
            results.append({"index": index, "event_id": _event_id_of(obj), "status": "rejected", **_reason(exc)})
            continue
        if not key.can_act_for(ev.customer_id):
            results.append(
                {
                    "index": index,
                    "event_id": ev.event_id,
                    "status": "rejected",
                    "reason_code": "customer_mismatch",
                    "message": "this API key may only send events of its own customer",
                    "field": "customer_id",
                }
            )
            continue
        if ev.event_id in seen:
            results.append(
                {
                    "index": index,
                    "event_id": ev.event_id,
                    "status": "duplicate_id_in_batch",
                    "reason_code": "duplicate_id_in_batch",
                    "message": "an earlier event of this request has the same event_id; this one was not sent",
                    "field": "event_id",
                }
            )
            continue
        seen.add(ev.event_id)
        to_send.append((index, ev))
        results.append({"index": index, "event_id": ev.event_id, "status": "accepted"})
    return results, to_send


def _reason(exc: InputError) -> dict[str, Any]:
    out: dict[str, Any] = {"reason_code": exc.reason_code, "message": exc.message}
    if exc.field is not None:
        out["field"] = exc.field
    return out


def _jsonable(v: Any) -> Any:
    """A ClickHouse value as exact JSON: Decimal -> str, datetime -> ISO 8601 (UTC if naive)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, datetime):
        return (v if v.tzinfo is not None else v.replace(tzinfo=UTC)).isoformat()
    if isinstance(v, (date, dtime)):
        return v.isoformat()
    if isinstance(v, (UUID, IPv4Address, IPv6Address)):
        return str(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return b.hex()
    if isinstance(v, dict):
        return {str(_jsonable(k)): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_jsonable(x) for x in v]
    return str(v)


# ------------------------------------------------------------------------------- handlers


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok", "service": "meterline-api", "version": meterline.__version__})


async def _post_events(request: Request) -> Response:
    key = require_key(request)
    body = await read_body(request, MAX_BODY_BYTES)
    doc = await run_in_threadpool(parse_json, body)
    if isinstance(doc, dict):
        raw = doc.get("events")
        if not isinstance(raw, list):
            raise ApiError(400, "invalid_body", "'events' must be a JSON array of events", field="events")
    elif isinstance(doc, list):
        raw = doc
    else:
        raise ApiError(400, "invalid_body", 'body must be {"events": [...]} or a JSON array')
    if len(raw) > MAX_EVENTS:
        raise ApiError(
            413, "too_many_events", f"{len(raw)} events in one request, at most {MAX_EVENTS}", field="events"
        )
    state = request.app.state
    results, to_send = await run_in_threadpool(_check_events, raw, key, state.max_future_ms)
    if to_send:
        try:
            refused = await run_in_threadpool(state.publisher.publish, [ev for _, ev in to_send])
        except TransientError as exc:
            log.warning("ingest: delivery failed key_id=%s events=%d: %s", key.key_id, len(to_send), exc)
            raise ApiError(
                503,
                "broker_unavailable",
                f"events were not acknowledged by Kafka, none accepted; retry the whole request ({exc})",
                headers={"Retry-After": "1"},
            ) from None
        for pos, exc in refused.items():
            index = to_send[pos][0]
            results[index] = {
                "index": index,
                "event_id": results[index]["event_id"],
                "status": "rejected",
                **_reason(exc),
            }
    accepted = sum(1 for r in results if r["status"] == "accepted")
    duplicates = sum(1 for r in results if r["status"] == "duplicate_id_in_batch")
    rejected = len(results) - accepted - duplicates
    for status, n in (("accepted", accepted), ("duplicate_id_in_batch", duplicates), ("rejected", rejected)):
        if n:
            INGEST_EVENTS.labels(status).inc(n)
    log.info("ingest key_id=%s accepted=%d rejected=%d duplicates=%d", key.key_id, accepted, rejected, duplicates)
    return _Utf8JSON({"accepted": accepted, "rejected": rejected, "duplicates": duplicates, "results": results})


async def _post_sql(request: Request) -> Response:
    key = require_key(request)
    require_admin(key)
    doc = parse_json(await read_body(request, MAX_SQL_BODY_BYTES))
    if not isinstance(doc, dict):
        raise ApiError(400, "invalid_body", 'body must be {"query": "...", "parameters"?: {...}, "format"?: ...}')
    query = doc.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ApiError(400, "invalid_body", "'query' must be a non-empty string", field="query")
    parameters = doc.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ApiError(400, "invalid_body", "'parameters' must be an object", field="parameters")
    fmt = doc.get("format", "json")
    if fmt not in SQL_FORMATS:
        raise ApiError(400, "invalid_body", f"'format' must be one of {', '.join(SQL_FORMATS)}", field="format")
    access = request.app.state.clickhouse
    if access is None:
        raise ApiError(503, "sql_unavailable", "this API server has no ClickHouse connection")

    limits = request.app.state.sql_limits

    def run() -> tuple[Any, Any]:
        from meterline.stack.analytics import run_readonly

        with access() as client:
            return run_readonly(client, query, parameters or None, limits=limits)

    try:
        columns, rows = await run_in_threadpool(run)
    except InputError as exc:
        raise ApiError(400, exc.reason_code, exc.message, field=exc.field) from None
    except (ClickHouseUnavailable, TransientError) as exc:
        raise ApiError(503, "clickhouse_unavailable", str(exc)) from None
    except Exception as exc:
        raise ApiError(400, "query_failed", str(exc)[:2000]) from None
    log.info("sql key_id=%s rows=%d format=%s", key.key_id, len(rows), fmt)
    if fmt == "json":
        return JSONResponse({"columns": _jsonable(list(columns)), "rows": [_jsonable(list(r)) for r in rows]})
    from meterline.stack.analytics import format_result

    text = format_result(columns, rows, fmt)
    return PlainTextResponse(text, media_type="text/csv" if fmt == "csv" else "text/plain")


# ------------------------------------------------------------------------------- errors


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers))


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return error_response(ApiError(500, "internal_error", "internal server error"))


# ------------------------------------------------------------------------------- factory


def create_api(
    settings: Settings,
    *,
    producer: Any,
    clickhouse: ClickHouseAccess | None,
    key_store: KeyStore,
    extra_routes: Sequence[BaseRoute] | None = None,
    flush_timeout: float = FLUSH_TIMEOUT_S,
) -> Starlette:
    """Build the app. The caller owns (and closes) ``producer``, ``clickhouse`` and ``key_store``.

    ``producer`` has ``send(UsageEvent)`` and ``flush(timeout)`` raising DeliveryFailed (a
    :class:`meterline.stack.producer.UsageProducer`). ``extra_routes`` are appended after the built-in
    routes; their handlers authenticate with :mod:`meterline.shell.api.auth` and may raise ApiError.
    """
    routes: list[BaseRoute] = [
        Route("/healthz", _healthz, methods=["GET"]),
        Route("/v1/events", _post_events, methods=["POST"]),
        Route("/v1/sql", _post_sql, methods=["POST"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *console_routes(),
        *(extra_routes or ()),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: _on_api_error,
            HTTPException: _on_http_exception,
            Exception: _on_unexpected,
        },
    )
    app.state.settings = settings
    app.state.key_store = key_store
    app.state.publisher = _Publisher(producer, flush_timeout)
    app.state.clickhouse = _clickhouse_access(clickhouse)
    app.state.max_future_ms = settings.max_future_skew_seconds * 1000
    app.state.sql_limits = SqlLimits.from_settings(settings)
    return app
