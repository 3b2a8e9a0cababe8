"""Reserve-then-settle holds for POST /v1/authorize and the overspend bound."""

from __future__ import annotations

import random

from meterline.core.ledger import (
    Budget,
    ExpireDue,
    GrantScope,
    Policy,
    SetBlock,
    SetBudget,
    apply,
    authorize,
    balance_view,
    new_ledger,
)

from .helpers import CUST, MIN, grant, p, run, usage


def _auth(s, rid, est, now, **kw):  # type: ignore[no-untyped-def]
    return authorize(s, rid, p(est), now, provider=kw.pop("provider", "openai"), model="m", **kw)


def test_fifty_interleaved_authorizations_never_reserve_beyond_available() -> None:
    rng = random.Random(7)
    s, _ = run(new_ledger(CUST, "usd"), grant("a", "1.00", prio=1), grant("b", "2.50", prio=2))
    start_available = p("3.50")
    open_holds: dict[str, int] = {}
    settled_actual = 0
    t = 1000
    for i in range(50):
        t += 100
        est = p(f"{rng.randint(1, 90)}e-2")
        s, d = authorize(s, f"r{i}", est, t, provider="openai", model="m")
        if d.allowed:
            assert d.hold is not None and d.hold.amount_picos == est and d.hold.overage_picos == 0
            open_holds[f"r{i}"] = est
        else:
            assert d.reason == "insufficient_credit" and d.available_picos < est
        # bound: everything reserved + everything settled never exceeds the starting credit
        assert sum(open_holds.values()) + settled_actual <= start_available
        assert sum(h.amount_picos for h in s.holds.values()) == sum(open_holds.values())
        if open_holds and rng.random() < 0.4:  # some requests finish, interleaved with new ones
            rid = rng.choice(sorted(open_holds))
            est_r = open_holds.pop(rid)
            actual = rng.randint(0, est_r)  # actual ≤ estimate
            s, eff = apply(s, usage(f"ev_{rid}", f"{actual}e-12", t, request_id=rid))
            settled_actual += actual
    assert s.overage_picos == 0  # actual ≤ estimate => never any overage
    assert s.grants["a"].remaining + s.grants["b"].remaining == start_available - settled_actual


def test_settlement_can_exceed_hold_by_only_that_requests_excess() -> None:
    s, _ = run(new_ledger(CUST, "usd"), grant("g", "1.00"))
    s, d1 = _auth(s, "r1", "0.60", 1000)
    s, d2 = _auth(s, "r2", "0.40", 1000)
    s, d3 = _auth(s, "r3", "0.01", 1000)
    assert d1.allowed and d2.allowed and not d3.allowed
    assert balance_view(s, 1000)["available"] == "0.00" and balance_view(s, 1000)["held"] == "1.00"
    s, (e1,) = run(s, usage("u1", "0.75", 1500, request_id="r1"))  # 0.15 over its estimate
    # r1 takes its own 0.60 plus 0.15 reserved by r2 (usage is a fact)
    assert sum(e.amount_picos for e in e1.entries if e.grant_id == "g") == p("0.75")
    s, (e2,) = run(s, usage("u2", "0.40", 1600, request_id="r2"))
    assert s.overage_picos == p("0.15")  # = actual − estimate of r1, nothing more
    assert s.holds == {}


def test_hold_ttl_and_idempotent_authorize_and_late_settlement() -> None:
    s, _ = run(new_ledger(CUST, "usd"), grant("g", "1"))
    s, d = _auth(s, "r1", "0.80", 0, ttl_ms=MIN)
    s, again = _auth(s, "r1", "0.80", 10)
    assert again.allowed and again.reason == "existing_hold" and again.hold == d.hold
    s, d2 = _auth(s, "r2", "0.50", 20)
    assert not d2.allowed
    s, (eff,) = run(s, ExpireDue(now_ms=MIN))
    assert s.holds == {} and balance_view(s, MIN)["available"] == "1.00"
    s, d3 = _auth(s, "r2", "0.50", MIN + 1)
    assert d3.allowed
    s, _ = run(s, usage("late", "0.30", MIN + 2, request_id="r1"))  # hold already expired: plain debit
    assert s.grants["g"].remaining == p("0.70") and set(s.holds) == {"r2"}


def test_authorize_respects_scope_blocks_budgets_and_policies() -> None:
    s, _ = run(
        new_ledger(CUST, "usd"),
        grant("anth", "5", scope=GrantScope(providers=frozenset({"anthropic"}))),
        grant("any", "1"),
    )
    s, d = _auth(s, "r1", "2", 0, provider="openai")
    assert not d.allowed and d.reason == "insufficient_credit" and d.available_picos == p("1")
    s, d = _auth(s, "r2", "2", 0, provider="anthropic")
    assert d.allowed and d.hold is not None and d.hold.allocations == (("anth", p("2")),)
    s, _ = run(s, SetBlock(scope="api_key:k9", blocked=True, at_ms=1))
    s, d = _auth(s, "r3", "0.1", 2, api_key_id="k9")
    assert (d.allowed, d.reason) == (False, "manual")
    s, _ = run(s, SetBudget(budget=Budget("pa", "project", "a", "day", p("1"), hard=True), at_ms=3))
    s, d = _auth(s, "r4", "0.6", 4, project="a")
    assert d.allowed
    s, d = _auth(s, "r5", "0.6", 5, project="a")  # 0.6 held + 0.6 > 1.00 budget
    assert (d.allowed, d.reason) == (False, "budget_exceeded")
    c = new_ledger(CUST, "usd", Policy(overage="credit_limit", credit_limit_picos=p("1")))
    c, d = _auth(c, "r1", "0.7", 0)
    assert d.allowed and d.hold is not None and d.hold.overage_picos == p("0.7")
    c, d = _auth(c, "r2", "0.7", 0)
    assert (d.allowed, d.reason) == (False, "credit_limit_reached")
    a = new_ledger(CUST, "usd", Policy(overage="allow"))
    a, d = _auth(a, "r1", "1000", 0)
    assert d.allowed
    b = new_ledger(CUST, "usd")
    b, d = _auth(b, "r1", "0", 0)
    assert (d.allowed, d.reason) == (False, "credit_exhausted")
