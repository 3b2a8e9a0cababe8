"""Rating: the issue's numeric cases, tiers as Stripe computes them, proration, true-up, caps."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

from meterline.core.plans import (
    PICOS_PER_UNIT,
    SubscriptionEvent,
    Usage,
    fold_timeline,
    overage_price,
    rate_period,
)
from tests.plans.helpers import JAN, M, catalog, plan, subscribed, tokens, ts

D = PICOS_PER_UNIT


def _bill(cat, usage, timeline=None, at=JAN, **kw):
    tl = timeline or subscribed(cat)
    period = tl.period_at(ts(at))
    assert period is not None
    return rate_period(period, [usage] if len(period.segments) == 1 else usage, **kw)


def test_200_plan_7m_tokens_bills_the_fee_and_reports_3m_unused() -> None:
    bill = _bill(catalog(), [tokens(4 * M, 3 * M)])
    assert bill.total == Decimal("200.00")
    assert [a.to_json() for a in bill.allowances] == [
        {
            "id": "tokens",
            "plan": "pro@1",
            "unit": "tokens",
            "included": 10 * M,
            "rolled_in": 0,
            "used": 7 * M,
            "remaining": 3 * M,
            "rollover_out": 0,
        }
    ]
    kinds = [line.kind for line in bill.lines]
    assert kinds == ["fee", "allowance"]
    assert bill.to_json()["period"] == {
        "start": "2026-01-01T00:00:00Z",
        "end": "2026-02-01T00:00:00Z",
        "stop": "2026-02-01T00:00:00Z",
    }


def test_200_plan_12m_tokens_bills_260() -> None:
    bill = _bill(catalog(), [tokens(5 * M, 4 * M), tokens(2 * M, 1 * M, model="gpt-4o-mini")])
    assert bill.total == Decimal("260.00")
    over = [line for line in bill.lines if line.kind == "overage"]
    assert len(over) == 1 and over[0].quantity == str(2 * M) and over[0].unit_price == "30"
    assert over[0].amount == 60 * D
    assert bill.allowances[0].remaining == 0 and bill.allowances[0].used == 10 * M


def test_tokens_outside_the_allowance_classes_are_overage() -> None:
    bill = _bill(catalog(), [tokens(1 * M, 0, cached_input=2 * M)])
    assert bill.amount_of("overage") == 60 * D
    assert bill.allowances[0].used == 1 * M


def test_flat_plan_bills_its_fee_whatever_the_usage() -> None:
    cat = catalog(plan(fee="25.00", allowances=[], overage={"per_million": "0"}))
    for usage in ([], [tokens(0)], [tokens(10**12, 10**12, cached_input=5 * 10**11)]):
        assert _bill(cat, usage).total == Decimal("25.00")


def test_minimum_commitment_trues_up() -> None:
    cat = catalog(plan(fee="0", allowances=[], overage={"per_million": "2.00"}, minimum_commitment="100.00"))
    low = _bill(cat, [tokens(10 * M)])  # $20 of usage
    assert low.amount_of("overage") == 20 * D
    assert low.amount_of("minimum_commitment") == 80 * D
    assert low.total == Decimal("100.00")
    high = _bill(cat, [tokens(60 * M)])  # $120 of usage: no true-up
    assert high.amount_of("minimum_commitment") == 0 and high.total == Decimal("120.00")


def test_commitment_counts_the_fee() -> None:
    cat = catalog(plan(minimum_commitment="250.00"))
    assert _bill(cat, [tokens(11 * M)]).total == Decimal("250.00")  # 200 + 30, trued up by 20
    assert _bill(cat, [tokens(13 * M)]).total == Decimal("290.00")


GRAD = {
    "tiers": {
        "mode": "graduated",
        "unit": "tokens",
        "steps": [
            {"up_to": 20_000_000, "per_million": "30"},
            {"up_to": 50_000_000, "per_million": "20"},
            {"up_to": None, "per_million": "10"},
        ],
    }
}
VOL = {
    "tiers": {
        "mode": "volume",
        "unit": "tokens",
        "steps": [
            {"up_to": 20_000_000, "per_million": "30"},
            {"up_to": 50_000_000, "per_million": "20"},
            {"up_to": None, "per_million": "10"},
        ],
    }
}


def test_graduated_tiers_price_each_band_at_its_rate() -> None:
    cat = catalog(plan(overage=GRAD))
    # 10M included, then 60M overage: 20M x 30 + 30M x 20 + 10M x 10 = 600 + 600 + 100
    bill = _bill(cat, [tokens(70 * M)])
    over = [(line.ref, line.quantity, line.amount // D) for line in bill.lines if line.kind == "overage"]
    assert over == [("tier 1", str(20 * M), 600), ("tier 2", str(30 * M), 600), ("tier 3", str(10 * M), 100)]
    assert bill.total == Decimal("1500.00")


def test_graduated_boundary_is_inclusive_like_stripe() -> None:
    ov = catalog(plan(overage=GRAD)).versions[0].overage
    assert overage_price(ov, 20 * M)[0] == 600 * D
    assert overage_price(ov, 20 * M + 1)[0] == 600 * D + 20 * 10**6  # one token at $20/M


def test_volume_tiers_price_everything_at_the_reached_tier() -> None:
    ov = catalog(plan(overage=VOL)).versions[0].overage
    assert overage_price(ov, 20 * M)[0] == 600 * D  # up_to inclusive: still tier 1
    assert overage_price(ov, 20 * M + 1)[0] == (20 * M + 1) * 20 * 10**6
    assert overage_price(ov, 60 * M)[0] == 600 * D  # 60M x $10
    bill = _bill(catalog(plan(overage=VOL)), [tokens(40 * M)])  # 30M overage at $20
    assert [(line.ref, line.amount // D) for line in bill.lines if line.kind == "overage"] == [("tier 2", 600)]
    assert bill.total == Decimal("800.00")


def test_rate_card_multiplier_overage_over_an_amount_allowance() -> None:
    cat = catalog(
        plan(fee="50.00", allowances=[{"id": "usage", "amount": "50.00"}], overage={"rate_card": {"multiplier": "1.2"}})
    )
    bill = _bill(cat, [Usage("openai", "gpt-4o", {"input": 1}, 80 * D)])
    assert bill.amount_of("overage") == 36 * D  # (80 - 50) x 1.2
    assert bill.total == Decimal("86.00")
    assert bill.allowances[0].to_json()["remaining"] == "0.00"


def test_model_scoped_allowance_leaves_other_models_to_overage() -> None:
    cat = catalog(
        plan(allowances=[{"id": "mini", "tokens": 5 * M, "models": [{"provider": "openai", "model": "gpt-4o-mini"}]}])
    )
    bill = _bill(cat, [tokens(4 * M, model="gpt-4o-mini"), tokens(1 * M, model="gpt-4o")])
    assert bill.allowances[0].used == 4 * M
    assert bill.amount_of("overage") == 30 * D


def test_cap_writes_off_overage_above_it() -> None:
    cat = catalog(plan(on_exhausted="cap", cap="45.00"))
    bill = _bill(cat, [tokens(12 * M)])  # $60 overage, capped at $45
    assert bill.amount_of("cap") == -15 * D and bill.total == Decimal("245.00")
    assert _bill(cat, [tokens(11 * M)]).total == Decimal("230.00")


def test_block_plan_invoices_no_overage_and_prepaid_pays_first() -> None:
    cat = catalog(plan(on_exhausted="block"))
    assert _bill(cat, [tokens(12 * M)]).total == Decimal("200.00")
    allow = catalog(plan())
    bill = _bill(allow, [tokens(12 * M)], prepaid=25 * D)
    assert bill.amount_of("prepaid_credit") == -25 * D and bill.total == Decimal("235.00")
    # prepaid credit pays overage only, never the fee
    assert _bill(allow, [tokens(1 * M)], prepaid=25 * D).total == Decimal("200.00")


def test_mid_period_upgrade_prorates_fee_and_allowance_by_seconds() -> None:
    cat = catalog(
        plan(),
        plan(id="max", fee="500.00", allowances=[{"id": "tokens", "tokens": 40 * M}], overage={"per_million": "20.00"}),
    )
    # April has 30 days: the change at noon on the 16th leaves exactly 15 days of each.
    start, change = "2026-04-01T00:00:00Z", "2026-04-16T00:00:00Z"
    tl = fold_timeline(
        "acme",
        [
            SubscriptionEvent("subscribed", "acme", ts(start), "pro"),
            SubscriptionEvent("changed", "acme", ts(change), "max"),
        ],
        cat,
    )
    period = tl.period_at(ts(change))
    assert period is not None and len(period.segments) == 2
    # first half: 6M used of the prorated 5M -> 1M overage at $30; second half: 21M of 20M -> 1M at $20
    bill = rate_period(period, [[tokens(6 * M)], [tokens(21 * M)]])
    fees = [line for line in bill.lines if line.kind == "fee"]
    assert [(f.plan, f.quantity, f.amount // D) for f in fees] == [
        ("pro@1", str(15 * 86400), 100),
        ("max@1", str(15 * 86400), 250),
    ]
    assert [(a.plan, a.included, a.used, a.remaining) for a in bill.allowances] == [
        ("pro@1", 5 * M, 5 * M, 0),
        ("max@1", 20 * M, 20 * M, 0),
    ]
    assert bill.amount_of("overage") == 50 * D
    assert bill.total == Decimal("400.00")


def test_non_terminating_proration_is_defined_at_the_pico_and_rounded_once() -> None:
    cat = catalog(
        plan(),
        plan(id="max", fee="500.00", allowances=[{"id": "tokens", "tokens": 40 * M}], overage={"per_million": "20.00"}),
    )
    tl = fold_timeline(
        "acme",
        [
            SubscriptionEvent("subscribed", "acme", ts(JAN), "pro"),
            SubscriptionEvent("changed", "acme", ts("2026-01-11T07:00:00Z"), "max"),
        ],
        cat,
    )
    period = tl.period_at(ts(JAN))
    bill = rate_period(period, [[], []])
    S = 31 * 86400
    s1 = 10 * 86400 + 7 * 3600
    fees = [line.amount for line in bill.lines if line.kind == "fee"]
    # defined to the nearest pico (ties to even), never a float
    assert fees == [round(Fraction(200 * D * s1, S)), round(Fraction(500 * D * (S - s1), S))]
    assert Fraction(200 * D * s1, S).denominator != 1  # really non-terminating
    assert bill.total == (Decimal(sum(fees)) / D).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    assert [a.included for a in bill.allowances] == [
        round(Fraction(10 * M * s1, S)),
        round(Fraction(40 * M * (S - s1), S)),
    ]


def test_cancel_mid_period_prorates_and_at_period_end_does_not() -> None:
    cat = catalog()
    tl = subscribed(cat, "acme", "pro", JAN, SubscriptionEvent("cancelled", "acme", ts("2026-01-16T12:00:00Z")))
    period = tl.period_at(ts(JAN))
    assert period is not None and period.stop == ts("2026-01-16T12:00:00Z")
    bill = rate_period(period, [[]])
    assert bill.total == Decimal("100.00")  # 15.5 of 31 days
    tl2 = subscribed(
        cat, "acme", "pro", JAN, SubscriptionEvent("cancelled", "acme", ts("2026-01-16T12:00:00Z"), at_period_end=True)
    )
    assert tl2.period_at(ts(JAN)).stop == ts("2026-02-01T00:00:00Z")
    assert tl2.period_at(ts("2026-02-02T00:00:00Z")) is None
    assert rate_period(tl2.period_at(ts(JAN)), [[]]).total == Decimal("200.00")


def test_rollover_carries_unused_up_to_max_and_does_not_compound() -> None:
    from meterline.core.plans import rate_periods

    cat = catalog(plan(allowances=[{"id": "tokens", "tokens": 10 * M, "rollover": {"max": 5 * M}}]))
    tl = subscribed(cat)
    periods = tl.periods(ts("2026-04-01T00:00:00Z"))
    assert [p.start for p in periods] == [
        ts("2026-01-01T00:00:00Z"),
        ts("2026-02-01T00:00:00Z"),
        ts("2026-03-01T00:00:00Z"),
    ]
    usage = {0: 2 * M, 1: 16 * M, 2: 0}
    bills = rate_periods(periods, lambda p: [[tokens(usage[p.index])]])
    # Jan: 8M unused -> 5M rolls; Feb: 15M available, 16M used -> 1M overage, nothing rolls
    assert bills[0].rollover_out == {"tokens": 5 * M}
    assert bills[1].allowances[0].rolled_in == 5 * M and bills[1].total == Decimal("230.00")
    assert bills[1].rollover_out == {"tokens": 0}
    assert bills[2].allowances[0].rolled_in == 0
    # rolled-in tokens are used first; only own unused rolls on
    bills = rate_periods(periods, lambda p: [[tokens({0: 0, 1: 3 * M, 2: 0}[p.index])]])
    assert bills[1].rollover_out == {"tokens": 5 * M} and bills[1].allowances[0].remaining == 12 * M


def test_zero_decimal_currency_rounds_to_whole_units() -> None:
    cat = catalog(plan(fee="1000", overage={"per_million": "0.5"}), currency="JPY")
    bill = _bill(cat, [tokens(10 * M + 1_000_001)])  # 1.000001M x 0.5 = 0.5000005 -> 1
    assert bill.currency == "JPY" and bill.total == Decimal("1001")
