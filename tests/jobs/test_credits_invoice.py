"""A period's invoice = ClickHouse charge total − prepaid credit used, to the cent (credits mirrored)."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from devtools.stripe_local import LocalStripe
from jobs.stripe import BillingConfig, StripeTarget, provision, sync
from jobs.stripe.credits import mirror_grants
from tests.jobs.conftest import DAY, HOUR, Usage


def cents(amount: Decimal) -> int:
    return int((amount * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def top_up(customer: str, grant_id: str, amount: str, at_ms: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "top_up",
        "command_id": f"evt_{grant_id}",
        "customer_id": customer,
        "at_ms": at_ms,
        "grant_id": grant_id,
        "amount": amount,
        "currency": "usd",
        "effective_at_ms": at_ms,
        "expires_at_ms": None,
        "priority": 10,
        "category": "paid",
        "scope": None,
        **extra,
    }


def test_invoice_total_is_usage_minus_credit_to_the_cent(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    client = target.client()
    t0 = ls.now()
    report = provision(client, clickhouse, cfg, customers=["acme", "globex"])
    links = report.customers
    first = (t0 // HOUR + 2) * HOUR
    items = [
        (c, first + k * 1800 + i, 987_654_321_987 + 1_111_111 * k + i)  # ~$0.99 each, pico digits
        for i, c in enumerate(("acme", "globex"))
        for k in range(40)
    ]
    usage.add_many(items)
    ls.advance_clock(2 * DAY)
    at = ls.now() * 1000
    commands = [
        top_up("acme", "g-acme-1", "5.00", at),
        {**top_up("acme", "g-acme-2", "2.50", at), "type": "grant", "category": "promotional"},
        top_up("globex", "g-globex", "100.00", at),  # more than the usage: invoice 0
        {"type": "set_policy", "command_id": "x", "customer_id": "acme", "at_ms": at},
    ]
    first_pass = mirror_grants(client, clickhouse, cfg, commands)
    assert sorted(first_pass.created) == ["g-acme-1", "g-acme-2", "g-globex"] and first_pass.ignored == 1
    replay = mirror_grants(client, clickhouse, cfg, commands)  # replayed commands: nothing new
    assert replay.created == [] and sorted(replay.existing) == ["g-acme-1", "g-acme-2", "g-globex"]
    assert len(client.v1.billing.credit_grants.list({"customer": links["acme"].stripe_customer_id}).data) == 2

    summary = sync(target, clickhouse, cfg, now=ls.now())
    assert summary.ok and summary.acked > 0
    ls.advance_clock(31 * DAY)  # past the period end: the periods close and are invoiced
    ls.close_periods(finalize=True)
    credits = {"acme": 750, "globex": 10_000}
    for cust in ("acme", "globex"):
        sc = links[cust].stripe_customer_id
        invoices = [
            i for i in client.v1.invoices.list({"customer": sc}).data if i.billing_reason == "subscription_cycle"
        ]
        assert len(invoices) == 1 and invoices[0].status in ("paid", "open")
        inv = invoices[0]
        subtotal = cents(usage.charges[cust])
        used = min(credits[cust], subtotal)
        assert inv.subtotal == subtotal, cust
        assert inv.total == subtotal - used, cust
        assert inv.amount_due == subtotal - used
    # the voided grant path: a void mirrors to Stripe once
    voided = mirror_grants(
        client,
        clickhouse,
        cfg,
        [
            {
                "type": "void",
                "grant_id": "g-acme-2",
                "customer_id": "acme",
                "command_id": "v1",
                "at_ms": at,
                "reason": "test",
            }
        ],
    )
    assert voided.voided == ["g-acme-2"]
