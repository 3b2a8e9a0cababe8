"""The credits and Stripe oracles and checks are not vacuous (no broker: fake stores)."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

from devtools.verify import (
    CreditPlan,
    Expected,
    StripeUnits,
    expected_stripe_units,
    ledger_check,
    make_events,
    plan_credits,
    stripe_deltas,
)


def test_plan_outcomes_follow_the_policies() -> None:
    d = Decimal
    assert CreditPlan("a", d("10"), "block").outcome(d("12.5")) == CreditPlan("a", d("10"), None).outcome(
        d("12.5")
    )  # the default once granted is block
    o = CreditPlan("a", d("10"), "block").outcome(d("12.5"))
    assert (o.grant_debits, o.overage, o.remaining, o.status, o.reason) == (
        d("10"),
        d("2.5"),
        0,
        "blocked",
        "credit_exhausted",
    )
    assert CreditPlan("a", d("10"), "allow").outcome(d("12.5")).status == "active"
    assert CreditPlan("a", None, None).outcome(d("3")).overage == d("3")  # no grant: default allow
    assert CreditPlan("a", d("10"), "credit_limit", d("2.5")).outcome(d("12.5")).reason == "credit_limit_reached"
    assert CreditPlan("a", d("10"), "credit_limit", d("2.51")).outcome(d("12.5")).status == "active"
    plans = plan_credits(random.Random(1), {"acme": d("100"), "globex": d("50")}, ["acme", "globex"])
    assert all(p.grant is not None and p.grant == p.grant.quantize(d("0.01")) for p in plans)


def test_stripe_units_floor_per_window_and_carry_across_windows_and_runs() -> None:
    exp = Expected()
    events = make_events(random.Random(3), 40)
    exp.add_priced(events)
    until = max(exp.occurred_ms.values()) // 1000 // 3600 * 3600 + 3600
    units = expected_stripe_units(exp, window=3600, until=until)
    for c, per in units.items():  # Σ pushed = floor(Σ charge in micro-units): less than 1 µ$ outstanding
        total = sum(ch for (cc, _), (_, ch) in exp.priced.items() if cc == c)
        assert sum(per.values()) == int((total * 10**6).to_integral_value(rounding="ROUND_FLOOR"))
    # late usage: a second plan pushes only the growth, and the totals stay floor(Σ)
    s = StripeUnits(3600)
    first = Expected()
    first.add_priced(events[:20])
    s.plan(first, until)
    first.add_priced(events[20:])
    s.plan(first, until)
    assert {c: sum(v.values()) for c, v in s.units.items()} == {c: sum(v.values()) for c, v in units.items()}
    assert stripe_deltas(units, units) == []
    c = sorted(units)[0]
    ws = sorted(units[c])[0]
    off = {k: dict(v) for k, v in units.items()}
    off[c][ws] += 1  # one micro-dollar too many in one window
    assert [d.subject for d in stripe_deltas(units, off)] == [f"{c} total", f"{c} window {ws}"]


def test_ledger_check_sees_a_missing_overage_debit() -> None:
    exp = Expected()
    exp.add_priced(make_events(random.Random(5), 12))
    totals = {c: t[2] for c, t in exp.per_customer().items()}
    exp.credit_plans = {c: CreditPlan(c, Decimal("0.01"), "allow") for c in totals}
    victim = sorted(totals)[0]

    def query(sql: str) -> list[tuple[Any, ...]]:
        if "FROM ledger_entries FINAL GROUP BY customer_id" in sql:
            out = []
            for c, charge in totals.items():
                overage = charge - Decimal("0.01") - (Decimal("0.000001") if c == victim else 0)
                out.append((c, Decimal("0.01"), overage, Decimal("0.01"), 3, 3, 3, 0))
            return out
        if "FROM usage_priced FINAL GROUP BY" in sql:
            return list(totals.items())
        if "HAVING" in sql:
            return [(0,)]
        return []

    deltas = ledger_check(query, exp)
    assert {d.subject for d in deltas} == {
        f"{victim} debits + overage vs usage_priced",
        f"{victim} debits + overage vs oracle",
        f"{victim} overage",
    }
