"""Threshold alerts (once per crossing), budgets, runaway-loop guard."""

from __future__ import annotations

from meterline.core.ledger import (
    Budget,
    ExpireDue,
    Policy,
    SetBlock,
    SetBudget,
    VelocityRule,
    apply,
    authorize,
    balance_view,
    new_ledger,
    status_of,
)

from .helpers import CUST, DAY, MIN, grant, p, run, usage


def _alerts(effs):  # type: ignore[no-untyped-def]
    return [a for e in effs for a in e.alerts]


def test_credit_thresholds_fire_once_per_crossing_and_rearm_after_top_up() -> None:
    s = new_ledger(CUST, "usd", Policy(overage="allow", low_balance_picos=(p("1"),)))
    s, _ = run(s, grant("g", "10"))
    effs = []
    for i in range(12):
        s, e = apply(s, usage(f"e{i}", "0.50", 1000 + i))
        effs.append(e)
    # 6.00 used of 10: 50 % once
    assert [(a.kind, a.threshold, a.alert_id) for a in _alerts(effs)] == [
        ("credit_used", 50, f"{CUST}/credit_used:50/1")
    ]
    s, e1 = run(s, usage("e12", "2.00", 2000))  # 8.00 -> 80 %
    s, e2 = run(s, usage("e13", "1.50", 2001))  # 9.50 -> low balance (0.50 < 1)
    s, e3 = run(s, usage("e14", "1.00", 2002))  # 10 used + 0.50 overage -> 100 %
    assert [a.alert_id for a in _alerts(e1 + e2 + e3)] == [
        f"{CUST}/credit_used:80/1",
        f"{CUST}/low_balance:{p('1')}/1",
        f"{CUST}/credit_used:100/1",
    ]
    s, e4 = run(s, usage("e15", "1.00", 2003))
    assert _alerts(e4) == []  # still above: no repeat
    # top-up of 10 -> granted 20, used 10 = 50 %: 80/100/low re-arm, 50 stays fired
    s, e5 = run(s, grant("t", "10", topup=True, at=3000))
    assert _alerts(e5) == []
    s, e6 = run(s, usage("e16", "6.00", 3001))  # 16/20 = 80 % again -> second crossing
    assert [a.alert_id for a in _alerts(e6)] == [f"{CUST}/credit_used:80/2"]


def test_soft_and_hard_budgets_by_utc_day() -> None:
    s = new_ledger(CUST, "usd", Policy(overage="allow"))
    s, _ = run(
        s,
        SetBudget(budget=Budget("soft_m", "customer", None, "month", p("5"), alert_pcts=(50, 100)), at_ms=0),
        SetBudget(budget=Budget("k1_day", "api_key", "k1", "day", p("2"), hard=True), at_ms=0),
    )
    day1 = 20 * DAY + 1000
    s, e = run(
        s,
        usage("a", "1.5", day1, key="k1"),
        usage("b", "1.0", day1 + 1, key="k2"),
        usage("c", "0.5", day1 + 2, key="k1"),
    )
    kinds = [(a.alert_id, a.scope) for a in _alerts(e)]
    assert kinds == [
        (f"{CUST}/budget:soft_m:1970-01:50", "customer"),  # 2.50 of 5 after event b
        (f"{CUST}/budget:k1_day:1970-01-21:80", "api_key:k1"),  # event c: 2.00 of 2 crosses 80 and 100
        (f"{CUST}/budget:k1_day:1970-01-21:100", "api_key:k1"),
    ]
    changes = [(c.scope, c.reason, c.blocked) for x in e for c in x.status_changes]
    assert changes == [("api_key:k1", "budget_exceeded", True)]
    assert status_of(s, "api_key:k1")["reason"] == "budget_exceeded" and status_of(s) == {"state": "active"}
    s, d = authorize(s, "r", p("0.01"), day1 + 3, provider="x", model="y", api_key_id="k1")
    assert (d.allowed, d.reason) == (False, "budget_exceeded")
    s, d = authorize(s, "r2", p("0.01"), day1 + 3, provider="x", model="y", api_key_id="k2")
    assert d.allowed
    # next UTC day: the hard block lifts by itself
    s, e = run(s, ExpireDue(now_ms=21 * DAY))
    assert [(c.scope, c.blocked) for c in e[0].status_changes] == [("api_key:k1", False)]
    v = balance_view(s, 21 * DAY)
    assert {b["budget_id"]: b["spent"] for b in v["budgets"]} == {"k1_day": "0.00", "soft_m": "3.00"}


def test_runaway_spike_fires_exactly_one_alert_and_blocks_the_key() -> None:
    rule = VelocityRule(
        window_ms=MIN,
        bucket_ms=10_000,
        baseline_ms=30 * MIN,
        abs_cap_picos=p("5"),
        baseline_multiple=10,
        min_picos=p("1"),
        block=True,
    )
    s = new_ledger(CUST, "usd", Policy(overage="allow", runaway_api_key=rule))
    t = 0
    effs = []
    for i in range(60):  # steady: 0.05 every 30 s (0.10 / min) for 30 min
        t += 30_000
        s, e = apply(s, usage(f"s{i}", "0.05", t, key="k1"))
        effs.append(e)
    assert _alerts(effs) == []
    spike = []
    for i in range(100):  # a loop: 0.05 every 100 ms
        t += 100
        s, e = apply(s, usage(f"x{i}", "0.05", t, key="k1"))
        spike.append(e)
    alerts = _alerts(spike)
    assert len(alerts) == 1
    (a,) = alerts
    assert (a.kind, a.scope, a.alert_id) == ("runaway", "api_key:k1", f"{CUST}/runaway:api_key:k1/1")
    # multiple rule (> 10 × 0.10/min baseline, ≥ 1.00) trips before the 5.00 absolute cap
    assert p("1") <= a.value_picos <= p("5")
    changes = [(c.scope, c.reason, c.blocked) for e in spike for c in e.status_changes]
    assert changes == [("api_key:k1", "runaway_guard", True)]
    s, d = authorize(s, "r", p("0.01"), t, provider="x", model="y", api_key_id="k1")
    assert (d.allowed, d.reason) == (False, "runaway_guard")
    # quiet again: re-armed; the block stays until an operator lifts it
    s, e = run(s, ExpireDue(now_ms=t + 40 * MIN))
    assert s.alert_tracks["runaway:api_key:k1"] == (1, False) and "api_key:k1" in s.blocks
    s, e = run(s, SetBlock(scope="api_key:k1", blocked=False, reason="runaway_guard", at_ms=t + 40 * MIN))
    assert [(c.reason, c.blocked) for c in e[0].status_changes] == [("runaway_guard", False)]
    assert "api_key:k1" not in s.blocks


def test_absolute_cap_without_baseline() -> None:
    rule = VelocityRule(window_ms=MIN, bucket_ms=10_000, baseline_ms=10 * MIN, abs_cap_picos=p("1"))
    s = new_ledger(CUST, "usd", Policy(overage="allow", runaway_customer=rule))
    s, e = run(s, *[usage(f"e{i}", "0.30", 1000 + i) for i in range(6)])
    alerts = _alerts(e)
    assert [(a.scope, a.value_picos) for a in alerts] == [("customer", p("1.20"))]
    assert status_of(s) == {"state": "active"}  # block=False: alert only
