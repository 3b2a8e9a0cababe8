"""Plans in ClickHouse on the real engine (chDB): bill preview's SQL aggregates, `bill close`, and
every query of docs/analytics.md's "Plan queries" section, with exact answers."""

from __future__ import annotations

import re
from datetime import UTC
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from jobs.plans.billing import bill_preview, close_period
from meterline.core.plans import SubscriptionEvent, load_plan_catalog, parse_instant
from meterline.stack.analytics import run_readonly
from pipeline.plans_sink import PLAN_COLUMNS, SUBSCRIPTION_COLUMNS, plan_row, subscription_row
from pipeline.sink import PRICED_COLUMNS, priced_row

DOC = Path(__file__).resolve().parents[2] / "docs" / "analytics.md"
M = 1_000_000
P = 10**12

CATALOG = load_plan_catalog(
    {
        "currency": "USD",
        "plans": [
            {
                "id": "pro",
                "version": 1,
                "effective_from": "2026-01-01T00:00:00Z",
                "interval": "month",
                "fee": "200.00",
                "allowances": [{"id": "tokens", "tokens": 10 * M, "token_classes": ["input", "output"]}],
                "overage": {"per_million": "30.00"},
            },
            {
                "id": "flat",
                "version": 1,
                "effective_from": "2026-01-01T00:00:00Z",
                "interval": "month",
                "fee": "25.00",
                "overage": {"per_million": "0"},
            },
            {
                "id": "commit",
                "version": 1,
                "effective_from": "2026-01-01T00:00:00Z",
                "interval": "month",
                "fee": "0",
                "overage": {"per_million": "2.00"},
                "minimum_commitment": "100.00",
            },
        ],
    }
)


def plan_queries() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8").split("## Plan queries", 1)[1].split("\n## ", 1)[0]
    return {t.strip(): q for t, q in re.findall(r"^### (.+?)\n.*?```sql\n(.*?)```", text, flags=re.S | re.M)}


def _ts(text: str) -> int:
    return parse_instant(text, where="test")


@pytest.fixture
def seeded(clickhouse: Any) -> Any:
    clickhouse.insert("plans", [plan_row(v) for v in CATALOG.versions], column_names=PLAN_COLUMNS)
    march = _ts("2026-03-01T00:00:00Z")
    subs = [
        SubscriptionEvent("subscribed", c, march, p)
        for c, p in (("a", "pro"), ("b", "pro"), ("c", "flat"), ("d", "commit"))
    ]
    subs.append(SubscriptionEvent("cancelled", "d", _ts("2026-03-20T00:00:00Z"), at_period_end=True))
    clickhouse.insert("subscription_events", [subscription_row(e) for e in subs], column_names=SUBSCRIPTION_COLUMNS)
    # usage at $5 per million tokens pay-per-token; several events per customer, two models
    usage = {"a": [4 * M, 3 * M], "b": [6 * M, 6 * M], "c": [30 * M, 20 * M], "d": [10 * M], "e": [M]}
    rows, n = [], 0
    for cust, amounts in usage.items():
        for i, tokens in enumerate(amounts):
            n += 1
            rows.append(
                priced_row(
                    {
                        "event_id": f"ev-{n}",
                        "occurred_at": (march + 86_400 * (i + 1)) * 1000,
                        "customer_id": cust,
                        "provider": "openai",
                        "model": "gpt-4o" if i % 2 else "gpt-4o-mini",
                        "input_tokens": tokens - tokens // 4,
                        "output_tokens": tokens // 4,
                        "cost_picos": tokens * 4 * M,
                        "charge_picos": tokens * 5 * M,
                        "currency": "USD",
                    },
                    partition=0,
                    offset=n,
                )
            )
    # one event in April (next period) and one in February (before the subscriptions) must not count
    for eid, when in (("late", _ts("2026-04-01T00:00:00Z")), ("early", _ts("2026-02-28T23:59:59Z"))):
        rows.append(
            priced_row(
                {
                    "event_id": eid,
                    "occurred_at": when * 1000,
                    "customer_id": "a",
                    "provider": "openai",
                    "model": "gpt-4o",
                    "input_tokens": 50 * M,
                    "cost_picos": 0,
                    "charge_picos": 0,
                    "currency": "USD",
                },
                partition=0,
                offset=0,
            )
        )
    clickhouse.insert("usage_priced", rows, column_names=PRICED_COLUMNS)
    return clickhouse


def test_bill_preview_aggregates_in_clickhouse(seeded: Any) -> None:
    a = bill_preview(seeded, "a", "2026-03")
    assert a["total"] == "200.00" and a["allowances"][0]["remaining"] == 3 * M
    b = bill_preview(seeded, "b", "2026-03")
    assert b["total"] == "260.00"
    d = bill_preview(seeded, "d", "2026-03")  # 10M at $2 = $20, trued up to the $100 commitment
    assert [(x["kind"], x["amount"]) for x in d["lines"] if x["kind"] != "allowance"] == [
        ("fee", "0.00"),
        ("overage", "20.00"),
        ("minimum_commitment", "80.00"),
    ]
    assert d["total"] == "100.00"
    assert bill_preview(seeded, "d", "2026-04")["plan"] is None  # cancelled at the end of March
    e = bill_preview(seeded, "e", "2026-03")
    assert e["plan"] is None and e["total"] == "5.00"
    assert bill_preview(seeded, "a", "2026-02")["plan"] is None


def test_bill_close_and_the_doc_queries(seeded: Any) -> None:
    assert close_period(seeded, "2026-03", closed_at_ms=1_000) == 4
    assert close_period(seeded, "2026-03", closed_at_ms=2_000) == 4  # re-close replaces
    queries = plan_queries()
    assert set(queries) == {
        "Revenue per plan",
        "Allowance utilisation (the quota a plan leaves unused)",
        "Overage revenue per month",
        "Customers above and below break-even",
    }
    res = {t: run_readonly(seeded, q) for t, q in queries.items()}

    cols, rows = res["Revenue per plan"]
    by_plan = {r[cols.index("plan_id")]: r for r in rows}
    assert by_plan["pro"][cols.index("revenue")] == Decimal("460")
    assert by_plan["pro"][cols.index("overage_net")] == Decimal("60")
    assert by_plan["pro"][cols.index("bills")] == 2
    assert by_plan["flat"][cols.index("revenue")] == Decimal("25")
    assert by_plan["commit"][cols.index("true_ups")] == Decimal("80")

    cols, rows = res["Allowance utilisation (the quota a plan leaves unused)"]
    assert [
        (
            r[cols.index("plan_id")],
            r[cols.index("total_included")],
            r[cols.index("total_used")],
            r[cols.index("unused")],
        )
        for r in rows
    ] == [("pro", 20 * M, 17 * M, 3 * M)]
    assert rows[0][cols.index("used_pct")] == Decimal("85")

    cols, rows = res["Overage revenue per month"]
    assert [
        (r[cols.index("plan_id")], r[cols.index("overage_billed")], r[cols.index("bills_with_overage")]) for r in rows
    ] == [("commit", Decimal("20"), 1), ("pro", Decimal("60"), 1)]

    cols, rows = res["Customers above and below break-even"]
    verdict = {
        r[cols.index("customer_id")]: (r[cols.index("pay_per_token")], r[cols.index("break_even")]) for r in rows
    }
    # pay-per-token at $5/M: a $35 < $200, b $60 < $260, c $250 > $25 (flat plan bargain), d $50 < $100
    assert verdict == {
        "a": (Decimal("35"), "below"),
        "b": (Decimal("60"), "below"),
        "c": (Decimal("250"), "above"),
        "d": (Decimal("50"), "below"),
    }


def test_rollover_chains_periods_and_prepaid_comes_from_the_ledger(clickhouse: Any) -> None:
    cat = load_plan_catalog(
        {
            "currency": "USD",
            "plans": [
                {
                    "id": "roll",
                    "version": 1,
                    "effective_from": "2026-01-01T00:00:00Z",
                    "interval": "month",
                    "fee": "100.00",
                    "allowances": [{"id": "tokens", "tokens": 10 * M, "rollover": {"max": 5 * M}}],
                    "overage": {"per_million": "10.00"},
                }
            ],
        }
    )
    clickhouse.insert("plans", [plan_row(v) for v in cat.versions], column_names=PLAN_COLUMNS)
    jan = _ts("2026-01-15T00:00:00Z")  # anchored mid-month: periods run 15th to 15th
    clickhouse.insert(
        "subscription_events",
        [subscription_row(SubscriptionEvent("subscribed", "r", jan, "roll", 1))],
        column_names=SUBSCRIPTION_COLUMNS,
    )
    rows = []
    for n, (when, tokens) in enumerate(((jan + 86_400, 2 * M), (_ts("2026-02-20T00:00:00Z"), 17 * M))):
        rows.append(
            priced_row(
                {
                    "event_id": f"r{n}",
                    "occurred_at": when * 1000,
                    "customer_id": "r",
                    "provider": "openai",
                    "model": "gpt-4o",
                    "input_tokens": tokens,
                    "cost_picos": 0,
                    "charge_picos": tokens * M,
                    "currency": "usd",
                },
                partition=0,
                offset=n,
            )
        )
    clickhouse.insert("usage_priced", rows, column_names=PRICED_COLUMNS)
    clickhouse.insert(
        "ledger_entries",
        [("r:1", _utc_dt("2026-02-21T00:00:00Z"), "r", 1, "debit", Decimal("7.5"), "USD", "g1", "r1", "usage")],
        column_names=[
            "entry_id",
            "at",
            "customer_id",
            "seq",
            "kind",
            "amount",
            "currency",
            "grant_id",
            "event_id",
            "reason",
        ],
    )
    jan_bill = bill_preview(clickhouse, "r", "2026-01")
    assert jan_bill["total"] == "100.00" and jan_bill["periods"][0]["allowances"][0]["rollover_out"] == 5 * M
    feb = bill_preview(clickhouse, "r", "2026-02")
    # 10M own + 5M rolled in; 17M used -> 2M overage at $10 = $20, of which the ledger's $7.50 was prepaid
    assert [(a["included"], a["rolled_in"], a["used"], a["remaining"]) for a in feb["allowances"]] == [
        (10 * M, 5 * M, 15 * M, 0)
    ]
    assert [(x["kind"], x["amount"]) for x in feb["lines"]] == [
        ("fee", "100.00"),
        ("allowance", "0.00"),
        ("overage", "20.00"),
        ("prepaid_credit", "-7.50"),
    ]
    assert feb["total"] == "112.50"


def _utc_dt(text: str) -> Any:
    from datetime import datetime

    return datetime.fromtimestamp(_ts(text), tz=UTC)


def test_usage_in_another_currency_is_refused_not_mixed(seeded: Any) -> None:
    from meterline.core.errors import MeterlineError

    seeded.insert(
        "usage_priced",
        [
            priced_row(
                {
                    "event_id": "eur-1",
                    "occurred_at": _ts("2026-03-05T00:00:00Z") * 1000,
                    "customer_id": "a",
                    "provider": "openai",
                    "model": "gpt-4o",
                    "input_tokens": 1,
                    "cost_picos": 1,
                    "charge_picos": 1,
                    "currency": "EUR",
                },
                partition=0,
                offset=99,
            )
        ],
        column_names=PRICED_COLUMNS,
    )
    with pytest.raises(MeterlineError, match="EUR"):
        bill_preview(seeded, "a", "2026-03")


def test_usage_before_a_mid_month_subscription_is_pay_per_token_and_yearly_plans_show(clickhouse: Any) -> None:
    cat = load_plan_catalog(
        {
            "currency": "USD",
            "plans": [
                {
                    "id": "pro",
                    "version": 1,
                    "effective_from": "2026-01-01T00:00:00Z",
                    "interval": "month",
                    "fee": "200.00",
                    "allowances": [{"id": "tokens", "tokens": 10 * M}],
                    "overage": {"per_million": "30.00"},
                },
                {
                    "id": "annual",
                    "version": 1,
                    "effective_from": "2026-01-01T00:00:00Z",
                    "interval": "year",
                    "fee": "1200.00",
                    "overage": {"per_million": "1"},
                },
            ],
        }
    )
    clickhouse.insert("plans", [plan_row(v) for v in cat.versions], column_names=PLAN_COLUMNS)
    clickhouse.insert(
        "subscription_events",
        [
            subscription_row(e)
            for e in (
                SubscriptionEvent("subscribed", "m", _ts("2026-03-10T00:00:00Z"), "pro", 1),
                SubscriptionEvent("subscribed", "y", _ts("2026-01-01T00:00:00Z"), "annual", 1),
            )
        ],
        column_names=SUBSCRIPTION_COLUMNS,
    )
    rows = [
        priced_row(
            {
                "event_id": eid,
                "occurred_at": _ts(when) * 1000,
                "customer_id": c,
                "provider": "openai",
                "model": "gpt-4o",
                "input_tokens": M,
                "cost_picos": 0,
                "charge_picos": charge,
                "currency": "USD",
            },
            partition=0,
            offset=i,
        )
        for i, (eid, c, when, charge) in enumerate(
            (
                ("m-before", "m", "2026-03-05T00:00:00Z", 3_250_000_000_000),  # $3.25 before the plan
                ("m-after", "m", "2026-03-12T00:00:00Z", 99 * P),  # inside the plan: the allowance covers it
                ("y-may", "y", "2026-05-05T00:00:00Z", P),
            )
        )
    ]
    clickhouse.insert("usage_priced", rows, column_names=PRICED_COLUMNS)
    m = bill_preview(clickhouse, "m", "2026-03")
    assert [(x["kind"], x["amount"]) for x in m["lines"]] == [
        ("usage", "3.25"),
        ("fee", "200.00"),
        ("allowance", "0.00"),
    ]
    assert m["total"] == "203.25" and m["lines"][0]["end"] == "2026-03-10T00:00:00Z"
    y = bill_preview(clickhouse, "y", "2026-05")  # no yearly period starts in May: the year's bill
    assert y["plan"] == "annual@1" and y["total"] == "1201.00"
    # bills are closed in the month their period starts: m's May 10 period, not y's year
    assert close_period(clickhouse, "2026-05", closed_at_ms=1) == 1
    assert clickhouse.query("SELECT customer_id, period_start FROM plan_bills FINAL").result_rows == [
        ("m", _utc_dt("2026-05-10T00:00:00Z").replace(tzinfo=None))
    ]
