"""Plan simulator routes of the HTTP API, added with ``create_api(..., extra_routes=simulate_routes())``.

``GET /v1/customers/{id}/simulate?period=P&plans=ID,ID@N[&format=json|html]``
    customer key (its own customer) or admin key: "your bill on other plans" -- the JSON of
    ``meterline plans simulate --customer ID --format json`` (or its HTML report).
``GET /v1/simulate?period=P&plans=...[&cohort=PLAN_ID][&format=json|html]``
    admin key: every customer (or one cohort), with the cohort view.

Plans are published plan ids (the catalog in ClickHouse). Read-only: every query goes through
:func:`meterline.stack.analytics.run_readonly`. Bad input → 400 with ``field``; no ClickHouse → 503.
The routing what-if is CLI-only (it reads the prices topic).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from meterline.core.errors import ClickHouseUnavailable, InputError, TransientError
from meterline.shell.api.auth import ApiError, require_admin, require_customer, require_key

__all__ = ["simulate_routes"]


class _Readonly:
    def __init__(self, client: Any) -> None:
        self._client = client

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        from meterline.stack.analytics import run_readonly

        return SimpleNamespace(result_rows=run_readonly(self._client, sql, parameters)[1])


async def _run(request: Request, customer: str | None) -> Response:
    q = request.query_params
    period, plans, fmt = q.get("period"), q.get("plans"), q.get("format", "json")
    if not period:
        raise ApiError(400, "invalid_query", "'period' is required (YYYY-MM or YYYY-MM..YYYY-MM)", field="period")
    if not plans:
        raise ApiError(400, "invalid_query", "'plans' is required (published plan ids: ID,ID@VERSION)", field="plans")
    if fmt not in ("json", "html"):
        raise ApiError(400, "invalid_query", "'format' must be json or html", field="format")
    access = request.app.state.clickhouse
    if access is None:
        raise ApiError(503, "sql_unavailable", "this API server has no ClickHouse connection")

    def run() -> dict[str, Any]:
        from jobs.plans.billing import load_catalog, month_bounds
        from jobs.plans.simulate import parse_months, resolve_plans, simulate

        months = parse_months(period)
        with access() as raw:
            client = _Readonly(raw)
            catalog = load_catalog(client)
            candidates = resolve_plans(plans.split(","), catalog, month_bounds(months[0])[0])
            return simulate(client, period, candidates, customer=customer, cohort=q.get("cohort"))

    try:
        doc = await run_in_threadpool(run)
    except InputError as exc:
        raise ApiError(400, exc.reason_code, exc.message, field=exc.field) from None
    except (ClickHouseUnavailable, TransientError) as exc:
        raise ApiError(503, "clickhouse_unavailable", str(exc)) from None
    if fmt == "html":
        from meterline.core.simulator._html import render_html

        return HTMLResponse(render_html(doc))
    return JSONResponse(doc)


async def _customer_simulate(request: Request) -> Response:
    key = require_key(request)
    customer = request.path_params["customer_id"]
    require_customer(key, customer)
    return await _run(request, customer)


async def _operator_simulate(request: Request) -> Response:
    require_admin(require_key(request))
    return await _run(request, None)


def simulate_routes() -> list[BaseRoute]:
    return [
        Route("/v1/customers/{customer_id}/simulate", _customer_simulate, methods=["GET"]),
        Route("/v1/simulate", _operator_simulate, methods=["GET"]),
    ]
