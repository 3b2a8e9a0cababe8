"""Plan customers' corrections reach Stripe (issue #18): a re-rated plan bill is money on top of the
plan (the plan meter counts tokens), so it goes to Stripe as a corrective amount on the plan
subscription's next invoice; an event-level re-rating of their in-plan usage changes no token and
sends nothing; their pay-per-token usage outside a plan run is corrected on the cost meter.

The plan-bill correction row is written here the way ``meterline reprice`` writes one (the
``usage_corrections`` schema: one row per customer x period, ``kind = 'plan'``, provider '', ``charge`` =
re-rated plan bill − billed plan bill); real chDB, plans domain, sync and the bundled Stripe server.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal
from typing import Any

import pytest

from devtools.stripe_local import LocalStripe
from jobs.stripe import BillingConfig, StripeTarget, reconcile, sync
from jobs.stripe._store import load_customers, load_pushes
from jobs.stripe.corrective import COLUMNS, PLAN, SENT, load_corrections
from jobs.stripe.plans import PLAN_EVENT, NotMappable, charge_metered, check_mappable, usage_price_params
from meterline.core.plans import load_plan_catalog
from tests.jobs.conftest import HOUR, Usage
from tests.jobs.test_plans_stripe import NOV, start, tokens


def correction_row(ch: Any, correction_id: str, customer: str, at: int, charge: str, *, provider: str) -> None:
    ch.insert(
        "usage_corrections",
        [
            (
                correction_id,
                datetime.fromtimestamp(at, tz=UTC),
                customer,
                "plan" if provider == "plan" else "usage",
                "" if provider == "plan" else provider,
                "" if provider == "plan" else "gpt-4o",
                "",
                "chat" if provider != "plan" else "",
                "",
                "usd",
                Decimal(0),
                Decimal(charge),
                "",
                "",
                datetime.fromtimestamp(at, tz=UTC),
            )
        ],
        column_names=[
            "correction_id",
            "occurred_at",
            "customer_id",
            "kind",
            "provider",
            "model",
            "model_version",
            "project",
            "feature",
            "currency",
            "cost",
            "charge",
            "price_version",
            "rate_card",
            "created_at",
        ],
    )


def test_a_rerated_plan_bill_is_a_corrective_amount_on_the_plan_subscription(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    client = target.client()
    start(ls, clickhouse, cfg, target, {"acme": "pro"})
    for h in range(3):
        tokens(usage, "acme", NOV + (h + 1) * HOUR, 1_000_000)
    ls.set_clock(NOV + 5 * HOUR)
    assert sync(target, clickhouse, cfg, now=ls.now()).ok
    pushed = {(p.meter, p.window_start, p.revision, p.value) for p in load_pushes(clickhouse)}
    assert {m for m, *_ in pushed} == {PLAN_EVENT}

    # an event-level re-rating of in-plan usage: money of no plan line, no token: nothing to send
    correction_row(clickhouse, "rp-events", "acme", NOV + HOUR, "-0.500000000000", provider="openai")
    # the plan bill re-rated after the fact (a fee discount agreed later): -12.345678901234 USD
    correction_row(clickhouse, "rp-plan", "acme", NOV, "-12.345678901234", provider="plan")
    ls.set_clock(NOV + 30 * HOUR)  # more than 24 h later
    s = sync(target, clickhouse, cfg, now=ls.now())
    assert s.ok, s
    assert s.planned == 0 and s.sent == 0 and s.credited == 0  # the plan meter's tokens did not change
    assert {(p.meter, p.window_start, p.revision, p.value) for p in load_pushes(clickhouse)} == pushed
    (corr,) = s.corrections
    assert corr.kind == PLAN and corr.customer_id == "acme" and corr.status == SENT
    assert corr.amount == Decimal("-12.345678901234")
    assert corr.cents == -1234 == int((corr.amount * 100).to_integral_value(rounding=ROUND_DOWN))
    link = load_customers(clickhouse)["acme"]
    item = client.v1.invoice_items.retrieve(corr.stripe_id)
    assert item.amount == -1234 and item.customer == link.stripe_customer_id
    assert item.metadata.to_dict()["meterline_correction"] == corr.correction_id
    assert item.parent.subscription_details.subscription == link.subscription_id

    again = sync(target, clickhouse, cfg, now=ls.now())
    assert again.ok and again.corrections == [] and again.planned == 0
    assert load_corrections(clickhouse) == [corr]
    rows = reconcile(client, clickhouse, cfg, NOV, NOV + 86400, now=ls.now())
    assert rows and not any(r.drifted for r in rows), rows
    # the store says Stripe holds an item Stripe does not have: drift on the plan-meter row
    clickhouse.insert(
        "stripe_corrections",
        [(*corr.row()[:11], "ii_gone", "sent", "", 3)],
        column_names=list(COLUMNS),
    )
    (plan_row,) = [
        r for r in reconcile(client, clickhouse, cfg, NOV, NOV + 86400, now=ls.now()) if r.meter == PLAN_EVENT
    ]
    assert plan_row.drifted and "ii_gone" in plan_row.credit_issues[0]


def test_pay_per_token_usage_of_a_plan_customer_outside_its_plan_is_corrected_on_the_cost_meter(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    """Before subscribing, acme paid per token (cost meter): a price raised after the fact on that
    usage is pushed as a new revision of those windows; reconcile is clean."""
    client = target.client()
    before = NOV - 2 * 86400
    usage.add("acme", before + 600, 2_500_000_000_000)  # $2.50 pay-per-token, two days before the plan
    start(ls, clickhouse, cfg, target, {"acme": "pro"})
    ls.set_clock(NOV + HOUR)
    s = sync(target, clickhouse, cfg, now=ls.now())
    assert s.ok, s
    correction_row(clickhouse, "rp-raise", "acme", before, "0.750000000000", provider="openai")
    s = sync(target, clickhouse, cfg, now=ls.now())
    assert s.ok and s.planned == 1 and s.acked == 1, s
    (grown,) = [p for p in load_pushes(clickhouse) if p.revision == 1]
    assert grown.meter == cfg.cost.event_name and grown.value == 750_000  # µ$
    rows = reconcile(client, clickhouse, cfg, before - 86400, NOV, now=ls.now())
    (row,) = rows
    assert row.clickhouse == 3_250_000 == row.pushed == row.stripe and not row.drifted


def test_rate_card_plans_map_to_the_plan_charge_meter_exactly_or_not_at_all() -> None:
    """An amount allowance + rate-card overage is a graduated price on the plan charge meter: free up
    to the allowance in meter units (µ$), then multiplier x 0.0001 cents per µ$; a multiplier whose
    price needs more than Stripe's 12 decimals, or a cap, is not mapped."""
    catalog = {
        v.plan_id: v
        for v in load_plan_catalog(
            """
currency: USD
plans:
  - {id: amt, version: 1, effective_from: "2025-01-01T00:00:00Z", interval: month, fee: "10.00",
     allowances: [{id: credit, amount: "2.00"}], overage: {rate_card: {multiplier: "1.5"}}, on_exhausted: allow}
  - {id: fine, version: 1, effective_from: "2025-01-01T00:00:00Z", interval: month, fee: "0",
     overage: {rate_card: {multiplier: "1.123456"}}, on_exhausted: allow}
  - {id: capped, version: 1, effective_from: "2025-01-01T00:00:00Z", interval: month, fee: "0",
     allowances: [{id: c, amount: "1.00"}], overage: {rate_card: {multiplier: "2"}}, on_exhausted: cap, cap: "5.00"}
"""
        ).versions
    }
    amt = catalog["amt"]
    check_mappable(amt, "usd")
    assert charge_metered(amt)
    assert usage_price_params(amt, 2_000_000) == {
        "billing_scheme": "tiered",
        "tiers_mode": "graduated",
        "tiers": [{"up_to": 2_000_000, "unit_amount_decimal": "0"}, {"up_to": "inf", "unit_amount_decimal": "0.00015"}],
    }
    check_mappable(catalog["fine"], "usd")  # 0.0001123456 cents per µ$
    with pytest.raises(NotMappable, match="12 decimals"):  # per nano-dollar it would need 13 decimals
        check_mappable(catalog["fine"], "usd", unit_exponent=9)
    with pytest.raises(NotMappable, match="cap"):
        check_mappable(catalog["capped"], "usd")
