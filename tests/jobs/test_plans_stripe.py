"""Plans invoiced through Stripe: for each case of issue #12, the Stripe invoice lines of a period add
up to meterline's own bill (``bill preview``), to the cent.

Real components: chDB with the migrations, the plans domain (catalog, timeline, rating), the
``provision`` / ``sync`` jobs, and the real stripe SDK against the bundled server. Stripe bills the
fee in advance, so "the Stripe invoice for a period" is every invoice line whose ``period`` lies in
that billing period (:func:`jobs.stripe.plans.stripe_period_cents`): the fee on the invoice that
opened it, usage / prorations / true-up on the one that closed it.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import stripe

from devtools.stripe_local import LocalStripe
from jobs.plans.billing import bill_preview
from jobs.stripe import BillingConfig, StripeTarget, provision, reconcile, sync
from jobs.stripe.plans import PLAN_EVENT, stripe_period_cents, to_cents
from jobs.stripe.statement import build_statement, render_csv, render_html
from meterline.core.plans import SubscriptionEvent, load_plan_catalog
from pipeline.plans_sink import PLAN_COLUMNS, SUBSCRIPTION_COLUMNS, plan_row, subscription_row
from tests.jobs.conftest import HOUR, Usage

NOV = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp())  # a 30-day month: Nov 1 -> Dec 1
DEC = NOV + 30 * 86400

PLANS = """
currency: USD
plans:
  - {id: pro, version: 1, effective_from: "2026-01-01T00:00:00Z", interval: month, fee: "200.00",
     allowances: [{id: tokens, tokens: 10000000}], overage: {per_million: "30.00"}, on_exhausted: allow}
  - {id: basic, version: 1, effective_from: "2026-01-01T00:00:00Z", interval: month, fee: "100.00",
     allowances: [{id: tokens, tokens: 1000000}], overage: {per_million: "40.00"}, on_exhausted: allow}
  - {id: flat, version: 1, effective_from: "2026-01-01T00:00:00Z", interval: month, fee: "25.00",
     allowances: [{id: tokens, tokens: 1000000}], overage: {per_million: "0"}, on_exhausted: allow}
  - {id: capped, version: 1, effective_from: "2026-01-01T00:00:00Z", interval: month, fee: "50.00",
     allowances: [{id: tokens, tokens: 2000000}], overage: {per_million: "30.00"}, on_exhausted: block}
  - {id: capx, version: 1, effective_from: "2026-01-01T00:00:00Z", interval: month, fee: "10.00",
     allowances: [{id: tokens, tokens: 1000}], overage: {per_million: "30.00"}, on_exhausted: cap, cap: "5.00"}
  - {id: commit, version: 1, effective_from: "2026-01-01T00:00:00Z", interval: month, fee: "0",
     overage: {per_million: "30.00"}, on_exhausted: allow, minimum_commitment: "100.00"}
  - id: grad
    version: 1
    effective_from: "2026-01-01T00:00:00Z"
    interval: month
    fee: "10.00"
    allowances: [{id: tokens, tokens: 1000000}]
    overage: {tiers: {mode: graduated, unit: tokens, steps: [{up_to: 2000000, per_million: "30"},
                                                              {up_to: null, per_million: "20"}]}}
    on_exhausted: allow
  - id: vol
    version: 1
    effective_from: "2026-01-01T00:00:00Z"
    interval: month
    fee: "0"
    overage: {tiers: {mode: volume, unit: tokens, steps: [{up_to: 2000000, per_million: "30"},
                                                           {up_to: null, per_million: "20"}]}}
    on_exhausted: allow
"""


def setup_plans(ch: Any) -> None:
    catalog = load_plan_catalog(PLANS)
    ch.insert("plans", [plan_row(v) for v in catalog.versions], column_names=list(PLAN_COLUMNS))


def fact(ch: Any, kind: str, customer: str, at: int, plan: str | None = None, *, at_period_end: bool = False) -> None:
    ev = SubscriptionEvent(kind, customer, at, plan_id=plan, at_period_end=at_period_end)
    ch.insert("subscription_events", [subscription_row(ev)], column_names=list(SUBSCRIPTION_COLUMNS))


def tokens(usage: Usage, customer: str, at: int, n: int) -> None:
    """``n`` tokens (half input, half output) at instant ``at``; the charge does not matter to plans."""
    usage.add(customer, at, 1_000_000, input_tokens=n // 2, output_tokens=n - n // 2)


def close_period(ls: LocalStripe, target: StripeTarget, ch: Any, cfg: BillingConfig, end: int) -> None:
    """What an operator's schedule does: sync before the period ends, then in the draft hour after it
    (usage, plan changes, true-ups), then Stripe finalizes."""
    ls.set_clock(end - 60)
    assert sync(target, ch, cfg, now=ls.now()).ok
    ls.set_clock(end + 120)  # the period closed: a draft invoice, still in its grace hour
    summary = sync(target, ch, cfg, now=ls.now())
    assert summary.ok, (summary.unmapped, summary.failed)
    ls.close_periods(finalize=True)


def stripe_total(client: stripe.StripeClient, target_customer: str, ch: Any, start: int, end: int) -> int:
    sub = ch.query(
        "SELECT subscription_id FROM stripe_customers FINAL WHERE customer_id = {c:String}",
        parameters={"c": target_customer},
    ).result_rows[0][0]
    return stripe_period_cents(client, sub, start, end)


def preview(ch: Any, customer: str, month: str) -> dict[str, Any]:
    return bill_preview(ch, customer, month)


def start(ls: LocalStripe, ch: Any, cfg: BillingConfig, target: StripeTarget, subs: dict[str, str]) -> None:
    setup_plans(ch)
    ls.set_clock(NOV)
    for customer, plan in subs.items():
        fact(ch, "subscribed", customer, NOV, plan)
    provision(target.client(), ch, cfg, now=ls.now())


def test_included_usage_and_overage_200_and_260(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    start(ls, clickhouse, cfg, target, {"acme": "pro", "globex": "pro"})
    client = target.client()
    for h in range(7):
        tokens(usage, "acme", NOV + (h + 1) * HOUR, 1_000_000)  # 7M: inside the 10M allowance
    for h in range(12):
        tokens(usage, "globex", NOV + (h + 1) * HOUR, 1_000_000)  # 12M: 2M over at $30/M
    close_period(ls, target, clickhouse, cfg, DEC)
    acme, globex = preview(clickhouse, "acme", "2026-11"), preview(clickhouse, "globex", "2026-11")
    assert (acme["total"], globex["total"]) == ("200.00", "260.00")
    assert [(a["included"], a["used"], a["remaining"]) for a in acme["allowances"]] == [
        (10_000_000, 7_000_000, 3_000_000)
    ]
    assert stripe_total(client, "acme", clickhouse, NOV, DEC) == to_cents(Decimal(acme["total"])) == 20_000
    assert stripe_total(client, "globex", clickhouse, NOV, DEC) == to_cents(Decimal(globex["total"])) == 26_000
    # the Stripe side is what Stripe computed: a 10M free first tier, then $30/M, on the plan meter
    sub = client.v1.subscriptions.retrieve(
        clickhouse.query("SELECT subscription_id FROM stripe_customers FINAL WHERE customer_id = 'globex'").result_rows[
            0
        ][0],
        {"expand": ["items.data.price.tiers"]},
    )
    usage_item = next(i for i in sub["items"].data if i.price.recurring.usage_type == "metered")
    assert [(t.up_to, t.unit_amount_decimal) for t in usage_item.price.tiers] == [
        (10_000_000, Decimal("0")),
        (None, Decimal("0.003")),
    ]
    meter = client.v1.billing.meters.retrieve(usage_item.price.recurring.meter)
    assert meter.event_name == PLAN_EVENT
    # `meterline statement` carries the plan lines
    st = build_statement(clickhouse, "globex", NOV, DEC)
    assert st.plan_total == Decimal("260.00")
    assert [(pl.kind, pl.amount) for pl in st.plan_lines if pl.amount] == [("fee", 200), ("overage", 60)]
    csv_text = render_csv(st)
    assert "period_start,kind,description,quantity,unit_price,amount" in csv_text and "total" in csv_text
    assert "<h2>Plan</h2>" in render_html(st)


def test_flat_plan_bills_its_fee_whatever_the_usage(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    start(ls, clickhouse, cfg, target, {"flat-heavy": "flat", "flat-idle": "flat"})
    for h in range(5):
        tokens(usage, "flat-heavy", NOV + (h + 1) * HOUR, 3_000_000)  # 15M on a 1M allowance, overage "0"
    close_period(ls, target, clickhouse, cfg, DEC)
    for customer in ("flat-heavy", "flat-idle"):
        bill = preview(clickhouse, customer, "2026-11")
        assert bill["total"] == "25.00", customer
        assert stripe_total(target.client(), customer, clickhouse, NOV, DEC) == 2_500


def test_block_plan_writes_off_what_got_past_the_gate(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    """A ``block`` plan stops the customer at the allowance; usage in flight past it (within the
    published bound) is written off by meterline's bill, and priced at 0 by the Stripe overage tier."""
    start(ls, clickhouse, cfg, target, {"blocked": "capped"})
    tokens(usage, "blocked", NOV + HOUR, 2_000_000)
    tokens(usage, "blocked", NOV + 2 * HOUR, 3_000)  # got past the gate while the allowance ran out
    close_period(ls, target, clickhouse, cfg, DEC)
    bill = preview(clickhouse, "blocked", "2026-11")
    assert bill["total"] == "50.00" and "blocked" in [ln["kind"] for ln in bill["lines"]]
    assert stripe_total(target.client(), "blocked", clickhouse, NOV, DEC) == 5_000


def test_a_plan_stripe_cannot_express_is_reported_not_guessed(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, cfg: BillingConfig
) -> None:
    """A cap on overage has no Stripe price: provision reports it and creates nothing for that
    customer (never a subscription that would bill something else); the other customer is mapped."""
    setup_plans(clickhouse)
    ls.set_clock(NOV)
    fact(clickhouse, "subscribed", "capped-co", NOV, "capx")
    fact(clickhouse, "subscribed", "ok-co", NOV, "pro")
    report = provision(target.client(), clickhouse, cfg, now=ls.now())
    assert any("capped-co" in w and "cap" in w for w in report.warnings), report.warnings
    assert "subscription:ok-co" in report.created and "subscription:capped-co" not in report.created
    summary = sync(target, clickhouse, cfg, now=ls.now())
    assert not summary.ok and any("capped-co" in u for u in summary.unmapped)


def test_cancel_at_period_end(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    """``meterline plans cancel --at-period-end``: Stripe's ``cancel_at_period_end`` ("cancel at the
    end of the current period"): the last invoice bills the period's usage and no next fee."""
    start(ls, clickhouse, cfg, target, {"leaving": "pro"})
    for h in range(12):
        tokens(usage, "leaving", NOV + (h + 1) * HOUR, 1_000_000)
    ls.set_clock(NOV + 10 * 86400)
    fact(clickhouse, "cancelled", "leaving", NOV + 10 * 86400, at_period_end=True)
    close_period(ls, target, clickhouse, cfg, DEC)
    assert preview(clickhouse, "leaving", "2026-11")["total"] == "260.00"
    client = target.client()
    assert stripe_total(client, "leaving", clickhouse, NOV, DEC) == 26_000
    sub = clickhouse.query(
        "SELECT subscription_id FROM stripe_customers FINAL WHERE customer_id = 'leaving'"
    ).result_rows[0][0]
    assert client.v1.subscriptions.retrieve(sub).status == "canceled"
    assert stripe_period_cents(client, sub, DEC, DEC + 31 * 86400) == 0  # no December fee


def test_minimum_commitment_trues_up(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    start(ls, clickhouse, cfg, target, {"small": "commit", "big": "commit"})
    tokens(usage, "small", NOV + HOUR, 1_234_567)  # $37.03701 of usage: trued up to $100
    for h in range(4):
        tokens(usage, "big", NOV + (h + 1) * HOUR, 1_000_000)  # $120: above the commitment
    close_period(ls, target, clickhouse, cfg, DEC)
    small, big = preview(clickhouse, "small", "2026-11"), preview(clickhouse, "big", "2026-11")
    assert small["total"] == "100.00" and big["total"] == "120.00"
    assert [ln["kind"] for ln in small["lines"]].count("minimum_commitment") == 1
    client = target.client()
    assert stripe_total(client, "small", clickhouse, NOV, DEC) == 10_000
    assert stripe_total(client, "big", clickhouse, NOV, DEC) == 12_000
    items = client.v1.invoice_items.list({"limit": 100}).data
    assert [ii.description for ii in items] == ["minimum commitment true-up"]  # only "small" needed one
    assert sync(target, clickhouse, cfg, now=ls.now()).true_ups == []  # idempotent


def test_graduated_and_volume_tiers(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    start(ls, clickhouse, cfg, target, {"g": "grad", "v": "vol"})
    for h in range(4):  # 4.5M each
        tokens(usage, "g", NOV + (h + 1) * HOUR, 1_125_000)
        tokens(usage, "v", NOV + (h + 1) * HOUR, 1_125_000)
    close_period(ls, target, clickhouse, cfg, DEC)
    g, v = preview(clickhouse, "g", "2026-11"), preview(clickhouse, "v", "2026-11")
    # graduated: 1M free, then 2M at $30/M and 1.5M at $20/M, plus the $10 fee
    assert Decimal(g["total"]) == Decimal("10") + 2 * Decimal(30) + Decimal("1.5") * 20
    # volume: all 4.5M at the rate of the tier 4.5M falls in ($20/M)
    assert Decimal(v["total"]) == Decimal("4.5") * 20
    client = target.client()
    assert stripe_total(client, "g", clickhouse, NOV, DEC) == to_cents(Decimal(g["total"]))
    assert stripe_total(client, "v", clickhouse, NOV, DEC) == to_cents(Decimal(v["total"]))


def test_mid_period_upgrade_prorates_fee_and_allowance(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    """Fee: Stripe's documented proration by seconds at ``proration_date``. Allowance: each segment
    bills on a price whose free tier is its prorated share; this relies on a replaced metered
    price's usage being cut at ``proration_date`` too (docs/stripe.md, "What the change mapping
    assumes": not verified against live Stripe)."""
    start(ls, clickhouse, cfg, target, {"up": "basic"})
    client = target.client()
    change = NOV + 15 * 86400  # exactly half of the 30-day period
    for h in range(3):
        tokens(usage, "up", NOV + (h + 1) * HOUR, 500_000)  # 1.5M on basic; its half allowance is 500k
    ls.set_clock(change - 60)
    assert sync(target, clickhouse, cfg, now=ls.now()).ok  # the usage before the change is reported
    ls.set_clock(change + 600)
    fact(clickhouse, "changed", "up", change, "pro")
    tokens(usage, "up", change + 1, 2_000_000)  # same hour as the change: the bucket is cut at the change
    for h in range(4):
        tokens(usage, "up", change + (h + 1) * HOUR, 1_000_000)  # 6M on pro; its half allowance is 5M
    summary = sync(target, clickhouse, cfg, now=ls.now())
    assert summary.ok and summary.plan_updates, summary
    close_period(ls, target, clickhouse, cfg, DEC)
    bill = preview(clickhouse, "up", "2026-11")
    # fee 100 x 1/2 + 200 x 1/2; basic 1M over its prorated 500k at $40/M; pro 1M over 5M at $30/M
    assert Decimal(bill["total"]) == 50 + 100 + 40 + 30
    assert [(a["plan"], a["included"]) for a in bill["allowances"]] == [("basic@1", 500_000), ("pro@1", 5_000_000)]
    assert stripe_total(client, "up", clickhouse, NOV, DEC) == to_cents(Decimal(bill["total"]))
    # what Stripe did: credit half the basic fee, charge half the pro fee, by seconds
    sub = clickhouse.query("SELECT subscription_id FROM stripe_customers FINAL WHERE customer_id = 'up'").result_rows[
        0
    ][0]
    prorations = sorted(
        ln.amount
        for inv in client.v1.invoices.list({"subscription": sub}).data
        for ln in inv.lines.data
        if ln.parent.invoice_item_details and ln.parent.invoice_item_details.proration
    )
    assert prorations == [-5_000, 10_000]
    assert calendar.monthrange(2026, 11)[1] == 30
    # the next period is a full pro period again: sync put the 10M price back at its start
    jan = DEC + 31 * 86400
    for h in range(11):
        tokens(usage, "up", DEC + (h + 1) * HOUR, 1_000_000)
    close_period(ls, target, clickhouse, cfg, jan)
    december = preview(clickhouse, "up", "2026-12")
    assert december["total"] == "230.00"  # $200 + 1M over 10M at $30/M
    assert stripe_total(client, "up", clickhouse, DEC, jan) == 23_000
    assert not [r for r in reconcile(client, clickhouse, cfg, NOV, jan) if r.drifted]


def test_cli_provision_sync_statement_with_a_plan(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, clickhouse_dsn: str, usage: Usage, tmp_path: Any
) -> None:
    """The commands themselves (in-process, as test_cli_statement does): no --now, so they read the
    local server's clock; the plan customer gets the plan subscription, never the pay-per-token one."""
    import typer
    from typer.testing import CliRunner

    from meterline.shell.cli_stripe import statement_command, stripe_app

    app = typer.Typer()
    app.add_typer(stripe_app, name="stripe")
    app.command("statement")(statement_command)
    env = {
        "METERLINE_CLICKHOUSE_DSN": clickhouse_dsn,
        "METERLINE_STRIPE_BASE_URL": ls.url,
        "METERLINE_DATA_DIR": str(tmp_path),
        "METERLINE_STRIPE_API_KEY": "",
    }
    setup_plans(clickhouse)
    ls.set_clock(NOV)
    fact(clickhouse, "subscribed", "acme", NOV, "pro")
    for h in range(12):
        tokens(usage, "acme", NOV + (h + 1) * HOUR, 1_000_000)
    runner = CliRunner()
    r = runner.invoke(app, ["stripe", "provision"], env=env)
    assert r.exit_code == 0 and "subscription:acme" in r.output, r.output
    for at in (DEC - 60, DEC + 120):
        ls.set_clock(at)
        r = runner.invoke(app, ["stripe", "sync", "--no-progress"], env=env)
        assert r.exit_code == 0, r.output
    ls.close_periods(finalize=True)
    client = target.client()
    (cus,) = client.v1.customers.list().data
    assert [
        s.metadata.to_dict().get("meterline_plan") for s in client.v1.subscriptions.list({"customer": cus.id}).data
    ] == ["pro@1"]
    assert stripe_total(client, "acme", clickhouse, NOV, DEC) == 26_000
    r = runner.invoke(app, ["statement", "acme", "--period", "2026-11", "--format", "csv"], env=env)
    assert r.exit_code == 0 and "period_start,kind,description,quantity,unit_price,amount" in r.output
    assert r.output.rstrip().splitlines()[-1].endswith(",260.00")


def test_usage_price_shapes() -> None:
    """Each plan shape's Stripe usage price (pure): free first tier + shifted overage tiers, per-unit
    without allowance, volume tiers as they are, free overage on a block plan, in cents per token."""
    from jobs.stripe.plans import NotMappable, check_mappable, usage_price_params

    catalog = {v.plan_id: v for v in load_plan_catalog(PLANS).versions}
    assert usage_price_params(catalog["pro"], 10_000_000) == {
        "billing_scheme": "tiered",
        "tiers_mode": "graduated",
        "tiers": [{"up_to": 10_000_000, "unit_amount_decimal": "0"}, {"up_to": "inf", "unit_amount_decimal": "0.003"}],
    }
    assert usage_price_params(catalog["pro"], 0) == {"billing_scheme": "per_unit", "unit_amount_decimal": "0.003"}
    assert usage_price_params(catalog["grad"], 1_000_000)["tiers"] == [
        {"up_to": 1_000_000, "unit_amount_decimal": "0"},
        {"up_to": 3_000_000, "unit_amount_decimal": "0.003"},
        {"up_to": "inf", "unit_amount_decimal": "0.002"},
    ]
    assert usage_price_params(catalog["vol"], 0) == {
        "billing_scheme": "tiered",
        "tiers_mode": "volume",
        "tiers": [
            {"up_to": 2_000_000, "unit_amount_decimal": "0.003"},
            {"up_to": "inf", "unit_amount_decimal": "0.002"},
        ],
    }
    assert {t["unit_amount_decimal"] for t in usage_price_params(catalog["capped"], 2_000_000)["tiers"]} == {"0"}
    for ok in ("pro", "flat", "grad", "vol", "capped", "commit"):
        check_mappable(catalog[ok], "usd")
    with pytest.raises(NotMappable):
        check_mappable(catalog["capx"], "usd")
    with pytest.raises(NotMappable):
        check_mappable(catalog["pro"], "eur")
