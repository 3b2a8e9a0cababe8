"""``GET /v1/customers/{id}/simulate`` (customer's own key) and ``GET /v1/simulate`` (admin) over a
real uvicorn server and chDB: same document as the simulator itself, keys scoped, errors clear."""

from __future__ import annotations

from collections.abc import Callable
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import httpx

from jobs.plans.billing import bill_preview
from jobs.plans.simulate import simulate
from meterline.core.plans import SubscriptionEvent, load_plan_catalog, parse_instant
from meterline.shell.api.simulate import simulate_routes
from pipeline.plans_sink import PLAN_COLUMNS, SUBSCRIPTION_COLUMNS, plan_row, subscription_row

PLANS = {
    "currency": "USD",
    "plans": [
        {
            "id": "flat",
            "version": 1,
            "effective_from": "2025-01-01T00:00:00Z",
            "interval": "month",
            "fee": "25",
            "overage": {"per_million": "0"},
        },
        {
            "id": "pro",
            "version": 1,
            "effective_from": "2025-01-01T00:00:00Z",
            "interval": "month",
            "fee": "20",
            "allowances": [{"id": "t", "tokens": 1000000}],
            "overage": {"per_million": "30"},
        },
        # model-scoped: only gpt-4o draws on the allowance (the simulator then groups by model in SQL)
        {
            "id": "scoped",
            "version": 1,
            "effective_from": "2025-01-01T00:00:00Z",
            "interval": "month",
            "fee": "10",
            "allowances": [{"id": "g", "tokens": 2000000, "models": [{"provider": "openai", "model": "gpt-4o"}]}],
            "overage": {"per_million": "7"},
        },
    ],
}


class _NoProducer:
    def send(self, event: Any) -> None:
        raise AssertionError("not used")

    def flush(self, timeout: float) -> int:
        return 0


def _seed(ch: Any) -> None:
    cat = load_plan_catalog(PLANS)
    ch.insert("plans", [plan_row(v) for v in cat.versions], column_names=PLAN_COLUMNS)
    ev = SubscriptionEvent("subscribed", "cust-a", parse_instant("2026-01-01T00:00:00Z", where="t"), "pro", 1)
    # cust-b subscribes mid-January: its January is pay-per-token until the 15th, then a period
    late = SubscriptionEvent("subscribed", "cust-b", parse_instant("2026-01-15T12:00:00Z", where="t"), "pro", 1)
    ch.insert("subscription_events", [subscription_row(e) for e in (ev, late)], column_names=SUBSCRIPTION_COLUMNS)
    ch.command(
        "INSERT INTO usage_priced (event_id, occurred_at, customer_id, provider, model, input_tokens, output_tokens, requests,"
        " cost, charge, currency)"
        " SELECT concat('e', toString(number)), toDateTime64('2026-01-01 00:00:00', 3, 'UTC') + toIntervalMinute(number * 31),"
        " if(number % 2 = 0, 'cust-a', 'cust-b'), if(number % 5 = 0, 'mistral', 'openai'), if(number % 5 = 0, 'mixtral', 'gpt-4o'),"
        " 40000 + number, 5000, 1, toDecimal128(0, 12),"
        " toDecimal128((40000 + number) * 5 + 5000 * 15, 12) / 1000000, 'USD' FROM numbers(2000)"
    )


def test_simulate_routes(api_factory: Callable[..., Any], keys: Any, clickhouse: Any) -> None:
    _seed(clickhouse)
    api = api_factory(producer=_NoProducer(), clickhouse=clickhouse, extra_routes=simulate_routes())

    def get(path, key):
        return httpx.get(api.url + path, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60)

    tables = "SELECT name, total_rows FROM system.tables WHERE database = currentDatabase() ORDER BY name"
    before = clickhouse.query(tables).result_rows
    r = get("/v1/customers/cust-a/simulate?period=2026-01..2026-02&plans=flat,pro@1", keys.cust_a)
    assert r.status_code == 200, r.text
    cat = load_plan_catalog(PLANS)
    want = simulate(clickhouse, "2026-01..2026-02", [cat.get("flat", 1), cat.get("pro", 1)], customer="cust-a")
    assert r.json() == want
    [c] = r.json()["customers"]
    assert c["customer_id"] == "cust-a" and c["current_plan"] == "pro@1"
    assert [x["plan"] for x in c["candidates"]] == ["payg", "pro@1", "flat@1", "pro@1"]

    assert get("/v1/customers/cust-b/simulate?period=2026-01&plans=flat", keys.cust_a).status_code == 403
    assert get("/v1/simulate?period=2026-01&plans=flat", keys.cust_a).status_code == 403
    assert get("/v1/customers/cust-a/simulate?period=2026-01&plans=flat", None).status_code == 401

    r = get("/v1/simulate?period=2026-01..2026-02&plans=flat,pro", keys.admin)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert [c["customer_id"] for c in doc["customers"]] == ["cust-a", "cust-b"]
    assert doc["cohorts"][0]["plan"] == "pro@1" and doc["cohorts"][0]["customers"] == 2
    # the current plan is what bill preview says, month by month (cust-b: pay-per-token gap + period)
    for c in doc["customers"]:
        cur = next(x for x in c["candidates"] if x["role"] == "current")
        for p in cur["periods"]:
            assert p["total"] == bill_preview(clickhouse, c["customer_id"], p["period"])["total"]
    b_jan = next(c for c in doc["customers"] if c["customer_id"] == "cust-b")["candidates"][1]["periods"][0]
    assert Decimal(b_jan["total"]) > Decimal("20.00")  # the fee plus the usage before the 15th
    r = get("/v1/simulate?period=2026-01..2026-02&plans=flat&cohort=pro", keys.admin)
    assert [c["customer_id"] for c in r.json()["customers"]] == ["cust-a", "cust-b"]
    r = get("/v1/simulate?period=2026-01..2026-02&plans=flat&cohort=flat", keys.admin)
    assert r.json()["customers"] == [] and r.json()["cohorts"] == []

    # the model-scoped plan against a hand computation from the stored rows
    r = get("/v1/customers/cust-a/simulate?period=2026-01..2026-02&plans=scoped", keys.cust_a)
    scoped = next(x for x in r.json()["customers"][0]["candidates"] if x["plan"] == "scoped@1")
    for p in scoped["periods"]:
        rows = clickhouse.query(
            "SELECT model = 'gpt-4o', sum(input_tokens + output_tokens) FROM usage_priced WHERE customer_id = 'cust-a'"
            " AND formatDateTime(occurred_at, '%Y-%m') = {m:String} GROUP BY 1",
            parameters={"m": p["period"]},
        ).result_rows
        t = {bool(k): int(v) for k, v in rows}
        over = max(t.get(True, 0) - 2_000_000, 0) + t.get(False, 0)
        assert Decimal(p["total"]) == (Decimal(10) + Decimal(over) * 7 / 1_000_000).quantize(
            Decimal("0.01"), ROUND_HALF_EVEN
        )

    assert clickhouse.query(tables).result_rows == before  # read-only: no table changed

    bad = get("/v1/customers/cust-a/simulate?period=2026-13&plans=flat", keys.cust_a)
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "period"
    unknown = get("/v1/customers/cust-a/simulate?period=2026-01&plans=nope", keys.cust_a)
    assert unknown.status_code == 400 and unknown.json()["error"]["field"] == "plans"
    html = get("/v1/customers/cust-a/simulate?period=2026-01&plans=flat&format=html", keys.cust_a)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert '<svg class="chart" data-chart="break_even"' in html.text and "http://" not in html.text.replace(
        "http://www.w3.org/2000/svg", ""
    )
