"""The web console: a small static app (``/console``) over JSON routes (``/v1/console/...``).

Mounted by :func:`meterline.shell.api.app.create_api`. The page and its two assets (hand-written
``console.js`` / ``console.css``, shipped in ``console_assets/``; no CDN, nothing fetched from the
network) need no key. Everything with data is behind the API's own bearer auth:

- the login form keeps the key in the tab's ``sessionStorage`` (gone when the tab closes, never in
  a URL or a cookie) and sends it as ``Authorization: Bearer`` on every call, to these routes and
  to the existing ones (``/v1/customers/{id}/balance`` and ``/status``);
- a customer key sees only its own customer (403 otherwise); an admin key sees every customer and
  the operator routes.

Routes (JSON unless said; money is exact decimal strings, never floats)
-----------------------------------------------------------------------
``GET  /v1/console/me``                       who the key is: ``{role, customer_id, key_prefix}``.
``GET  /v1/console/spend?customer_id&period`` ``{customer_id, start, end, currency: {cur: {total,
    by_day, by_model, by_project}}}`` from ``usage_daily`` (exact sums), ``period`` as for
    ``meterline statement`` (``YYYY-MM``, ``YYYY-MM-DD``, ``START..END``; default: this month).
``GET  /v1/console/alerts?customer_id``       the customer's most recent alerts (``alerts`` topic).
``GET  /v1/console/statement?customer_id&period``  the statement page of ``meterline statement
    --format html`` (text/html), so the console shows the very same statement.
``GET  /v1/console/plans``              any key: the published plan ids (``{plans: [id, ...]}``), the
                                        candidates of the console's "your bill on other plans".
``GET  /v1/console/customers``          admin: every customer with usage: events, cost, charge, margin.
``GET  /v1/console/dead-letters``       admin: open dead letters by reason, and the latest 50.
``POST /v1/console/dead-letters/redrive`` admin: body ``{reason?, customer_id?}``; re-sends the open
    re-drivable dead letters to ``usage-events`` (as ``meterline dead-letters redrive``).
``GET  /v1/console/pipeline``           admin: events priced per minute (last hour), delays
    occurred→priced→row (last 15 minutes), open dead letters, and worker-reported consumer lag.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from meterline.core.errors import ClickHouseUnavailable, MeterlineError, TransientError
from meterline.shell.api.auth import ApiError, require_admin, require_customer, require_key
from meterline.shell.api.body import json_object
from meterline.shell.api.keys import KeyRecord

__all__ = ["console_routes"]

log = logging.getLogger(__name__)

ASSETS = Path(__file__).with_name("console_assets")
_ASSET_TYPES = {"console.js": "text/javascript", "console.css": "text/css", "index.html": "text/html"}
ALERTS_LIMIT = 50


# ------------------------------------------------------------------------------- helpers


def _admin(request: Request) -> KeyRecord:
    key = require_key(request)
    require_admin(key)
    return key


def _customer_param(request: Request, key: KeyRecord) -> str:
    """The ``customer_id`` query parameter (a customer key defaults to its own), checked against the key."""
    customer = request.query_params.get("customer_id") or key.customer_id
    if not customer:
        raise ApiError(400, "invalid_request", "give customer_id", field="customer_id")
    require_customer(key, customer)
    return customer


def _period(request: Request) -> tuple[int, int]:
    from jobs.stripe.reconcile import parse_period

    raw = request.query_params.get("period") or datetime.now(UTC).strftime("%Y-%m")
    try:
        return parse_period(raw)
    except (MeterlineError, ValueError) as exc:
        raise ApiError(400, "invalid_request", f"period: {exc}", field="period") from None


async def _query(request: Request, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    access = request.app.state.clickhouse
    if access is None:
        raise ApiError(503, "sql_unavailable", "this API server has no ClickHouse connection")

    def run() -> list[tuple[Any, ...]]:
        with access() as client:
            return [tuple(r) for r in client.query(sql, parameters=params or {}).result_rows]

    try:
        return await run_in_threadpool(run)
    except (ClickHouseUnavailable, TransientError) as exc:
        raise ApiError(503, "clickhouse_unavailable", str(exc)) from None


def _dec(v: Any) -> str:
    return format(Decimal(v), "f")


def _iso(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat()
    return str(v)


# ------------------------------------------------------------------------------- page


async def _page(request: Request) -> Response:
    return FileResponse(
        ASSETS / "index.html",
        media_type="text/html",
        headers={"Cache-Control": "no-store", "Content-Security-Policy": _CSP},
    )


# Everything comes from this origin; no inline script; fetches only to this API.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none'"
)


async def _asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in _ASSET_TYPES or name == "index.html":
        raise ApiError(404, "not_found", "no such asset")
    return FileResponse(ASSETS / name, media_type=_ASSET_TYPES[name], headers={"Cache-Control": "no-cache"})


# ------------------------------------------------------------------------------- customer routes


async def _me(request: Request) -> Response:
    key = require_key(request)
    return JSONResponse(
        {
            "role": "admin" if key.is_admin else "customer",
            "customer_id": key.customer_id,
            "key_prefix": key.public_dict().get("prefix"),
        }
    )


async def _spend(request: Request) -> Response:
    key = require_key(request)
    customer = _customer_param(request, key)
    start, end = _period(request)
    rows = await _query(
        request,
        "SELECT currency, toString(day), model, project, sum(charge) FROM usage_daily "
        "WHERE customer_id = {c:String} AND day >= toDate({s:DateTime}) AND day < toDate({e:DateTime}) "
        "GROUP BY currency, day, model, project ORDER BY currency, day, model, project",
        {
            "c": customer,
            "s": datetime.fromtimestamp(start, UTC).replace(tzinfo=None),
            "e": datetime.fromtimestamp(end, UTC).replace(tzinfo=None),
        },
    )
    out: dict[str, dict[str, Any]] = {}
    for cur, day, model, project, charge in rows:
        c = out.setdefault(cur, {"total": Decimal(0), "by_day": {}, "by_model": {}, "by_project": {}})
        amount = Decimal(charge)
        c["total"] += amount
        for dim, k in (("by_day", day), ("by_model", model), ("by_project", project or "(none)")):
            c[dim][k] = c[dim].get(k, Decimal(0)) + amount
    doc = {
        cur: {
            "total": _dec(c["total"]),
            **{dim: {k: _dec(v) for k, v in sorted(c[dim].items())} for dim in ("by_day", "by_model", "by_project")},
        }
        for cur, c in sorted(out.items())
    }
    return JSONResponse(
        {
            "customer_id": customer,
            "start": datetime.fromtimestamp(start, UTC).date().isoformat(),
            "end": datetime.fromtimestamp(end, UTC).date().isoformat(),
            "currency": doc,
        }
    )


def recent_alerts(
    bootstrap: str, topic: str, customer_id: str | None, limit: int = ALERTS_LIMIT
) -> list[dict[str, Any]]:
    """The latest ``limit`` alerts of ``customer_id`` (all customers when None), newest first,
    one per ``alert_id`` (deliveries are at-least-once)."""
    from meterline.stack.kafka import read_topic

    seen: dict[str, dict[str, Any]] = {}
    for m in read_topic(bootstrap, topic, timeout=10.0):
        try:
            doc = json.loads(m.value())
        except (TypeError, ValueError):
            continue
        if not isinstance(doc, dict) or (customer_id is not None and doc.get("customer_id") != customer_id):
            continue
        seen.setdefault(str(doc.get("alert_id")), doc)
    alerts = sorted(seen.values(), key=lambda a: a.get("at_ms") or 0, reverse=True)
    return alerts[:limit]


async def _alerts(request: Request) -> Response:
    key = require_key(request)
    customer = _customer_param(request, key)
    settings = request.app.state.settings
    if not settings.kafka_bootstrap:
        return JSONResponse({"customer_id": customer, "alerts": []})
    alerts = await run_in_threadpool(recent_alerts, settings.kafka_bootstrap, settings.topic("alerts"), customer)
    return JSONResponse({"customer_id": customer, "alerts": alerts})


async def _statement(request: Request) -> Response:
    from jobs.stripe.statement import build_statement, render_html

    key = require_key(request)
    customer = _customer_param(request, key)
    start, end = _period(request)
    access = request.app.state.clickhouse
    if access is None:
        raise ApiError(503, "sql_unavailable", "this API server has no ClickHouse connection")

    def run() -> str:
        with access() as client:
            return render_html(build_statement(client, customer, start, end))

    return HTMLResponse(await run_in_threadpool(run), headers={"Cache-Control": "no-store"})


# ------------------------------------------------------------------------------- operator routes


async def _plans(request: Request) -> Response:
    # The catalog is public to every key holder: plan ids are what a customer may subscribe to.
    require_key(request)
    rows = await _query(request, "SELECT DISTINCT plan_id FROM plans FINAL ORDER BY plan_id")
    return JSONResponse({"plans": [str(r[0]) for r in rows]})


async def _customers(request: Request) -> Response:
    _admin(request)
    rows = await _query(
        request,
        "SELECT customer_id, currency, sum(events), sum(cost), sum(charge), max(day) FROM usage_daily "
        "GROUP BY customer_id, currency ORDER BY customer_id, currency",
    )
    return JSONResponse(
        {
            "customers": [
                {
                    "customer_id": c,
                    "currency": cur,
                    "events": int(n),
                    "cost": _dec(cost),
                    "charge": _dec(charge),
                    "margin": _dec(Decimal(charge) - Decimal(cost)),
                    "last_day": str(last),
                }
                for c, cur, n, cost, charge, last in rows
            ]
        }
    )


def _open_filter(doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    where = ["payload_format = 'usage_batch'"]
    params: dict[str, Any] = {}
    for field, col in (("reason", "reason_code"), ("customer_id", "customer_id")):
        v = doc.get(field)
        if v is None or v == "":
            continue
        if not isinstance(v, str):
            raise ApiError(400, "invalid_body", f"'{field}' must be a string", field=field)
        where.append(f"{col} = {{{field}:String}}")
        params[field] = v
    return " AND ".join(where), params


async def _dead_letters(request: Request) -> Response:
    _admin(request)
    by_reason = await _query(
        request,
        "SELECT reason_code, count(), countIf(payload_format = 'usage_batch') FROM v_rejected_open "
        "GROUP BY reason_code ORDER BY reason_code",
    )
    latest = await _query(
        request,
        "SELECT failed_at, customer_id, event_id, reason_code, reason, payload_format FROM v_rejected_open "
        "ORDER BY failed_at DESC, event_id LIMIT 50",
    )
    return JSONResponse(
        {
            "open": sum(int(n) for _, n, _ in by_reason),
            "by_reason": [{"reason_code": r, "open": int(n), "redrivable": int(d)} for r, n, d in by_reason],
            "latest": [
                {
                    "failed_at": _iso(t),
                    "customer_id": c,
                    "event_id": e,
                    "reason_code": r,
                    "reason": why,
                    "redrivable": fmt == "usage_batch",
                }
                for t, c, e, r, why, fmt in latest
            ],
        }
    )


async def _redrive(request: Request) -> Response:
    from pipeline.publish import publish_records

    key = _admin(request)
    doc = await json_object(request, 16 * 1024)
    where, params = _open_filter(doc)
    rows = await _query(request, f"SELECT customer_id, hex(payload) FROM v_rejected_open WHERE {where}", params)
    settings = request.app.state.settings
    records = [(str(c), bytes.fromhex(str(p))) for c, p in rows]
    topic = settings.topic("usage-events")
    try:
        n = await run_in_threadpool(publish_records, settings.kafka_bootstrap, topic, records) if records else 0
    except MeterlineError as exc:
        raise ApiError(503, "broker_unavailable", f"re-drive not acknowledged by Kafka: {exc}") from None
    log.info("console: key_id=%s re-drove %d dead letter(s) to %s", key.key_id, n, topic)
    return JSONResponse({"redriven": n, "topic": topic})


async def _pipeline(request: Request) -> Response:
    _admin(request)
    per_minute = await _query(
        request,
        "SELECT toStartOfMinute(inserted_at) AS m, count() FROM usage_priced "
        "WHERE inserted_at >= now64(3) - INTERVAL 1 HOUR GROUP BY m ORDER BY m",
    )
    delays = await _query(
        request,
        "SELECT count(), "
        "avg(dateDiff('millisecond', occurred_at, priced_at)), max(dateDiff('millisecond', occurred_at, priced_at)), "
        "avg(dateDiff('millisecond', priced_at, inserted_at)), max(dateDiff('millisecond', priced_at, inserted_at)) "
        "FROM usage_priced WHERE inserted_at >= now64(3) - INTERVAL 15 MINUTE",
    )
    n, occ_avg, occ_max, sink_avg, sink_max = delays[0] if delays else (0, None, None, None, None)
    open_dl = await _query(request, "SELECT count() FROM v_rejected_open")
    settings = request.app.state.settings
    from meterline.stack.metrics import read_worker_lag

    return JSONResponse(
        {
            "throughput_per_minute": [{"minute": _iso(m), "events": int(c)} for m, c in per_minute],
            "last_15_minutes": {
                "events": int(n),
                "occurred_to_priced_ms": {"avg": _num(occ_avg), "max": _num(occ_max)},
                "priced_to_row_ms": {"avg": _num(sink_avg), "max": _num(sink_max)},
            },
            "open_dead_letters": int(open_dl[0][0]) if open_dl else 0,
            "consumer_lag": await run_in_threadpool(read_worker_lag, settings.data_dir),
            "at": datetime.now(UTC).isoformat(),
        }
    )


def _num(v: Any) -> int | None:
    """A delay in whole milliseconds for display (ClickHouse's avg is a float; nan when empty)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else round(f)


def console_routes() -> list[BaseRoute]:
    """The console's page, assets and JSON routes (see the module docstring)."""
    return [
        Route("/console", _page, methods=["GET"]),
        Route("/console/assets/{name}", _asset, methods=["GET"]),
        Route("/v1/console/me", _me, methods=["GET"]),
        Route("/v1/console/spend", _spend, methods=["GET"]),
        Route("/v1/console/alerts", _alerts, methods=["GET"]),
        Route("/v1/console/statement", _statement, methods=["GET"]),
        Route("/v1/console/plans", _plans, methods=["GET"]),
        Route("/v1/console/customers", _customers, methods=["GET"]),
        Route("/v1/console/dead-letters", _dead_letters, methods=["GET"]),
        Route("/v1/console/dead-letters/redrive", _redrive, methods=["POST"]),
        Route("/v1/console/pipeline", _pipeline, methods=["GET"]),
    ]
