"""Prices, subscriptions, credit grants, invoices at period close, persistence — via the real SDK."""

from __future__ import annotations

import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
import stripe

from devtools.stripe_local import LocalStripe
from tests.stripe_local.conftest import Metered, make_metered, send, total


def cents(amount: Decimal) -> int:
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def metered_price(client: stripe.StripeClient, m: Metered, **extra: object) -> stripe.Price:
    params: dict[str, object] = {
        "currency": "usd",
        "product_data": {"name": "Tokens"},
        "recurring": {"interval": "month", "usage_type": "metered", "meter": m.meter},
    }
    params.update(extra)
    return client.v1.prices.create(params)  # type: ignore[arg-type]


def test_price_validation_and_decimals(client: stripe.StripeClient) -> None:
    m = make_metered(client)
    price = metered_price(client, m, unit_amount_decimal="0.000000000001")
    assert isinstance(price, stripe.Price)
    assert price.unit_amount_decimal == Decimal("0.000000000001") and price.unit_amount is None
    assert price.recurring is not None and price.recurring.meter == m.meter
    with pytest.raises(stripe.InvalidRequestError) as too_precise:
        metered_price(client, m, unit_amount_decimal="0.0000000000001")
    assert too_precise.value.param == "unit_amount_decimal"
    with pytest.raises(stripe.InvalidRequestError) as no_meter:
        client.v1.prices.create(
            {
                "currency": "usd",
                "product_data": {"name": "x"},
                "unit_amount": 1,
                "recurring": {"interval": "month", "usage_type": "metered"},
            }
        )
    assert no_meter.value.param == "recurring[meter]"
    with pytest.raises(stripe.InvalidRequestError) as bad_meter:
        metered_price(client, Metered(m.customer, "mtr_missing", m.event_name), unit_amount=1)
    assert bad_meter.value.param == "recurring[meter]"
    client.v1.billing.meters.deactivate(m.meter)
    with pytest.raises(stripe.InvalidRequestError):
        metered_price(client, m, unit_amount=1)
    assert [p.id for p in client.v1.prices.list({"product": price.product}).data] == [price.id]
    product = client.v1.products.retrieve(str(price.product))
    assert product.name == "Tokens"


def test_customers_and_balance_transactions(client: stripe.StripeClient) -> None:
    cus = client.v1.customers.create({"email": "b@example.com", "name": "B", "metadata": {"tier": "pro"}})
    client.v1.customers.create({"email": "other@example.com"})
    assert [c.id for c in client.v1.customers.list({"email": "b@example.com"}).data] == [cus.id]
    upd = client.v1.customers.update(cus.id, {"metadata": {"tier": "", "team": "ml"}})
    assert upd.metadata.to_dict() == {"team": "ml"}
    txn = client.v1.customers.balance_transactions.create(cus.id, {"amount": -2500, "currency": "usd"})
    assert isinstance(txn, stripe.CustomerBalanceTransaction) and txn.ending_balance == -2500
    assert client.v1.customers.retrieve(cus.id).balance == -2500
    assert client.v1.customers.balance_transactions.retrieve(cus.id, txn.id).amount == -2500
    assert len(client.v1.customers.balance_transactions.list(cus.id).data) == 1


def test_credit_grants_and_balance_summary(ls: LocalStripe, client: stripe.StripeClient) -> None:
    cus = client.v1.customers.create({"email": "c@example.com"})
    now = ls.now()
    scope = {"scope": {"price_type": "metered"}}
    g1 = client.v1.billing.credit_grants.create(
        {
            "customer": cus.id,
            "category": "paid",
            "applicability_config": scope,
            "priority": 10,
            "amount": {"type": "monetary", "monetary": {"currency": "usd", "value": 1000}},
        }
    )
    g2 = client.v1.billing.credit_grants.create(
        {
            "customer": cus.id,
            "category": "promotional",
            "applicability_config": scope,
            "expires_at": now + 86400,
            "amount": {"type": "monetary", "monetary": {"currency": "usd", "value": 500}},
        }
    )
    g3 = client.v1.billing.credit_grants.create(
        {
            "customer": cus.id,
            "category": "promotional",
            "applicability_config": scope,
            "effective_at": now + 3600,
            "amount": {"type": "monetary", "monetary": {"currency": "usd", "value": 250}},
        }
    )
    assert isinstance(g1, stripe.billing.CreditGrant) and g1.amount.monetary is not None
    assert (g1.priority, g2.priority, g1.amount.monetary.value) == (10, 50, 1000)
    assert client.v1.billing.credit_grants.retrieve(g2.id).expires_at == now + 86400
    assert {g.id for g in client.v1.billing.credit_grants.list({"customer": cus.id}).data} == {g1.id, g2.id, g3.id}

    def available() -> int:
        s = client.v1.billing.credit_balance_summary.retrieve(
            {
                "customer": cus.id,
                "filter": {"type": "applicability_scope", "applicability_scope": {"price_type": "metered"}},
            }
        )
        assert isinstance(s, stripe.billing.CreditBalanceSummary)
        return sum(b.available_balance.monetary.value for b in s.balances if b.available_balance.monetary)

    assert available() == 1500  # g3 not yet effective
    one = client.v1.billing.credit_balance_summary.retrieve(
        {"customer": cus.id, "filter": {"type": "credit_grant", "credit_grant": g1.id}}
    )
    assert one.balances[0].ledger_balance.monetary is not None and one.balances[0].ledger_balance.monetary.value == 1000
    ls.advance_clock(3600)
    assert available() == 1750
    assert client.v1.billing.credit_grants.void_grant(g3.id).voided_at is not None
    assert client.v1.billing.credit_grants.expire(g2.id).expires_at is not None
    assert available() == 1000
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing.credit_grants.expire(g2.id)


def test_invoice_at_period_close_uses_meter_aggregate_and_credits(ls: LocalStripe, client: stripe.StripeClient) -> None:
    m = make_metered(client)
    price = metered_price(client, m, unit_amount_decimal="0.0025")
    sub = client.v1.subscriptions.create({"customer": m.customer, "items": [{"price": price.id}]})
    item = sub["items"].data[0]
    start, end = item.current_period_start, item.current_period_end
    assert end > start
    for v in (1_000_000, 234_567):
        send(client, m, v, timestamp=start)
    now = ls.now()
    for cat, prio, value, exp in (
        ("paid", 10, 1000, None),
        ("promotional", 50, 500, now + 60 * 86400),
        ("promotional", 50, 400, now + 90 * 86400),
    ):
        params: dict[str, object] = {
            "customer": m.customer,
            "category": cat,
            "priority": prio,
            "applicability_config": {"scope": {"price_type": "metered"}},
            "amount": {"type": "monetary", "monetary": {"currency": "usd", "value": value}},
        }
        if exp is not None:
            params["expires_at"] = exp
        client.v1.billing.credit_grants.create(params)  # type: ignore[arg-type]

    preview = client.v1.invoices.create_preview({"customer": m.customer, "subscription": sub.id})
    assert isinstance(preview, stripe.Invoice) and preview.lines.data[0].quantity == 1_234_567

    ls.advance_clock(end - ls.now() + 600)  # 10 min past period end: draft, still in the grace hour
    # the subscription_create invoice bills nothing in advance (metered only) and is paid at 0
    first, *_ = client.v1.invoices.list({"customer": m.customer, "status": "paid"}).data
    assert (first.billing_reason, first.total) == ("subscription_create", 0)
    drafts = client.v1.invoices.list({"customer": m.customer, "status": "draft"}).data
    assert [i.billing_reason for i in drafts] == ["subscription_cycle"]
    send(client, m, 1000, timestamp=end - 30)  # late usage inside the grace hour still counts
    ls.advance_clock(3600)
    inv = client.v1.invoices.retrieve(drafts[0].id)
    assert inv.status == "open" and inv.number is not None
    assert (inv.period_start, inv.period_end) == (start, end)
    line = inv.lines.data[0]
    assert line.quantity == total(client, m, start, end) == 1_235_567
    assert line.period.start == start and line.pricing is not None
    assert line.pricing.unit_amount_decimal == Decimal("0.0025")
    expected_line = cents(Decimal(line.quantity) * Decimal("0.0025"))
    assert line.amount == expected_line and inv.subtotal == expected_line
    applied = [c.amount for c in line.pretax_credit_amounts or []]
    assert applied == [1000, 500, 400][: len(applied)] and sum(applied) == min(1900, expected_line)
    assert inv.total == inv.amount_due == expected_line - sum(applied)
    txns = client.v1.billing.credit_balance_transactions.list({"customer": m.customer}).data
    assert sorted(t.debit.amount.monetary.value for t in txns if t.debit and t.debit.amount.monetary) == sorted(applied)
    summary = client.v1.billing.credit_balance_summary.retrieve(
        {
            "customer": m.customer,
            "filter": {"type": "applicability_scope", "applicability_scope": {"price_type": "metered"}},
        }
    )
    left = sum(b.available_balance.monetary.value for b in summary.balances if b.available_balance.monetary)
    assert left == 1900 - sum(applied)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.finalize_invoice(inv.id)
    assert client.v1.subscriptions.retrieve(sub.id)["items"].data[0].current_period_start == end


def test_tiered_transform_licensed_and_customer_balance(ls: LocalStripe, client: stripe.StripeClient) -> None:
    m = make_metered(client)
    graduated = metered_price(
        client,
        m,
        billing_scheme="tiered",
        tiers_mode="graduated",
        tiers=[
            {"up_to": 1000, "unit_amount_decimal": "0.5"},
            {"up_to": "inf", "unit_amount_decimal": "0.25", "flat_amount": 100},
        ],
    )
    volume = metered_price(
        client,
        m,
        billing_scheme="tiered",
        tiers_mode="volume",
        tiers=[{"up_to": 1000, "unit_amount": 2}, {"up_to": "inf", "unit_amount": 1}],
    )
    per_k = metered_price(client, m, unit_amount=3, transform_quantity={"divide_by": 1000, "round": "up"})
    seat = client.v1.prices.create(
        {"currency": "usd", "unit_amount": 1500, "product_data": {"name": "Seat"}, "recurring": {"interval": "month"}}
    )
    anchor = ls.now() + 3600
    sub = client.v1.subscriptions.create(
        {
            "customer": m.customer,
            "billing_cycle_anchor": anchor,
            "items": [
                {"price": graduated.id},
                {"price": volume.id},
                {"price": per_k.id},
                {"price": seat.id, "quantity": 2},
            ],
        }
    )
    assert sub["items"].data[0].current_period_end == anchor
    client.v1.customers.balance_transactions.create(m.customer, {"amount": -500, "currency": "usd"})
    send(client, m, 2501)
    assert ls.close_periods() == []  # period not over yet
    ls.advance_clock(3601)
    (inv_id,) = ls.close_periods()
    inv = client.v1.invoices.retrieve(inv_id)
    by_price = {ln.pricing.price_details.price: ln for ln in inv.lines.data if ln.pricing and ln.pricing.price_details}
    q = Decimal(2501)
    assert by_price[graduated.id].amount == cents(1000 * Decimal("0.5") + (q - 1000) * Decimal("0.25") + 100)
    assert by_price[volume.id].amount == cents(q * 1)
    assert by_price[per_k.id].amount == 3 * 3  # ceil(2501 / 1000) units of 3 cents
    assert by_price[seat.id].amount == 2 * 1500 and by_price[seat.id].quantity == 2
    subtotal = sum(ln.amount for ln in inv.lines.data)
    assert inv.total == subtotal and inv.starting_balance == -500
    assert inv.amount_due == subtotal - 500 and inv.ending_balance == 0
    assert client.v1.customers.retrieve(m.customer).balance == 0
    nxt = client.v1.subscriptions.retrieve(sub.id)["items"].data[0]
    assert nxt.current_period_start == anchor and nxt.current_period_end > anchor + 27 * 86400


def test_state_survives_restart(tmp_path: Path) -> None:
    state = tmp_path / "stripe.sqlite"
    with LocalStripe(state) as ls:
        client = ls.client()
        m = make_metered(client)
        price = metered_price(client, m, unit_amount_decimal="1.5")
        sub = client.v1.subscriptions.create(
            {"customer": m.customer, "items": [{"price": price.id}], "billing_cycle_anchor": ls.now() + 120}
        )
        ev = send(client, m, 41, options={"idempotency_key": "persist-1"})
        ls.advance_clock(200)
        (inv_id,) = ls.close_periods()
        before = client.v1.invoices.retrieve(inv_id)
        clock = ls.now()
    with LocalStripe(state) as ls2:
        client = ls2.client()
        assert ls2.now() >= clock
        after = client.v1.invoices.retrieve(inv_id)
        assert after.to_dict() == before.to_dict() and after.total == cents(Decimal(41) * Decimal("1.5"))
        replay = send(client, m, 41, options={"idempotency_key": "persist-1"})
        assert replay.identifier == ev.identifier
        assert total(client, m, ev.timestamp, ev.timestamp + 1) == 41
        assert client.v1.subscriptions.retrieve(sub.id).status == "active"


def test_standalone_process(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.stripe_local", "--port", "0", "--state", str(tmp_path / "s.db")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = next(w for w in proc.stdout.readline().split() if w.startswith("http://"))
        with LocalStripe(url=url) as ls:
            assert ls.client().v1.customers.create({"name": "Proc"}).name == "Proc"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


def test_remaining_endpoints_via_sdk(ls: LocalStripe, client: stripe.StripeClient) -> None:
    m = make_metered(client)
    prod = client.v1.products.create({"name": "API"})
    assert client.v1.products.update(prod.id, {"name": "API v2"}).name == "API v2"
    assert prod.id in [p.id for p in client.v1.products.list().auto_paging_iter()]
    price = client.v1.prices.create(
        {
            "currency": "usd",
            "product": prod.id,
            "unit_amount": 2,
            "recurring": {"interval": "day", "usage_type": "metered", "meter": m.meter},
        }
    )
    assert client.v1.prices.update(price.id, {"nickname": "per token"}).nickname == "per token"
    assert client.v1.prices.retrieve(price.id).nickname == "per token"
    for i in range(12):  # pagination across pages
        client.v1.customers.create({"name": f"c{i}"})
    assert len(list(client.v1.customers.list({"limit": 5}).auto_paging_iter())) == 13
    sub = client.v1.subscriptions.create({"customer": m.customer, "items": [{"price": price.id}]})
    assert client.v1.subscriptions.update(sub.id, {"metadata": {"plan": "x"}}).metadata.to_dict() == {"plan": "x"}
    assert [s.id for s in client.v1.subscriptions.list({"customer": m.customer}).data] == [sub.id]
    send(client, m, 7)
    ls.advance_clock(86400 + 3601)  # day period + grace: finalized by the clock alone
    (inv,) = client.v1.invoices.list({"subscription": sub.id, "status": "open"}).data
    lines = client.v1.invoices.line_items.list(inv.id)
    assert [(ln.quantity, ln.amount) for ln in lines.data] == [(7, 14)]
    grant = client.v1.billing.credit_grants.create(
        {
            "customer": m.customer,
            "category": "paid",
            "applicability_config": {"scope": {"price_type": "metered"}},
            "amount": {"type": "monetary", "monetary": {"currency": "usd", "value": 100}},
        }
    )
    assert client.v1.billing.credit_grants.update(grant.id, {"metadata": {"src": "topup"}}).metadata.to_dict() == {
        "src": "topup"
    }
    send(client, m, 3)
    ls.advance_clock(86400)
    (inv2,) = [
        i
        for i in client.v1.invoices.list({"customer": m.customer}).data
        if i.id != inv.id and i.billing_reason == "subscription_cycle"
    ]
    assert inv2.status == "paid" and inv2.total == 0 and inv2.subtotal == 6
    (txn,) = client.v1.billing.credit_balance_transactions.list({"customer": m.customer}).data
    assert client.v1.billing.credit_balance_transactions.retrieve(txn.id).credit_grant == grant.id
    canceled = client.v1.subscriptions.cancel(sub.id)
    assert canceled.status == "canceled"
    assert client.v1.subscriptions.list({"customer": m.customer}).data == []
