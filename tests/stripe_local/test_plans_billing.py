"""What subscription plans need from Stripe, asserted as Stripe documents it (real SDK, local server).

Each test quotes the rule it checks: from Stripe's OpenAPI description (github stripe/openapi,
``spec3.json``) or from Stripe's docs. Nothing here asserts a quirk of the local server.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import httpx
import pytest
import stripe

from devtools.stripe_local import LocalStripe
from tests.stripe_local.conftest import Metered, make_metered, send

DAY = 86400


def cents(amount: Decimal) -> int:
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def fee_price(client: stripe.StripeClient, amount: int, name: str = "Pro fee") -> stripe.Price:
    return client.v1.prices.create(
        {
            "currency": "usd",
            "unit_amount": amount,
            "product_data": {"name": name},
            "recurring": {"interval": "month", "usage_type": "licensed"},
        }
    )


def allowance_price(
    client: stripe.StripeClient, m: Metered, included: int, per_token_cents: str, name: str = "Pro tokens"
) -> stripe.Price:
    """Stripe's included-usage pattern: a graduated price whose first tier is free."""
    if included == 0:
        return client.v1.prices.create(
            {
                "currency": "usd",
                "product_data": {"name": name},
                "unit_amount_decimal": per_token_cents,
                "recurring": {"interval": "month", "usage_type": "metered", "meter": m.meter},
            }
        )
    return client.v1.prices.create(
        {
            "currency": "usd",
            "product_data": {"name": name},
            "billing_scheme": "tiered",
            "tiers_mode": "graduated",
            "recurring": {"interval": "month", "usage_type": "metered", "meter": m.meter},
            "tiers": [
                {"up_to": included, "unit_amount_decimal": "0"},
                {"up_to": "inf", "unit_amount_decimal": per_token_cents},
            ],
        }
    )


def by_reason(client: stripe.StripeClient, customer: str, reason: str) -> list[stripe.Invoice]:
    return [i for i in client.v1.invoices.list({"customer": customer, "limit": 100}).data if i.billing_reason == reason]


# ----------------------------------------------------------------------------- the spec's request rules


def test_unknown_parameters_are_refused(ls: LocalStripe, client: stripe.StripeClient) -> None:
    """spec3.json declares every request body with ``"additionalProperties": false``; Stripe answers
    an unknown parameter with 400 invalid_request_error ``parameter_unknown``
    ("Received unknown parameter: ...")."""
    m = make_metered(client)
    with pytest.raises(stripe.InvalidRequestError) as top:
        client.v1.customers.create({"email": "x@example.com", "favourite_colour": "blue"})  # type: ignore[typeddict-unknown-key]
    assert (top.value.code, top.value.param) == ("parameter_unknown", "favourite_colour")
    with pytest.raises(stripe.InvalidRequestError) as nested:
        client.v1.prices.create(
            {
                "currency": "usd",
                "unit_amount": 1,
                "product_data": {"name": "x"},
                "recurring": {"interval": "month", "usage_type": "metered", "meter": m.meter, "aggregate_usage": "sum"},
            }
        )  # type: ignore[typeddict-unknown-key]
    assert (nested.value.code, nested.value.param) == ("parameter_unknown", "recurring[aggregate_usage]")
    price = fee_price(client, 100)
    with pytest.raises(stripe.InvalidRequestError) as in_list:
        client.v1.subscriptions.create({"customer": m.customer, "items": [{"price": price.id, "seats": 3}]})  # type: ignore[typeddict-item]
    assert in_list.value.param == "items[0][seats]"
    assert client.v1.subscriptions.list({"customer": m.customer}).data == []  # nothing was created
    with pytest.raises(stripe.InvalidRequestError) as query:
        client.v1.customers.list({"colour": "blue"})  # type: ignore[typeddict-unknown-key]
    assert query.value.code == "parameter_unknown"
    # v2 bodies are closed too (JSON): an unknown key in a meter event
    resp = httpx.post(
        f"{ls.url}/v2/billing/meter_events",
        headers={"Authorization": "Bearer sk_test_1"},
        json={
            "event_name": m.event_name,
            "payload": {"stripe_customer_id": m.customer, "value": "1"},
            "colour": "blue",
        },
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "parameter_unknown"


def test_event_summary_windows_must_be_aligned(ls: LocalStripe, client: stripe.StripeClient) -> None:
    """spec3.json, ``start_time`` / ``end_time`` of meter event summaries: "must be aligned with
    minute boundaries", and with ``value_grouping_window`` "aligned with value_grouping_window
    boundaries"."""
    m = make_metered(client)
    hour = ls.now() // 3600 * 3600 - 3600
    send(client, m, 5, timestamp=hour + 60)
    ok = client.v1.billing.meters.event_summaries.list(
        m.meter, {"customer": m.customer, "start_time": hour, "end_time": hour + 3600, "value_grouping_window": "hour"}
    )
    assert [s.aggregated_value for s in ok.data] == [5]
    for start, end, window in (
        (hour + 60, hour + 3600, "hour"),
        (hour, hour + 7200 - 60, "hour"),
        (hour - hour % DAY + 3600, hour - hour % DAY + DAY + 3600, "day"),
    ):
        with pytest.raises(stripe.InvalidRequestError):
            client.v1.billing.meters.event_summaries.list(
                m.meter, {"customer": m.customer, "start_time": start, "end_time": end, "value_grouping_window": window}
            )


def test_price_tiers_only_when_expanded(client: stripe.StripeClient) -> None:
    """Price.tiers is an includable field: Stripe returns it only with ``expand[]=tiers``, and then
    as an array, never null (checked against spec3.json, shared/notes/stripe.md)."""
    m = make_metered(client)
    tiered = allowance_price(client, m, 1000, "0.5")
    flat = fee_price(client, 2000)
    assert "tiers" not in tiered.to_dict() and "tiers" not in client.v1.prices.retrieve(tiered.id).to_dict()
    got = client.v1.prices.retrieve(tiered.id, {"expand": ["tiers"]})
    assert [(t.up_to, t.unit_amount_decimal) for t in got.tiers] == [(1000, Decimal("0")), (None, Decimal("0.5"))]
    assert client.v1.prices.retrieve(flat.id, {"expand": ["tiers"]}).tiers == []
    listed = client.v1.prices.list({"expand": ["data.tiers"], "limit": 100}).data
    assert {p.id: len(p.tiers) for p in listed} == {tiered.id: 2, flat.id: 0}
    assert all("tiers" not in p.to_dict() for p in client.v1.prices.list().data)
    sub = client.v1.subscriptions.create({"customer": m.customer, "items": [{"price": tiered.id}]})
    assert "tiers" not in sub["items"].data[0].price.to_dict()
    sub = client.v1.subscriptions.retrieve(sub.id, {"expand": ["items.data.price.tiers"]})
    assert len(sub["items"].data[0].price.tiers) == 2


def test_required_fields_of_objects(client: stripe.StripeClient) -> None:
    """Fields spec3.json lists as ``required`` on Invoice, Subscription (and ``plan`` on its items)
    and Product."""
    m = make_metered(client)
    price = fee_price(client, 1000)
    product = client.v1.products.retrieve(str(price.product)).to_dict()
    assert product["images"] == [] and product["marketing_features"] == []
    sub = client.v1.subscriptions.create({"customer": m.customer, "items": [{"price": price.id}]}).to_dict()
    for key in ("automatic_tax", "billing_mode", "invoice_settings"):
        assert key in sub, key
    assert sub["billing_mode"]["type"] == "flexible"  # the default: "If no value is passed, the default is `flexible`"
    assert sub["items"]["data"][0]["plan"]["id"] == price.id
    inv = client.v1.invoices.retrieve(str(sub["latest_invoice"])).to_dict()
    for key in ("amount_paid_off_stripe", "automatic_tax", "default_tax_rates", "issuer", "payment_settings"):
        assert key in inv, key


# ----------------------------------------------------------------------------- invoices of a plan


def test_fee_in_advance_included_usage_in_arrears(ls: LocalStripe, client: stripe.StripeClient) -> None:
    """Licensed prices are billed in advance and metered prices in arrears: the first invoice
    (``subscription_create``) bills the fee of the first period; the cycle invoice bills the
    period's usage and the next period's fee. Included usage is a graduated price whose first tier
    is free (Stripe's usage-based pricing models, "flat fee and overages")."""
    m = make_metered(client)
    fee = fee_price(client, 20_000)
    usage = allowance_price(client, m, 10_000_000, "0.003")  # $30 per million = 0.003 cents per token
    sub = client.v1.subscriptions.create({"customer": m.customer, "items": [{"price": fee.id}, {"price": usage.id}]})
    item = sub["items"].data[0]
    start, end = item.current_period_start, item.current_period_end
    (first,) = by_reason(client, m.customer, "subscription_create")
    assert first.total == 20_000 and first.status == "open"
    assert [(ln.period.start, ln.period.end, ln.amount) for ln in first.lines.data] == [(start, end, 20_000)]
    send(client, m, 12_000_000, timestamp=start + 60)
    ls.advance_clock(end - ls.now() + 1)
    (inv_id,) = ls.close_periods()
    inv = client.v1.invoices.retrieve(inv_id)
    lines = {ln.pricing.price_details.price: ln for ln in inv.lines.data if ln.pricing and ln.pricing.price_details}
    assert (lines[usage.id].period.start, lines[usage.id].period.end) == (start, end)
    assert lines[usage.id].quantity == 12_000_000 and lines[usage.id].amount == 6_000  # 2M x $30/M
    assert lines[fee.id].period.start == end and lines[fee.id].amount == 20_000  # next period, in advance
    assert inv.total == 26_000 and (inv.period_start, inv.period_end) == (start, end)


def test_graduated_and_volume_tiers(ls: LocalStripe, client: stripe.StripeClient) -> None:
    """Stripe's tiers ("Set up tiered pricing"): graduated prices each unit at the rate of its
    tier, plus each reached tier's flat amount; volume prices every unit at the rate of the tier
    the total falls in. ``up_to`` is inclusive."""
    m = make_metered(client)
    tiers = [
        {"up_to": 1000, "unit_amount_decimal": "2", "flat_amount": 50},
        {"up_to": 5000, "unit_amount_decimal": "1.5"},
        {"up_to": "inf", "unit_amount_decimal": "0.25"},
    ]
    common: dict[str, Any] = {
        "currency": "usd",
        "product_data": {"name": "Tokens"},
        "billing_scheme": "tiered",
        "recurring": {"interval": "month", "usage_type": "metered", "meter": m.meter},
    }
    grad = client.v1.prices.create({**common, "tiers_mode": "graduated", "tiers": tiers})
    vol = client.v1.prices.create({**common, "tiers_mode": "volume", "tiers": tiers})
    sub = client.v1.subscriptions.create({"customer": m.customer, "items": [{"price": grad.id}, {"price": vol.id}]})
    end = sub["items"].data[0].current_period_end
    send(client, m, 6001)
    ls.advance_clock(end - ls.now() + 1)
    (inv_id,) = ls.close_periods()
    got = {ln.pricing.price_details.price: ln.amount for ln in client.v1.invoices.retrieve(inv_id).lines.data}
    assert got[grad.id] == cents(1000 * Decimal(2) + 50 + 4000 * Decimal("1.5") + 1001 * Decimal("0.25"))
    assert got[vol.id] == cents(6001 * Decimal("0.25"))


def test_upgrade_prorates_by_seconds(ls: LocalStripe, client: stripe.StripeClient) -> None:
    """Stripe's prorations docs: "The prorated amount is calculated down to the second ... using the
    current billing period's start and end times": a credit for unused time on the old price and a
    charge for the remaining time on the new one, on the next invoice (``create_prorations``, the
    default) or at once (``always_invoice``).

    Flexible billing mode ("Update prices mid-cycle"): removing a metered price creates an invoice
    item billing the usage reported so far at that price; the new price bills usage from the change."""
    m = make_metered(client)
    fee_a, fee_b = fee_price(client, 10_000, "Basic fee"), fee_price(client, 30_000, "Pro fee")
    use_a = allowance_price(client, m, 1000, "1", "Basic tokens")
    use_b = allowance_price(client, m, 5000, "0.5", "Pro tokens")
    sub = client.v1.subscriptions.create({"customer": m.customer, "items": [{"price": fee_a.id}, {"price": use_a.id}]})
    fee_item, use_item = (it.id for it in sub["items"].data)
    start, end = sub["items"].data[0].current_period_start, sub["items"].data[0].current_period_end
    send(client, m, 1500, timestamp=start + 10)  # before the change: 500 over Basic's 1,000 at 1 cent
    ls.advance_clock(3 * DAY)
    t = ls.now()
    client.v1.subscriptions.update(
        sub.id,
        {
            "proration_date": t,
            "items": [{"id": fee_item, "price": fee_b.id}, {"id": use_item, "deleted": True}, {"price": use_b.id}],
        },
    )
    send(client, m, 6000, timestamp=t + 5)  # after: 1,000 over Pro's 5,000 at 0.5 cent
    r = Decimal(end - t) / Decimal(end - start)
    pending = client.v1.invoice_items.list({"customer": m.customer, "pending": True}).data
    got = sorted((ii.amount, ii.proration) for ii in pending)
    assert got == sorted([(-cents(10_000 * r), True), (cents(30_000 * r), True), (500, False)])
    ls.advance_clock(end - ls.now() + 1)
    (inv_id,) = ls.close_periods()
    inv = client.v1.invoices.retrieve(inv_id)
    this_period = [ln for ln in inv.lines.data if ln.period.end <= end]
    assert sum(ln.amount for ln in this_period) == 500 - cents(10_000 * r) + cents(30_000 * r) + 500
    assert [ln.amount for ln in inv.lines.data if ln.period.start == end] == [30_000]  # Pro fee in advance
    # always_invoice: the prorations are invoiced at once, on their own invoice
    client.v1.subscriptions.update(
        sub.id, {"proration_behavior": "always_invoice", "items": [{"id": fee_item, "quantity": 2}]}
    )
    (upd,) = by_reason(client, m.customer, "subscription_update")
    assert upd.status == "open" and len(upd.lines.data) == 2 and upd.total > 0
    # none: no prorations at all
    client.v1.subscriptions.update(sub.id, {"proration_behavior": "none", "items": [{"id": fee_item, "quantity": 1}]})
    assert client.v1.invoice_items.list({"customer": m.customer, "pending": True}).data == []


def test_credit_grants_apply_to_metered_lines_only(ls: LocalStripe, client: stripe.StripeClient) -> None:
    """Credit grants apply to metered prices only: spec3.json, ``applicability_config.scope.price_type``
    "The price type that credit grants can apply to. We currently only support the `metered` price
    type." The licensed fee is paid in full."""
    m = make_metered(client)
    fee = fee_price(client, 5_000)
    use = allowance_price(client, m, 0, "1")
    sub = client.v1.subscriptions.create({"customer": m.customer, "items": [{"price": fee.id}, {"price": use.id}]})
    end = sub["items"].data[0].current_period_end
    client.v1.billing.credit_grants.create(
        {
            "customer": m.customer,
            "category": "paid",
            "applicability_config": {"scope": {"price_type": "metered"}},
            "amount": {"type": "monetary", "monetary": {"currency": "usd", "value": 10_000}},
        }
    )
    send(client, m, 700)
    ls.advance_clock(end - ls.now() + 1)
    (inv_id,) = ls.close_periods()
    inv = client.v1.invoices.retrieve(inv_id)
    assert inv.subtotal == 700 + 5_000 and inv.total == 5_000  # usage covered, next fee not
    (first,) = by_reason(client, m.customer, "subscription_create")
    assert first.total == 5_000 and first.total_pretax_credit_amounts == []


def test_invoice_item_on_a_draft_invoice(ls: LocalStripe, client: stripe.StripeClient) -> None:
    """spec3.json, invoice item ``invoice``: "The ID of an existing invoice to add this invoice item
    to. For subscription invoices, when left blank, the invoice item will be added to the next
    upcoming scheduled invoice. ... You can only add invoice items to draft invoices"."""
    m = make_metered(client)
    use = allowance_price(client, m, 0, "1")
    sub = client.v1.subscriptions.create({"customer": m.customer, "items": [{"price": use.id}]})
    end = sub["items"].data[0].current_period_end
    ls.advance_clock(end - ls.now() + 60)
    (draft,) = [i for i in client.v1.invoices.list({"customer": m.customer, "status": "draft"}).data]
    client.v1.invoice_items.create(
        {
            "customer": m.customer,
            "invoice": draft.id,
            "amount": 1234,
            "currency": "usd",
            "description": "minimum commitment true-up",
            "subscription": sub.id,
            "period": {"start": draft.period_start, "end": draft.period_end},
        }
    )
    final = client.v1.invoices.finalize_invoice(draft.id)
    assert final.total == 1234 and final.lines.data[-1].description == "minimum commitment true-up"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoice_items.create({"customer": m.customer, "invoice": draft.id, "amount": 1, "currency": "usd"})


def test_downgrade_credit_goes_to_the_customer_balance(ls: LocalStripe, client: stripe.StripeClient) -> None:
    """A downgrade invoiced at once (``always_invoice``) has a negative total. Stripe's customer
    credit balance docs: "Prorations from downgrading a subscription can indirectly create credits
    to reduce the amount due on the next invoice", and "The credit balance automatically applies
    toward the next invoice finalized to a customer"."""
    m = make_metered(client)
    pro, basic = fee_price(client, 30_000, "Pro fee"), fee_price(client, 10_000, "Basic fee")
    sub = client.v1.subscriptions.create({"customer": m.customer, "items": [{"price": pro.id}]})
    item = sub["items"].data[0]
    start, end = item.current_period_start, item.current_period_end
    ls.advance_clock(DAY)
    t = ls.now()
    client.v1.subscriptions.update(
        sub.id,
        {"proration_behavior": "always_invoice", "proration_date": t, "items": [{"id": item.id, "price": basic.id}]},
    )
    (upd,) = by_reason(client, m.customer, "subscription_update")
    r = Decimal(end - t) / Decimal(end - start)
    assert upd.total == cents(10_000 * r) - cents(30_000 * r) < 0 and upd.amount_due == 0
    assert client.v1.customers.retrieve(m.customer).balance == upd.total
    ls.advance_clock(end - ls.now() + 1)
    (cycle,) = by_reason(client, m.customer, "subscription_cycle")
    ls.close_periods(finalize=True)
    cycle = client.v1.invoices.retrieve(cycle.id)
    assert cycle.total == 10_000 and cycle.starting_balance == upd.total
    assert cycle.amount_due == max(0, 10_000 + upd.total) and cycle.ending_balance == min(0, 10_000 + upd.total)


def test_credit_grant_category_defaults_to_paid(client: stripe.StripeClient) -> None:
    """spec3.json, credit grant ``category``: "It defaults to `paid` if not specified."."""
    cus = client.v1.customers.create({"name": "g"})
    grant = client.v1.billing.credit_grants.create(
        {
            "customer": cus.id,
            "applicability_config": {"scope": {"price_type": "metered"}},
            "amount": {"type": "monetary", "monetary": {"currency": "usd", "value": 100}},
        }
    )
    assert grant.category == "paid"
